r"""Compiled multi-tensor ops, each with a pure-PyTorch fallback.

Every op exists twice: as a kernel of the extension ``metamask_fast._C`` (``torch.ops.metamask_fast.<op>``,
CPU kernel always, CUDA kernel when the extension was built with a CUDA toolkit) and as ``_<op>_torch`` in
this module, the same result with ``torch._foreach`` ops. The ops are ``global_norm``, ``add_scaled_``
(``x += α y`` in place), ``add_scaled`` (``x + α y`` into new tensors: the ``θ ± R v`` of the finite
difference) and ``virtual_sgd_step`` (the update ``torch.optim.SGD`` would make, into new tensors).

Fallback rule: the public wrapper checks its arguments (``TypeError``/``ValueError`` naming the argument),
then runs the compiled op when the extension is loaded, has a kernel for the inputs' device and the tensors
are dense with one layout per pair (contiguous or channels_last, the same strides across the lists: the
kernels walk flat memory; parameter lists always qualify), and the fallback otherwise.
``METAMASK_FAST_NO_EXT=1`` in the environment, before this module is imported, skips
loading the extension, so the fallbacks can be tested and timed on a machine where it is built.
:data:`HAS_EXTENSION` says whether it is loaded.

Precision: results have the inputs' dtype. The elementwise ops compute float16 and bfloat16 in float32 and
round once per element, without fused multiply-adds on any device (each product and sum rounded), so the
CPU and CUDA kernels give the same bits. For the norm, the compiled kernels accumulate squares in float64
for every dtype: in C++ the wider sum is free (the pass is memory bound), whereas torch's own float64
reductions of float32 tensors are many times slower on the CPU, so the fallbacks keep float32 sums for
float32, float16 and bfloat16 inputs. The CUDA kernel is right over the whole range by itself (float64
inputs are summed in power-of-two units of each chunk's peak), so its path reads nothing back to the host.
Elsewhere a norm whose squares may have overflowed or underflowed their sum's dtype (fallbacks, float32 or
bfloat16 inputs: a norm outside [1e-18, 1e18]; float64 on the CPU kernel or a fallback: outside [1e-150,
1e150]) is computed again in float64 in units of the largest magnitude, one tensor at a time (one device
sync for the check; a float64 copy of one tensor at most).

The compiled ops carry fake (meta) kernels, for ``torch.compile``, and ``global_norm`` an autograd formula,
registered below; the sweeps run under ``torch.no_grad``.
"""

import bisect
import os
from collections.abc import Sequence

import torch

from metamask_fast._checks import check_number

_EXTENSION_ERROR: str | None = None
if os.environ.get("METAMASK_FAST_NO_EXT") == "1":
    _EXTENSION_ERROR = "disabled by METAMASK_FAST_NO_EXT=1"
else:
    try:
        from metamask_fast import _C  # noqa: F401  (loading it registers torch.ops.metamask_fast)
    except ImportError as exc:
        _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

#: Whether the compiled ops of ``metamask_fast._C`` are loaded.
HAS_EXTENSION: bool = _EXTENSION_ERROR is None

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _kernel_devices(op: str) -> frozenset[str]:
    """The device types that the compiled ``op`` has kernels for (a CPU-only build has no CUDA kernels).

    Looked up once, at import, so that the wrappers stay traceable by ``torch.compile``."""
    if not HAS_EXTENSION:
        return frozenset()
    name = f"metamask_fast::{op}"
    return frozenset(
        device
        for device in ("cpu", "cuda")
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, torch._C._dispatch_key_for_device(device))
    )


