"""Property-based tests (hypothesis): hostile input to the losses and to the meta-step ops.

Shapes (empty and 1-element included), dtypes (float32, float64, bfloat16, float16), memory layouts
(transposed, sliced with a step, expanded, channels_last, a misaligned storage offset), devices (the CPU, a
CUDA GPU when there is one, and ``meta`` tensors as "another device") and values (0, denormals, values near
the dtype's overflow, inf and nan), on every backend of the run: the PyTorch and Triton paths of the losses,
the compiled kernels and the ``torch._foreach`` fallbacks of :mod:`metamask_fast.ops`. Every call must
return the result of a float64 reference written in this file, within a tolerance derived from the dtype
and the conditioning of the input, or raise ``ValueError``/``TypeError`` naming the argument.

The rules for the non-finite cases, as documented by the code under test:

* The losses refuse non-finite inputs (``ValueError`` naming ``z_a``, ``z_b`` or ``weight``, in that order).
  Where the reference is beyond the dtype's range, the loss must not be finite either (nan or inf), or
  raise ``ValueError``. Where it is undefined (0/0: a constant column under ``normalize="std"``), any
  result goes: torch's std of equal values is 0 or rounding noise of the mean.
* The ops take any values: elementwise results must show the reference's nan/±inf pattern exactly, except
  where an intermediate of the arithmetic leaves the dtype's range (as it would in ``torch.optim.SGD``):
  there a non-finite result is also accepted.

Reproducible: ``derandomize=True`` and no example database. Each test states its example count.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, for a run of this file alone

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from metamask_fast import ops  # noqa: E402
from metamask_fast.functional import barlow_twins_loss, nt_xent_loss  # noqa: E402

settings.register_profile(
    "metamask_fast_properties",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PROFILE = settings.get_profile("metamask_fast_properties")


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Values and tensors

# The special values put into tensors. "huge" is near the dtype's overflow, so that sums and squares
# overflow it (the float64 references work in units of the largest magnitude where that matters).
SPECIALS = ["zero", "denormal", "-denormal", "huge", "-huge", "inf", "-inf", "nan"]
FINITE_SPECIALS = SPECIALS[:5]
HUGE = {torch.float32: 1e38, torch.bfloat16: 1e38, torch.float16: 3e4, torch.float64: 1e300}
# Overall scales of the random part: ordinary, tiny (denormal for the dtype), large, huge.
SCALES = ["one", "denormal", "large", "huge"]


def special_value(kind: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return {
        "zero": 0.0,
        "denormal": info.tiny / 8,
        "-denormal": -info.tiny / 8,
        "huge": HUGE[dtype],
        "-huge": -HUGE[dtype],
        "inf": math.inf,
        "-inf": -math.inf,
        "nan": math.nan,
    }[kind]


def scale_value(kind: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return {"one": 1.0, "denormal": info.tiny / 64, "large": math.sqrt(info.max) * 4, "huge": HUGE[dtype] / 4}[kind]


@st.composite
def value_specs(draw, specials=SPECIALS, max_specials=3):
    """How to fill a tensor: a seed for the random part, its scale, and special values at flat positions."""
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from(SCALES))
    chosen = draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(specials)), max_size=max_specials))
    return seed, scale, tuple(chosen)


def fill(shape, dtype, spec) -> torch.Tensor:
    """A contiguous CPU tensor of ``shape`` and ``dtype`` with the values ``spec`` describes."""
    seed, scale, chosen = spec
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale_value(scale, dtype)
    flat = values.view(-1)
    if flat.numel():
        for position, kind in chosen:
            flat[position % flat.numel()] = special_value(kind, dtype)
    return values.to(dtype)


LAYOUTS = ["contiguous", "transposed", "strided", "expanded", "channels_last", "offset"]


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (contiguous) with the values and shape it has, in another memory layout. ``"expanded"`` changes
    the values: every index along dimension 0 reads the first one (stride 0)."""
    if layout == "transposed" and t.dim() >= 2:
        order = list(reversed(range(t.dim())))
        return t.permute(order).contiguous().permute(order)
    if layout == "strided" and t.dim() >= 1:
        buffer = torch.zeros((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype)
        buffer[::2] = t
        return buffer[::2]
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] >= 1:
        return t[:1].expand(t.shape)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "offset":
        buffer = torch.zeros(t.numel() + 1, dtype=t.dtype)
        buffer[1:] = t.reshape(-1)
        return buffer[1:].view(t.shape)
    return t


def on(t, device):
    """``t`` on ``device`` with its strides (``.to`` would keep them for dense tensors only)."""
    if t is None or device == "cpu":
        return t
    if 0 in t.stride():  # expanded: the same elements read again
        return t.contiguous().to(device).as_strided(t.size(), t.stride())
    moved = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    moved.copy_(t)
    return moved


