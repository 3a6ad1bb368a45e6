"""Fused Barlow Twins loss: masked normalisation, cross-correlation and redundancy loss, in Triton.

Notation (every kernel below refers to it). ``z_a, z_b`` are (N, D); for each column ``i``::

    μ_i = mean_n z_ni
    r_i = 1 / sqrt(Σ_n (z_ni - μ_i)² / (N - 1))          "std" (the authors' form, unbiased, no eps)
    r_i = 1 / sqrt(Σ_n (z_ni - μ_i)² / N + eps)          "bn"  (BatchNorm1d(affine=False) in training mode)
    ẑ_ni = (z_ni - μ_i) r_i,    a = ẑ_a diag(w),    b = ẑ_b diag(w)      (w = 1 without a weight)

    P_i = Σ_n a_ni b_ni,        c_ii = P_i / N,     F = ‖aᵀb‖²_F
    L = Σ_i (1 - c_ii)² + λ (F / N² - Σ_i c_ii²)

``aᵀb`` is D × D and is never written to memory. ``F`` comes from one of two paths, chosen by shape:

* Gram path (N < D): ``F = ⟨a aᵀ, b bᵀ⟩`` with the two N × N Gram matrices, O(N²D) work.
* Tiled C path (N ≥ D): ``F = Σ_tiles ‖T‖²`` over D-block tiles ``T = a[:, I]ᵀ b[:, J]``, each squared and
  summed in its kernel's epilogue, O(ND²) work.

Gradient (the backward kernels). With ``g = ∂out/∂L``, ``s = 2λ / N²`` and
``κ_i = (-2 (1 - c_ii) - 2λ c_ii) / N`` (so that ``∂L/∂P_i = κ_i``)::

    ∂L/∂a = κ ⊙ b + s · b bᵀ a      (= κ ⊙ b + s · b Cᵀ with C = aᵀ b)
    ∂L/∂b = κ ⊙ a + s · a aᵀ b      (the same expression with a and b swapped)

and through the weight and the standardisation, with ``T = ∂L/∂a`` and ``h = g · T diag(w)``::

    ∂L/∂w_i   = g Σ_n (T_a ⊙ ẑ_a + T_b ⊙ ẑ_b)_ni
    ∂L/∂z_ni  = r_i (h_ni - mean_n h_ni - ẑ_ni Σ_m h_mi ẑ_mi / k),    k = N - 1 ("std") or N ("bn")

All arithmetic is float32 whatever the input dtype (float32, bfloat16, float16). ``tl.dot`` takes its
precision per input dtype (:func:`dot_precision`): for float32 inputs ``"tf32x3"``, three TF32
tensor-core products per float32 product, float32 accuracy (plain TF32 would round every operand to 10
bits), so the kernels agree with a float64 reference to float32 rounding; for bfloat16 and float16 inputs,
whose own rounding is coarser than TF32's, one ``"tf32"`` product of operands rounded to the nearest TF32
value first (:func:`_round_to_tf32`: the tensor cores would truncate them, a bias of about 1e-3 per
product). The loss itself (the sums over the diagonal and over the Frobenius partials) is reduced by one
more kernel, in a fixed order, so results are deterministic. The host functions at the bottom launch the kernels; they hold no state and register
nothing (``metamask_fast._fused_loss`` turns them into a ``torch.library`` custom op with autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["barlow_twins_forward", "barlow_twins_backward", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tile sizes. tl.dot needs every dimension >= 16; masks handle the ragged edges.
STATS_BLOCK_N, STATS_BLOCK_D = 64, 64
GRAM_BLOCK_M, GRAM_BLOCK_K = 64, 32
GRAM_BWD_BLOCK_M, GRAM_BWD_BLOCK_D, GRAM_BWD_BLOCK_K = 64, 64, 32
CORR_BLOCK_D, CORR_BLOCK_N = 64, 32
CORR_BWD_BLOCK_I, CORR_BWD_BLOCK_J, CORR_BWD_BLOCK_N = 32, 64, 64
FINISH_BLOCK, LOSS_BLOCK = 1024, 1024
# The Gram forward splits its reduction over D so that a small N still fills the GPU (about two
# programs per streaming multiprocessor of an H100/H200); each split costs 2 N² float32 until the sum.
GRAM_TARGET_PROGRAMS = 256
GRAM_MIN_SPLIT_WIDTH = 256


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for embeddings of ``dtype``: float32 accuracy for float32 inputs."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def _round_to_tf32(x):
    """``x`` (float32) rounded to the nearest TF32 value (10 mantissa bits, ties to even), by bit arithmetic.

    Tensor cores given float32 operands at TF32 precision drop the low 13 mantissa bits (sm_90 ``wgmma .tf32``
    truncates; Triton emits no rounding for plain ``"tf32"``). Truncation biases every product towards zero, so
    the diagonal of ``aᵀb`` came out about 1e-3 small while ``Σ c_ii²`` is exact, and converged half-precision
    inputs gave losses 1-5 % low. Rounded operands are exact TF32 values: the hardware keeps them as they are,
    and the errors left are unbiased."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(x, y, DOT_PRECISION: tl.constexpr):
    """``tl.dot(x, y)`` of float32 operands at ``DOT_PRECISION``, the operands of a ``"tf32"`` product first
    rounded to nearest (:func:`_round_to_tf32`); ``"tf32x3"`` rounds its own splits."""
    if DOT_PRECISION == "tf32":
        x = _round_to_tf32(x)
        y = _round_to_tf32(y)
    return tl.dot(x, y, input_precision=DOT_PRECISION)