def _check_tensor_list(op: str, arg: str, tensors: object) -> list[torch.Tensor]:
    """``tensors`` as a list, after checking that it is a non-empty list or tuple of tensors of one floating
    dtype (float32, float64, float16 or bfloat16) on one device. The messages match the C++ checks."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: `{arg}` must be a list or tuple of tensors, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{op}: `{arg}` must be a non-empty list of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{arg}` must hold tensors, but {arg}[{i}] is a {type(t).__name__}")
    first = tensors[0]
    if first.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: `{arg}` must hold float32, float64, float16 or bfloat16 tensors, got {first.dtype}")
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype:
            raise ValueError(
                f"{op}: all of `{arg}` must share one dtype, but {arg}[0] is {first.dtype} and {arg}[{i}] is {t.dtype}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: all of `{arg}` must be on one device, but {arg}[0] is on {first.device} "
                f"and {arg}[{i}] is on {t.device}"
            )
    return list(tensors)


# ---------------------------------------------------------------------------------------------------------
# global_norm

_GLOBAL_NORM_DEVICES = _kernel_devices("global_norm")


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The Euclidean norm of all elements of all ``tensors`` together, computed in one pass:

    .. math:: \lVert (t_1, \dots, t_k) \rVert = \sqrt{\textstyle\sum_i \sum_j t_{i,j}^2}

    Returns a 0-d tensor of the inputs' dtype on their device. Differentiable, with
    :math:`\partial \lVert t \rVert / \partial t_i = t_i / \lVert t \rVert`, taken as 0 where the norm is 0.
    ``tensors`` must be a non-empty list or tuple of float32, float64, float16 or bfloat16 tensors of one
    dtype on one device (``TypeError``/``ValueError`` otherwise); any shapes and strides, empty tensors allowed.
    """
    tensors = _check_tensor_list("global_norm", "tensors", tensors)
    if HAS_EXTENSION and tensors[0].device.type in _GLOBAL_NORM_DEVICES:
        norm = torch.ops.metamask_fast.global_norm.default(tensors)
        # Only the CPU kernel's unscaled float64 sums of float64 squares need the check (module docstring).
        if norm.device.type == "cpu":
            return _checked_norm(norm, tensors, float64_sums=True)
        return norm
    return _global_norm_torch(tensors)


def _checked_norm(norm: torch.Tensor, tensors: list[torch.Tensor], *, float64_sums: bool) -> torch.Tensor:
    """``norm``, or, where its sum of squares may have overflowed or underflowed, the norm computed again
    in units of the largest magnitude. Squares of float64 values leave float64 outside about
    [1e-154, 1e154], squares of float32 and bfloat16 values leave float32 outside [1e-19, 1.8e19] (float16
    squares always fit float32, and every float32 square fits float64): a norm outside [1e-150, 1e150],
    resp. [1e-18, 1e18] (0, inf and nan included) is recomputed. One device sync where a check applies;
    none while tracing, where the branch would depend on the data."""
    dtype = tensors[0].dtype
    if dtype == torch.float64:
        bounds = (1e-150, 1e150)
    elif dtype in (torch.float32, torch.bfloat16) and not float64_sums:
        bounds = (1e-18, 1e18)
    else:
        return norm
    if torch.compiler.is_compiling() or bool((norm > bounds[0]) & (norm < bounds[1])):
        return norm
    peaks = [t.detach().abs().amax() for t in tensors if t.numel()]
    if not peaks:
        return norm
    peak = torch.stack(peaks).amax().double()
    scale = torch.where(torch.isfinite(peak) & (peak > 0), peak, 1)  # nan and inf stay what they are
    # One float64 copy at a time: this path runs on exactly the steps that must not run out of memory.
    norms = [torch.linalg.vector_norm(t.to(torch.float64) / scale) for t in tensors]
    return (torch.linalg.vector_norm(torch.stack(norms)) * scale).to(norm.dtype)


def _global_norm_torch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Fallback of :func:`global_norm`: the norm of the per-tensor norms."""
    dtype = tensors[0].dtype
    # float16/bfloat16 norms are kept in float32 before they are combined. float32 and float64 inputs keep
    # torch's default: asking for any dtype, even their own, makes torch convert on the way, which is
    # slower on the CPU.
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else None)
    return _checked_norm(torch.linalg.vector_norm(torch.stack(norms)), tensors, float64_sums=False).to(dtype)


def _global_norm_fake(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Fake (meta) kernel: the compiled op's checks and output metadata, for ``torch.compile``."""
    _check_tensor_list("global_norm", "tensors", tensors)
    return tensors[0].new_empty(())


def _global_norm_setup_context(ctx, inputs, output) -> None:
    (tensors,) = inputs
    ctx.save_for_backward(*tensors, output)