def subnormal(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------------------
# The losses: float64 references (SPEC §1, written out)


def reference_barlow_twins(z_a, z_b, lambd, weight, normalize, eps):
    """Loss, and a bound on the error that computing it in ``compute`` precision may make, in float64.

    The bound follows the conditioning of the standardisation: a column's mean is computed with an error of
    about ``N eps max|z|``, which the division by its std (or ``sqrt(var + eps)``) amplifies; denormal
    inputs add their absolute spacing."""
    a, b = z_a.double().cpu(), z_b.double().cpu()
    n, d = a.shape
    compute = torch.float32 if z_a.dtype in HALF else z_a.dtype

    def standardise(z):
        # In units of the column's largest magnitude, so that float64 squares neither overflow nor underflow
        # (the formula is invariant to the scale of a column, with eps in the same units).
        peak = z.abs().amax(0)
        peak = torch.where(peak > 0, peak, 1)
        z = z / peak
        centred = z - z.mean(0)
        # (eps in these units may underflow: then it only matters for a constant column, 0 / not 0.)
        scaled_eps = (eps / peak**2).clamp_min(torch.finfo(torch.float64).tiny)
        scale = z.std(0) if normalize == "std" else torch.sqrt(z.var(0, unbiased=False) + scaled_eps)
        # Error of the standardised column: rounding amplified by the conditioning (|z| <= 1 here), plus the
        # spacing of denormals relative to the spread.
        delta = 8 * n * (torch.finfo(compute).eps + subnormal(z_a.dtype) / peak) / scale
        return centred / scale, delta

    (sa, da), (sb, db) = standardise(a), standardise(b)
    c = sa.T @ sb / n
    w = torch.ones(d, dtype=torch.float64) if weight is None else weight.double().cpu()
    c = w[:, None] * c * w[None, :]
    loss = ((1 - torch.diagonal(c)) ** 2).sum() + lambd * ((c**2).sum() - (torch.diagonal(c) ** 2).sum())
    # |ΔC_ij| <= w_i w_j sqrt(N) (δ_i + δ_j) (standardised entries are at most sqrt(N) in size), plus the
    # rounding of the products and sums themselves.
    dc = (w[:, None] * w[None, :]).abs() * (
        math.sqrt(n) * (da[:, None] + db[None, :]) + 4 * n * torch.finfo(compute).eps
    )
    weight_of = torch.full((d, d), float(lambd), dtype=torch.float64)
    weight_of.fill_diagonal_(1.0)
    bound = (weight_of * (2 * (1 + c.abs()) * dc + dc**2)).sum() + 4 * d * d * torch.finfo(compute).eps * (
        1 + c.abs().max() ** 2
    ) * (1 + lambd)
    return loss, bound


def reference_nt_xent(z_a, z_b, temperature, weight):
    """Loss and an error bound, in float64. Rows are L2-normalised exactly; a zero row stays zero (as
    ``torch.nn.functional.normalize`` leaves it)."""
    z = torch.cat([z_a, z_b]).double().cpu()
    compute = torch.float32 if z_a.dtype in HALF else z_a.dtype

    def in_units_of_the_peak(v):  # a row's direction does not change; float64 squares stay in range
        peak = v.abs().amax(1, keepdim=True)
        return v / torch.where(peak > 0, peak, 1)

    z = in_units_of_the_peak(z)
    if weight is not None:
        z = in_units_of_the_peak(z * weight.double().cpu())
    norm = z.norm(dim=1, keepdim=True)
    u = torch.where(norm > 0, z / torch.where(norm > 0, norm, 1), 0)
    n2 = z.shape[0]
    n = n2 // 2
    logits = u @ u.T / temperature
    logits.fill_diagonal_(-math.inf)
    positives = (torch.arange(n2) + n) % n2
    loss = -(logits[torch.arange(n2), positives] - torch.logsumexp(logits, dim=1)).mean()
    # Each cosine is computed to about D eps, plus what the row's dynamic range costs: an element below
    # about subnormal * (the row's peak) is lost, before and after the weight. Divided by the temperature;
    # the loss moves by at most twice the largest logit error.
    d = z.shape[1]
    w_peak = 1.0 if weight is None else 1.0 + weight.double().abs().max().item()
    weighted = torch.cat([z_a, z_b]).double().cpu()
    if weight is not None:  # the norm of the weighted row relative to the peak of the unweighted one
        weighted = in_units_of_the_peak(weighted) * weight.double().cpu()
        relative_norm = weighted.norm(dim=1, keepdim=True)
    else:
        relative_norm = in_units_of_the_peak(weighted).norm(dim=1, keepdim=True)
    lost = 4 * d * subnormal(compute) * w_peak
    spacing = torch.where(relative_norm > 0, lost / torch.where(relative_norm > 0, relative_norm, 1), 0).max()
    bound = 2 * (8 * (d + 4) * torch.finfo(compute).eps + 4 * spacing) / temperature * (1 + loss.abs())
    return loss, bound


def check_loss(got, want, bound, dtype):
    """``got`` (a 0-d tensor of ``dtype``) is the reference ``want`` within ``bound`` plus its own rounding;
    a reference that is not finite in ``dtype`` wants a non-finite result."""
    assert got.shape == () and got.dtype == dtype
    got = got.detach().double().cpu()
    expected = want.to(dtype).double()
    if torch.isnan(want):
        # 0/0: a constant column under normalize="std". Undefined; whether the computed std is 0 (nan) or
        # rounding noise of the mean (a finite loss) is up to rounding, in torch's std as in this reference.
        return
    if not torch.isfinite(expected):
        assert not torch.isfinite(got), f"got {got.item()}, reference {want.item()} (not finite in {dtype})"
        return
    tolerance = bound.item() + 2 * torch.finfo(dtype).eps * abs(want.item()) + subnormal(dtype)
    if not math.isfinite(tolerance) or tolerance > 1e6 * max(1.0, abs(want.item())):
        return  # ill-conditioned beyond the dtype: any result is as good as the next
    assert torch.isfinite(got) and abs(got.item() - want.item()) <= tolerance, (
        f"got {got.item()!r}, reference {want.item()!r}, tolerance {tolerance:.3g}"
    )


def first_non_finite(**tensors) -> str | None:
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None


@st.composite
def loss_inputs(draw, dtypes=DTYPES, max_n=6, max_d=7, layouts=LAYOUTS, specials=SPECIALS, weighted=None):
    """Valid structure (N >= 2, D >= 1, one shape, dtype and device), hostile values and layouts."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, max_d))
    z = []
    for _ in range(2):
        t = fill((n, d), dtype, draw(value_specs(specials)))
        z.append(lay_out(t, draw(st.sampled_from(layouts))))
    weight = None
    if draw(st.booleans()) if weighted is None else weighted:
        kind = draw(st.sampled_from(["mask", "hostile"]))
        if kind == "mask":  # what a mask looks like: values in [0, 1]
            seed = draw(st.integers(0, 2**16))
            weight = torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
        else:
            weight = fill((d,), dtype, draw(value_specs(specials)))
        weight = lay_out(weight, draw(st.sampled_from(["contiguous", "strided", "expanded", "offset"])))
    return z[0], z[1], weight


def call_or_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError) as error:
        return None, error


@pytest.mark.parametrize("device", DEVICES)
@examples(300)
@given(
    inputs=loss_inputs(),
    lambd=st.sampled_from([5e-3, 0.0, 1.0, 1e-30, 37.0]),
    normalize=st.sampled_from(["std", "bn"]),
    eps=st.sampled_from([1e-5, 1e-30, 1.0]),
)
# Found by this test: float32 variance overflow under "bn" gave the finite loss 1.0 (reference 3.6e-11),
# a float32 mean overflow under "std" gave nan; float64 denormal columns gave nan.
@example(
    inputs=(torch.tensor([[1.5410], [-0.2934]]), torch.tensor([[1.1371e20], [-2.1651e19]]), None),
    lambd=5e-3, normalize="bn", eps=1e-5,
)
@example(
    inputs=(
        torch.tensor([[1.0, 0.3], [2.0, -1.0], [0.5, 0.2]]),
        torch.tensor([[3e38, 1.0], [2e38, 2.0], [-1e38, 0.1]]),
        None,
    ),
    lambd=5e-3, normalize="std", eps=1e-5,
)
@example(
    inputs=(
        torch.tensor([[1.5410], [-0.2934]], dtype=torch.float64),
        torch.tensor([[5e-310], [-1e-310]], dtype=torch.float64),
        None,
    ),
    lambd=5e-3, normalize="std", eps=1e-5,
)
# Guards of the fix (columns scaled by a power of two): under "bn", eps / scale² must neither underflow to 0
# (a constant column of large values: 0 / 0, reference 1) nor overflow (a denormal column: standardised to
# 0, loss 1.0, where the reference with this weight overflows float32).
@example(
    inputs=(torch.tensor([[1.5410], [-0.2934]]), torch.tensor([[3.8525e37], [3.8525e37]]), None),
    lambd=5e-3, normalize="bn", eps=1e-5,
)
@example(
    inputs=(
        torch.tensor([[1.5410], [-0.2934]]), torch.tensor([[2.8304e-40], [-5.3894e-41]]), torch.tensor([3.8525e37])
    ),
    lambd=5e-3, normalize="bn", eps=1e-5,
)
def test_barlow_twins_torch_matches_reference_or_refuses(device, inputs, lambd, normalize, eps):
    z_a, z_b, weight = (on(t, device) for t in inputs)
    got, error = call_or_error(
        barlow_twins_loss, z_a, z_b, lambd, weight=weight, normalize=normalize, eps=eps, backend="torch"
    )
    culprit = first_non_finite(z_a=z_a, z_b=z_b, weight=weight)
    if culprit is not None:
        assert isinstance(error, ValueError) and culprit in str(error), (culprit, error)
        return
    want, bound = reference_barlow_twins(z_a, z_b, lambd, weight, normalize, eps)
    if error is not None:  # refusing finite input is allowed only where the reference is not finite either
        assert isinstance(error, ValueError) and not torch.isfinite(want.to(z_a.dtype)), error
        return
    check_loss(got, want, bound, z_a.dtype)


@pytest.mark.parametrize("device", DEVICES)
@examples(300)
@given(inputs=loss_inputs(), temperature=st.sampled_from([0.07, 1.0, 0.5, 1e-3, 10.0]))
# Found by this test: float32 rows of norm above ~1.8e19 (norm overflow) or of denormals (squares underflow,
# then F.normalize's eps) were normalised to ~0, a finite wrong loss (log(2N - 1) for all rows).
@example(
    inputs=(torch.tensor([[1.0, 0.5], [-0.3, 2.0]]), torch.tensor([[1.1e20, 0.4e20], [-0.2e20, 1.9e20]]), None),
    temperature=0.07,
)
@example(
    inputs=(torch.tensor([[1.0, 0.5], [-0.3, 2.0]]), torch.tensor([[1.1e-40, 0.4e-40], [-0.2e-40, 1.9e-40]]), None),
    temperature=0.07,
)
@example(
    inputs=(
        torch.tensor([[1.0, 0.5], [-0.3, 2.0]]), torch.tensor([[1.1, 0.4], [-0.2, 1.9]]), torch.tensor([3e-40, 1e-39])
    ),
    temperature=0.07,
)
def test_nt_xent_torch_matches_reference_or_refuses(device, inputs, temperature):
    z_a, z_b, weight = (on(t, device) for t in inputs)
    got, error = call_or_error(nt_xent_loss, z_a, z_b, temperature, weight=weight, backend="torch")
    culprit = first_non_finite(z_a=z_a, z_b=z_b, weight=weight)
    if culprit is not None:
        assert isinstance(error, ValueError) and culprit in str(error), (culprit, error)
        return
    want, bound = reference_nt_xent(z_a, z_b, temperature, weight)
    if error is not None:
        assert isinstance(error, ValueError) and not torch.isfinite(want.to(z_a.dtype)), error
        return
    check_loss(got, want, bound, z_a.dtype)


def triton_runs_here() -> bool:
    from metamask_fast.functional import _triton_problem

    return _triton_problem(torch.device(DEVICES[-1])) is None


@pytest.mark.skipif(not triton_runs_here(), reason="the Triton backend cannot run in this environment")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings in Triton's interpreter
@examples(10)
@given(
    inputs=loss_inputs(dtypes=[torch.float32, torch.bfloat16, torch.float16], max_n=4, max_d=4),
    normalize=st.sampled_from(["std", "bn"]),
)
# Found by this test: float32 column statistics overflowed (a finite wrong loss, 3.0 for 4.57 here) or
# underflowed (nan); now refused with a ValueError naming z_b.
@example(
    inputs=(
        torch.tensor([[1.0, 0.3], [2.0, -1.0], [0.5, 0.2]]),
        torch.tensor([[1e20, 1.0], [-2e20, 2.0], [0.5e20, 0.1]]),
        None,
    ),
    normalize="std",
)
@example(
    inputs=(
        torch.tensor([[1.0, 0.3], [2.0, -1.0], [0.5, 0.2]]),
        torch.tensor([[1e-40, 1.0], [-2e-40, 2.0], [0.5e-40, 0.1]]),
        None,
    ),
    normalize="std",
)
def test_barlow_twins_triton_matches_reference_or_refuses(inputs, normalize):
    """The fused kernels (Triton's interpreter on the CPU, slow: few, tiny examples; the GPU when there is one)."""
    z_a, z_b, weight = (on(t, DEVICES[-1]) for t in inputs)
    got, error = call_or_error(barlow_twins_loss, z_a, z_b, 5e-3, weight=weight, normalize=normalize, backend="triton")
    culprit = first_non_finite(z_a=z_a, z_b=z_b, weight=weight)
    if culprit is not None:
        assert isinstance(error, ValueError) and culprit in str(error), (culprit, error)
        return
    want, bound = reference_barlow_twins(z_a, z_b, 5e-3, weight, normalize, 1e-5)
    if error is not None:
        # Documented: the kernels' float32 column statistics refuse spreads they cannot hold.
        out_of_range = [name for name, z in (("z_a", z_a), ("z_b", z_b)) if not triton_statistics_hold(z, normalize)]
        assert isinstance(error, ValueError) and out_of_range and out_of_range[0] in str(error), error
        assert "backend='torch'" in str(error)
    else:
        check_loss(got, want, bound, z_a.dtype)
    if z_a.is_cuda:  # "auto" takes the kernels on a GPU and never refuses what the PyTorch path computes
        check_loss(barlow_twins_loss(z_a, z_b, 5e-3, weight=weight, normalize=normalize), want, bound, z_a.dtype)


def triton_statistics_hold(z, normalize):
    """Whether every column's spread lies where float32 sums of squares hold it (see functional.py),
    with a margin of a factor 2 on either side."""
    z = z.double().cpu()
    n = z.shape[0]
    spread = z.std(0) if normalize == "std" else torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    no_overflow = bool((n * z.abs().amax(0) < 1e38).all())
    return no_overflow and bool(((spread > 2.0**-49) & (spread < 2.0**59 / math.sqrt(n))).all())


# Malformed calls: one thing wrong with otherwise valid arguments; the error type and the name it must give.
LOSS_CORRUPTIONS = {
    "z_a rank 1": (lambda a: dict(a, z_a=a["z_a"][:, 0]), ValueError, "z_a"),
    "z_b rank 3": (lambda a: dict(a, z_b=a["z_b"][None]), ValueError, "z_b"),
    "z_a not a tensor": (lambda a: dict(a, z_a=a["z_a"].tolist()), TypeError, "z_a"),
    "z_b integer": (lambda a: dict(a, z_b=a["z_b"].to(torch.int64)), TypeError, "z_b"),
    "shapes differ": (lambda a: dict(a, z_b=a["z_b"][:, :-1]), ValueError, "z_b"),
    "z_b on meta": (lambda a: dict(a, z_b=a["z_b"].to("meta")), ValueError, "z_b"),
    "dtypes differ": (
        lambda a: dict(a, z_b=a["z_b"].to(torch.float64 if a["z_a"].dtype != torch.float64 else torch.float32)),
        TypeError,
        "z_b",
    ),
    "N = 1": (lambda a: dict(a, z_a=a["z_a"][:1], z_b=a["z_b"][:1]), ValueError, "z_a"),
    "N = 0": (lambda a: dict(a, z_a=a["z_a"][:0], z_b=a["z_b"][:0]), ValueError, "z_a"),
    "D = 0": (lambda a: dict(a, z_a=a["z_a"][:, :0], z_b=a["z_b"][:, :0]), ValueError, "z_a"),
    "weight shape": (
        lambda a: dict(a, weight=torch.ones(a["z_a"].shape[1] + 1, dtype=a["z_a"].dtype)), ValueError, "weight"
    ),
    "weight 2-D": (
        lambda a: dict(a, weight=torch.ones(1, a["z_a"].shape[1], dtype=a["z_a"].dtype)), ValueError, "weight"
    ),
    "weight dtype": (
        lambda a: dict(
            a,
            weight=torch.ones(
                a["z_a"].shape[1], dtype=torch.float64 if a["z_a"].dtype != torch.float64 else torch.float16
            ),
        ),
        TypeError,
        "weight",
    ),
    "weight on meta": (
        lambda a: dict(a, weight=torch.ones(a["z_a"].shape[1], dtype=a["z_a"].dtype, device="meta")),
        ValueError,
        "weight",
    ),
    "weight a list": (lambda a: dict(a, weight=[1.0] * a["z_a"].shape[1]), TypeError, "weight"),
    "backend": (lambda a: dict(a, backend="cuda"), ValueError, "backend"),
}
BT_CORRUPTIONS = {
    "lambd negative": (lambda a: dict(a, lambd=-1e-3), ValueError, "lambd"),
    "lambd nan": (lambda a: dict(a, lambd=math.nan), ValueError, "lambd"),
    "normalize": (lambda a: dict(a, normalize="layer"), ValueError, "normalize"),
    "eps zero": (lambda a: dict(a, eps=0.0), ValueError, "eps"),
    "eps inf": (lambda a: dict(a, eps=math.inf), ValueError, "eps"),
}
NT_CORRUPTIONS = {
    "temperature zero": (lambda a: dict(a, temperature=0.0), ValueError, "temperature"),
    "temperature nan": (lambda a: dict(a, temperature=math.nan), ValueError, "temperature"),
    "temperature a string": (lambda a: dict(a, temperature="0.1"), ValueError, "temperature"),
}


@examples(200)
@given(
    inputs=loss_inputs(specials=FINITE_SPECIALS, max_n=4, max_d=4, weighted=False),
    which=st.sampled_from(["barlow_twins", "nt_xent"]),
    data=st.data(),
)
def test_losses_refuse_malformed_arguments_naming_them(inputs, which, data):
    z_a, z_b, _ = inputs
    if which == "barlow_twins":
        loss, corruptions, args = barlow_twins_loss, {**LOSS_CORRUPTIONS, **BT_CORRUPTIONS}, dict(lambd=5e-3)
    else:
        loss, corruptions, args = nt_xent_loss, {**LOSS_CORRUPTIONS, **NT_CORRUPTIONS}, dict(temperature=0.07)
    name = data.draw(st.sampled_from(sorted(corruptions)), label="corruption")
    corrupt, error_type, argument = corruptions[name]
    kwargs = corrupt(dict(z_a=z_a, z_b=z_b, weight=None, backend="torch", **args))
    with pytest.raises(error_type) as raised:
        loss(**kwargs)
    assert argument in str(raised.value), f"{name}: {raised.value}"


# ---------------------------------------------------------------------------------------------------------
# The meta-step ops


@contextlib.contextmanager
def ops_path(path: str):
    """``"compiled"``: the wrapper as it is (the compiled kernels where the inputs qualify, the fallback for
    the others, as documented); ``"fallback"``: the ``torch._foreach`` fallbacks only."""
    if path == "compiled" and not ops.HAS_EXTENSION:
        pytest.skip(f"metamask_fast._C not loaded ({ops._EXTENSION_ERROR})")
    with pytest.MonkeyPatch.context() as patch:
        if path == "fallback":
            patch.setattr(ops, "HAS_EXTENSION", False)
        yield


SHAPES = st.one_of(
    st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
    st.sampled_from([(1,), (), (0, 3), (2, 3, 2, 2), (1, 3, 1, 1), (37,), (3, 1, 5), (4, 4, 3, 3)]),
)


@st.composite
def op_tensor(draw, shape, dtype, *, layouts=LAYOUTS, specials=SPECIALS):
    t = fill(shape, dtype, draw(value_specs(specials)))
    return lay_out(t, draw(st.sampled_from(layouts)))


@st.composite
def op_lists(draw, count, *, min_len=1, max_len=6, written=(), specials=SPECIALS):
    """``count`` lists of one length, pairwise of one shape, one dtype; the lists whose indices are in
    ``written`` get no expanded tensors (writing them has its own test)."""
    dtype = draw(st.sampled_from(DTYPES))
    length = draw(st.integers(min_len, max_len))
    shapes = [draw(SHAPES) for _ in range(length)]
    lists = []
    for k in range(count):
        layouts = [l for l in LAYOUTS if l != "expanded"] if k in written else LAYOUTS
        lists.append([draw(op_tensor(s, dtype, layouts=layouts, specials=specials)) for s in shapes])
    return dtype, lists


def dont_care(dtype, *intermediates):
    """Elements where an intermediate of the arithmetic, computed from finite inputs, leaves the dtype's
    range or comes within rounding of its edge: there the result may be non-finite, or finite (a fused
    multiply-add, or float32 arithmetic for a 16-bit dtype, does not round the intermediate), even where the
    float64 reference overflows itself. ``intermediates``: (values, mask of elements with finite inputs)."""
    limit = torch.finfo(dtype).max * (1 - 8 * torch.finfo(dtype).eps)
    mask = torch.zeros_like(intermediates[-1][0], dtype=torch.bool)
    for values, finite_inputs in intermediates:
        mask |= finite_inputs & ~(values.abs() <= limit)
    return mask


def check_elementwise(got, want, tolerance, loose, dtype, what):
    """``got`` is ``want`` (float64) rounded to ``dtype``, within ``tolerance`` (elementwise, float64), with
    the reference's nan/±inf pattern exactly, except where ``loose`` (an intermediate overflowed the dtype):
    there a non-finite result is accepted too."""
    assert got.dtype == dtype and got.shape == want.shape, what
    got = got.detach().double().cpu()
    expected = want.to(dtype).double()
    same_pattern = (
        (torch.isnan(got) == torch.isnan(expected))
        & (torch.isposinf(got) == torch.isposinf(expected))
        & (torch.isneginf(got) == torch.isneginf(expected))
    )
    wrong = ~same_pattern & ~(loose & ~torch.isfinite(got))
    assert not bool(wrong.any()), f"{what}: got {got[wrong].tolist()}, reference {want[wrong].tolist()}"
    compare = torch.isfinite(expected) & torch.isfinite(got)
    bad = compare & ~((got - want).abs() <= tolerance + 2 * subnormal(dtype))
    assert not bool(bad.any()), (
        f"{what}: got {got[bad].tolist()}, reference {want[bad].tolist()}, "
        f"tolerance {tolerance.expand_as(want)[bad].tolist()}"
    )


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@pytest.mark.parametrize("device", DEVICES)
@examples(200)
@given(lists=op_lists(1))
@example(lists=(torch.float32, [[torch.full((4,), 1e20)]]))  # squares overflow float32, the norm does not
@example(lists=(torch.float32, [[torch.full((5,), 1e-40)]]))  # squares underflow float32, the norm does not
@example(lists=(torch.float64, [[torch.full((3,), 1e160, dtype=torch.float64)]]))  # and float64
@example(lists=(torch.float64, [[torch.tensor(5.3575e-310, dtype=torch.float64)]]))
def test_global_norm_matches_reference(path, device, lists):
    dtype, (tensors,) = lists
    tensors = [on(t, device) for t in tensors]
    with ops_path(path):
        got = ops.global_norm(tensors)
    assert got.shape == () and got.dtype == dtype and got.device == tensors[0].device
    values = torch.cat([t.double().cpu().reshape(-1) for t in tensors])
    peak = values.abs().max().item() if values.numel() else 0.0
    if math.isfinite(peak) and peak > 0:  # in units of the peak: float64 squares neither overflow nor underflow
        want = torch.tensor([peak * math.sqrt(float(((values / peak) ** 2).sum()))], dtype=torch.float64)
    else:
        want = torch.linalg.vector_norm(values).reshape(1)  # 0, inf or nan
    numel = sum(t.numel() for t in tensors)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32  # the least the paths use
    # The rounding of the result to the dtype, and of the accumulation.
    tolerance = (2 * torch.finfo(dtype).eps + 2 * numel * torch.finfo(accumulate).eps) * want.abs()
    finite = torch.tensor([bool(torch.isfinite(values).all())])
    check_elementwise(got.reshape(1), want, tolerance, dont_care(dtype, (want, finite)), dtype, "global_norm")


def representable(coefficient: float, dtype: torch.dtype) -> bool:
    """Whether a coefficient survives its rounding to ``dtype`` (torch's own ops, hence the fallbacks, round
    ``alpha`` to the tensors' dtype: 1e-30 becomes 0 in float16, and 0 * inf is nan). Where it does not, a
    non-finite result is accepted anywhere (the results are compared where finite)."""
    rounded = float(torch.tensor(coefficient, dtype=dtype))
    return coefficient == 0 or (rounded != 0 and math.isfinite(rounded))


ALPHAS = st.sampled_from([1.0, -1.0, 0.0, 0.5, -0.3, 1e-3, 1e30, -1e-30, 1e-310, 3.0])


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@pytest.mark.parametrize("device", DEVICES)
@examples(200)
@given(
    lists=op_lists(3, written=(0, 2)),
    alpha=ALPHAS,
    form=st.sampled_from(["in_place", "new", "out", "out_is_tensors"]),
    data=st.data(),
)
def test_add_scaled_matches_reference(path, device, lists, alpha, form, data):
    dtype, (tensors, others, out) = lists
    tensors, others, out = ([on(t, device) for t in ts] for ts in (tensors, others, out))
    # Pairs where others[i] is tensors[i] itself (allowed by the contract).
    same = [data.draw(st.booleans(), label=f"others[{i}] is tensors[{i}]") for i in range(len(tensors))]
    others = [t if s else o for t, o, s in zip(tensors, others, same)]
    x = [t.double().cpu() for t in tensors]
    y = [o.double().cpu() for o in others]
    saved_others = [o.clone() for o in others]
    want = [a + alpha * b for a, b in zip(x, y)]
    magnitude = [a.abs() + abs(alpha) * b.abs() for a, b in zip(x, y)]
    loose = [
        dont_care(dtype, (alpha * b, torch.isfinite(b)), (w, torch.isfinite(a) & torch.isfinite(b)))
        for a, b, w in zip(x, y, want)
    ]
    if not representable(alpha, dtype):
        loose = [torch.ones_like(l) for l in loose]
    with ops_path(path):
        if form == "in_place":
            result = ops.add_scaled_(tensors, others, alpha)
            assert result is None
            got = tensors
        elif form == "new":
            saved = [t.clone() for t in tensors]
            got = ops.add_scaled(tensors, others, alpha)
            assert all(torch.equal(t.nan_to_num(), s.nan_to_num()) for t, s in zip(tensors, saved)), "tensors changed"
            for g, t in zip(got, tensors):
                assert g.numel() == 0 or g.data_ptr() not in (t.data_ptr(),), "a result shares memory with its input"
        elif form == "out_is_tensors" and any(same):
            # out[i] is tensors[i] and others[i] is too: out shares memory with others, which is refused
            # (for an empty tensor the compiled op refuses, the fallback does not: no memory is shared).
            shared = [i for i, s in enumerate(same) if s]
            try:
                got = ops.add_scaled(tensors, others, alpha, out=tensors)
            except ValueError as error:
                assert any(f"out[{i}] shares memory with others[{i}]" in str(error) for i in shared), error
                return
            assert all(tensors[i].numel() == 0 for i in shared), "out[i] is others[i]: not refused"
        else:
            target = tensors if form == "out_is_tensors" else out
            got = ops.add_scaled(tensors, others, alpha, out=target)
            assert all(g is t for g, t in zip(got, target))
    for i, (g, w, m, l) in enumerate(zip(got, want, magnitude, loose)):
        check_elementwise(g, w, 4 * torch.finfo(dtype).eps * m, l, dtype, f"add_scaled ({form}) [{i}]")
    for i, (o, s) in enumerate(zip(others, saved_others)):
        if not same[i]:
            assert torch.equal(o.nan_to_num(), s.nan_to_num()), f"others[{i}] changed"


@pytest.mark.parametrize("path", ["compiled", "fallback"])
def test_writing_into_an_expanded_tensor_names_it(path):
    """Found by the test below: torch's own RuntimeError ("more than one element of the written-to tensor
    refers to a single memory location") did not name the argument."""
    x = [torch.zeros(3), torch.zeros(1, 3).expand(4, 3)]
    y = [torch.ones(3), torch.ones(4, 3)]
    with ops_path(path):
        with pytest.raises(ValueError, match=r"add_scaled_: elements of tensors\[1\] share memory"):
            ops.add_scaled_(x, y, 1.0)
        with pytest.raises(ValueError, match=r"add_scaled: elements of out\[1\] share memory"):
            ops.add_scaled([torch.zeros(3), torch.zeros(4, 3)], y, 1.0, out=x)


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@examples(60)
@given(
    lists=op_lists(2),
    alpha=ALPHAS,
    form=st.sampled_from(["in_place", "out"]),
    where=st.integers(0, 5),
)
def test_writing_into_an_expanded_tensor_is_refused(path, lists, alpha, form, where):
    """A written tensor whose elements share memory (stride 0) cannot take a result per element."""
    dtype, (tensors, others) = lists
    i = where % len(tensors)
    if not tensors[i].dim() or tensors[i].shape[0] < 2 or tensors[i][0].numel() == 0:
        return
    target = [t.clone() for t in tensors]
    target[i] = target[i][:1].expand(target[i].shape)
    with ops_path(path), pytest.raises(ValueError) as raised:
        if form == "in_place":
            ops.add_scaled_(target, others, alpha)
        else:
            ops.add_scaled(tensors, others, alpha, out=target)
    name = "tensors" if form == "in_place" else "out"
    assert f"{name}[{i}]" in str(raised.value), raised.value


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@pytest.mark.parametrize("alpha", [1e-6, 1e5])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_alpha_is_applied_in_float32(path, alpha, dtype):
    """Found by test_add_scaled_matches_reference: the fallbacks used torch's add, which takes alpha in the
    tensors' dtype: float16 raised RuntimeError for 1e5 ("value cannot be converted to type c10::Half
    without overflow") and made 1e-6 1.013e-6. (Transposed tensors: the fallback on either path.)"""
    y = torch.tensor([[1.5e-3, 0.25, 1000.0, -3.0]] * 3, dtype=dtype).T
    want = (alpha * y.float()).to(dtype)  # x = 0: one rounding of α y
    with ops_path(path):
        got = ops.add_scaled([torch.zeros(3, 4, dtype=dtype).T], [y], alpha)[0]
        in_place = torch.zeros(3, 4, dtype=dtype).T
        ops.add_scaled_([in_place], [y], alpha)
        into = ops.add_scaled([torch.zeros(3, 4, dtype=dtype).T], [y], alpha, out=[torch.empty(4, 3, dtype=dtype)])[0]
    for result in (got, in_place, into):
        torch.testing.assert_close(result, want, rtol=0, atol=0)


def test_global_norm_beyond_float32_range_is_inf():
    """Found by test_global_norm_matches_reference (unpinned examples): the C++ CPU kernel raised 'value cannot
    be converted to type float without overflow' instead of giving inf."""
    assert ops.global_norm([torch.full((37,), -5.776e37)]).item() == math.inf


def reference_virtual_sgd(p, g, b, lr, momentum, dampening, weight_decay, nesterov):
    """torch.optim.SGD's update written out, in float64: the result, the magnitude of its terms and the
    intermediates, each with the mask of elements whose inputs are finite (for the overflow rule)."""
    if g is None:
        return p, p.abs(), [(p, torch.isfinite(p))]
    fp, fg = torch.isfinite(p), torch.isfinite(g)
    d, d_mag, fd, steps = g, g.abs(), fg, []
    if weight_decay != 0:  # as torch.optim.SGD: no term at all (0 * inf would be nan)
        d, d_mag, fd = g + weight_decay * p, g.abs() + weight_decay * p.abs(), fg & fp
        steps += [(weight_decay * p, fp), (d, fd)]
    update, update_mag, fu = d, d_mag, fd
    if momentum != 0:
        if b is not None:
            fb = torch.isfinite(b)
            update = momentum * b + (1 - dampening) * d
            update_mag = momentum * b.abs() + abs(1 - dampening) * d_mag
            steps += [(momentum * b, fb), ((1 - dampening) * d, fd), (update, fb & fd)]
            fu = fb & fd
        if nesterov:
            steps += [(momentum * update, fu)]
            update, update_mag = d + momentum * update, d_mag + momentum * update_mag
            steps += [(update, fu)]
    result = p - lr * update
    steps += [(lr * update, fu), (result, fu & fp)]
    return result, p.abs() + lr * update_mag, steps


SGD_SETTINGS = st.sampled_from(
    [
        dict(momentum=m, dampening=dmp, weight_decay=wd, nesterov=nest)
        for m in (0.0, 0.9, 1.0, 2.5)
        for dmp in (0.0, 0.3, 1.0, -0.5)
        for wd in (0.0, 5e-4, 1.0)
        for nest in (False, True)
        if not (nest and (m == 0 or dmp != 0))
    ]
)


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@pytest.mark.parametrize("device", DEVICES)
@examples(200)
@given(
    lists=op_lists(3),
    lr=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 37.0, 1e-30]),
    sgd=SGD_SETTINGS,
    data=st.data(),
)
def test_virtual_sgd_step_matches_reference(path, device, lists, lr, sgd, data):
    dtype, (params, grads, buffers) = lists
    params, grads, buffers = ([on(t, device) for t in ts] for ts in (params, grads, buffers))
    grads = [None if data.draw(st.booleans(), label=f"grads[{i}] is None") else g for i, g in enumerate(grads)]
    buffers = [None if data.draw(st.booleans(), label=f"buffers[{i}] is None") else b for i, b in enumerate(buffers)]
    saved = [None if t is None else t.clone() for t in params + grads + buffers]
    with ops_path(path):
        got = ops.virtual_sgd_step(params, grads, buffers, lr=lr, **sgd)
    assert isinstance(got, list) and len(got) == len(params)
    for t, s in zip(params + grads + buffers, saved):  # nothing given is written
        assert (t is None and s is None) or torch.equal(t.nan_to_num(), s.nan_to_num())
    for i, (o, p, g, b) in enumerate(zip(got, params, grads, buffers)):
        assert not o.requires_grad and o.device == p.device
        cpu = lambda t: None if t is None else t.double().cpu()  # noqa: E731
        want, magnitude, steps = reference_virtual_sgd(cpu(p), cpu(g), cpu(b), lr, **sgd)
        if g is None:
            assert torch.equal(o.nan_to_num(), p.nan_to_num()) and o.dtype == dtype, f"[{i}] without a gradient changed"
            continue
        # Rounding relative to the terms, and the absolute rounding of denormal intermediates, which the
        # coefficients applied after them amplify.
        momentum, keep = abs(sgd["momentum"]), abs(1 - sgd["dampening"])
        amplified = 8 * subnormal(dtype) * (1 + lr) * (1 + momentum) ** 2 * (1 + keep) * (1 + sgd["weight_decay"])
        tolerance = 10 * torch.finfo(dtype).eps * magnitude + amplified
        loose = dont_care(dtype, *steps)
        coefficients = (lr, sgd["momentum"], 1 - sgd["dampening"], sgd["weight_decay"])
        if not all(representable(c, dtype) for c in coefficients):
            loose = torch.ones_like(loose)
        check_elementwise(o, want, tolerance, loose, dtype, f"virtual_sgd_step [{i}] {sgd}")


