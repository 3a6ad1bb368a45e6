"""Fused Barlow Twins loss: masked normalisation, cross-correlation and redundancy loss, in Triton.

Notation (every kernel below refers to it). ``z_a, z_b`` are (N, D); for each column ``i``::

    μ_i = mean_n z_ni
    r_i = 1 / sqrt(Σ_n (z_ni - μ_i)² / (N - 1))          "std" (the authors' form, unbiased, no eps)
    r_i = 1 / sqrt(Σ_n (z_ni - μ_i)² / N + eps)          "bn"  (BatchNorm1d(affine=False) in training mode)
    ẑ_ni = (z_ni - μ_i) r_i,    a = ẑ_a diag(w),    b = ẑ_b diag(w)      (w = 1 without a weight)

    P_i = Σ_n a_ni b_ni,        c_ii = P_i / N,     F = ‖aᵀb‖²_F
    L = Σ_i (1 - c_ii)² + λ (F / N² - Σ_i c_ii²)

``F`` comes from one of two paths, chosen by shape, each keeping the smaller square matrix:

* Gram path (N < D): ``F = ⟨a aᵀ, b bᵀ⟩`` with the two N × N Gram matrices, O(N²D) work; ``aᵀb`` (D × D)
  is never written to memory.
* Tiled C path (N ≥ D): ``K = bᵀa`` (D × D, no larger than a view since N ≥ D) in tiles, its rows summed
  over slices of N so that a small D still fills the GPU, then ``F = ‖K‖²_F``; O(ND²) work. The backward
  reuses ``K`` for both views.

The kernels that reduce over the rows (column statistics, ``K``, the standardisation's backward) split
the rows into slices (:func:`_row_splits`) and add the slices' partial results in a fixed order.

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
PRODUCT_BLOCK_J, PRODUCT_BLOCK_I, PRODUCT_BLOCK_N = 64, 64, 32
APPLY_BLOCK_N, APPLY_BLOCK_I, APPLY_BLOCK_J = 64, 64, 32
# The kernels that reduce over the rows (column statistics, the tiled backward's bᵀa, the standardisation's
# backward) split them until about two programs per streaming multiprocessor of an H100/H200 are busy.
ROW_SPLIT_TARGET_PROGRAMS = 264
ROW_SPLIT_MIN_ROWS = 512
FINISH_BLOCK, LOSS_BLOCK = 1024, 1024
# The Gram forward splits its reduction over D so that a small N still fills the GPU (about two
# programs per streaming multiprocessor of an H100/H200); each split costs 2 N² float32 until the sum.
GRAM_TARGET_PROGRAMS = 256
GRAM_MIN_SPLIT_WIDTH = 256


# Kernels compile per specialisation of their integer arguments (divisible by 16 or not); the ones that
# follow the batch size are left unspecialised, so that a ragged last batch reuses the full batches' kernels.
_batch_kernel = triton.jit(do_not_specialize=["N", "NN", "NUM_PARTIALS", "k"])


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
    mean_x, scale_x, mean_y, scale_y, row_start, row_end,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``x[r, cols_x]ᵀ y[r, cols_y]`` of the standardised (and weighted) matrices over the rows
    ``row_start <= r < row_end``, in float32."""
    tile = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_N):
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
def _store_t(
    out_ptr, acc, z_other_ptr, w_ptr, mean_o_ptr, rstd_o_ptr, diag_ptr, rows, cols,
    stride_on, stride_od, N, D, lambd, HAS_WEIGHT: tl.constexpr,
):
    """Store the (rows, cols) tile of ``T_self = κ ⊙ other + s · acc``, ``acc`` the tile of ``other M``
    (``M = otherᵀ self``) that a backward kernel accumulated, ``s = 2λ / N²``."""
    mean_o = tl.load(mean_o_ptr + cols, mask=cols < D, other=0.0)
    scale_o = _column_scale(rstd_o_ptr, w_ptr, cols, D, HAS_WEIGHT)
    x_other = _load_standardized(z_other_ptr, rows, cols, stride_on, stride_od, N, D, mean_o, scale_o)
    kappa = _kappa(diag_ptr, cols, D, N, lambd)
    t = kappa[None, :] * x_other + (2.0 * lambd / N / N) * acc
    inside = (rows < N)[:, None] & (cols < D)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], t, mask=inside)