def _global_norm_backward(ctx, grad: torch.Tensor) -> tuple[list[torch.Tensor]]:
    *tensors, norm = ctx.saved_tensors
    # The norm is 0 only when every element is; there the subgradient 0 is used instead of 0/0. The safe
    # denominator keeps the unused branch finite, so double backward stays finite too.
    is_zero = norm == 0
    scale = torch.where(is_zero, 0, grad / torch.where(is_zero, 1, norm))
    # One gradient per input, a list for `tensors`. Not torch._foreach_mul: its backward with a tensor
    # scalar that requires grad fails ("inconsistent range for TensorList output", torch 2.14), which
    # would break double backward.
    return ([t * scale for t in tensors],)


if HAS_EXTENSION:
    torch.library.register_fake("metamask_fast::global_norm")(_global_norm_fake)
    torch.library.register_autograd(
        "metamask_fast::global_norm", _global_norm_backward, setup_context=_global_norm_setup_context
    )


# ---------------------------------------------------------------------------------------------------------
# add_scaled_, add_scaled and virtual_sgd_step: the sweeps of the meta step (SPEC §1 steps 2 and 4).

_ADD_SCALED_DEVICES = _kernel_devices("add_scaled_")
_VIRTUAL_SGD_DEVICES = _kernel_devices("virtual_sgd_step")


