"""The losses against literal float64 transcriptions of SPEC §1 and against the authors' formulation."""

import pytest
import torch

from baselines.authors_style import authors_barlow_twins_loss, authors_nt_xent_loss
from metamask_fast import functional
from metamask_fast.functional import barlow_twins_loss, nt_xent_loss

SHAPES = [(37, 70), (70, 37), (5, 129), (2, 1), (301, 300)]


def reference_barlow_twins(z_a, z_b, lambd, weight=None, normalize="std", eps=1e-5):
    """SPEC §1 written out: standardise, C = diag(w) ẑ_aᵀ ẑ_b diag(w) / N, sum over diagonal and off-diagonal."""
    z_a, z_b = z_a.double(), z_b.double()
    n, d = z_a.shape

    def standardise(z):
        mean = z.sum(0) / n
        if normalize == "std":
            scale = torch.sqrt(((z - mean) ** 2).sum(0) / (n - 1))
        else:
            scale = torch.sqrt(((z - mean) ** 2).sum(0) / n + eps)
        return (z - mean) / scale

    c = standardise(z_a).T @ standardise(z_b) / n
    if weight is not None:
        w = weight.double()
        c = w[:, None] * c * w[None, :]
    on = sum((1 - c[i, i]) ** 2 for i in range(d))
    off = (c**2).sum() - sum(c[i, i] ** 2 for i in range(d))
    return on + lambd * off


def reference_nt_xent(z_a, z_b, temperature, weight=None):
    """For every anchor of the 2N samples: -log softmax over the 2N-1 others, at its other view."""
    z = torch.cat([z_a, z_b]).double()
    if weight is not None:
        z = z * weight.double()
    u = z / z.norm(dim=1, keepdim=True)
    n2 = u.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        others = [k for k in range(n2) if k != i]
        sims = torch.stack([u[i] @ u[k] for k in others]) / temperature
        total = total - (u[i] @ u[positive] / temperature - torch.logsumexp(sims, 0))
    return total / n2


# Fresh inputs for every call, reproducible run to run, without touching the global RNG.
_INPUTS = torch.Generator().manual_seed(20261128)


def fresh(shape, dtype=torch.float64):
    return torch.randn(*shape, generator=_INPUTS, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", ["std", "bn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_barlow_twins_matches_transcription(shape, normalize, weighted):
    n, d = shape
    z_a, z_b = fresh(shape), fresh(shape) + 0.5 * fresh(shape)
    weight = torch.rand(d, dtype=torch.float64) + 0.1 if weighted else None
    lambd = 0.0137
    got = barlow_twins_loss(z_a, z_b, lambd, weight=weight, normalize=normalize)
    want = reference_barlow_twins(z_a, z_b, lambd, weight, normalize)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_barlow_twins_float32_close_to_float64(shape):
    z_a, z_b = fresh(shape, torch.float32), fresh(shape, torch.float32)
    got = barlow_twins_loss(z_a, z_b)
    want = reference_barlow_twins(z_a, z_b, 5e-3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# Half precision is computed in float32 and returned in the input dtype: its error is the rounding of inputs.
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE))
@pytest.mark.parametrize("shape", [(64, 512), (300, 128), (5, 129)])
def test_half_precision_losses_are_finite_and_close(dtype, shape):
    z_a, z_b = fresh(shape, dtype), fresh(shape, dtype)
    for got, want in [
        (barlow_twins_loss(z_a, z_b), reference_barlow_twins(z_a, z_b, 5e-3)),
        (nt_xent_loss(z_a, z_b, 0.5), reference_nt_xent(z_a, z_b, 0.5)),
    ]:
        assert got.dtype == dtype and torch.isfinite(got)
        torch.testing.assert_close(got.double(), want, rtol=HALF_TOLERANCE[dtype], atol=0)


@pytest.mark.parametrize("shape", [(37, 70), (70, 37)])
def test_both_cross_correlation_paths_match_dense(shape, monkeypatch):
    # Small tiles force several tiles and a ragged last one on the C path.
    monkeypatch.setattr(functional, "C_TILE_ROWS", 8)
    a = fresh(shape).requires_grad_()
    b = fresh(shape).requires_grad_()
    upstream = torch.tensor(1.7, dtype=torch.float64)
    got = functional._SquaredCrossCorrelationNorm.apply(a, b)
    got_grads = torch.autograd.grad(got * upstream, [a, b])
    dense = ((a.T @ b) ** 2).sum()
    want_grads = torch.autograd.grad(dense * upstream, [a, b])
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(7, 11), (11, 7)])
@pytest.mark.parametrize("normalize", ["std", "bn"])
def test_barlow_twins_gradcheck(shape, normalize, monkeypatch):
    monkeypatch.setattr(functional, "C_TILE_ROWS", 3)
    z_a = fresh(shape).requires_grad_()
    z_b = fresh(shape).requires_grad_()
    weight = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, w: barlow_twins_loss(a, b, 0.02, weight=w, normalize=normalize), (z_a, z_b, weight)
    )


@pytest.mark.parametrize("shape", [(7, 11), (11, 7)])
def test_barlow_twins_double_backward(shape, monkeypatch):
    # The custom backward is itself differentiable: second derivatives (e.g. of a gradient penalty) are exact.
    monkeypatch.setattr(functional, "C_TILE_ROWS", 3)
    z_a = fresh(shape).requires_grad_()
    z_b = fresh(shape).requires_grad_()
    weight = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a, b, w: barlow_twins_loss(a, b, 0.02, weight=w), (z_a, z_b, weight)
    )


