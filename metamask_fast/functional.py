"""The two MetaMask losses as functions: Barlow Twins redundancy reduction and SimCLR's NT-Xent.

Both take a ``backend``: ``"auto"`` (the default; the environment variable ``METAMASK_FAST_BACKEND``
replaces it when set), ``"torch"`` (the plain-PyTorch path below, which is also the test oracle) or
``"triton"`` (the fused kernels of :mod:`metamask_fast.kernels`, a ``torch.library`` custom op).

``"auto"`` picks Triton for CUDA tensors of float32, bfloat16 or float16 on a GPU of compute capability 8.0
or newer when Triton is installed, and PyTorch otherwise; it never fails because a fast path is missing.
``"triton"`` asked for explicitly raises ``RuntimeError`` where it cannot run (no Triton; a CPU tensor
without ``TRITON_INTERPRET=1``, which runs the kernels in Triton's interpreter: slow, for testing) and
``TypeError`` for float64. Only :func:`barlow_twins_loss` has a Triton kernel: :func:`nt_xent_loss`
rejects an explicit ``backend="triton"`` and runs PyTorch when the environment variable asks for Triton.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from metamask_fast import _build
from metamask_fast._checks import check_number

__all__ = ["barlow_twins_loss", "nt_xent_loss", "bt_loss_backend"]

_BACKENDS = ("auto", "torch", "triton")
_NORMALIZATIONS = ("std", "bn")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Rows of C = ẑ_aᵀ ẑ_b held at once by the tiled path: memory stays at TILE_ROWS × D, never D × D.
C_TILE_ROWS = 128

# The range of 1/std (1/sqrt(var + eps) for "bn") per column, times sqrt(N) at the low end, in which the
# Triton kernels' float32 sums of squared deviations neither overflow (std up to 2^60/sqrt(N)) nor lose
# precision to denormals (std down to 2^-50).
_TRITON_RSTD_RANGE = (2.0**-60, 2.0**50)


def _resolve_backend(backend: str, z: torch.Tensor, *, has_triton_kernel: bool) -> str:
    """The backend (``"torch"`` or ``"triton"``) a loss call on ``z`` runs on; see the module docstring."""
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    from_environment = backend == "auto"
    if from_environment:
        backend = os.environ.get("METAMASK_FAST_BACKEND", "auto")
        if backend not in _BACKENDS:
            raise ValueError(f"METAMASK_FAST_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "triton" and from_environment and not has_triton_kernel):
        return "torch"
    if backend == "auto":
        # "auto" takes Triton only where it is the fast path (CUDA) and can run; it never raises.
        suits = has_triton_kernel and z.is_cuda and z.dtype in _TRITON_DTYPES and _triton_problem(z.device) is None
        return "triton" if suits else "torch"
    if not has_triton_kernel:
        raise RuntimeError("backend='triton': this loss has no Triton kernel; use backend='torch' or 'auto'")
    if z.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"z_a: backend='triton' takes float32, bfloat16 or float16 embeddings (it accumulates in "
            f"float32), got {z.dtype}; use backend='torch' for {z.dtype}"
        )
    problem = _triton_problem(z.device)
    if problem is not None:
        raise RuntimeError(
            f"backend='triton' cannot run on z_a ({z.device}): {problem}; use backend='torch' or 'auto'"
        )
    return "triton"


def _triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    status = _build.STATUS
    if status is not None and status.problem is not None:
        return f"metamask_fast.kernels is not available: {status.problem}"
    if importlib.util.find_spec("metamask_fast.kernels") is None:
        return "metamask_fast.kernels is not installed; run `pip install .`"
    if device.type == "cpu":
        from metamask_fast import _fused_loss

        if not _fused_loss.kernels_run_on_cpu():
            return (
                "the kernels run on CUDA devices, or on the CPU in Triton's interpreter when TRITON_INTERPRET=1 "
                "is set before the first Triton call (slow; for testing)"
            )
        return None
    if device.type != "cuda":
        return f"the kernels run on CUDA devices, not on {device.type}"
    if torch.version.hip is not None:
        return "this torch is a ROCm build; the kernels' float32 dots (input_precision='tf32x3') are NVIDIA-only"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"{device} has compute capability {capability[0]}.{capability[1]}; the kernels need 8.0+"
    return None


def bt_loss_backend(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[str, str | None]:
    """The backend :func:`barlow_twins_loss` with ``backend="auto"`` runs for ``dtype`` embeddings on
    ``device`` (``"triton"`` or ``"torch"``), and why it skips Triton (None when it does not). Where the
    environment forces a backend that cannot run there, ``("error", the error's message)``."""
    device = torch.device(device)
    try:
        backend = _resolve_backend("auto", torch.empty(0, dtype=dtype, device=device), has_triton_kernel=True)
    except (RuntimeError, TypeError) as error:
        return "error", str(error)
    if backend == "triton":
        return "triton", None
    if os.environ.get("METAMASK_FAST_BACKEND") == "torch":
        return "torch", "METAMASK_FAST_BACKEND=torch"
    if dtype not in _TRITON_DTYPES:
        return "torch", f"the kernels take float32, bfloat16 or float16 embeddings, not {dtype}"
    problem = _triton_problem(device)
    if problem is None:  # the interpreter on the CPU: only an explicit backend="triton" uses it
        problem = "'auto' takes Triton on CUDA devices only; Triton's interpreter runs with backend='triton'"
    return "torch", problem


def _check_embeddings(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {z.dtype}")
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if z_a.device != z_b.device:
        raise ValueError(f"z_a and z_b must be on the same device, got {z_a.device} and {z_b.device}")
    if z_a.dtype != z_b.dtype:
        raise TypeError(f"z_a and z_b must have the same dtype, got {z_a.dtype} and {z_b.dtype}")
    n, d = z_a.shape
    if n < 2:
        raise ValueError(f"z_a: the batch needs at least 2 samples, got {n}")
    if d < 1:
        raise ValueError("z_a: the embedding dimension must be at least 1, got 0")


def _check_weight(weight: torch.Tensor | None, z: torch.Tensor) -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.shape != (z.shape[1],):
        raise ValueError(f"weight must have shape ({z.shape[1]},), got {tuple(weight.shape)}")
    if weight.device != z.device:
        raise ValueError(f"weight must be on the device of z_a ({z.device}), got {weight.device}")
    if weight.dtype != z.dtype:
        raise TypeError(f"weight must have the dtype of z_a ({z.dtype}), got {weight.dtype}")


def _check_finite(**tensors: torch.Tensor | None) -> None:
    # Skipped while tracing: a data-dependent check would break the graph.
    if torch.compiler.is_compiling():
        return
    given = {name: t for name, t in tensors.items() if t is not None}
    # One reduction and one device sync for all arguments; the culprit is looked up only on failure.
    if bool(torch.stack([torch.isfinite(t).all() for t in given.values()]).all()):
        return
    name = next(name for name, t in given.items() if not bool(torch.isfinite(t).all()))
    raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float32 for the half-precision dtypes, whose range and sums the losses outgrow; else z's dtype."""
    return torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype


def _without_autocast(z: torch.Tensor):
    """The losses compute in their own precision (float32 for half inputs, see :func:`_compute_dtype`),
    also inside a caller's ``torch.autocast`` region, which would otherwise run their matmuls in half."""
    return torch.autocast(z.device.type, enabled=False)


def _power_of_two_near_peak(z: torch.Tensor, dim: int) -> torch.Tensor:
    """A power of two within a factor 2 of ``max |z|`` along ``dim`` (kept), 1 where that is 0 or not finite.

    Dividing by it is exact (barring underflow), so a computation that is invariant to the scale of its
    input gives bitwise the same result on ``z / scale``, without the sums and squares of values near the
    dtype's range overflowing it (float32 squares overflow from about 1.8e19). Not differentiated through:
    the callers' results do not depend on it."""
    peak = z.detach().abs().amax(dim=dim, keepdim=True)
    mantissa, _ = torch.frexp(peak)  # peak = mantissa * 2**e, 0.5 <= mantissa < 1
    return torch.where((peak > 0) & torch.isfinite(peak), peak / (2 * mantissa), 1)  # 2**(e - 1), exact


def _standardize(z: torch.Tensor, normalize: str = "std", eps: float = 1e-5) -> torch.Tensor:
    """Standardise every column of ``z`` over the batch.

    ``"std"`` (the authors' form): ``(z - mean) / std`` with the unbiased std and no eps.
    ``"bn"`` (official Barlow Twins, ``BatchNorm1d(affine=False)`` in training mode):
    ``(z - mean) / sqrt(var + eps)`` with the biased variance.

    Each column is first divided by a power of two near its largest magnitude (``eps`` by its square), which
    changes no result but keeps the mean and variance of values near the dtype's range from overflowing,
    and (``"std"``) those of denormals from underflowing. ``"bn"`` scales only columns of values above 1,
    so that ``eps / scale²`` cannot overflow, and keeps it from underflowing to 0, so that a constant column
    still gives 0 / (not 0): where it would underflow, it is negligible next to any non-zero variance.
    """
    scale = _power_of_two_near_peak(z, 0)
    if normalize != "std":
        scale = scale.clamp_min(1)
    z = z / scale
    centred = z - z.mean(dim=0)
    if normalize == "std":
        return centred / z.std(dim=0)
    scaled_eps = (eps / scale / scale).clamp_min(torch.finfo(z.dtype).tiny)
    return centred / torch.sqrt(z.var(dim=0, unbiased=False) + scaled_eps)


class _SquaredCrossCorrelationNorm(torch.autograd.Function):
    """``F(a, b) = ‖aᵀb‖²_F`` for ``a, b`` of shape (N, D), without a D × D tensor.

    Gram path (N < D): ``F = ⟨a aᵀ, b bᵀ⟩`` in O(N²D); gradients ``∂F/∂a = 2 (b bᵀ) a`` and
    ``∂F/∂b = 2 (a aᵀ) b``.
    Tiled C path (N ≥ D): for row blocks ``T_j = a[:, j]ᵀ b`` of ``aᵀb``, ``F = Σ_j ‖T_j‖²``; the backward
    recomputes each tile: ``∂F/∂a[:, j] = 2 b T_jᵀ`` and ``∂F/∂b = 2 Σ_j a[:, j] T_j``.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, d = a.shape
        if n < d:
            gram_a, gram_b = a @ a.T, b @ b.T
            ctx.save_for_backward(a, b, gram_a, gram_b)
            return torch.sum(gram_a * gram_b)
        ctx.save_for_backward(a, b)
        total = a.new_zeros(())
        for start in range(0, d, C_TILE_ROWS):
            total = total + torch.sum(torch.square(a[:, start : start + C_TILE_ROWS].T @ b))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Differentiable operations only, so that a double backward (create_graph=True, grad mode on here)
        # is exact; the Gram matrices saved by the forward carry no graph, so that case recomputes them.
        create_graph = torch.is_grad_enabled()
        scale = 2 * grad_out
        if len(ctx.saved_tensors) == 4:
            a, b, gram_a, gram_b = ctx.saved_tensors
            if create_graph:
                gram_a, gram_b = a @ a.T, b @ b.T
            return scale * (gram_b @ a), scale * (gram_a @ b)
        a, b = ctx.saved_tensors
        grad_a_tiles = []
        grad_b = torch.zeros_like(b)
        for start in range(0, a.shape[1], C_TILE_ROWS):
            a_tile = a[:, start : start + C_TILE_ROWS]
            tile = a_tile.T @ b
            grad_a_tiles.append(b @ tile.T)
            grad_b = torch.addmm(grad_b, a_tile, tile) if create_graph else grad_b.addmm_(a_tile, tile)
        return scale * torch.cat(grad_a_tiles, dim=1), scale * grad_b


def barlow_twins_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    lambd: float = 5e-3,
    *,
    weight: torch.Tensor | None = None,
    normalize: str = "std",
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """Barlow Twins redundancy-reduction loss.

    With ``ẑ`` the column-standardised embeddings (see :func:`_standardize`), ``w`` the optional
    per-dimension ``weight`` and ``C = diag(w) ẑ_aᵀ ẑ_b diag(w) / N``::

        L = Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²
          = Σ_i (1 - C_ii)² + λ (‖C‖²_F - Σ_i C_ii²)

    ``C_ii`` costs O(ND) and ``‖C‖²_F`` is computed by the Gram path (N < D) or the tiled C path (N ≥ D),
    so no D × D tensor is ever built. float16 and bfloat16 inputs are computed in float32 (the unscaled
    Gram products overflow float16). Returns a scalar tensor of the inputs' dtype.

    Under ``torch.compile`` the checks that need the values (non-finite inputs, and the Triton kernels'
    float32 range of column statistics, which ``"auto"`` answers by falling back to PyTorch) are skipped:
    a compiled call with NaN/Inf inputs or columns of extreme spread returns a non-finite or wrong loss
    instead of raising. Shapes, dtypes and devices are still checked.
    """
    _check_embeddings(z_a, z_b)
    explicit = backend == "triton" or (backend == "auto" and os.environ.get("METAMASK_FAST_BACKEND") == "triton")
    backend = _resolve_backend(backend, z_a, has_triton_kernel=True)
    _check_weight(weight, z_a)
    check_number("lambd", lambd, minimum=0)
    if not isinstance(normalize, str) or normalize not in _NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {_NORMALIZATIONS}, got {normalize!r}")
    check_number("eps", eps, minimum=0, strict=True)

    if backend == "triton":
        from metamask_fast import _fused_loss

        outputs = _fused_loss.barlow_twins_fused(z_a, z_b, weight, float(lambd), normalize == "std", float(eps))
        loss = outputs[0]
        if torch.compiler.is_compiling():
            return loss.to(z_a.dtype)
        # The kernels' column statistics are float32 sums of squares: a column whose spread leaves
        # _TRITON_RSTD_RANGE overflows them (a wrong, even finite, loss) or underflows them. A non-finite input
        # makes its column's mean or variance non-finite, hence out of range too. One sync for all of it; the
        # inputs are searched only when it fails.
        low, high = math.sqrt(z_a.shape[0]) * _TRITON_RSTD_RANGE[0], _TRITON_RSTD_RANGE[1]
        in_range = [((rstd >= low) & (rstd <= high)).all() for rstd in (outputs[2], outputs[4])]
        if bool(torch.stack([torch.isfinite(loss), *in_range]).all()):
            return loss.to(z_a.dtype)
        _check_finite(z_a=z_a, z_b=z_b, weight=weight)
        if bool(in_range[0] & in_range[1]):
            return loss.to(z_a.dtype)  # finite statistics, a loss beyond float32 (huge weights): as PyTorch
        if explicit:
            name = "z_a" if not bool(in_range[0]) else "z_b"
            raise ValueError(
                f"{name}: backend='triton' keeps column statistics in float32, and a column of {name} is "
                f"constant or has a spread (std) outside about [1e-15, 1e18 / sqrt(N)]; use backend='torch'"
            )
        # "auto" falls back to the PyTorch path, which scales each column first.

    _check_finite(z_a=z_a, z_b=z_b, weight=weight)

    n = z_a.shape[0]
    dtype = _compute_dtype(z_a)
    with _without_autocast(z_a):
        a = _standardize(z_a.to(dtype), normalize, eps)
        b = _standardize(z_b.to(dtype), normalize, eps)
        if weight is not None:
            a, b = a * weight.to(dtype), b * weight.to(dtype)
        diagonal = torch.sum(a * b, dim=0) / n
        frobenius = _SquaredCrossCorrelationNorm.apply(a, b) / (n * n)
        off_diagonal = frobenius - torch.sum(torch.square(diagonal))
        loss = torch.sum(torch.square(1 - diagonal)) + lambd * off_diagonal
    return loss.to(z_a.dtype)


def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.07,
    *,
    weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SimCLR's NT-Xent loss over the 2N samples of two views.

    Rows (times the optional per-dimension ``weight``) are L2-normalised to ``u``; for anchor ``i`` the
    other 2N - 1 samples are candidates and its other view ``p(i)`` is the positive::

        L = 1/(2N) Σ_i -log( exp(u_i·u_p(i)/τ) / Σ_{k≠i} exp(u_i·u_k/τ) )

    which equals the authors' ``½[CE([z0z1ᵀ, z0z0ᵀ - ∞I]/τ) + CE([z1z0ᵀ, z1z1ᵀ - ∞I]/τ)]``. float16 and
    bfloat16 inputs are computed in float32. Returns a scalar tensor of the inputs' dtype. Under
    ``torch.compile`` the check for non-finite inputs is skipped (it needs the values).
    """
    _check_embeddings(z_a, z_b)
    _resolve_backend(backend, z_a, has_triton_kernel=False)
    _check_weight(weight, z_a)
    check_number("temperature", temperature, minimum=0, strict=True)
    _check_finite(z_a=z_a, z_b=z_b, weight=weight)

    n = z_a.shape[0]
    dtype = _compute_dtype(z_a)
    with _without_autocast(z_a):
        # Rows divided by powers of two near their largest magnitude (before and after the weight): u is
        # bitwise the same, but the norms of rows near the dtype's range, or of denormals, neither overflow
        # nor underflow. (The weighted rows overflow only for weights beyond half the dtype's range.)
        z = torch.cat([z_a, z_b]).to(dtype)
        z = z / _power_of_two_near_peak(z, 1)
        if weight is not None:
            z = z * weight.to(dtype)
            z = z / _power_of_two_near_peak(z, 1)
        u = F.normalize(z, dim=1)
        logits = (u @ u.T) / temperature
        self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_pairs, float("-inf"))
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        loss = F.cross_entropy(logits, positives)
    return loss.to(z_a.dtype)