def _compiled(devices: frozenset[str], *lists: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled op with kernels for ``devices`` can take these lists (see the module docstring).

    Cheap on purpose: it only looks at what picks the path (lists of dense tensors, the first one's
    device). Everything else about the lists the kernels check themselves, in C++, with the messages of
    the Python checks that the fallback path runs (checking a ResNet's lists in Python would cost a
    third of the sweep)."""
    if not HAS_EXTENSION:
        return False
    try:
        first = lists[0]
        return (
            all(isinstance(tensors, (list, tuple)) for tensors in lists)
            and first[0].device.type in devices
            and all(_dense(t) for t in first)
            and all(_same_layout(t, ref) for tensors in lists[1:] for t, ref in zip(tensors, first))
        )
    except (AttributeError, IndexError, TypeError):  # not lists of tensors: the Python checks say why
        return False


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """The same memory order as ``ref`` (shapes are checked elsewhere): equal strides in every dimension
    of size > 1, as the C++ ``same_layout``."""
    return t.stride() == ref.stride() or all(
        s == r for s, r, size in zip(t.stride(), ref.stride(), ref.shape) if size > 1
    )


def _dense(t: torch.Tensor) -> bool:
    """Contiguous or channels_last: the dense layouts of weights. (The kernels take any dense layout.)"""
    return (
        t.is_contiguous()
        or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )


def _check_add_scaled(op: str, tensors, others, alpha) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    tensors = _check_tensor_list(op, "tensors", tensors)
    others = _check_tensor_list(op, "others", others)
    _check_pairs(op, "tensors", tensors, "others", others)
    return tensors, others, check_number(f"{op}: `alpha`", alpha)


def add_scaled_(tensors: Sequence[torch.Tensor], others: Sequence[torch.Tensor], alpha: float) -> None:
    r"""In place, for every pair: :math:`x_i \mathrel{+}= \alpha\, y_i`.

    ``tensors`` and ``others`` are equally long lists of tensors of one dtype on one device, pairwise of
    one shape; ``alpha`` a finite number. ``others[i]`` may be ``tensors[i]`` itself, and the same tensor
    may appear several times in ``others``, but no two of ``tensors`` may share memory, nor ``tensors[i]``
    with any other ``others[j]`` (``ValueError``). Not differentiable (it runs under ``torch.no_grad``);
    like any in-place op it bumps the autograd version counters of ``tensors``, so that a backward pass
    that saved one of them fails instead of using the new values.
    """
    alpha = check_number("add_scaled_: `alpha`", alpha)
    with torch.no_grad():
        if _compiled(_ADD_SCALED_DEVICES, tensors, others):
            torch.ops.metamask_fast.add_scaled_.default(tensors, others, alpha)
            _bump_versions(tensors)
            return
        tensors, others, alpha = _check_add_scaled("add_scaled_", tensors, others, alpha)
        _check_no_internal_overlap("add_scaled_", "tensors", tensors)
        _check_no_overlap("add_scaled_", "tensors", tensors, "others", others, same_allowed=True)
        _check_no_cross_overlap("add_scaled_", "tensors", tensors, ("others", others))
        _add_scaled__torch(tensors, others, alpha)


def _add_scaled__torch(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float) -> None:
    scaled, alpha_kw = _alpha_times(tensors, others, alpha)
    torch._foreach_add_(tensors, scaled, **alpha_kw)


def _alpha_times(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float):
    """``(others, alpha=alpha)`` for ``torch._foreach_add``, or, for float16 and bfloat16, ``(α others,
    alpha=1)``: torch's add rounds ``alpha`` to the tensors' dtype (1e-6 is 1.3% off in float16, and
    float16 cannot take 1e5 at all: RuntimeError), whereas its mul applies it in float32."""
    if tensors[0].dtype in (torch.float16, torch.bfloat16) and alpha != 1:
        return torch._foreach_mul(others, alpha), {"alpha": 1}
    return others, {"alpha": alpha}


def add_scaled(
    tensors: Sequence[torch.Tensor],
    others: Sequence[torch.Tensor],
    alpha: float,
    *,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    r""":math:`x_i + \alpha\, y_i` for every pair, into new tensors or into ``out`` (``tensors`` and
    ``others`` unchanged unless ``out`` is ``tensors``).

    The same arguments as :func:`add_scaled_`. Without ``out`` the results are new tensors, with the memory
    layout of ``tensors[i]`` where that is contiguous or channels_last, contiguous otherwise. With
    ``out``, a list of tensors like ``tensors`` (shape, dtype, device), they are written into ``out[i]``,
    which may be ``tensors[i]`` itself but must not otherwise share memory with ``tensors[i]`` or
    ``others[i]``, nor any memory with another ``out[j]``, ``tensors[j]`` or ``others[j]`` (``ValueError``);
    the list of the ``out`` tensors is returned, their autograd version counters bumped. Keeping ``out``
    from one call to the next saves allocating and page-faulting fresh memory on every call, which on the
    CPU costs more than the sweep.
    """
    alpha = check_number("add_scaled: `alpha`", alpha)
    with torch.no_grad():
        if out is None and _compiled(_ADD_SCALED_DEVICES, tensors, others):
            return list(torch.ops.metamask_fast.add_scaled.default(tensors, others, alpha))
        if out is not None and _compiled(_ADD_SCALED_DEVICES, tensors, others, out):
            torch.ops.metamask_fast.add_scaled.out(tensors, others, alpha, out=out)
            _bump_versions(out)
            return list(out)
        tensors, others, alpha = _check_add_scaled("add_scaled", tensors, others, alpha)
        if out is None:
            return _add_scaled_torch(tensors, others, alpha)
        out = _check_tensor_list("add_scaled", "out", out)
        _check_pairs("add_scaled", "tensors", tensors, "out", out)
        _check_no_internal_overlap("add_scaled", "out", out)
        _check_no_overlap("add_scaled", "out", out, "tensors", tensors, same_allowed=True)
        _check_no_overlap("add_scaled", "out", out, "others", others, same_allowed=False)
        _check_no_cross_overlap("add_scaled", "out", out, ("tensors", tensors), ("others", others))
        _add_scaled_out_torch(tensors, others, alpha, out)
        return out


def _add_scaled_torch(tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    scaled, alpha_kw = _alpha_times(tensors, others, alpha)
    results = torch._foreach_add(tensors, scaled, **alpha_kw)
    return [r if _dense(t) else r.contiguous() for r, t in zip(results, tensors)]


def _add_scaled_out_torch(
    tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float, out: list[torch.Tensor]
) -> None:
    """Fallback of ``add_scaled(..., out=out)``: ``out = x`` then ``out += α y``, the same rounding as
    ``x + α y``. Correct because ``out[i]`` is ``tensors[i]`` or does not overlap either input."""
    scaled, alpha_kw = _alpha_times(tensors, others, alpha)
    torch._foreach_copy_(out, tensors)
    torch._foreach_add_(out, scaled, **alpha_kw)


def _bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Tell autograd that the compiled op wrote ``tensors``, as torch's own in-place ops do: the custom ops
    have no ADInplaceOrView kernel, so nothing else bumps the version counters, and a backward pass that
    saved one of these tensors would silently use the new values. (One C++ call for the whole list; skipped
    while ``torch.compile`` traces, where functionalization replays the mutation with torch's own ops.)"""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(tensors)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The first and one-past-last byte that ``t`` can touch, ``(0, 0)`` for an empty tensor or one without
    storage (a meta tensor; torch strides are never negative)."""
    if t.numel() == 0 or t.data_ptr() == 0:
        return 0, 0
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (span + 1) * t.itemsize


def _check_no_internal_overlap(op: str, name: str, written: list[torch.Tensor]) -> None:
    """No element of a written tensor may share memory with another of its elements (an expanded tensor):
    the dense tensors of the compiled path never do, and torch's own error would not name the argument."""
    for i, t in enumerate(written):
        if torch._debug_has_internal_overlap(t) == 1:  # 1: MemOverlap::Yes (2: too hard to tell, left to torch)
            raise ValueError(
                f"{op}: elements of {name}[{i}] share memory (an expanded tensor, strides {t.stride()}); "
                "pass a tensor with memory of its own (e.g. .clone())"
            )


def _check_no_overlap(
    op: str, written_name: str, written: list[torch.Tensor], read_name: str, read: list[torch.Tensor], *, same_allowed: bool
) -> None:
    """``written[i]`` must not share memory with ``read[i]``, except, where ``same_allowed``, by being the very
    same elements (an in-place update). The same rule and message as the C++ ``check_no_overlap``."""
    for i, (w, r) in enumerate(zip(written, read)):
        (w_low, w_high), (r_low, r_high) = _byte_range(w), _byte_range(r)
        if w_low >= r_high or r_low >= w_high:
            continue
        if same_allowed and w.data_ptr() == r.data_ptr() and w.stride() == r.stride():
            continue
        raise ValueError(
            f"{op}: {written_name}[{i}] shares memory with {read_name}[{i}]"
            + (" without being the same tensor" if same_allowed else "")
            + "; pass a separate tensor"
        )


def _check_no_cross_overlap(
    op: str, written_name: str, written: list[torch.Tensor], *reads: tuple[str, list[torch.Tensor]]
) -> None:
    """Aliasing across pairs (``_check_no_overlap`` covers each pair ``written[i]``, ``read[i]``): no two of
    ``written`` may share memory, and ``written[i]`` none with any ``read[j]``, ``j != i``, of the lists
    ``reads`` (``(name, list)`` pairs); reads may share memory with each other. The same algorithm, and so
    the same message for the same arguments, as the C++ ``check_no_cross_overlap``: the written byte ranges,
    sorted, must be disjoint, and each read range is looked up among them (O(n log n), not O(n²)). Byte
    ranges are exact for dense tensors and err on the safe side for others (two interleaved views of one
    storage count as sharing memory)."""
    ranges = sorted((*_byte_range(t), i) for i, t in enumerate(written))
    ranges = [r for r in ranges if r[1] != 0]  # no memory touched
    for (_, previous_end, previous), (begin, _, current) in zip(ranges, ranges[1:]):
        if begin < previous_end:
            first, second = sorted((previous, current))
            raise ValueError(
                f"{op}: {written_name}[{first}] and {written_name}[{second}] share memory; pass separate tensors"
            )
    ends = [end for _, end, _ in ranges]  # the ranges are disjoint and sorted by begin, hence also by end
    for read_name, read in reads:
        for j, t in enumerate(read):
            begin, end = _byte_range(t)
            if end == 0:
                continue
            k = bisect.bisect_right(ends, begin)
            while k < len(ranges) and ranges[k][0] < end:
                if ranges[k][2] != j:
                    raise ValueError(
                        f"{op}: {written_name}[{ranges[k][2]}] shares memory with {read_name}[{j}]; "
                        "pass a separate tensor"
                    )
                k += 1


def virtual_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    buffers: Sequence[torch.Tensor | None],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    r"""The weights ``torch.optim.SGD`` would produce, without changing ``params`` or ``buffers``.

    For every weight ``θ`` with gradient ``g`` and momentum buffer ``b`` (``None`` before the first step):

    .. math::
        d = g + \mathrm{wd}\,θ, \qquad
        b' = \begin{cases} d & b = \text{None} \\ μ b + (1 - \text{dampening})\, d & \text{otherwise}\end{cases}, \qquad
        θ' = θ - η \cdot \begin{cases} d + μ b' & \text{nesterov} \\ b' & \text{otherwise}\end{cases}

    (with ``momentum = 0``, ``θ' = θ - η d``). A weight whose gradient is ``None`` is returned as it is
    (detached, not copied). Returns new tensors that do not require grad, or, with ``out`` (a list like
    ``params``: shape, dtype, device, layout), writes θ' into those and returns them; then every gradient
    must be a tensor and ``out[i]`` must share no memory with any input or another ``out[j]`` (the rules
    of :mod:`metamask_fast.optim_ops`).
    """
    op = "virtual_sgd_step"
    params = _check_tensor_list(op, "params", params)
    if not isinstance(grads, (list, tuple)) or len(grads) != len(params):
        raise ValueError(f"{op}: `grads` must be a list as long as `params` (None where no gradient)")
    if not isinstance(buffers, (list, tuple)) or len(buffers) != len(params):
        raise ValueError(f"{op}: `buffers` must be a list as long as `params` (None where no buffer)")
    # torch.optim.SGD accepts a tensor lr; the update only needs its value.
    lr = check_number(f"{op}: `lr`", float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr, minimum=0)
    momentum = check_number(f"{op}: `momentum`", momentum, minimum=0)
    dampening = check_number(f"{op}: `dampening`", dampening)
    weight_decay = check_number(f"{op}: `weight_decay`", weight_decay, minimum=0)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{op}: `nesterov` must be a bool, got {type(nesterov).__name__}")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(f"{op}: `nesterov` needs momentum > 0 and dampening 0")
    stepped = [i for i, g in enumerate(grads) if g is not None]
    if out is not None and len(stepped) != len(params):
        raise ValueError(f"{op}: with `out`, every grad must be a tensor (leave weights without one out of the lists)")
    for i in stepped:
        _check_like(op, "grads", i, grads[i], "params", params[i])
        if buffers[i] is not None:
            _check_like(op, "buffers", i, buffers[i], "params", params[i])
    weights = [params[i].detach() for i in stepped]
    step_grads = [grads[i].detach() for i in stepped]
    step_buffers = [buffers[i] for i in stepped]
    coefficients = (lr, momentum, dampening, weight_decay, nesterov)
    if out is not None:
        return _virtual_sgd_step_into(weights, step_grads, step_buffers, coefficients, out)
    result = [p.detach() for p in params]
    if not stepped:
        return result
    with torch.no_grad():
        laid_out = [w if b is None else b for w, b in zip(weights, step_buffers)]  # aligned with weights
        if _compiled(_VIRTUAL_SGD_DEVICES, weights, step_grads, laid_out):
            updated = torch.ops.metamask_fast.virtual_sgd_step.default(weights, step_grads, step_buffers, *coefficients)
        else:
            updated = _virtual_sgd_step_torch(weights, step_grads, step_buffers, *coefficients)
    for i, new in zip(stepped, updated):
        result[i] = new
    return result


_NOTHING = torch.empty(0)  # an absent optional tensor in the overlap checks: it touches no memory


def _check_separate_out(op: str, out: list[torch.Tensor], reads: list[tuple[str, list]]) -> None:
    """The rules of the C++ ``check_separate_out`` for an op's ``out`` on its fallback path: ``out`` like the
    first list of ``reads`` (``(name, list)`` pairs, None for absent optional tensors), and no ``out[i]``
    sharing memory with any read tensor or another ``out[j]``."""
    (ref_name, ref), *_ = reads
    _check_pairs(op, ref_name, ref, "out", out)
    _check_no_internal_overlap(op, "out", out)
    present = [(name, [_NOTHING if t is None else t for t in tensors]) for name, tensors in reads]
    for name, tensors in present:
        _check_no_overlap(op, "out", out, name, tensors, same_allowed=False)
    _check_no_cross_overlap(op, "out", out, *present)


def _virtual_sgd_step_into(weights, grads, buffers, coefficients, out) -> list[torch.Tensor]:
    """:func:`virtual_sgd_step` into ``out``: the compiled op, or the fallback after the kernels' checks."""
    op = "virtual_sgd_step"
    out = _check_tensor_list(op, "out", out)
    with torch.no_grad():
        laid_out = [w if b is None else b for w, b in zip(weights, buffers)]
        if _compiled(_VIRTUAL_SGD_DEVICES, weights, grads, laid_out, out):
            torch.ops.metamask_fast.virtual_sgd_step.out(weights, grads, buffers, *coefficients, out=out)
        else:
            _check_separate_out(op, out, [("params", weights), ("grads", grads), ("buffers", buffers)])
            torch._foreach_copy_(out, _virtual_sgd_step_torch(weights, grads, buffers, *coefficients))
    _bump_versions(out)
    return out


def _virtual_sgd_step_torch(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> list[torch.Tensor]:
    """Fallback of :func:`virtual_sgd_step` for weights that all have a gradient: torch.optim.SGD's
    ``_multi_tensor_sgd`` arithmetic, out of place."""
    d = grads
    if weight_decay != 0:
        d = torch._foreach_add(d, weights, alpha=weight_decay)
    if momentum != 0:
        moved = [d_i if b is None else b.mul(momentum).add_(d_i, alpha=1 - dampening) for d_i, b in zip(d, buffers)]
        d = torch._foreach_add(d, moved, alpha=momentum) if nesterov else moved
    return torch._foreach_add(weights, d, alpha=-lr)


def _add_scaled__fake(tensors, others, alpha) -> None:
    _check_add_scaled("add_scaled_", list(tensors), list(others), alpha)


def _add_scaled_fake(tensors, others, alpha) -> list[torch.Tensor]:
    _check_add_scaled("add_scaled", list(tensors), list(others), alpha)
    return [torch.empty_like(t) for t in tensors]  # the compiled op takes dense tensors: their layout


def _add_scaled_out_fake(tensors, others, alpha, *, out) -> None:
    _check_add_scaled("add_scaled", list(tensors), list(others), alpha)
    _check_pairs("add_scaled", "tensors", list(tensors), "out", list(out))


def _virtual_sgd_step_fake(params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov):
    _check_tensor_list("virtual_sgd_step", "params", list(params))
    _check_pairs("virtual_sgd_step", "params", list(params), "grads", list(grads))
    return [torch.empty_like(p) for p in params]


def _virtual_sgd_step_out_fake(params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov, *, out):
    _virtual_sgd_step_fake(params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov)
    _check_pairs("virtual_sgd_step", "params", list(params), "out", list(out))


if HAS_EXTENSION:
    torch.library.register_fake("metamask_fast::add_scaled_")(_add_scaled__fake)
    torch.library.register_fake("metamask_fast::add_scaled")(_add_scaled_fake)
    torch.library.register_fake("metamask_fast::add_scaled.out")(_add_scaled_out_fake)
    torch.library.register_fake("metamask_fast::virtual_sgd_step")(_virtual_sgd_step_fake)
    torch.library.register_fake("metamask_fast::virtual_sgd_step.out")(_virtual_sgd_step_out_fake)


def _check_like(op: str, name: str, i: int, t: object, ref_name: str, ref: torch.Tensor) -> None:
    """``name[i]`` must be a tensor of the shape, dtype and device of ``ref_name[i]``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(
            f"{op}: {name}[{i}] must have the shape of {ref_name}[{i}], {tuple(ref.shape)}, got {tuple(t.shape)}"
        )
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"{op}: {name}[{i}] must have the dtype and device of {ref_name}[{i}] ({ref.dtype}, {ref.device}), "
            f"got {t.dtype}, {t.device}"
        )


def _check_pairs(op: str, name_a: str, a: list[torch.Tensor], name_b: str, b: list[torch.Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{op}: `{name_a}` and `{name_b}` must be equally long, got {len(a)} and {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        _check_like(op, name_b, i, y, name_a, x)
