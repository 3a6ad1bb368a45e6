r"""Compiled virtual updates of LARS and AdamW and the vector-Jacobian products of SGD, LARS and AdamW.

The ops of MetaMask's virtual step for the optimizers other than SGD (whose update is
:func:`metamask_fast.ops.virtual_sgd_step`) and of the mask's hypergradient ``u = J_Uᵀ v`` for all three
(:mod:`metamask_fast.optim` says which the step uses). Each is a kernel of ``metamask_fast._C`` (CPU always,
CUDA when built with a toolkit) and a ``torch._foreach`` fallback here, under the rules of
:mod:`metamask_fast.ops`: the public function checks its arguments (``TypeError``/``ValueError`` naming the
argument), then runs the compiled op when it can take the lists (dense tensors, one layout per list) and
the fallback otherwise; ``METAMASK_FAST_NO_EXT=1`` forces the fallbacks.

Every function returns new tensors, or, with ``out=`` (a list like the first list: shape, dtype, device and
layout), writes into those and returns them: keeping them from one step to the next saves allocating and
page-faulting fresh memory on every call, which costs more on the CPU than the sweep itself. ``out[i]``
must share no memory with any input nor with another ``out[j]`` (``ValueError``). Every gradient must be a
tensor: weights without one keep ``θ' = θ`` and are left out by the caller. Optional state (momentum
buffers, Adam's moments) is ``None`` before the optimizer's first step, read as zeros.

The arithmetic, per element in float32 for float32/float16/bfloat16 (float64 for float64), each result
rounded once, per-tensor scalars in float64 (``d`` below is ``g + wd·θ``, or ``g`` for a 1-d weight under
``weight_decay_filter``; the trust ratio ``q = eta·‖θ‖/‖d‖`` when both norms are > 0, else 1, and 1 for a
1-d weight under ``lars_adaptation_filter``):

- LARS: ``μ' = momentum·μ + q·d``, ``θ' = θ − lr·μ'``; VJP ``u = −lr·q·(v − d·⟨d,v⟩/‖d‖²)`` where the trust
  ratio applies and both norms are > 0, else ``u = −lr·v``. The norms and ``⟨d,v⟩`` are summed in float64
  in one pass before the update's pass; the compiled CUDA sums run in another order than the CPU's, so
  LARS agrees across devices to rounding.
- AdamW (step number ``k`` per weight, the state's step + 1): ``m = lerp(m₀, g, 1−β₁)``,
  ``s = β₂·s₀ + (1−β₂)·g·g``, ``θ' = θ·(1 − lr·wd) − (lr/b₁)·m / (√s/√b₂ + eps)`` with ``b_i = 1 − β_iᵏ``;
  VJP (a diagonal Jacobian) ``u = v·((1−β₁)/D − m·(1−β₂)·g/(b₂·σ·D²))·(−lr/b₁)``, ``σ = √s/√b₂``,
  ``D = σ + eps``, the second term 0 where ``σ = 0``.
- SGD's VJP: ``u = −lr·c·v`` with ``c`` the gradient's weight in the step (:func:`sgd_vjp`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from metamask_fast import ops
from metamask_fast._checks import check_number
from metamask_fast.ops import (
    _bump_versions,
    _check_like,
    _check_pairs,
    _check_separate_out,
    _check_tensor_list,
    _compiled,
    _kernel_devices,
)

__all__ = ["virtual_lars_step", "virtual_adamw_step", "sgd_vjp", "lars_vjp", "adamw_vjp", "sgd_vjp_factor"]

_DEVICES = {op: _kernel_devices(op) for op in ("virtual_lars_step", "virtual_adamw_step", "sgd_vjp", "lars_vjp",
                                               "adamw_vjp")}


# ---------------------------------------------------------------------------------------------- checks


def _check_optional(op: str, name: str, tensors: object, ref_name: str, ref: list[torch.Tensor]) -> list:
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(ref):
        raise ValueError(f"{op}: `{name}` must be a list as long as `{ref_name}` (None where absent)")
    for i, t in enumerate(tensors):
        if t is not None:
            _check_like(op, name, i, t, ref_name, ref[i])
    return list(tensors)


def _check_required(op: str, name: str, tensors: object, ref_name: str, ref: list[torch.Tensor]) -> list:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: `{name}` must be a list or tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if t is None:
            raise ValueError(f"{op}: {name}[{i}] is None; leave weights without a gradient out of the lists")
    _check_pairs(op, ref_name, ref, name, list(tensors))
    return [t.detach() for t in tensors]


def _check_steps(op: str, steps: object, ref: list[torch.Tensor]) -> list[float]:
    if not isinstance(steps, (list, tuple)) or len(steps) != len(ref):
        raise ValueError(f"{op}: `steps` must be a list as long as `params`")
    checked = [check_number(f"{op}: steps[{i}]", float(s) if isinstance(s, torch.Tensor) else s, minimum=1)
               for i, s in enumerate(steps)]
    return checked


def _check_paired_moments(op: str, exp_avgs: list, exp_avg_sqs: list) -> None:
    for i, (m, s) in enumerate(zip(exp_avgs, exp_avg_sqs)):
        if (m is None) != (s is None):
            raise ValueError(f"{op}: exp_avgs[{i}] and exp_avg_sqs[{i}] must both be tensors or both be None")


def _lr(op: str, lr: object) -> float:
    # The optimizers accept a tensor lr; the update only needs its value.
    return check_number(f"{op}: `lr`", float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr, minimum=0)


def _check_flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: `{name}` must be a bool, got {type(value).__name__}")
    return value


def _betas(op: str, betas: object) -> tuple[float, float]:
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"{op}: `betas` must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (check_number(f"{op}: `betas[{i}]`", float(b) if isinstance(b, torch.Tensor) else b, minimum=0)
                    for i, b in enumerate(betas))
    if beta1 >= 1 or beta2 >= 1:
        raise ValueError(f"{op}: `betas` must be in [0, 1), got {betas!r}")
    return beta1, beta2


def _in_opmath(fallback, args: tuple) -> list[torch.Tensor]:
    """``fallback(*args)``, for float16 and bfloat16 lists on float32 copies, rounded once at the end, as
    the kernels compute them (in half precision, ‖d‖² or ``eps`` would leave the dtype's range)."""
    dtype = args[0][0].dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return fallback(*args)
    widened = [[None if t is None else t.float() for t in a]
               if isinstance(a, list) and any(isinstance(t, torch.Tensor) for t in a) else a for a in args]
    return [r.to(dtype) for r in fallback(*widened)]


def _run(op: str, ref: list[torch.Tensor], layout_lists: list, compiled_args: tuple, fallback_fn, out,
         reads: list[tuple[str, list]]) -> list[torch.Tensor]:
    """The compiled op ``torch.ops.metamask_fast.<op>`` on ``compiled_args`` when it can take the lists,
    else ``fallback_fn`` on the same arguments (:func:`_in_opmath`); into ``out`` when given (checked on the
    fallback path as the kernels check it)."""
    def fallback():
        return _in_opmath(fallback_fn, compiled_args)

    packet = getattr(torch.ops.metamask_fast, op) if ops.HAS_EXTENSION else None
    with torch.no_grad():
        if out is not None:
            out = _check_tensor_list(op, "out", out)
            if _compiled(_DEVICES[op], ref, *layout_lists, out):
                packet.out(*compiled_args, out=out)
                _bump_versions(out)
                return out
            _check_separate_out(op, out, reads)
            torch._foreach_copy_(out, fallback())
            _bump_versions(out)
            return out
        if _compiled(_DEVICES[op], ref, *layout_lists):
            return list(packet.default(*compiled_args))
        return [r if ops._dense(t) else r.contiguous() for r, t in zip(fallback(), ref)]


def _laid_out(ref: list[torch.Tensor], optional: list) -> list[torch.Tensor]:
    """``optional`` with the reference tensor where absent, for the layout test of the compiled path."""
    return [r if t is None else t for r, t in zip(ref, optional)]


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor Euclidean norms, stacked (float32 for float16/bfloat16 lists)."""
    half = tensors[0].dtype in (torch.float16, torch.bfloat16)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32 if half else None))


# ------------------------------------------------------------------------------------------------ LARS


def _lars_directions(params, grads, weight_decay, decays) -> list[torch.Tensor]:
    """``d = g + wd·θ`` where the weight decays, ``g`` elsewhere."""
    d = list(grads)
    idx = [i for i, decay in enumerate(decays) if decay]
    if idx:
        for i, new in zip(idx, torch._foreach_add([grads[i] for i in idx], [params[i] for i in idx],
                                                  alpha=weight_decay)):
            d[i] = new
    return d


def _lars_filters(params, weight_decay_filter, lars_adaptation_filter):
    decays = [not (weight_decay_filter and p.dim() == 1) for p in params]
    adapts = [not (lars_adaptation_filter and p.dim() == 1) for p in params]
    return decays, adapts


def virtual_lars_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      buffers: Sequence[torch.Tensor | None], *, lr: float, weight_decay: float = 0.0,
                      momentum: float = 0.9, eta: float = 0.001, weight_decay_filter: bool = False,
                      lars_adaptation_filter: bool = False,
                      out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The weights :class:`metamask_fast.optim.LARS` would produce, without changing ``params`` or
    ``buffers`` (its state ``mu``; None before the first step). See the module docstring."""
    op = "virtual_lars_step"
    params = [p.detach() for p in _check_tensor_list(op, "params", params)]
    grads = _check_required(op, "grads", grads, "params", params)
    buffers = _check_optional(op, "buffers", buffers, "params", params)
    lr = _lr(op, lr)
    weight_decay = check_number(f"{op}: `weight_decay`", weight_decay, minimum=0)
    momentum = check_number(f"{op}: `momentum`", momentum, minimum=0)
    eta = check_number(f"{op}: `eta`", eta, minimum=0, strict=True)
    flags = (_check_flag(op, "weight_decay_filter", weight_decay_filter),
             _check_flag(op, "lars_adaptation_filter", lars_adaptation_filter))
    args = (params, grads, buffers, lr, weight_decay, momentum, eta, *flags)
    return _run(op, params, [grads, _laid_out(params, buffers)], args, _virtual_lars_step_torch, out,
                [("params", params), ("grads", grads), ("buffers", buffers)])


def _virtual_lars_step_torch(params, grads, buffers, lr, weight_decay, momentum, eta, weight_decay_filter,
                             lars_adaptation_filter) -> list[torch.Tensor]:
    decays, adapts = _lars_filters(params, weight_decay_filter, lars_adaptation_filter)
    d = _lars_directions(params, grads, weight_decay, decays)
    idx = [i for i, adapt in enumerate(adapts) if adapt]
    if idx:
        p_norm, d_norm = _norms([params[i] for i in idx]), _norms([d[i] for i in idx])
        ratio = torch.where((p_norm > 0) & (d_norm > 0), eta * p_norm / d_norm, torch.ones_like(p_norm))
        for i, new in zip(idx, torch._foreach_mul([d[i] for i in idx], list(ratio.unbind()))):
            d[i] = new
    held = [i for i, b in enumerate(buffers) if b is not None]
    if held:
        moved = torch._foreach_mul([buffers[i] for i in held], momentum)
        torch._foreach_add_(moved, [d[i] for i in held])
        for i, new in zip(held, moved):
            d[i] = new
    return torch._foreach_add(params, d, alpha=-lr)


def lars_vjp(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor], *,
             lr: float, weight_decay: float = 0.0, eta: float = 0.001, weight_decay_filter: bool = False,
             lars_adaptation_filter: bool = False, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``u = J_Uᵀ v`` of LARS's update with respect to the gradient, at ``grads`` (the momentum buffer enters
    the update additively, so it does not enter ``J``). See the module docstring."""
    op = "lars_vjp"
    params = [p.detach() for p in _check_tensor_list(op, "params", params)]
    grads = _check_required(op, "grads", grads, "params", params)
    vectors = _check_required(op, "vectors", vectors, "params", params)
    lr = _lr(op, lr)
    weight_decay = check_number(f"{op}: `weight_decay`", weight_decay, minimum=0)
    eta = check_number(f"{op}: `eta`", eta, minimum=0, strict=True)
    flags = (_check_flag(op, "weight_decay_filter", weight_decay_filter),
             _check_flag(op, "lars_adaptation_filter", lars_adaptation_filter))
    args = (params, grads, vectors, lr, weight_decay, eta, *flags)
    return _run(op, params, [grads, vectors], args, _lars_vjp_torch, out,
                [("params", params), ("grads", grads), ("vectors", vectors)])


def _lars_vjp_torch(params, grads, vectors, lr, weight_decay, eta, weight_decay_filter,
                    lars_adaptation_filter) -> list[torch.Tensor]:
    decays, adapts = _lars_filters(params, weight_decay_filter, lars_adaptation_filter)
    u = list(torch._foreach_mul(vectors, -lr))
    idx = [i for i, adapt in enumerate(adapts) if adapt]
    if not idx:
        return u
    d = _lars_directions(params, grads, weight_decay, decays)
    d, v = [d[i] for i in idx], [vectors[i] for i in idx]
    p_norm, d_norm = _norms([params[i] for i in idx]), _norms(d)
    dots = torch.stack([torch.sum(x) for x in torch._foreach_mul(d, v)]).to(d_norm.dtype)
    adaptive = (p_norm > 0) & (d_norm > 0)
    ones = torch.ones_like(d_norm)
    projection = torch.where(adaptive, dots / torch.where(adaptive, d_norm.square(), ones), torch.zeros_like(d_norm))
    factor = torch.where(adaptive, eta * p_norm / d_norm, ones) * -lr
    projected = torch._foreach_sub(v, torch._foreach_mul(d, list(projection.unbind())))
    torch._foreach_mul_(projected, list(factor.unbind()))
    for i, new in zip(idx, projected):
        u[i] = new
    return u


# ----------------------------------------------------------------------------------------------- AdamW


def _check_adamw(op, ref_name, ref, exp_avgs, exp_avg_sqs, steps, lr, betas, eps):
    exp_avgs = _check_optional(op, "exp_avgs", exp_avgs, ref_name, ref)
    exp_avg_sqs = _check_optional(op, "exp_avg_sqs", exp_avg_sqs, ref_name, ref)
    _check_paired_moments(op, exp_avgs, exp_avg_sqs)
    steps = _check_steps(op, steps, ref)
    beta1, beta2 = _betas(op, betas)
    eps = check_number(f"{op}: `eps`", eps, minimum=0)
    return exp_avgs, exp_avg_sqs, steps, _lr(op, lr), beta1, beta2, eps


def virtual_adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor | None], exp_avg_sqs: Sequence[torch.Tensor | None],
                       steps: Sequence[float], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 1e-2,
                       out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The weights ``torch.optim.AdamW`` (not amsgrad) would produce, without changing ``params`` or its
    state (``exp_avgs``, ``exp_avg_sqs``: None before the first step; ``steps``: the number of the step
    being made, per weight). See the module docstring."""
    op = "virtual_adamw_step"
    params = [p.detach() for p in _check_tensor_list(op, "params", params)]
    grads = _check_required(op, "grads", grads, "params", params)
    exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps = _check_adamw(
        op, "params", params, exp_avgs, exp_avg_sqs, steps, lr, betas, eps)
    weight_decay = check_number(f"{op}: `weight_decay`", weight_decay, minimum=0)
    args = (params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay)
    layout = [grads, _laid_out(params, exp_avgs), _laid_out(params, exp_avg_sqs)]
    return _run(op, params, layout, args, _virtual_adamw_step_torch, out,
                [("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)])


def _adamw_moments_torch(grads, exp_avgs, exp_avg_sqs, beta1, beta2):
    """``m`` and ``s`` after ``grads``: torch.optim.AdamW's lerp and addcmul (zeros for absent state)."""
    first = [torch.zeros_like(g) if m is None else m for g, m in zip(grads, exp_avgs)]
    m = torch._foreach_lerp(first, grads, 1 - beta1)
    s = [torch.zeros_like(g) if s is None else s for g, s in zip(grads, exp_avg_sqs)]
    s = torch._foreach_mul(s, beta2)
    torch._foreach_addcmul_(s, grads, grads, value=1 - beta2)
    return m, s


def _bias_corrections(steps, beta1, beta2):
    return [1 - beta1 ** k for k in steps], [1 - beta2 ** k for k in steps]


def _virtual_adamw_step_torch(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                              weight_decay) -> list[torch.Tensor]:
    m, s = _adamw_moments_torch(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
    bias1, bias2 = _bias_corrections(steps, beta1, beta2)
    denominator = torch._foreach_sqrt(s)
    torch._foreach_div_(denominator, [math.sqrt(b) for b in bias2])
    torch._foreach_add_(denominator, eps)
    out = torch._foreach_mul(params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(out, m, denominator, [-lr / b for b in bias1])
    return out


def adamw_vjp(grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor | None],
              exp_avg_sqs: Sequence[torch.Tensor | None], steps: Sequence[float], vectors: Sequence[torch.Tensor], *,
              lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``u = J_Uᵀ v`` of AdamW's update with respect to the gradient, at ``grads`` (weight decay does not
    enter ``J``). See the module docstring."""
    op = "adamw_vjp"
    grads = [g.detach() for g in _check_tensor_list(op, "grads", grads)]
    vectors = _check_required(op, "vectors", vectors, "grads", grads)
    exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps = _check_adamw(
        op, "grads", grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps)
    args = (grads, exp_avgs, exp_avg_sqs, steps, vectors, lr, beta1, beta2, eps)
    layout = [_laid_out(grads, exp_avgs), _laid_out(grads, exp_avg_sqs), vectors]
    return _run(op, grads, layout, args, _adamw_vjp_torch, out,
                [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("vectors", vectors)])


def _adamw_vjp_torch(grads, exp_avgs, exp_avg_sqs, steps, vectors, lr, beta1, beta2, eps) -> list[torch.Tensor]:
    m, s = _adamw_moments_torch(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
    bias1, bias2 = _bias_corrections(steps, beta1, beta2)
    sigma = torch._foreach_sqrt(s)
    torch._foreach_div_(sigma, [math.sqrt(b) for b in bias2])
    denominator = torch._foreach_add(sigma, eps)
    numerator = torch._foreach_mul(m, 1 - beta2)
    torch._foreach_mul_(numerator, grads)
    below = torch._foreach_mul(sigma, bias2)
    torch._foreach_mul_(below, torch._foreach_mul(denominator, denominator))
    curvature = [torch.where(si > 0, n / b, 0) for si, n, b in zip(sigma, numerator, below)]
    factor = [(1 - beta1) / den for den in denominator]
    factor = torch._foreach_sub(factor, curvature)
    u = torch._foreach_mul(vectors, factor)
    torch._foreach_mul_(u, [-lr / b for b in bias1])
    return u


# ------------------------------------------------------------------------------------------------- SGD


def sgd_vjp_factor(lr: float, momentum: float, dampening: float, nesterov: bool, has_buffer: bool) -> float:
    """``f = −lr·c``: ``c`` the weight of the gradient in SGD's step (``1−dampening`` with a momentum buffer,
    ``1+momentum·(1−dampening)`` with nesterov; before the first step, without a buffer, ``1``, or
    ``1+momentum`` with nesterov; ``1`` without momentum)."""
    if momentum == 0:
        c = 1.0
    elif not has_buffer:
        c = 1.0 + momentum if nesterov else 1.0
    else:
        c = 1.0 + momentum * (1.0 - dampening) if nesterov else 1.0 - dampening
    return -lr * c


def sgd_vjp(vectors: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor | None], *, lr: float,
            momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
            out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``u = J_Uᵀ v = f·v`` of ``torch.optim.SGD``'s update, ``f`` per weight from :func:`sgd_vjp_factor`
    (``buffers``: the momentum buffers, of which only the presence counts)."""
    op = "sgd_vjp"
    vectors = [v.detach() for v in _check_tensor_list(op, "vectors", vectors)]
    buffers = _check_optional(op, "buffers", buffers, "vectors", vectors)
    lr = _lr(op, lr)
    momentum = check_number(f"{op}: `momentum`", momentum, minimum=0)
    dampening = check_number(f"{op}: `dampening`", dampening)
    nesterov = _check_flag(op, "nesterov", nesterov)
    args = (vectors, buffers, lr, momentum, dampening, nesterov)
    return _run(op, vectors, [_laid_out(vectors, buffers)], args, _sgd_vjp_torch, out,
                [("vectors", vectors), ("buffers", buffers)])


def _sgd_vjp_torch(vectors, buffers, lr, momentum, dampening, nesterov) -> list[torch.Tensor]:
    return torch._foreach_mul(vectors, [sgd_vjp_factor(lr, momentum, dampening, nesterov, b is not None)
                                        for b in buffers])


# ---------------------------------------------------------------------------------------- fake kernels


def _fake_outputs(ref) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in ref]


def _fake_out(ref, out) -> None:
    _check_pairs("out", "ref", list(ref), "out", list(out))


if ops.HAS_EXTENSION:
    for _name, _ref in (("virtual_lars_step", 0), ("virtual_adamw_step", 0), ("sgd_vjp", 0), ("lars_vjp", 0),
                        ("adamw_vjp", 0)):
        torch.library.register_fake(f"metamask_fast::{_name}")(
            lambda *args, _r=_ref: _fake_outputs(args[_r]))
        torch.library.register_fake(f"metamask_fast::{_name}.out")(
            lambda *args, out, _r=_ref: _fake_out(args[_r], out))
