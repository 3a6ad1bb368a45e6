"""The MetaMask training step: a regular step on the network, then a meta-gradient step on the mask.

``MetaMaskStep.step(x0, x1)`` runs SPEC §1 in its faithful order. With θ the network weights, ``M`` the
mask, ``L = L_bt + w_cl · L_cl`` and ``U(θ, g)`` the network optimizer's update from gradient ``g``
(``torch.optim.SGD``, ``torch.optim.AdamW`` or :class:`metamask_fast.optim.LARS`; :mod:`metamask_fast.optim`):

1. ``θ_{t+1} = U(θ_t, ∇_θ L(θ_t, M))``, the optimizer's real step; the mask gets no gradient from ``L``
   (:meth:`MetaMaskStep._regular_step`).
2. ``g = ∇_θ L_cl(θ_{t+1}, M)``; virtual weights ``θ' = U(θ_{t+1}, g)``, the update the optimizer would
   make, reading its state (momentum buffers, Adam moments, step count) without writing it; for the
   authors' SGD ``θ' = θ_{t+1} - η · (μ · buf + g + wd · θ_{t+1})``. Weights with no ``L_cl`` gradient,
   the Barlow Twins head, keep ``θ' = θ_{t+1}`` (:meth:`MetaMaskStep._virtual_step`).
3. Direct term ``∂_m L_cl(θ', M)`` and ``v = ∇_θ' L_cl(θ', M)`` (:meth:`MetaMaskStep._outer_gradient`).
4. ``u = J_Uᵀ v``, the vector-Jacobian product of the update with respect to ``g`` (for SGD ``−lr·c·v`` per
   group, ``c`` the gradient's weight in the step; the authors' ``−η·v``), and the mask gradient
   ``direct + ∂_m ⟨∇_θ L_cl(θ_{t+1}, M), u⟩``, the exact one-step hypergradient.
   ``second_order="finite_difference"`` estimates the second term as
   ``(∂_m L_cl(θ_{t+1} + R u, M) - ∂_m L_cl(θ_{t+1} - R u, M)) / 2R`` with ``R = r / ‖u‖`` (for the authors'
   SGD this is their ``direct - η · HVP``); ``second_order="exact"`` computes it, the finite difference's
   limit as r → 0, by forward-mode differentiation of the mask gradient along u (:func:`torch.func.jvp`);
   ``second_order="none"`` (first order) uses the direct term alone (:meth:`MetaMaskStep._second_order_term`).
5. The mask optimizer steps with that gradient (:meth:`MetaMaskStep._mask_update`).

With ``meta_interval=k`` steps 2-5 run on every k-th call only (the first call included); the other calls
are step 1 alone, the network's regular step.

The virtual weights are evaluated with :func:`torch.func.functional_call` on the model's own modules (no
second model copy), on scratch copies of the BatchNorm buffers. The exact second-order term runs BatchNorm
on batch statistics without running buffers, because :func:`torch.func.jvp` cannot update buffers in
place. In training mode BatchNorm normalises with batch statistics, so none of this changes any number of
the step.

BatchNorm running statistics (what evaluation reads) move once per step, with the regular step's
forwards of both views. The authors' code also moves them in step 2, a second forward of the same batch at
θ_{t+1}; here step 2 puts them back as they were (the only deliberate difference from the authors' step: it
changes no weight and no mask value, only what an evaluation in eval mode sees).

With ``distributed=True`` (one process per rank, :mod:`metamask_fast.distributed`) every loss of every
phase is computed on the embeddings gathered from all ranks and every gradient is averaged over the ranks
before it is used, so that each rank takes the step one process would take on the global batch (with
BatchNorm converted by :func:`metamask_fast.distributed.convert_sync_batchnorm`).

Non-finite values never reach the weights or the mask. When step 1's loss or any of the network's gradients
is not finite (NaN or ±inf; embeddings that are not finite count as a NaN loss), the call changes nothing:
no weight, no momentum buffer, no BatchNorm running statistic (they are put back as they were before the
forwards), no mask; it returns ``skipped=1.0``. When anything of the meta part is not finite (L_cl at
θ_{t+1} or its gradient, the virtual loss, the direct mask gradient, v, or the mask gradient after the
second-order term), the mask and its optimizer are left alone while the network keeps its (finite) step 1;
it returns ``mask_skipped=1.0``. Each check costs at most one host sync per phase (:func:`_all_finite`: one
fused pass per dtype, no sync of its own; the last check rides on the sync that fetches the returned values)
and is made after the distributed averaging, so that every rank sees the same values and takes the same
decision without a collective of its own.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn
from torch.func import functional_call

from metamask_fast import _tangents, ops
from metamask_fast import distributed as mmdist
from metamask_fast._checks import check_number
from metamask_fast.functional import barlow_twins_loss, nt_xent_loss
from metamask_fast.optim import check_network_optimizer, sgd_vjp_factors, update_vjp, virtual_update

__all__ = ["MetaMaskStep", "SingleLossStep"]

_SECOND_ORDER = ("finite_difference", "exact", "none")
_PRECISIONS = ("fp32", "bf16")


def _gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``∂loss/∂p`` for every ``p`` in ``params``; None for the ones that do not require grad (a frozen layer
    left in the optimizer) or that ``loss`` does not depend on."""
    trainable = [p for p in params if p.requires_grad]
    grads = iter(torch.autograd.grad(loss, trainable, allow_unused=True) if trainable else ())
    return [next(grads) if p.requires_grad else None for p in params]