# Malformed calls to the ops: (corruption, error type, text the message must contain).
def _other_dtype(dtype):
    return torch.float64 if dtype != torch.float64 else torch.float32


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@examples(150)
@given(
    lists=op_lists(3, max_len=4, specials=FINITE_SPECIALS, written=(0, 1, 2)),
    op=st.sampled_from(["global_norm", "add_scaled_", "add_scaled", "add_scaled_out", "virtual_sgd_step"]),
    corruption=st.sampled_from(
        ["empty", "dtype within", "device within", "pair dtype", "pair device", "pair shape", "length", "integer",
         "not a tensor", "not a list", "scalar"]
    ),
    where=st.integers(0, 5),
)
def test_ops_refuse_malformed_lists_naming_the_argument(path, lists, op, corruption, where):
    dtype, (a, b, c) = lists
    first, second = {
        "global_norm": ("tensors", None),
        "add_scaled_": ("tensors", "others"),
        "add_scaled": ("tensors", "others"),
        "add_scaled_out": ("tensors", "out"),
        "virtual_sgd_step": ("params", "grads"),
    }[op]
    i = where % len(a)
    expected_type, names = ValueError, []
    if corruption == "empty":
        a, b, c = [], [], []
        names = [first]
    elif corruption == "dtype within":
        if len(a) < 2:
            return
        i = max(i, 1)
        a[i] = a[i].to(_other_dtype(dtype))
        names = [f"{first}[{i}]"]
    elif corruption == "device within":
        if len(a) < 2:
            return
        i = max(i, 1)
        a[i] = a[i].to("meta")
        names = [f"{first}[{i}]"]
    elif corruption == "integer":
        a = [t.to(torch.int32) for t in a]
        expected_type, names = TypeError, [first]
    elif corruption == "not a tensor":
        a[i] = a[i].tolist()
        expected_type, names = TypeError, [f"{first}[{i}]"]
    elif corruption == "not a list":
        a = a[0]
        expected_type, names = (TypeError, ValueError), [first]
    elif second is None:
        return
    elif corruption == "pair dtype":
        b[i] = b[i].to(_other_dtype(dtype))
        names = [second]
    elif corruption == "pair device":
        b[i] = b[i].to("meta")
        names = [second]
    elif corruption == "pair shape":
        b[i] = torch.zeros(tuple(a[i].shape) + (2,), dtype=dtype)
        names = [f"{second}[{i}]"]
    elif corruption == "length":
        b = b[:-1]
        names = [second]
    elif corruption == "scalar":
        if op == "virtual_sgd_step":
            scalar, names = dict(lr=-1.0), ["lr"]
        else:
            scalar, names = dict(alpha=math.inf), ["alpha"]
    kwargs = dict(scalar) if corruption == "scalar" else {}
    with ops_path(path), pytest.raises(expected_type) as raised:
        if op == "global_norm":
            ops.global_norm(a)
        elif op == "add_scaled_":
            ops.add_scaled_(a, b, kwargs.get("alpha", 0.5))
        elif op == "add_scaled":
            ops.add_scaled(a, b, kwargs.get("alpha", 0.5))
        elif op == "add_scaled_out":
            ops.add_scaled(a, c, kwargs.get("alpha", 0.5), out=b)
        else:
            ops.virtual_sgd_step(a, b, c, lr=kwargs.get("lr", 0.1), momentum=0.9)
    message = str(raised.value)
    assert any(name in message for name in names), f"{op}, {corruption}: {message!r} names none of {names}"


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@examples(100)
@given(
    lists=op_lists(3, max_len=4, specials=FINITE_SPECIALS, written=(0, 1, 2)),
    corruption=st.sampled_from(
        ["nesterov without momentum", "nesterov with dampening", "nesterov not a bool", "grads short", "buffers short",
         "grad shape", "grad dtype", "buffer shape", "buffer dtype", "buffer device", "lr nan", "momentum negative",
         "weight_decay negative", "dampening inf"]
    ),
    where=st.integers(0, 5),
)
def test_virtual_sgd_step_refuses_bad_arguments_naming_them(path, lists, corruption, where):
    dtype, (params, grads, buffers) = lists
    i = where % len(params)
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False)
    expected_type = ValueError
    if corruption == "nesterov without momentum":
        kwargs.update(nesterov=True, momentum=0.0)
        name = "nesterov"
    elif corruption == "nesterov with dampening":
        kwargs.update(nesterov=True, dampening=0.1)
        name = "nesterov"
    elif corruption == "nesterov not a bool":
        kwargs.update(nesterov=1)
        expected_type, name = TypeError, "nesterov"
    elif corruption == "grads short":
        grads, name = grads[:-1], "grads"
    elif corruption == "buffers short":
        buffers, name = buffers[:-1], "buffers"
    elif corruption == "grad shape":
        grads[i], name = torch.zeros(tuple(params[i].shape) + (1,), dtype=dtype), f"grads[{i}]"
    elif corruption == "grad dtype":
        grads[i], name = grads[i].to(_other_dtype(dtype)), f"grads[{i}]"
    elif corruption == "buffer shape":
        buffers[i], name = torch.zeros(tuple(params[i].shape) + (1,), dtype=dtype), f"buffers[{i}]"
    elif corruption == "buffer dtype":
        buffers[i], name = buffers[i].to(_other_dtype(dtype)), f"buffers[{i}]"
    elif corruption == "buffer device":
        buffers[i], name = buffers[i].to("meta"), f"buffers[{i}]"
    else:
        key, value = {
            "lr nan": ("lr", math.nan),
            "momentum negative": ("momentum", -0.1),
            "weight_decay negative": ("weight_decay", -1e-4),
            "dampening inf": ("dampening", math.inf),
        }[corruption]
        kwargs[key], name = value, key
    with ops_path(path), pytest.raises(expected_type) as raised:
        ops.virtual_sgd_step(params, grads, buffers, **kwargs)
    assert name in str(raised.value), f"{corruption}: {raised.value}"