@pytest.mark.parametrize("shape", [(37, 70), (70, 37)])
def test_barlow_twins_gradients_with_upstream_match_transcription(shape):
    z_a = fresh(shape).requires_grad_()
    z_b = fresh(shape).requires_grad_()
    weight = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    upstream = torch.tensor(-2.3, dtype=torch.float64)
    got = torch.autograd.grad(barlow_twins_loss(z_a, z_b, weight=weight) * upstream, [z_a, z_b, weight])
    want = torch.autograd.grad(reference_barlow_twins(z_a, z_b, 5e-3, weight) * upstream, [z_a, z_b, weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(37, 70), (70, 37), (4, 3)])
def test_barlow_twins_equals_authors_loss(shape):
    z_a, z_b = fresh(shape), fresh(shape)
    torch.testing.assert_close(barlow_twins_loss(z_a, z_b), authors_barlow_twins_loss(z_a, z_b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 3), (9, 5), (13, 40)])
@pytest.mark.parametrize("weighted", [False, True])
def test_nt_xent_matches_transcription(shape, weighted):
    z_a, z_b = fresh(shape), fresh(shape)
    weight = torch.rand(shape[1], dtype=torch.float64) + 0.1 if weighted else None
    got = nt_xent_loss(z_a, z_b, 0.3, weight=weight)
    torch.testing.assert_close(got, reference_nt_xent(z_a, z_b, 0.3, weight), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(9, 5), (32, 17)])
def test_nt_xent_equals_authors_loss_with_gradients(shape):
    z_a = fresh(shape).requires_grad_()
    z_b = fresh(shape).requires_grad_()
    got = nt_xent_loss(z_a, z_b)
    want = authors_nt_xent_loss(z_a, z_b)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(torch.autograd.grad(got * 0.6, [z_a, z_b]), torch.autograd.grad(want * 0.6, [z_a, z_b])):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_nt_xent_gradcheck_and_double_backward():
    z_a = fresh((5, 4)).requires_grad_()
    z_b = fresh((5, 4)).requires_grad_()
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda a, b, w: nt_xent_loss(a, b, 0.5, weight=w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z_a, z_b, weight))
    assert torch.autograd.gradgradcheck(fn, (z_a, z_b, weight))


def test_backend_selection(monkeypatch):
    z = fresh((4, 3))
    want = barlow_twins_loss(z, z + 1, backend="torch")
    torch.testing.assert_close(barlow_twins_loss(z, z + 1, backend="auto"), want)
    # The Triton kernels accumulate in float32 and refuse float64; NT-Xent has no Triton kernel at all.
    with pytest.raises(TypeError, match="z_a: backend='triton'.*float64"):
        barlow_twins_loss(z, z, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton'.*no Triton kernel"):
        nt_xent_loss(z, z, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        nt_xent_loss(z, z, backend="cuda")
    monkeypatch.setenv("METAMASK_FAST_BACKEND", "torch")
    torch.testing.assert_close(barlow_twins_loss(z, z + 1), want)
    monkeypatch.setenv("METAMASK_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="METAMASK_FAST_BACKEND"):
        nt_xent_loss(z, z)


BAD_INPUTS = [
    (dict(z_a=[[1.0, 2.0]]), TypeError, "z_a"),
    (dict(z_a=torch.zeros(4)), ValueError, "z_a"),
    (dict(z_b=torch.zeros(4, 2)), ValueError, "z_a and z_b"),
    (dict(z_a=torch.zeros(1, 3), z_b=torch.zeros(1, 3)), ValueError, "z_a"),
    (dict(z_a=torch.zeros(4, 0), z_b=torch.zeros(4, 0)), ValueError, "z_a"),
    (dict(z_b=torch.zeros(4, 3, dtype=torch.float32)), TypeError, "dtype"),
    (dict(z_a=torch.zeros(4, 3, dtype=torch.int64), z_b=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "z_a"),
    (dict(z_a=torch.full((4, 3), float("nan"), dtype=torch.float64)), ValueError, "z_a"),
    (dict(z_b=torch.full((4, 3), float("inf"), dtype=torch.float64)), ValueError, "z_b"),
    (dict(weight=torch.ones(4, dtype=torch.float64)), ValueError, "weight"),
    (dict(weight=torch.ones(3)), TypeError, "weight"),
    (dict(weight=torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)), ValueError, "weight"),
    (dict(z_b=torch.zeros(4, 3, dtype=torch.float64, device="meta")), ValueError, "device"),
    (dict(weight=torch.ones(3, dtype=torch.float64, device="meta")), ValueError, "weight"),
]


@pytest.mark.parametrize("loss", [barlow_twins_loss, nt_xent_loss])
@pytest.mark.parametrize("override,error,name", BAD_INPUTS)
def test_bad_input_names_the_argument(loss, override, error, name):
    kwargs = dict(z_a=fresh((4, 3)), z_b=fresh((4, 3)))
    kwargs.update(override)
    with pytest.raises(error, match=name):
        loss(kwargs.pop("z_a"), kwargs.pop("z_b"), **kwargs)


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(lambd=float("nan")), "lambd"), (dict(normalize="layer"), "normalize"), (dict(eps=0.0), "eps")],
)
def test_barlow_twins_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        barlow_twins_loss(fresh((4, 3)), fresh((4, 3)), **kwargs)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), "0.1"])
def test_nt_xent_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(fresh((4, 3)), fresh((4, 3)), temperature)