def _running_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every running buffer of the model's BatchNorm layers in training mode, with a copy of its value."""
    return [
        (buffer, buffer.clone())
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]


def _restore(statistics: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put back the values saved by :func:`_running_statistics`."""
    with torch.no_grad():
        for buffer, saved in statistics:
            buffer.copy_(saved)


def _all_finite(tensors) -> torch.Tensor:
    """A 0-d bool tensor, without a host sync: every element of every tensor (None entries skipped) is
    finite. One :func:`metamask_fast.ops.global_norm` pass per dtype (the norm of values that hold a NaN or
    an infinity is not finite; a norm that overflows its dtype, beyond ~3e38 in float32, counts as not
    finite too)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = [torch.isfinite(ops.global_norm(group)) for group in groups.values()]
    if len(flags) == 1:
        return flags[0]
    if not flags:
        return torch.tensor(True)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def _loss(loss_fn, z_a: torch.Tensor, z_b: torch.Tensor, *args) -> torch.Tensor:
    """``loss_fn(z_a, z_b, *args)``; when the embeddings are not finite (the losses refuse them with a
    ValueError), a NaN instead that still depends on them, so that the step's finiteness check sees a
    non-finite loss and non-finite gradients and skips. Other ValueErrors propagate."""
    try:
        return loss_fn(z_a, z_b, *args)
    except ValueError:
        if bool(torch.stack([torch.isfinite(z_a).all(), torch.isfinite(z_b).all()]).all()):
            raise
        return (z_a.sum() + z_b.sum()) * float("nan")


def _scaled(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · loss`` (solo-learn's ``scale_loss`` of the Barlow Twins term); ``loss`` itself at 1."""
    return loss if scale == 1.0 else scale * loss


def _check_distributed(distributed: bool) -> None:
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    if distributed and not mmdist.is_initialized():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group "
            "(metamask_fast.distributed.init_from_env under torchrun)"
        )


def _gather_all(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`metamask_fast.distributed.gather` of every one of ``embeddings`` (``[n, d_i]``, the same n and
    dtype), in one collective."""
    widths = [z.shape[1] for z in embeddings]
    return list(mmdist.gather(torch.cat(embeddings, dim=1)).split(widths, dim=1))


def _sub_dict(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries of ``tensors`` under module ``prefix``, renamed relative to it."""
    start = len(prefix) + 1
    return {name[start:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


_LOSS_KEYS = ("loss", "loss_bt", "loss_cl")
_META_KEYS = (*_LOSS_KEYS, "loss_cl_virtual", "mask_grad_norm")


def _report(keys, values, clock, **flags: float) -> dict[str, float]:
    """The dict that :meth:`MetaMaskStep.step` returns: ``values`` (python floats) under ``keys``, then
    ``flags``, then the seconds per phase of ``clock``."""
    return {**dict(zip(keys, values)), **flags, **clock.seconds()}


def _mask_skipped(losses, clock, loss_virtual=None, mask_grad=None) -> dict[str, float]:
    """The dict of a meta step whose mask update was skipped (a value of the meta part was not finite):
    the losses ``(L, L_bt, L_cl)`` at θ_t, L_cl at θ' and the mask gradient's norm, NaN where not yet
    computed (one host sync)."""
    loss, loss_bt, loss_cl = losses
    nan = torch.full((), float("nan"), dtype=loss.dtype, device=loss.device)
    values = torch.stack([
        loss.detach(), loss_bt.detach(), loss_cl.detach(),
        nan if loss_virtual is None else loss_virtual.detach().to(loss.dtype),
        nan if mask_grad is None else mask_grad.detach().norm().to(loss.dtype),
    ]).tolist()
    return _report(_META_KEYS, values, clock, meta_step=1.0, skipped=0.0, mask_skipped=1.0)


def _check_arguments(
    model, net_optimizer, mask_optimizer, *, weight_cl, scale_loss, lambd, temperature, second_order, fd_radius,
    meta_interval, precision, channels_last, compile_backbone, timings, distributed,
) -> None:
    """The checks of :class:`MetaMaskStep`'s arguments (those of the optimizers' parameter groups aside,
    :func:`_network_groups`), in this order: the first failing one raises."""
    for attr in ("backbone", "bt_head", "cl_head", "mask"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a MetaMaskModel (with .{attr}), got {type(model).__name__}")
    check_network_optimizer(net_optimizer)
    if not isinstance(mask_optimizer, torch.optim.Optimizer):
        raise TypeError(f"mask_optimizer must be a torch.optim.Optimizer, got {type(mask_optimizer).__name__}")
    if not isinstance(second_order, str) or second_order not in _SECOND_ORDER:
        raise ValueError(f"second_order must be one of {_SECOND_ORDER}, got {second_order!r}")
    check_number("weight_cl", weight_cl, minimum=0)
    check_number("scale_loss", scale_loss, minimum=0, strict=True)
    check_number("lambd", lambd, minimum=0)
    check_number("temperature", temperature, minimum=0, strict=True)
    check_number("fd_radius", fd_radius, minimum=0, strict=True)
    if isinstance(meta_interval, bool) or not isinstance(meta_interval, int) or meta_interval < 1:
        raise ValueError(f"meta_interval must be an integer >= 1, got {meta_interval!r}")
    if not isinstance(timings, bool):
        raise TypeError(f"timings must be a bool, got {type(timings).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    if not isinstance(compile_backbone, bool):
        raise TypeError(f"compile_backbone must be a bool, got {type(compile_backbone).__name__}")
    if distributed and second_order == "exact":
        raise ValueError(
            "second_order='exact' is not supported with distributed=True (forward-mode differentiation "
            "does not go through the collectives); use 'finite_difference' or 'none'"
        )
    _check_distributed(distributed)
    if not isinstance(precision, str) or precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision == "bf16" and model.mask.logits.dtype != torch.float32:
        raise ValueError(
            "precision='bf16' autocasts float32 weights to bfloat16, but the model's weights are "
            f"{model.mask.logits.dtype}; use a float32 model or precision='fp32'"
        )


def _network_groups(model, net_optimizer, mask_optimizer) -> list[tuple[dict, list[str]]]:
    """Every parameter group of ``net_optimizer`` with the names in ``model`` of its parameters, after
    checking that the network optimizer holds parameters of ``model`` but not the mask (and does not
    maximize) and that ``mask_optimizer`` holds the mask."""
    mask = model.mask.logits
    names = {p: name for name, p in model.named_parameters()}
    groups = []
    for group in net_optimizer.param_groups:
        for p in group["params"]:
            if p is mask:
                raise ValueError("net_optimizer must not hold model.mask.logits: the mask has its own optimizer")
            if p not in names:
                raise ValueError("net_optimizer holds a tensor that is not a parameter of model")
        groups.append((group, [names[p] for p in group["params"]]))
    if not any(p is mask for g in mask_optimizer.param_groups for p in g["params"]):
        raise ValueError("mask_optimizer must hold model.mask.logits")
    return groups


class MetaMaskStep:
    """One MetaMask training step per call; see the module docstring for the math.

    ``model``: a :class:`~metamask_fast.models.MetaMaskModel`. ``net_optimizer``: ``torch.optim.SGD`` (any
    options and parameter groups), ``torch.optim.AdamW`` (not amsgrad) or :class:`metamask_fast.optim.LARS`
    over the network weights (every trainable parameter but ``model.mask.logits``); its update, with each
    group's settings, is the virtual step, and its vector-Jacobian product the second-order term's
    direction. Any other optimizer is refused. ``mask_optimizer``: any optimizer over ``model.mask.logits``.

    ``scale_loss``: the Barlow Twins loss's weight in step 1, ``L = scale_loss · L_bt + weight_cl · L_cl``
    (solo-learn's ``scale_loss``; the reported ``loss_bt`` is unscaled).

    ``second_order``: ``"finite_difference"`` (the authors' estimate, the default), ``"exact"`` (the mixed
    second derivative it estimates, by forward-mode differentiation) or ``"none"`` (first order).
    ``fd_radius``: r of the finite difference. ``meta_interval``: run the mask's meta step (steps 2-5) on
    every ``meta_interval``-th call only, the first call included; :attr:`step_count` counts the calls (set
    it when resuming a run, so that the schedule continues). ``precision="bf16"``: the forwards run under
    ``torch.autocast`` in bfloat16 (the weights stay float32 and the losses accumulate in float32); the
    finite difference's two passes stay in float32, because its perturbation R·v is far below bfloat16's
    resolution, and the exact term too (measured on a ResNet-18: 60 % error against float64 in bfloat16,
    ReLU masks flip on rounded values). ``channels_last``: convert the model's
    4-d weights to ``torch.channels_last`` once, here, and 4-d inputs at every step (the compiled ops take
    channels_last weights as they are). ``compile_backbone``: run the regular forwards (step 1, and step 2
    unless the exact term records it) through ``torch.compile(model.backbone)``; the passes at other weights
    stay eager. The first steps pay the compilation. ``timings``: add the seconds spent in each
    phase to the returned dict (``time_regular``, ``time_virtual``: steps 2 and the virtual step,
    ``time_outer``: step 3, ``time_second_order``: step 4), synchronising CUDA at each phase's end.
    ``distributed``: this process is one rank of an initialised ``torch.distributed`` process group and
    ``x0``, ``x1`` are its slice of the global batch; every loss (all phases) is computed on the embeddings
    gathered from all ranks (:func:`metamask_fast.distributed.gather`, rank order) and every gradient (θ's
    in steps 1 and 2, the direct mask gradient and v in step 3, the finite difference's two mask gradients)
    is averaged over the ranks before it is used, so that every rank takes the single-process step on the
    global batch (given SyncBatchNorm, :func:`metamask_fast.distributed.convert_sync_batchnorm`, and equal
    weights on all ranks at the start, :func:`metamask_fast.distributed.broadcast_module`). The returned
    losses are the global ones. Not with ``second_order="exact"`` (forward-mode differentiation does not
    go through the collectives).
    """

    def __init__(
        self,
        model,
        net_optimizer: torch.optim.Optimizer,
        mask_optimizer: torch.optim.Optimizer,
        *,
        weight_cl: float = 10.0,
        scale_loss: float = 1.0,
        lambd: float = 5e-3,
        temperature: float = 0.07,
        second_order: str = "finite_difference",
        fd_radius: float = 1e-2,
        meta_interval: int = 1,
        precision: str = "fp32",
        channels_last: bool = False,
        compile_backbone: bool = False,
        timings: bool = False,
        distributed: bool = False,
    ):
        _check_arguments(
            model, net_optimizer, mask_optimizer, weight_cl=weight_cl, scale_loss=scale_loss, lambd=lambd,
            temperature=temperature,
            second_order=second_order, fd_radius=fd_radius, meta_interval=meta_interval, precision=precision,
            channels_last=channels_last, compile_backbone=compile_backbone, timings=timings, distributed=distributed,
        )
        #: Per parameter group of ``net_optimizer``: the group and its parameters' names in ``model``.
        self._groups = _network_groups(model, net_optimizer, mask_optimizer)

        self.model = model
        self.net_optimizer = net_optimizer
        self.mask_optimizer = mask_optimizer
        self.weight_cl = float(weight_cl)
        self.scale_loss = float(scale_loss)
        self.lambd = float(lambd)
        self.temperature = float(temperature)
        self.second_order = second_order
        self.fd_radius = float(fd_radius)
        self.meta_interval = meta_interval
        self.distributed = distributed
        self.timings = timings
        self.precision = precision
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # The regular forwards (step 1, and step 2 unless it is recorded for the exact term) through
        # torch.compile; the virtual and perturbed passes swap weights per call and stay eager.
        self._backbone = torch.compile(model.backbone) if compile_backbone else None
        # The exact term differentiates step 2's forward afterwards (metamask_fast._tangents); None when
        # the backbone cannot be traced, and the exact term then reruns the forward under torch.func.jvp.
        self._traced = _tangents.trace_backbone(model.backbone) if second_order == "exact" else None
        #: Calls of :meth:`step` so far; the meta step runs when ``step_count % meta_interval == 0`` before
        #: the call.
        self.step_count = 0
        self._params = [p for group, _ in self._groups for p in group["params"]]
        self._names = [name for _, group_names in self._groups for name in group_names]
        # θ ± R v of the finite difference, θ' of the virtual step and u = J_Uᵀ v, kept from step to step
        # (_kept): allocating ~one model's worth of fresh memory each step costs more than the sweep that
        # fills it (page faults, on the CPU).
        self._kept_tensors: dict[object, list[torch.Tensor]] = {}

    def _check_views(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        device, dtype = self.model.mask.logits.device, self.model.mask.logits.dtype
        for name, x in (("x0", x0), ("x1", x1)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 1 or x.shape[0] < 2:
                raise ValueError(f"{name} must be a batch of at least 2 samples, got shape {tuple(x.shape)}")
            if x.device != device:
                raise ValueError(f"{name} is on {x.device} but the model is on {device}")
            if x.dtype != dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the model's weights are {dtype}")
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")

    def _features(self, weights, buffers, x, *, backbone_grad: bool) -> torch.Tensor:
        """``backbone(x).flatten(1)`` with ``weights`` and ``buffers`` (by full name) where given."""
        state = {**_sub_dict("backbone", weights), **_sub_dict("backbone", buffers)}
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            return functional_call(self.model.backbone, state, (x,), strict=False).flatten(1)

    def _head_loss(self, weights, buffers, features, mask) -> torch.Tensor:
        """``L_cl`` of the contrastive head on both views' ``features`` times ``mask``."""
        state = {**_sub_dict("cl_head", weights), **_sub_dict("cl_head", buffers)}
        z0, z1 = (functional_call(self.model.cl_head, state, (f * mask,), strict=False) for f in features)
        return _loss(nt_xent_loss, *self._global(z0, z1), self.temperature)

    def _contrastive_loss_at(self, weights, buffers, x0, x1, *, backbone_grad: bool) -> torch.Tensor:
        """``L_cl(weights, M)`` through the backbone and the contrastive head only."""
        features = [self._features(weights, buffers, x, backbone_grad=backbone_grad) for x in (x0, x1)]
        return self._head_loss(weights, buffers, features, self.model.mask())

    def _virtual_weights(self, grads) -> dict[str, torch.Tensor]:
        """θ' of step 2 for every weight with a gradient, as leaves that require grad."""
        virtual = {}
        for index, (group, names, group_grads) in enumerate(self._live_groups(grads)):
            kept = self._kept(("virtual", index), [p for p, g in zip(group["params"], group_grads) if g is not None])
            updated = virtual_update(self.net_optimizer, group, group["params"], group_grads, out=kept)
            for name, g, w in zip(names, group_grads, updated):
                if g is not None:
                    virtual[name] = w.detach().requires_grad_()
        return virtual

    def _live_groups(self, values: list):
        """``(group, names, values of its parameters)`` per parameter group of the network optimizer, with
        ``values`` in the order of :attr:`_params`. The optimizer's live groups: ``load_state_dict`` replaces
        the group dicts (and with them lr, momentum…), so the ones seen at construction may be stale; their
        parameters are the same tensors."""
        start = 0
        for group, (_, names) in zip(self.net_optimizer.param_groups, self._groups, strict=True):
            count = len(group["params"])
            yield group, names, values[start : start + count]
            start += count

    def _hypergradient_direction(self, v: dict[str, torch.Tensor], grads: list) -> tuple[float | None, dict]:
        """``u = J_Uᵀ v`` of the network optimizer's update at step 2's gradients ``grads``, as
        ``(scale, direction)``: for SGD with one factor ``f = −lr·c`` for every weight with a direction,
        ``(f, v)`` (``u = f·v``, the authors' ``−η·v`` in their setting, kept as a scale so that their step
        is reproduced to the bit); otherwise ``(None, u)`` by name."""
        sgd = isinstance(self.net_optimizer, torch.optim.SGD)
        if sgd:
            factors = {name: f for group, names, _ in self._live_groups(self._params)
                       for name, f in zip(names, sgd_vjp_factors(self.net_optimizer, group, group["params"]))}
            distinct = {factors[name] for name in v}
            if len(distinct) == 1:
                return distinct.pop(), v
        u = {}
        for index, (group, names, group_grads) in enumerate(self._live_groups(grads)):
            vectors = [v.get(name) for name in names]
            live = [w for w, g in zip(vectors, group_grads) if w is not None and g is not None]
            kept = self._kept(("u", index), live)
            directions = update_vjp(self.net_optimizer, group, group["params"], group_grads, vectors, out=kept)
            for name, w in zip(names, directions):
                if w is not None:
                    u[name] = w
        return None, u

    def _kept(self, key: object, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors kept under ``key`` for results like ``like``, (re)allocated when those change."""
        kept = self._kept_tensors.get(key, [])
        if len(kept) != len(like) or any(
            k.shape != w.shape or k.stride() != w.stride() or k.dtype != w.dtype or k.device != w.device
            for k, w in zip(kept, like)
        ):
            self._kept_tensors[key] = kept = [torch.empty_like(w) for w in like]  # the weights' layouts
        return kept

    def _finite_difference_hvp(self, v: dict[str, torch.Tensor], buffers, x0, x1, norm=None) -> torch.Tensor:
        """``(∂_m L_cl(θ + R v) - ∂_m L_cl(θ - R v)) / 2R`` with ``R = r / ‖v‖`` around the current θ.
        ``norm``: ``ops.global_norm`` of ``v``'s tensors when already computed."""
        params = dict(self.model.named_parameters())
        names = list(v)
        directions = [v[name] for name in names]
        norm = float(ops.global_norm(directions) if norm is None else norm)
        if norm == 0:  # no direction to differentiate along: the second-order term vanishes
            return torch.zeros_like(self.model.mask.logits)
        if not math.isfinite(norm):
            raise FloatingPointError(
                "MetaMaskStep: the contrastive gradient at the virtual weights is not finite; "
                "the network has diverged (try a smaller learning rate)"
            )
        radius = self.fd_radius / norm
        mask = self.model.mask.logits

        weights = [params[name].detach() for name in names]
        perturbed = ops.add_scaled(weights, directions, radius, out=self._kept("perturbed", weights))
        loss_plus = self._contrastive_loss_at(dict(zip(names, perturbed)), buffers, x0, x1, backbone_grad=False)
        (grad_plus,) = torch.autograd.grad(loss_plus, [mask])
        ops.add_scaled_(perturbed, directions, -2 * radius)
        loss_minus = self._contrastive_loss_at(dict(zip(names, perturbed)), buffers, x0, x1, backbone_grad=False)
        (grad_minus,) = torch.autograd.grad(loss_minus, [mask])
        self._average([grad_plus, grad_minus])
        return (grad_plus - grad_minus) / (2 * radius)

    def _exact_hvp(self, v: dict[str, torch.Tensor], x0, x1, records=None) -> torch.Tensor:
        """``∂_m ⟨∇_θ L_cl(θ_{t+1}, M), v⟩``: the directional derivative along ``v`` of the mask gradient,
        by forward-mode differentiation (:func:`torch.func.jvp` over :func:`torch.func.grad`).

        The mask gradient only backpropagates through the contrastive head. ``records``: step 2's forwards
        of both views at θ_{t+1}, recorded by :func:`metamask_fast._tangents.record_forward`; the backbone's
        tangents then come from them without a new forward. Without, the backbone runs once more, with
        tangents. BatchNorm runs on batch statistics without running buffers (see the module docstring)."""
        if records is not None:
            return self._exact_hvp_from_records(v, records)
        model = self.model
        params = dict(model.named_parameters())
        names = list(v)
        buffers = _tangents.batch_statistics_buffers(model)
        mask_module, logits = model.mask, model.mask.logits.detach()

        def mask_gradient(weights):
            features = [self._features(weights, buffers, x, backbone_grad=True) for x in (x0, x1)]

            def loss_of_logits(m):
                return self._head_loss(weights, buffers, features, functional_call(mask_module, {"logits": m}, ()))

            return torch.func.grad(loss_of_logits)(logits)

        primals = {name: params[name].detach() for name in names}
        tangents = {name: v[name].detach() for name in names}
        # No autograd graph is wanted around the transforms (they differentiate on their own): the other
        # parameters enter as constants.
        with torch.no_grad():
            _, hvp = torch.func.jvp(mask_gradient, (primals,), (tangents,))
        return hvp

    def _exact_hvp_from_records(self, v: dict[str, torch.Tensor], records) -> torch.Tensor:
        """:meth:`_exact_hvp` from step 2's recorded forwards: the backbone's output tangents along the
        backbone part of ``v``, then forward-over-reverse through the (small) contrastive head only."""
        model = self.model
        buffers = _tangents.batch_statistics_buffers(model)
        backbone_v = {name[len("backbone.") :]: t.detach() for name, t in v.items() if name.startswith("backbone.")}
        head_v = {name: t.detach() for name, t in v.items() if name.startswith("cl_head.")}
        params = dict(model.named_parameters())
        mask_module, logits = model.mask, model.mask.logits.detach()
        with torch.no_grad():
            features, feature_tangents = [], []
            dtype = logits.dtype  # bfloat16 records (autocast) are differentiated in the weights' precision
            for output, env in records:
                features.append(output.detach().flatten(1).to(dtype))
                tangent = _tangents.forward_tangent(self._traced, env, backbone_v) if backbone_v else None
                feature_tangents.append(torch.zeros_like(features[-1]) if tangent is None else tangent.flatten(1))

            def mask_gradient(features, head_weights):
                def loss_of_logits(m):
                    mask = functional_call(mask_module, {"logits": m}, ())
                    return self._head_loss(head_weights, buffers, features, mask)

                return torch.func.grad(loss_of_logits)(logits)

            primals = (tuple(features), {name: params[name].detach() for name in head_v})
            _, hvp = torch.func.jvp(mask_gradient, primals, (tuple(feature_tangents), head_v))
        return hvp

    def _regular_features(self, x: torch.Tensor) -> torch.Tensor:
        """``model.features(x)``, through the compiled backbone when ``compile_backbone`` is set."""
        if self._backbone is None:
            return self.model.features(x)
        return self._backbone(x).flatten(1) * self.model.mask()

    def _master(self, z: torch.Tensor) -> torch.Tensor:
        """Embeddings in the weights' dtype before a loss: under bfloat16 autocast the losses then return
        (and report) float32 values; they compute in float32 either way."""
        return z.to(self.model.mask.logits.dtype)

    def _global(self, *embeddings: torch.Tensor) -> list[torch.Tensor]:
        """The embeddings in the weights' dtype (:meth:`_master`); with ``distributed``, gathered from all
        ranks (one collective for all of them)."""
        embeddings = [self._master(z) for z in embeddings]
        return _gather_all(embeddings) if self.distributed else embeddings

    def _average(self, grads: list[torch.Tensor | None]) -> None:
        """With ``distributed``, average ``grads`` over the ranks in place."""
        if self.distributed:
            mmdist.average_gradients(grads)

    def _autocast(self):
        """The forwards' autocast context: bfloat16 for ``precision="bf16"``, none otherwise."""
        if self.precision == "bf16":
            return torch.autocast(self.model.mask.logits.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, x0: torch.Tensor, x1: torch.Tensor) -> dict[str, float]:
        """One training step on the two views ``x0``, ``x1`` of a batch.

        Returns python floats: ``loss``, ``loss_bt``, ``loss_cl`` (at θ_t), ``meta_step`` (1.0 when the
        mask's meta step ran, 0.0 on the calls that ``meta_interval`` skips and on skipped calls) and
        ``skipped`` (1.0 when step 1's loss or gradients were not finite and the call changed nothing, the
        losses then being the non-finite values; 0.0 otherwise); after a meta step also ``loss_cl_virtual``
        (L_cl at θ'), ``mask_grad_norm`` (the norm of the mask gradient) and ``mask_skipped`` (1.0 when a
        value of the meta part was not finite and the mask was not updated; 0.0 when it was); with
        ``timings=True`` the seconds per phase (class docstring). :attr:`step_count` counts every call,
        skipped ones included, so that the ``meta_interval`` schedule does not shift.
        """
        self._check_views(x0, x1)
        if self.channels_last:
            x0, x1 = (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in (x0, x1))
        self.model.train()
        clock = _PhaseClock(self.timings, self.model.mask.logits.device)
        meta_step = self.step_count % self.meta_interval == 0
        self.step_count += 1

        losses, skipped = self._regular_step(x0, x1)
        clock.lap("regular")
        if skipped or not meta_step:
            values = torch.stack([loss.detach() for loss in losses]).tolist()
            return _report(_LOSS_KEYS, values, clock, meta_step=0.0, skipped=float(skipped))

        virtual, records, grads = self._virtual_step(x0, x1)
        clock.lap("virtual")
        if virtual is None:
            return _mask_skipped(losses, clock)

        buffers = {name: b.clone() for name, b in self.model.named_buffers()}  # scratch BatchNorm buffers
        loss_virtual, direct, v, v_norm, finite = self._outer_gradient(virtual, buffers, x0, x1)
        clock.lap("outer")
        if not finite:
            return _mask_skipped(losses, clock, loss_virtual, direct)

        mask_grad = self._second_order_term(direct, v, v_norm, grads, buffers, x0, x1, records)
        clock.lap("second_order")

        return self._mask_update(mask_grad, losses, loss_virtual, clock)

    def _regular_step(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
        """Step 1, the regular step on θ only: the mask's gradient from L is never formed.

        Returns the losses ``(L, L_bt, L_cl)`` at θ_t (0-d tensors) and whether the step was skipped: when
        ``L`` or a gradient is not finite (checked after the distributed averaging, so that every rank sees
        the same values), the optimizer does not step and the BatchNorm running statistics, saved before the
        forwards, are put back."""
        model, params = self.model, self._params
        before = _running_statistics(model)
        with self._autocast():
            h0, h1 = self._regular_features(x0), self._regular_features(x1)
            z0_bt, z0_cl, z1_bt, z1_cl = model.bt_head(h0), model.cl_head(h0), model.bt_head(h1), model.cl_head(h1)
            z0_bt, z1_bt, z0_cl, z1_cl = self._global(z0_bt, z1_bt, z0_cl, z1_cl)
            loss_bt = _loss(barlow_twins_loss, z0_bt, z1_bt, self.lambd)
            loss_cl = _loss(nt_xent_loss, z0_cl, z1_cl, self.temperature)
            loss = _scaled(loss_bt, self.scale_loss) + self.weight_cl * loss_cl
        grads = _gradients(loss, params)
        self._average(grads)
        # ``loss`` carries a NaN or an infinity of either loss (0 · inf is NaN too).
        if not bool(_all_finite([loss, *grads])):
            _restore(before)
            return (loss, loss_bt, loss_cl), True
        for p, g in zip(params, grads):
            p.grad = g
        self.net_optimizer.step()
        self.net_optimizer.zero_grad(set_to_none=True)
        return (loss, loss_bt, loss_cl), False

    def _virtual_step(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[dict[str, torch.Tensor] | None, list | None,
                                                                        list]:
        """Step 2, the virtual step: θ' = the network optimizer's update, read-only on its state.

        ``g = ∇_θ L_cl(θ_{t+1}, M)`` through the real modules (their BatchNorm running statistics are put
        back: they move once per step), averaged over the ranks with ``distributed``; then θ', the update
        the network optimizer would make from ``g`` without touching its state (:meth:`_virtual_weights`).

        Returns θ' by name (None when ``L_cl`` or ``g`` is not finite), for the exact second-order term with
        a traced backbone the forwards of both views recorded at θ_{t+1} (None otherwise), and ``g`` (in the
        order of :attr:`_params`), at which the second-order term differentiates the update."""
        model, params = self.model, self._params
        statistics = _running_statistics(model)
        records = None
        with self._autocast():
            if self._traced is not None:  # the same forward, recorded for the exact second-order term
                records = [_tangents.record_forward(self._traced, x) for x in (x0, x1)]
                mask_value = model.mask()
                z0, z1 = (model.cl_head(output.flatten(1) * mask_value) for output, _ in records)
            else:
                z0 = model.cl_head(self._regular_features(x0))
                z1 = model.cl_head(self._regular_features(x1))
            loss_next = _loss(nt_xent_loss, *self._global(z0, z1), self.temperature)
        grads = _gradients(loss_next, params)
        self._average(grads)
        _restore(statistics)  # after the backward, which saved the buffers it read
        if not bool(_all_finite([loss_next, *grads])):
            return None, records, grads
        return self._virtual_weights(grads), records, grads

    def _outer_gradient(self, virtual: dict[str, torch.Tensor], buffers, x0: torch.Tensor, x1: torch.Tensor):
        """Step 3 at θ' (``virtual``), on the scratch BatchNorm ``buffers``: the direct mask gradient
        ``∂_m L_cl(θ', M)`` and ``v = ∇_θ' L_cl(θ', M)``, both averaged over the ranks with ``distributed``.

        Returns ``(L_cl(θ', M), direct, v, ‖v‖, finite)``: ``v`` by name, for the weights it does not vanish
        on; ``‖v‖`` a 0-d tensor (None when ``v`` is empty), which the finite difference needs anyway and
        which is also the check of ``v``; ``finite``: whether the loss, ``direct`` and ``‖v‖`` are finite
        (one host sync)."""
        mask = self.model.mask.logits
        with self._autocast():
            loss_virtual = self._contrastive_loss_at(virtual, buffers, x0, x1, backbone_grad=True)
        names = list(virtual)
        direct, *v = torch.autograd.grad(loss_virtual, [mask] + [virtual[n] for n in names], allow_unused=True)
        self._average([direct, *v])
        directions = {n: g for n, g in zip(names, v) if g is not None}
        v_norm = ops.global_norm(list(directions.values())) if directions else None
        finite = _all_finite([loss_virtual, direct])
        if v_norm is not None:
            finite = finite & torch.isfinite(v_norm).to(finite.device)
        return loss_virtual, direct, directions, v_norm, bool(finite)

    def _second_order_term(self, direct, v, v_norm, grads, buffers, x0, x1, records) -> torch.Tensor:
        """Step 4 around θ_{t+1}: the mask gradient ``direct + ∂_m ⟨∇_θ L_cl(θ_{t+1}, M), u⟩`` with
        ``u = J_Uᵀ v`` (:meth:`_hypergradient_direction`; for the authors' SGD ``u = −η·v``, so the term is
        their ``−η · HVP``), by the central finite difference along ``u`` (:meth:`_finite_difference_hvp`,
        on the scratch ``buffers``; ``v_norm`` is ‖v‖) or exactly (:meth:`_exact_hvp`, from step 2's
        ``records``; in float32 also under bfloat16 autocast, as the finite difference); ``direct`` itself
        with ``second_order="none"`` or an empty ``v``."""
        if self.second_order == "none" or not v:
            return direct
        scale, direction = self._hypergradient_direction(v, grads)
        if self.second_order == "exact":
            hvp = self._exact_hvp(direction, x0, x1, records)
        else:
            hvp = self._finite_difference_hvp(direction, buffers, x0, x1, norm=v_norm if scale is not None else None)
        return direct + hvp if scale is None else direct + scale * hvp

    def _mask_update(self, mask_grad: torch.Tensor, losses, loss_virtual: torch.Tensor, clock) -> dict[str, float]:
        """Step 5: the mask optimizer steps with ``mask_grad`` when it is finite (the check of the
        second-order term, on the host sync that fetches the returned values). Returns the step's dict."""
        loss, loss_bt, loss_cl = losses
        values = torch.stack(
            [loss.detach(), loss_bt.detach(), loss_cl.detach(), loss_virtual.detach(), mask_grad.norm(),
             torch.isfinite(mask_grad).all().to(loss.dtype)]
        ).tolist()
        if not values[-1]:
            return _mask_skipped(losses, clock, loss_virtual, mask_grad)
        mask = self.model.mask.logits
        mask.grad = mask_grad
        self.mask_optimizer.step()
        self.mask_optimizer.zero_grad(set_to_none=True)
        return _report(_META_KEYS, values, clock, meta_step=1.0, skipped=0.0, mask_skipped=0.0)


class SingleLossStep:
    """One SGD step on the Barlow Twins loss (``"barlowtwins"``) or NT-Xent alone (``"simclr"``).

    The baselines' counterpart of :class:`~metamask_fast.meta.MetaMaskStep`, with the same ``step(x0, x1)``
    interface and keys; the loss that is not trained is still reported (computed on detached embeddings).
    ``distributed``: as for :class:`~metamask_fast.meta.MetaMaskStep`, both losses are computed on the
    embeddings gathered from all ranks and the gradients (``.grad`` of the optimizer's parameters) are
    averaged over the ranks before the optimizer steps. ``precision="bf16"``: the forwards run under
    bfloat16 autocast and the losses in float32, as in MetaMaskStep. ``channels_last``: the model's 4-d
    weights are converted once, here, and 4-d inputs at every step. ``scale_loss``: the trained loss is
    ``scale_loss · L_bt`` for ``"barlowtwins"`` (``loss_bt`` reported unscaled).

    ``step`` returns ``loss``, ``loss_bt``, ``loss_cl`` and ``skipped``: 1.0 when the trained loss or a
    gradient of the optimizer's parameters was not finite (checked after the distributed averaging, one
    fused reduction); the call then changes nothing (no optimizer step, BatchNorm running statistics put
    back, the gradients cleared). A non-finite value of the loss that is not trained is reported, not acted
    on.
    """

    def __init__(self, model: MetaMaskModel, optimizer: torch.optim.Optimizer, *, method: str,
                 lambd: float, temperature: float, distributed: bool = False, precision: str = "fp32",
                 channels_last: bool = False, scale_loss: float = 1.0):
        if method not in ("barlowtwins", "simclr"):
            raise ValueError(f"method must be 'barlowtwins' or 'simclr', got {method!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
        _check_distributed(distributed)
        self.model, self.optimizer, self.method = model, optimizer, method
        self.lambd, self.temperature = lambd, temperature
        self.scale_loss = float(check_number("scale_loss", scale_loss, minimum=0, strict=True))
        self.distributed, self.precision, self.channels_last = distributed, precision, channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)

    def step(self, x0: torch.Tensor, x1: torch.Tensor) -> dict[str, float]:
        if self.channels_last:
            x0, x1 = (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in (x0, x1))
        dtype = self.model.mask.logits.dtype
        autocast = (torch.autocast(x0.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        before = _running_statistics(self.model)  # put back when the step is skipped
        with autocast:
            z_bt0, z_cl0 = self.model(x0)
            z_bt1, z_cl1 = self.model(x1)
        # The losses in the weights' precision (they compute in float32 either way).
        z_bt0, z_cl0, z_bt1, z_cl1 = (z.to(dtype) for z in (z_bt0, z_cl0, z_bt1, z_cl1))
        if self.distributed:  # one collective; the embeddings of the loss that is not trained carry no gradient
            trained = self.method == "barlowtwins"
            z_bt0, z_bt1, z_cl0, z_cl1 = _gather_all([
                z_bt0 if trained else z_bt0.detach(), z_bt1 if trained else z_bt1.detach(),
                z_cl0.detach() if trained else z_cl0, z_cl1.detach() if trained else z_cl1,
            ])
        if self.method == "barlowtwins":
            loss_bt = _loss(barlow_twins_loss, z_bt0, z_bt1, self.lambd)
            loss = _scaled(loss_bt, self.scale_loss)
            with torch.no_grad():
                loss_cl = _loss(nt_xent_loss, z_cl0.detach(), z_cl1.detach(), self.temperature)
        else:
            loss = _loss(nt_xent_loss, z_cl0, z_cl1, self.temperature)
            with torch.no_grad():
                other = _loss(barlow_twins_loss, z_bt0.detach(), z_bt1.detach(), self.lambd)
            loss_bt, loss_cl = other, loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        if self.distributed:
            mmdist.average_gradients(grads)
        # After the averaging: the same decision on every rank. One sync for the check and the values.
        finite = _all_finite([loss, *grads])
        values = torch.stack([loss.detach(), loss_bt.detach(), loss_cl.detach(), finite.to(loss.dtype)]).tolist()
        skipped = not values[-1]
        if skipped:
            _restore(before)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        return {**dict(zip(("loss", "loss_bt", "loss_cl"), values[:3])), "skipped": float(skipped)}


class _PhaseClock:
    """Seconds per phase of a step, when enabled (CUDA is synchronised at each phase's end, so that a
    phase's kernels count in that phase); otherwise it does nothing."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.times: dict[str, float] = {}
        self.last = time.perf_counter() if enabled else 0.0

    def lap(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[f"time_{phase}"] = now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        return dict(self.times)