@_batch_kernel
def _column_stats_kernel(
    za_ptr, zb_ptr, parts_ptr, N, D, stride_an, stride_ad, stride_bn, stride_bd, rows_per_split,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per column, over one slice s of the rows (``rows_per_split`` each, a multiple of BLOCK_N): the slice's
    means ``μ_s`` of both views, its centred sums of squares ``Σ(z - μ_s)²`` and its centred cross sum
    ``Σ(z_a - μ_a,s)(z_b - μ_b,s)``, stored as ``parts[s, 0:5, cols]`` for :func:`_column_stats_finish_kernel`.

    Two passes over the slice (mean, then centred moments) so the variance does not cancel; the second pass
    also sums the residuals ``e = Σ (z - μ)`` of the first mean, and ``μ + e/n``, ``Σ(z - μ)² - e²/n`` and
    ``Σ(z_a - μ_a)(z_b - μ_b) - e_a e_b / n`` correct the rounding of a mean that dwarfs the spread.
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    count = (row_end - row_start).to(tl.float32)
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_a, sum_b = zero, zero
    for start in range(row_start, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        sum_a += tl.sum(_load_standardized(za_ptr, rows, cols, stride_an, stride_ad, N, D, zero, zero + 1.0), axis=0)
        sum_b += tl.sum(_load_standardized(zb_ptr, rows, cols, stride_bn, stride_bd, N, D, zero, zero + 1.0), axis=0)
    mean_a, mean_b = sum_a / count, sum_b / count
    ss_a, ss_b, cross, err_a, err_b = zero, zero, zero, zero, zero
    for start in range(row_start, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        ca = _load_standardized(za_ptr, rows, cols, stride_an, stride_ad, N, D, mean_a, zero + 1.0)
        cb = _load_standardized(zb_ptr, rows, cols, stride_bn, stride_bd, N, D, mean_b, zero + 1.0)
        err_a += tl.sum(ca, axis=0)
        err_b += tl.sum(cb, axis=0)
        ss_a += tl.sum(ca * ca, axis=0)
        ss_b += tl.sum(cb * cb, axis=0)
        cross += tl.sum(ca * cb, axis=0)
    col_mask = cols < D
    base = parts_ptr + split.to(tl.int64) * 5 * D + cols
    tl.store(base, mean_a + err_a / count, mask=col_mask)
    tl.store(base + D, mean_b + err_b / count, mask=col_mask)
    tl.store(base + 2 * D, ss_a - err_a * err_a / count, mask=col_mask)
    tl.store(base + 3 * D, ss_b - err_b * err_b / count, mask=col_mask)
    tl.store(base + 4 * D, cross - err_a * err_b / count, mask=col_mask)


@_batch_kernel
def _column_stats_finish_kernel(
    parts_ptr, w_ptr, mean_a_ptr, rstd_a_ptr, mean_b_ptr, rstd_b_ptr, diag_ptr, N, D, rows_per_split, splits, eps,
    HAS_WEIGHT: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per column: ``μ`` and ``r`` of both views, and ``c_ii = w_i² r_a,i r_b,i Σ_n (z_a - μ_a)(z_b - μ_b) / N``,
    from the slices of :func:`_column_stats_kernel`, combined in a fixed order (Chan et al.):
    ``μ = Σ_s n_s μ_s / N``, ``Σ(z - μ)² = Σ_s [Σ(z - μ_s)² + n_s (μ_s - μ)²]`` and the same for the cross
    sum with ``n_s (μ_a,s - μ_a)(μ_b,s - μ_b)``. One slice gives the slice's own values back."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    mean_a, mean_b = zero, zero
    for split in range(0, splits):
        count = (tl.minimum(split * rows_per_split + rows_per_split, N) - split * rows_per_split).to(tl.float32)
        base = parts_ptr + split * 5 * D + cols
        mean_a += count * tl.load(base, mask=col_mask, other=0.0)
        mean_b += count * tl.load(base + D, mask=col_mask, other=0.0)
    mean_a, mean_b = mean_a / N, mean_b / N
    ss_a, ss_b, cross = zero, zero, zero
    for split in range(0, splits):
        count = (tl.minimum(split * rows_per_split + rows_per_split, N) - split * rows_per_split).to(tl.float32)
        base = parts_ptr + split * 5 * D + cols
        delta_a = tl.load(base, mask=col_mask, other=0.0) - mean_a
        delta_b = tl.load(base + D, mask=col_mask, other=0.0) - mean_b
        ss_a += tl.load(base + 2 * D, mask=col_mask, other=0.0) + count * delta_a * delta_a
        ss_b += tl.load(base + 3 * D, mask=col_mask, other=0.0) + count * delta_b * delta_b
        cross += tl.load(base + 4 * D, mask=col_mask, other=0.0) + count * delta_a * delta_b
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


@_batch_kernel
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


@_batch_kernel
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
    _store_t(out_ptr, acc, z_other_ptr, w_ptr, mean_o_ptr, rstd_o_ptr, diag_ptr, rows, cols,
             stride_on, stride_od, N, D, lambd, HAS_WEIGHT)


@_batch_kernel
def _cross_product_kernel(
    za_ptr, zb_ptr, w_ptr, mean_a_ptr, rstd_a_ptr, mean_b_ptr, rstd_b_ptr, out_ptr,
    N, D, stride_an, stride_ad, stride_bn, stride_bd, rows_per_split,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tiled C path: the (J, I) tile of ``K_s = b[r, :]ᵀ a[r, :]`` over one slice s of the rows
    (``rows_per_split`` each, a multiple of BLOCK_N), into ``out[s]`` (D × D float32).

    The slices keep the GPU busy when D is small and N large; :func:`_gram_finish_kernel` adds them in a
    fixed order and reduces ``F = ‖K‖²_F``. The backward uses ``K = bᵀ a`` for both views:
    ``T_a = κ ⊙ b + s · b K`` and ``T_b = κ ⊙ a + s · a Kᵀ``.
    """
    pid_j, pid_i, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    cols_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mean_j = tl.load(mean_b_ptr + cols_j, mask=cols_j < D, other=0.0)
    scale_j = _column_scale(rstd_b_ptr, w_ptr, cols_j, D, HAS_WEIGHT)
    mean_i = tl.load(mean_a_ptr + cols_i, mask=cols_i < D, other=0.0)
    scale_i = _column_scale(rstd_a_ptr, w_ptr, cols_i, D, HAS_WEIGHT)
    row_start = split * rows_per_split
    tile = _cross_tile(
        zb_ptr, za_ptr, cols_j, cols_i, stride_bn, stride_bd, stride_an, stride_ad, N, D,
        mean_j, scale_j, mean_i, scale_i, row_start, tl.minimum(row_start + rows_per_split, N),
        BLOCK_J, BLOCK_I, BLOCK_N, DOT_PRECISION,
    )
    offsets = split.to(tl.int64) * D * D + cols_j.to(tl.int64)[:, None] * D + cols_i[None, :]
    tl.store(out_ptr + offsets, tile, mask=(cols_j < D)[:, None] & (cols_i < D)[None, :])


@_batch_kernel
def _cross_apply_kernel(
    z_other_ptr, w_ptr, mean_o_ptr, rstd_o_ptr, k_ptr, diag_ptr, out_ptr,
    N, D, stride_on, stride_od, lambd,
    HAS_WEIGHT: tl.constexpr, TRANSPOSE_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Tiled C path backward: one (rows, I) tile of ``T_self = κ ⊙ other + s · other M`` with
    ``M = K`` (self = a, other = b) or ``M = Kᵀ`` (``TRANSPOSE_K``: self = b, other = a); a plain tiled
    product over J, each program owning its tile of ``T``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    for j_start in range(0, D, BLOCK_J):
        cols_j = j_start + tl.arange(0, BLOCK_J)
        mean_oj = tl.load(mean_o_ptr + cols_j, mask=cols_j < D, other=0.0)
        scale_oj = _column_scale(rstd_o_ptr, w_ptr, cols_j, D, HAS_WEIGHT)
        x_other = _load_standardized(z_other_ptr, rows, cols_j, stride_on, stride_od, N, D, mean_oj, scale_oj)
        inside = (cols_j < D)[:, None] & (cols_i < D)[None, :]
        if TRANSPOSE_K:  # M[j, i] = K[i, j]
            m_offsets = cols_i.to(tl.int64)[None, :] * D + cols_j[:, None]
        else:
            m_offsets = cols_j.to(tl.int64)[:, None] * D + cols_i[None, :]
        m = tl.load(k_ptr + m_offsets, mask=inside, other=0.0)
        acc += _dot(x_other, m, DOT_PRECISION)
    _store_t(out_ptr, acc, z_other_ptr, w_ptr, mean_o_ptr, rstd_o_ptr, diag_ptr, rows, cols_i,
             stride_on, stride_od, N, D, lambd, HAS_WEIGHT)


@_batch_kernel
def _gram_finish_kernel(parts_a_ptr, parts_b_ptr, gram_a_ptr, gram_b_ptr, partial_ptr, NN, SPLITS, BLOCK: tl.constexpr):
    """Sum the slices of two square matrices (``gram = Σ_s parts[s]``, kept for the backward) and reduce one
    block of their inner product to ``partial[program]``: the Gram matrices' ``⟨a aᵀ, b bᵀ⟩``, or on the
    tiled C path ``‖K‖²_F`` with both operands (and both outputs) ``K``."""
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


@_batch_kernel
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


@_batch_kernel
def _standardize_backward_sums_kernel(
    z_ptr, mean_ptr, rstd_ptr, t_ptr, parts_ptr, N, D, stride_n, stride_d, rows_per_split,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per column, over one slice s of the rows: ``Σ T`` and ``Σ T ẑ`` into ``parts[s, 0:2, cols]``."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    col_mask = cols < D
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=col_mask, other=0.0)
    t_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_proj = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = split * rows_per_split
    for start in range(row_start, tl.minimum(row_start + rows_per_split, N), BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        inside = (rows < N)[:, None] & col_mask[None, :]
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=inside, other=0.0)
        z_hat = _load_standardized(z_ptr, rows, cols, stride_n, stride_d, N, D, mean, rstd)
        t_sum += tl.sum(t, axis=0)
        t_proj += tl.sum(t * z_hat, axis=0)
    base = parts_ptr + split.to(tl.int64) * 2 * D + cols
    tl.store(base, t_sum, mask=col_mask)
    tl.store(base + D, t_proj, mask=col_mask)


@_batch_kernel
def _standardize_backward_kernel(
    z_ptr, w_ptr, mean_ptr, rstd_ptr, t_ptr, parts_ptr, grad_out_ptr, grad_z_ptr, grad_w_ptr,
    N, D, stride_n, stride_d, k, rows_per_split, splits,
    HAS_WEIGHT: tl.constexpr, ADD_TO_GRAD_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """From ``T = ∂L/∂a`` of one view to ``∂out/∂z`` and its share of ``∂out/∂w``, for one slice of the rows.

    ``Σ_n T`` and ``Σ_n T ẑ`` are the slices' sums of :func:`_standardize_backward_sums_kernel`, added in
    a fixed order; the program writes ``r (h - mean h - ẑ Σ h ẑ / k)`` with ``h = g T w`` for its rows, in
    the output dtype. The weight's gradient ``g Σ_n T ẑ`` is stored (first view) or added (second view,
    ``ADD_TO_GRAD_W``) in float32 by the first slice's programs. ``T`` may share memory with the output
    (float32 inputs): every element is read before it is overwritten, and the sums were complete before
    this kernel started.
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    col_mask = cols < D
    g = tl.load(grad_out_ptr).to(tl.float32)
    w = tl.full((BLOCK_D,), 1.0, dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=col_mask, other=0.0)
    t_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_proj = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(0, splits):
        t_sum += tl.load(parts_ptr + s * 2 * D + cols, mask=col_mask, other=0.0)
        t_proj += tl.load(parts_ptr + s * 2 * D + D + cols, mask=col_mask, other=0.0)
    if HAS_WEIGHT:
        if split == 0:
            grad_w = g * t_proj
            if ADD_TO_GRAD_W:
                grad_w += tl.load(grad_w_ptr + cols, mask=col_mask, other=0.0)
            tl.store(grad_w_ptr + cols, grad_w, mask=col_mask)
    # h = g T w, so mean h = g w Σ T / N and Σ h ẑ = g w Σ T ẑ; g is applied last.
    h_mean, h_coef = w * t_sum / N, w * t_proj / k
    row_start = split * rows_per_split
    for start in range(row_start, tl.minimum(row_start + rows_per_split, N), BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        inside = (rows < N)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        t = tl.load(t_ptr + offsets, mask=inside, other=0.0)
        z_hat = _load_standardized(z_ptr, rows, cols, stride_n, stride_d, N, D, mean, rstd)
        grad = g * rstd[None, :] * (t * w[None, :] - h_mean[None, :] - z_hat * h_coef[None, :])
        tl.store(grad_z_ptr + offsets, grad.to(grad_z_ptr.dtype.element_ty), mask=inside)


def _row_splits(n: int, column_programs: int, block_n: int) -> tuple[int, int]:
    """``(splits, rows_per_split)`` for a kernel of ``column_programs`` programs per slice of the rows: enough
    slices for about two programs per streaming multiprocessor of an H100/H200, each at least
    ROW_SPLIT_MIN_ROWS rows and a whole number of ``block_n`` blocks."""
    splits = max(1, min(triton.cdiv(ROW_SPLIT_TARGET_PROGRAMS, column_programs), n // ROW_SPLIT_MIN_ROWS))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    return triton.cdiv(n, rows_per_split), rows_per_split


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

    Everything is float32; ``loss`` is a 0-d tensor. ``gram_a, gram_b`` are saved for the backward: the
    N × N Gram matrices on the Gram path; on the tiled C path ``K = bᵀa`` (D × D) and an empty tensor.
    ``gram`` forces a path (``None``: :func:`use_gram_path`). ``z_a`` and ``z_b`` may have any strides;
    the caller has validated shapes, dtypes and devices.
    """
    n, d = z_a.shape
    gram = use_gram_path(n, d) if gram is None else gram
    f32 = dict(dtype=torch.float32, device=z_a.device)
    mean_a, rstd_a, mean_b, rstd_b, diag = (torch.empty(d, **f32) for _ in range(5))
    has_weight = weight is not None
    w = weight.contiguous() if has_weight else diag  # any pointer without a weight; never read then
    strides = (*z_a.stride(), *z_b.stride())
    precision = dot_precision(z_a.dtype)
    splits, rows_per_split = _row_splits(n, triton.cdiv(d, STATS_BLOCK_D), STATS_BLOCK_N)
    parts = torch.empty(splits, 5, d, **f32)
    _column_stats_kernel[(triton.cdiv(d, STATS_BLOCK_D), splits)](
        z_a, z_b, parts, n, d, *strides, rows_per_split, BLOCK_N=STATS_BLOCK_N, BLOCK_D=STATS_BLOCK_D,
    )
    _column_stats_finish_kernel[(triton.cdiv(d, STATS_BLOCK_D),)](
        parts, w, mean_a, rstd_a, mean_b, rstd_b, diag, n, d, rows_per_split, splits, eps,
        HAS_WEIGHT=has_weight, UNBIASED=unbiased, BLOCK_D=STATS_BLOCK_D,
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
        # K = bᵀ a = Cᵀ N, kept for the backward; gram_b stays empty, which marks this path.
        parts = _cross_product_parts(z_a, z_b, w, has_weight, stats, precision)
        gram_a, gram_b = torch.empty(d, d, **f32), torch.empty(0, **f32)
        partial = torch.empty(triton.cdiv(d * d, FINISH_BLOCK), **f32)
        _gram_finish_kernel[(partial.numel(),)](
            parts, parts, gram_a, gram_a, partial, d * d, parts.shape[0], BLOCK=FINISH_BLOCK
        )
    loss = torch.empty((), **f32)
    _loss_kernel[(1,)](diag, partial, loss, d, partial.numel(), lambd, 1.0 / (n * n), BLOCK=LOSS_BLOCK)
    return loss, mean_a, rstd_a, mean_b, rstd_b, diag, gram_a, gram_b


def _cross_product_parts(z_a, z_b, w, has_weight, stats, precision) -> torch.Tensor:
    """The tiled C path's ``K = bᵀ a`` (D × D, float32) as ``splits`` partial sums over slices of the rows,
    ``(splits, D, D)``; :func:`_gram_finish_kernel` adds them in a fixed order. No larger than a view per
    slice: this path runs where N ≥ D, and N is split only while it is large."""
    n, d = z_a.shape
    tiles = triton.cdiv(d, PRODUCT_BLOCK_J) * triton.cdiv(d, PRODUCT_BLOCK_I)
    splits, rows_per_split = _row_splits(n, tiles, PRODUCT_BLOCK_N)
    parts = torch.empty(splits, d, d, dtype=torch.float32, device=z_a.device)
    grid = (triton.cdiv(d, PRODUCT_BLOCK_J), triton.cdiv(d, PRODUCT_BLOCK_I), splits)
    _cross_product_kernel[grid](
        z_a, z_b, w, *stats, parts, n, d, *z_a.stride(), *z_b.stride(), rows_per_split,
        HAS_WEIGHT=has_weight, DOT_PRECISION=precision,
        BLOCK_J=PRODUCT_BLOCK_J, BLOCK_I=PRODUCT_BLOCK_I, BLOCK_N=PRODUCT_BLOCK_N,
    )
    return parts


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
    gram_b)`` from :func:`barlow_twins_forward`; an empty ``gram_b`` selects the tiled C path. Gradients
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
    gram_path = gram_b.numel() > 0  # the tiled C path saves K = bᵀ a as gram_a and leaves gram_b empty
    splits, rows_per_split = _row_splits(n, triton.cdiv(d, STATS_BLOCK_D), STATS_BLOCK_N)
    sums = torch.empty(splits, 2, d, dtype=torch.float32, device=z_a.device)
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
        if gram_path:
            grid = (triton.cdiv(d, GRAM_BWD_BLOCK_D), triton.cdiv(n, GRAM_BWD_BLOCK_M))
            _gram_backward_kernel[grid](
                z_self, z_other, w, mean_s, rstd_s, mean_o, rstd_o, gram_other, diag, t, n, d, *strides, lambd,
                HAS_WEIGHT=has_weight, DOT_PRECISION=precision,
                BLOCK_M=GRAM_BWD_BLOCK_M, BLOCK_D=GRAM_BWD_BLOCK_D, BLOCK_K=GRAM_BWD_BLOCK_K,
            )
        else:
            grid = (triton.cdiv(n, APPLY_BLOCK_N), triton.cdiv(d, APPLY_BLOCK_I))
            _cross_apply_kernel[grid](
                z_other, w, mean_o, rstd_o, gram_a, diag, t, n, d, *z_other.stride(), lambd,
                HAS_WEIGHT=has_weight, TRANSPOSE_K=index == 1, DOT_PRECISION=precision,
                BLOCK_N=APPLY_BLOCK_N, BLOCK_I=APPLY_BLOCK_I, BLOCK_J=APPLY_BLOCK_J,
            )
        grid = (triton.cdiv(d, STATS_BLOCK_D), splits)
        _standardize_backward_sums_kernel[grid](
            z_self, mean_s, rstd_s, t, sums, n, d, *z_self.stride(), rows_per_split,
            BLOCK_N=STATS_BLOCK_N, BLOCK_D=STATS_BLOCK_D,
        )
        _standardize_backward_kernel[grid](
            z_self, w, mean_s, rstd_s, t, sums, grad_loss, grad, grad_w if has_weight else diag,
            n, d, *z_self.stride(), n - 1 if unbiased else n, rows_per_split, splits,
            HAS_WEIGHT=has_weight, ADD_TO_GRAD_W=index == 1, BLOCK_N=STATS_BLOCK_N, BLOCK_D=STATS_BLOCK_D,
        )
        grads.append(grad)
    return grads[0], grads[1], grad_w.to(weight.dtype) if has_weight else None