@triton.jit
def _load_standardized(z_ptr, rows, cols, stride_n, stride_d, N, D, mean, scale):
    """``(z[rows, cols] - mean) * scale`` in float32; exactly 0 outside the (N, D) matrix."""
    inside = (rows < N)[:, None] & (cols < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_d
    z = tl.load(z_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    return tl.where(inside, (z - mean[None, :]) * scale[None, :], 0.0)


@triton.jit
def _column_scale(rstd_ptr, w_ptr, cols, D, HAS_WEIGHT: tl.constexpr):
    """``r_i w_i`` for the columns ``cols`` (0 outside the matrix): the factor that turns ``z - μ`` into a or b."""
    scale = tl.load(rstd_ptr + cols, mask=cols < D, other=0.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    return scale


@triton.jit
def _cross_tile(
    x_ptr, y_ptr, cols_x, cols_y, stride_xn, stride_xd, stride_yn, stride_yd, N, D,
    mean_x, scale_x, mean_y, scale_y,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``x[:, cols_x]ᵀ y[:, cols_y]`` of the standardised (and weighted) matrices, over all N rows, in float32."""
    tile = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        x = _load_standardized(x_ptr, rows, cols_x, stride_xn, stride_xd, N, D, mean_x, scale_x)
        y = _load_standardized(y_ptr, rows, cols_y, stride_yn, stride_yd, N, D, mean_y, scale_y)
        tile += _dot(tl.trans(x), y, DOT_PRECISION)
    return tile


@triton.jit
def _kappa(diag_ptr, cols, D, N, lambd):
    """``κ_i = ∂L/∂P_i = (-2 (1 - c_ii) - 2λ c_ii) / N`` for the columns ``cols`` (0 outside the matrix)."""
    diag = tl.load(diag_ptr + cols, mask=cols < D, other=1.0)
    return tl.where(cols < D, (-2.0 * (1.0 - diag) - 2.0 * lambd * diag) / N, 0.0)


@triton.jit
def _column_stats_kernel(
    za_ptr, zb_ptr, w_ptr, mean_a_ptr, rstd_a_ptr, mean_b_ptr, rstd_b_ptr, diag_ptr,
    N, D, stride_an, stride_ad, stride_bn, stride_bd, eps,
    HAS_WEIGHT: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per column: ``μ`` and ``r`` of both views, and ``c_ii = w_i² r_a,i r_b,i Σ_n (z_a - μ_a)(z_b - μ_b) / N``.

    Two passes over the rows (mean, then centred moments) so the variance does not cancel; the second pass
    also sums the residuals ``e = Σ_n (z - μ)`` of the first mean, and ``μ + e/N``, ``Σ(z - μ)² - e²/N`` and
    ``Σ(z_a - μ_a)(z_b - μ_b) - e_a e_b / N`` correct the rounding of a mean that dwarfs the spread.
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_a, sum_b = zero, zero
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        sum_a += tl.sum(_load_standardized(za_ptr, rows, cols, stride_an, stride_ad, N, D, zero, zero + 1.0), axis=0)
        sum_b += tl.sum(_load_standardized(zb_ptr, rows, cols, stride_bn, stride_bd, N, D, zero, zero + 1.0), axis=0)
    mean_a, mean_b = sum_a / N, sum_b / N
    ss_a, ss_b, cross, err_a, err_b = zero, zero, zero, zero, zero
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        ca = _load_standardized(za_ptr, rows, cols, stride_an, stride_ad, N, D, mean_a, zero + 1.0)
        cb = _load_standardized(zb_ptr, rows, cols, stride_bn, stride_bd, N, D, mean_b, zero + 1.0)
        err_a += tl.sum(ca, axis=0)
        err_b += tl.sum(cb, axis=0)
        ss_a += tl.sum(ca * ca, axis=0)
        ss_b += tl.sum(cb * cb, axis=0)
        cross += tl.sum(ca * cb, axis=0)
    mean_a, mean_b = mean_a + err_a / N, mean_b + err_b / N
    ss_a, ss_b, cross = ss_a - err_a * err_a / N, ss_b - err_b * err_b / N, cross - err_a * err_b / N
    if UNBIASED:
        var_a, var_b = ss_a / (N - 1), ss_b / (N - 1)
    else:
        var_a, var_b = ss_a / N + eps, ss_b / N + eps
    # Columns past D get 1 (never stored); a constant column gives inf and a non-finite loss, as in PyTorch.
    rstd_a = 1.0 / tl.sqrt(tl.where(col_mask, var_a, 1.0))
    rstd_b = 1.0 / tl.sqrt(tl.where(col_mask, var_b, 1.0))
    diag = cross * rstd_a * rstd_b / N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        diag = diag * w * w
    tl.store(mean_a_ptr + cols, mean_a, mask=col_mask)
    tl.store(rstd_a_ptr + cols, rstd_a, mask=col_mask)
    tl.store(mean_b_ptr + cols, mean_b, mask=col_mask)
    tl.store(rstd_b_ptr + cols, rstd_b, mask=col_mask)
    tl.store(diag_ptr + cols, diag, mask=col_mask)


@triton.jit
def _gram_kernel(
    za_ptr, zb_ptr, w_ptr, mean_a_ptr, rstd_a_ptr, mean_b_ptr, rstd_b_ptr, gram_a_ptr, gram_b_ptr,
    N, D, stride_an, stride_ad, stride_bn, stride_bd, split_width,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gram path forward: the (I, J) tile of ``a aᵀ`` and ``b bᵀ`` over one slice of the D columns.

    ``gram[s, I, J] = Σ_{k in slice s} a[I, k] a[J, k]ᵀ`` (and the same for b); the host sums the slices
    and forms ``F = ⟨a aᵀ, b bᵀ⟩``. Both matrices are symmetric: programs with I ≤ J compute the tile and
    store it at (I, J) and, when I < J, transposed at (J, I); the others do nothing. Standardisation and weight
    are applied to each tile as it is loaded.
    """
    pid_i, pid_j, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_i <= pid_j:
        rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
        acc_a = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        k_end = tl.minimum(split * split_width + split_width, D)
        for k_start in range(split * split_width, k_end, BLOCK_K):
            cols = k_start + tl.arange(0, BLOCK_K)
            mean = tl.load(mean_a_ptr + cols, mask=cols < D, other=0.0)
            scale = _column_scale(rstd_a_ptr, w_ptr, cols, D, HAS_WEIGHT)
            a_i = _load_standardized(za_ptr, rows_i, cols, stride_an, stride_ad, N, D, mean, scale)
            a_j = _load_standardized(za_ptr, rows_j, cols, stride_an, stride_ad, N, D, mean, scale)
            acc_a += _dot(a_i, tl.trans(a_j), DOT_PRECISION)
            mean = tl.load(mean_b_ptr + cols, mask=cols < D, other=0.0)
            scale = _column_scale(rstd_b_ptr, w_ptr, cols, D, HAS_WEIGHT)
            b_i = _load_standardized(zb_ptr, rows_i, cols, stride_bn, stride_bd, N, D, mean, scale)
            b_j = _load_standardized(zb_ptr, rows_j, cols, stride_bn, stride_bd, N, D, mean, scale)
            acc_b += _dot(b_i, tl.trans(b_j), DOT_PRECISION)
        base = split.to(tl.int64) * N * N
        inside = (rows_i < N)[:, None] & (rows_j < N)[None, :]
        upper = base + rows_i.to(tl.int64)[:, None] * N + rows_j[None, :]
        tl.store(gram_a_ptr + upper, acc_a, mask=inside)
        tl.store(gram_b_ptr + upper, acc_b, mask=inside)
        if pid_i < pid_j:
            lower = base + rows_j.to(tl.int64)[:, None] * N + rows_i[None, :]
            inside_t = (rows_j < N)[:, None] & (rows_i < N)[None, :]
            tl.store(gram_a_ptr + lower, tl.trans(acc_a), mask=inside_t)
            tl.store(gram_b_ptr + lower, tl.trans(acc_b), mask=inside_t)


@triton.jit
def _gram_backward_kernel(
    z_self_ptr, z_other_ptr, w_ptr, mean_s_ptr, rstd_s_ptr, mean_o_ptr, rstd_o_ptr, gram_o_ptr, diag_ptr,
    out_ptr, N, D, stride_sn, stride_sd, stride_on, stride_od, lambd,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gram path: one (rows, cols) tile of ``T_self = κ ⊙ other + s · (other otherᵀ) self``.

    ``other otherᵀ`` is the stored N × N Gram matrix; ``self`` is standardised as it is loaded. Launched
    once with (self, other) = (a, b) and once with (b, a). Writes float32 ``T`` (``∂L/∂a`` or ``∂L/∂b``).
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # D on axis 0: the grid's long axis
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mean_s = tl.load(mean_s_ptr + cols, mask=cols < D, other=0.0)
    scale_s = _column_scale(rstd_s_ptr, w_ptr, cols, D, HAS_WEIGHT)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k_start in range(0, N, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        gram_mask = (rows < N)[:, None] & (ks < N)[None, :]
        gram = tl.load(gram_o_ptr + rows.to(tl.int64)[:, None] * N + ks[None, :], mask=gram_mask, other=0.0)
        x_self = _load_standardized(z_self_ptr, ks, cols, stride_sn, stride_sd, N, D, mean_s, scale_s)
        acc += _dot(gram, x_self, DOT_PRECISION)
    mean_o = tl.load(mean_o_ptr + cols, mask=cols < D, other=0.0)
    scale_o = _column_scale(rstd_o_ptr, w_ptr, cols, D, HAS_WEIGHT)
    x_other = _load_standardized(z_other_ptr, rows, cols, stride_on, stride_od, N, D, mean_o, scale_o)
    kappa = _kappa(diag_ptr, cols, D, N, lambd)
    t = kappa[None, :] * x_other + (2.0 * lambd / N / N) * acc
    inside = (rows < N)[:, None] & (cols < D)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], t, mask=inside)


@triton.jit
def _cross_corr_sq_kernel(
    za_ptr, zb_ptr, w_ptr, mean_a_ptr, rstd_a_ptr, mean_b_ptr, rstd_b_ptr, partial_ptr,
    N, D, stride_an, stride_ad, stride_bn, stride_bd,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tiled C path forward: ``partial[I, J] = ‖a[:, I]ᵀ b[:, J]‖²_F`` for one D-block tile of C.

    The tile is accumulated over the N rows in registers and reduced to one number in the epilogue; the
    host sums the partials (a fixed order, so the result is deterministic) into ``F``.
    """
    pid_i, pid_j = tl.program_id(0), tl.program_id(1)
    cols_i = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_j = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
    mean_i = tl.load(mean_a_ptr + cols_i, mask=cols_i < D, other=0.0)
    scale_i = _column_scale(rstd_a_ptr, w_ptr, cols_i, D, HAS_WEIGHT)
    mean_j = tl.load(mean_b_ptr + cols_j, mask=cols_j < D, other=0.0)
    scale_j = _column_scale(rstd_b_ptr, w_ptr, cols_j, D, HAS_WEIGHT)
    tile = _cross_tile(
        za_ptr, zb_ptr, cols_i, cols_j, stride_an, stride_ad, stride_bn, stride_bd, N, D,
        mean_i, scale_i, mean_j, scale_j, BLOCK_D, BLOCK_D, BLOCK_N, DOT_PRECISION,
    )
    tl.store(partial_ptr + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(tile * tile, axis=1), axis=0))


@triton.jit
def _cross_corr_backward_kernel(
    z_self_ptr, z_other_ptr, w_ptr, mean_s_ptr, rstd_s_ptr, mean_o_ptr, rstd_o_ptr, diag_ptr, out_ptr,
    N, D, stride_sn, stride_sd, stride_on, stride_od, lambd,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tiled C path: the columns I of ``T_self = κ ⊙ other + s · other (otherᵀ self)``, flash-style.

    For every column block J the (J, I) tile ``K = other[:, J]ᵀ self[:, I]`` is recomputed over the rows
    (never stored), then ``T[:, I] += s · other[:, J] K``. The program owns the columns I of ``T``, so the
    read-modify-write needs no atomics and the sum order is fixed. Launched once per view, like the Gram
    kernel.
    """
    cols_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mean_si = tl.load(mean_s_ptr + cols_i, mask=cols_i < D, other=0.0)
    scale_si = _column_scale(rstd_s_ptr, w_ptr, cols_i, D, HAS_WEIGHT)
    mean_oi = tl.load(mean_o_ptr + cols_i, mask=cols_i < D, other=0.0)
    scale_oi = _column_scale(rstd_o_ptr, w_ptr, cols_i, D, HAS_WEIGHT)
    kappa = _kappa(diag_ptr, cols_i, D, N, lambd)
    s = 2.0 * lambd / N / N
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        x_other = _load_standardized(z_other_ptr, rows, cols_i, stride_on, stride_od, N, D, mean_oi, scale_oi)
        inside = (rows < N)[:, None] & (cols_i < D)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols_i[None, :], kappa[None, :] * x_other, mask=inside)
    tl.debug_barrier()
    for j_start in range(0, D, BLOCK_J):
        cols_j = j_start + tl.arange(0, BLOCK_J)
        mean_oj = tl.load(mean_o_ptr + cols_j, mask=cols_j < D, other=0.0)
        scale_oj = _column_scale(rstd_o_ptr, w_ptr, cols_j, D, HAS_WEIGHT)
        tile = _cross_tile(
            z_other_ptr, z_self_ptr, cols_j, cols_i, stride_on, stride_od, stride_sn, stride_sd, N, D,
            mean_oj, scale_oj, mean_si, scale_si, BLOCK_J, BLOCK_I, BLOCK_N, DOT_PRECISION,
        )
        for start in range(0, N, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            x_other = _load_standardized(z_other_ptr, rows, cols_j, stride_on, stride_od, N, D, mean_oj, scale_oj)
            inside = (rows < N)[:, None] & (cols_i < D)[None, :]
            t_ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + cols_i[None, :]
            t = tl.load(t_ptrs, mask=inside, other=0.0) + s * _dot(x_other, tile, DOT_PRECISION)
            tl.store(t_ptrs, t, mask=inside)
        tl.debug_barrier()


@triton.jit
def _gram_finish_kernel(parts_a_ptr, parts_b_ptr, gram_a_ptr, gram_b_ptr, partial_ptr, NN, SPLITS, BLOCK: tl.constexpr):
    """Sum the D slices of the Gram matrices (``gram = Σ_s parts[s]``, kept for the backward) and reduce one
    block of ``⟨a aᵀ, b bᵀ⟩`` to ``partial[program]``."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < NN
    gram_a = tl.zeros((BLOCK,), dtype=tl.float32)
    gram_b = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, SPLITS):
        gram_a += tl.load(parts_a_ptr + split * NN + offsets, mask=inside, other=0.0)
        gram_b += tl.load(parts_b_ptr + split * NN + offsets, mask=inside, other=0.0)
    tl.store(gram_a_ptr + offsets, gram_a, mask=inside)
    tl.store(gram_b_ptr + offsets, gram_b, mask=inside)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(gram_a * gram_b, axis=0))


@triton.jit
def _loss_kernel(diag_ptr, partial_ptr, loss_ptr, D, NUM_PARTIALS, lambd, inv_n2, BLOCK: tl.constexpr):
    """One program: ``L = Σ_i (1 - c_ii)² + λ (F / N² - Σ_i c_ii²)`` with ``F = Σ partial``, in a fixed order."""
    on_diagonal = tl.zeros((BLOCK,), dtype=tl.float32)
    diagonal_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        diag = tl.load(diag_ptr + cols, mask=cols < D, other=0.0)
        on_diagonal += tl.where(cols < D, (1.0 - diag) * (1.0 - diag), 0.0)
        diagonal_sq += diag * diag
    frobenius = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, NUM_PARTIALS, BLOCK):
        index = start + tl.arange(0, BLOCK)
        frobenius += tl.load(partial_ptr + index, mask=index < NUM_PARTIALS, other=0.0)
    frobenius_sum = tl.sum(frobenius, axis=0)
    loss = tl.sum(on_diagonal, axis=0) + lambd * (frobenius_sum * inv_n2 - tl.sum(diagonal_sq, axis=0))
    tl.store(loss_ptr, loss)


@triton.jit
def _standardize_backward_kernel(
    z_ptr, w_ptr, mean_ptr, rstd_ptr, t_ptr, grad_out_ptr, grad_z_ptr, grad_w_ptr,
    N, D, stride_n, stride_d, k,
    HAS_WEIGHT: tl.constexpr, ADD_TO_GRAD_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """From ``T = ∂L/∂a`` of one view to ``∂out/∂z`` and its share of ``∂out/∂w``.

    Pass 1 reduces ``Σ_n T`` and ``Σ_n T ẑ`` per column; pass 2 writes ``r (h - mean h - ẑ Σ h ẑ / k)``
    with ``h = g T w``, in the output dtype. The weight's gradient ``g Σ_n T ẑ`` is stored (first view) or
    added (second view, ``ADD_TO_GRAD_W``) in float32. ``T`` may share memory with the output (float32
    inputs): pass 2 reads each element before overwriting it, after pass 1's reductions are complete.
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    g = tl.load(grad_out_ptr).to(tl.float32)
    w = tl.full((BLOCK_D,), 1.0, dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=col_mask, other=0.0)
    t_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_proj = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        inside = (rows < N)[:, None] & col_mask[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=inside, other=0.0)
        z_hat = _load_standardized(z_ptr, rows, cols, stride_n, stride_d, N, D, mean, rstd)
        t_sum += tl.sum(t, axis=0)
        t_proj += tl.sum(t * z_hat, axis=0)
    if HAS_WEIGHT:
        grad_w = g * t_proj
        if ADD_TO_GRAD_W:
            grad_w += tl.load(grad_w_ptr + cols, mask=col_mask, other=0.0)
        tl.store(grad_w_ptr + cols, grad_w, mask=col_mask)
    # h = g T w, so mean h = g w Σ T / N and Σ h ẑ = g w Σ T ẑ; g is applied last.
    h_mean, h_coef = w * t_sum / N, w * t_proj / k
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        inside = (rows < N)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        t = tl.load(t_ptr + offsets, mask=inside, other=0.0)
        z_hat = _load_standardized(z_ptr, rows, cols, stride_n, stride_d, N, D, mean, rstd)
        grad = g * rstd[None, :] * (t * w[None, :] - h_mean[None, :] - z_hat * h_coef[None, :])
        tl.store(grad_z_ptr + offsets, grad.to(grad_z_ptr.dtype.element_ty), mask=inside)


def use_gram_path(n: int, d: int) -> bool:
    """The Gram path costs O(N²D) and the tiled C path O(ND²): the smaller wins."""
    return n < d


def barlow_twins_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    weight: torch.Tensor | None,
    lambd: float,
    unbiased: bool,
    eps: float,
    gram: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernels. Returns ``(loss, mean_a, rstd_a, mean_b, rstd_b, diag, gram_a, gram_b)``.

    Everything is float32; ``loss`` is a 0-d tensor. The Gram matrices (N × N, saved for the backward) are
    empty on the tiled C path. ``gram`` forces a path (``None``: :func:`use_gram_path`). ``z_a`` and
    ``z_b`` may have any strides; the caller has validated shapes, dtypes and devices.
    """
    n, d = z_a.shape
    gram = use_gram_path(n, d) if gram is None else gram
    f32 = dict(dtype=torch.float32, device=z_a.device)
    mean_a, rstd_a, mean_b, rstd_b, diag = (torch.empty(d, **f32) for _ in range(5))
    has_weight = weight is not None
    w = weight.contiguous() if has_weight else diag  # any pointer without a weight; never read then
    strides = (*z_a.stride(), *z_b.stride())
    precision = dot_precision(z_a.dtype)
    _column_stats_kernel[(triton.cdiv(d, STATS_BLOCK_D),)](
        z_a, z_b, w, mean_a, rstd_a, mean_b, rstd_b, diag, n, d, *strides, eps,
        HAS_WEIGHT=has_weight, UNBIASED=unbiased, BLOCK_N=STATS_BLOCK_N, BLOCK_D=STATS_BLOCK_D,
    )
    stats = (mean_a, rstd_a, mean_b, rstd_b)
    if gram:
        tiles = triton.cdiv(n, GRAM_BLOCK_M)
        working_tiles = tiles * (tiles + 1) // 2  # the upper triangle
        splits = max(1, min(triton.cdiv(GRAM_TARGET_PROGRAMS, working_tiles), d // GRAM_MIN_SPLIT_WIDTH))
        split_width = triton.cdiv(triton.cdiv(d, splits), GRAM_BLOCK_K) * GRAM_BLOCK_K
        splits = triton.cdiv(d, split_width)
        parts_a = torch.empty(splits, n, n, **f32)
        parts_b = torch.empty(splits, n, n, **f32)
        _gram_kernel[(tiles, tiles, splits)](
            z_a, z_b, w, *stats, parts_a, parts_b, n, d, *strides, split_width,
            HAS_WEIGHT=has_weight, DOT_PRECISION=precision, BLOCK_M=GRAM_BLOCK_M, BLOCK_K=GRAM_BLOCK_K,
        )
        gram_a, gram_b = torch.empty(n, n, **f32), torch.empty(n, n, **f32)
        partial = torch.empty(triton.cdiv(n * n, FINISH_BLOCK), **f32)
        _gram_finish_kernel[(partial.numel(),)](
            parts_a, parts_b, gram_a, gram_b, partial, n * n, splits, BLOCK=FINISH_BLOCK
        )
    else:
        tiles = triton.cdiv(d, CORR_BLOCK_D)
        partial = torch.empty(tiles * tiles, **f32)
        _cross_corr_sq_kernel[(tiles, tiles)](
            z_a, z_b, w, *stats, partial, n, d, *strides,
            HAS_WEIGHT=has_weight, DOT_PRECISION=precision, BLOCK_D=CORR_BLOCK_D, BLOCK_N=CORR_BLOCK_N,
        )
        gram_a, gram_b = torch.empty(0, **f32), torch.empty(0, **f32)
    loss = torch.empty((), **f32)
    _loss_kernel[(1,)](diag, partial, loss, d, partial.numel(), lambd, 1.0 / (n * n), BLOCK=LOSS_BLOCK)
    return loss, mean_a, rstd_a, mean_b, rstd_b, diag, gram_a, gram_b


def barlow_twins_backward(
    grad_loss: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    weight: torch.Tensor | None,
    lambd: float,
    unbiased: bool,
    saved: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernels: ``(∂out/∂z_a, ∂out/∂z_b, ∂out/∂weight or None)``.

    ``grad_loss`` is a float32 0-d tensor; ``saved`` is ``(mean_a, rstd_a, mean_b, rstd_b, diag, gram_a,
    gram_b)`` from :func:`barlow_twins_forward`; empty Gram matrices select the tiled C path. Gradients
    have the dtype of their input and are contiguous. One view at a time: ``T`` of a float32 view is
    written into its gradient (the last kernel works in place); the other dtypes share one float32 N × D
    workspace, so memory stays at the gradients plus N × D.
    """
    mean_a, rstd_a, mean_b, rstd_b, diag, gram_a, gram_b = saved
    n, d = z_a.shape
    has_weight = weight is not None
    grad_w = torch.empty(d, dtype=torch.float32, device=z_a.device) if has_weight else None
    w = weight.contiguous() if has_weight else diag  # any pointer without a weight; never read then
    precision = dot_precision(z_a.dtype)
    workspace = None
    views = (
        (z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, gram_b),
        (z_b, z_a, mean_b, rstd_b, mean_a, rstd_a, gram_a),
    )
    grads = []
    for index, (z_self, z_other, mean_s, rstd_s, mean_o, rstd_o, gram_other) in enumerate(views):
        grad = torch.empty(n, d, dtype=z_self.dtype, device=z_self.device)
        if grad.dtype == torch.float32:
            t = grad
        else:
            if workspace is None:
                workspace = torch.empty(n, d, dtype=torch.float32, device=z_self.device)
            t = workspace
        strides = (*z_self.stride(), *z_other.stride())
        if gram_other.numel():
            grid = (triton.cdiv(d, GRAM_BWD_BLOCK_D), triton.cdiv(n, GRAM_BWD_BLOCK_M))
            _gram_backward_kernel[grid](
                z_self, z_other, w, mean_s, rstd_s, mean_o, rstd_o, gram_other, diag, t, n, d, *strides, lambd,
                HAS_WEIGHT=has_weight, DOT_PRECISION=precision,
                BLOCK_M=GRAM_BWD_BLOCK_M, BLOCK_D=GRAM_BWD_BLOCK_D, BLOCK_K=GRAM_BWD_BLOCK_K,
            )
        else:
            _cross_corr_backward_kernel[(triton.cdiv(d, CORR_BWD_BLOCK_I),)](
                z_self, z_other, w, mean_s, rstd_s, mean_o, rstd_o, diag, t, n, d, *strides, lambd,
                HAS_WEIGHT=has_weight, DOT_PRECISION=precision,
                BLOCK_I=CORR_BWD_BLOCK_I, BLOCK_J=CORR_BWD_BLOCK_J, BLOCK_N=CORR_BWD_BLOCK_N,
            )
        _standardize_backward_kernel[(triton.cdiv(d, STATS_BLOCK_D),)](
            z_self, w, mean_s, rstd_s, t, grad_loss, grad, grad_w if has_weight else diag,
            n, d, *z_self.stride(), n - 1 if unbiased else n,
            HAS_WEIGHT=has_weight, ADD_TO_GRAD_W=index == 1, BLOCK_N=STATS_BLOCK_N, BLOCK_D=STATS_BLOCK_D,
        )
        grads.append(grad)
    return grads[0], grads[1], grad_w.to(weight.dtype) if has_weight else None
