"""The optimizers' compiled virtual updates and VJPs (metamask_fast.optim_ops, virtual_sgd_step's out=).

References: the virtual updates against the real optimizers (``metamask_fast.optim.LARS``,
``torch.optim.AdamW``, ``torch.optim.SGD``) stepping float64 copies with the same state; the VJPs against
``torch.autograd.functional.vjp`` of a float64 transcription of each update as a function of the gradient,
written here from the optimizers' definitions. Every case runs the compiled kernels and the
``torch._foreach`` fallbacks (the ``path`` fixture), on odd shapes (empty, 0-d, 1-d weights for the filters,
one over two CPU chunks, an all-zero weight for the norm-0 branches) and fresh random inputs.
"""

import copy
import itertools

import pytest
import torch
from torch import nn

from metamask_fast import ops, optim_ops
from metamask_fast.meta import MetaMaskStep
from metamask_fast.models import MetaMaskModel
from metamask_fast.optim import LARS

needs_extension = pytest.mark.skipif(
    not ops.HAS_EXTENSION, reason=f"metamask_fast._C not loaded ({ops._EXTENSION_ERROR})"
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in optim_ops._DEVICES["lars_vjp"] else [])
SHAPES = [(37,), (5, 7), (), (0,), (3, 1, 9), (70001,), (64, 3, 3, 3), (11,)]
ZERO = 7  # index of the weight that is all zeros (‖θ‖ = 0: LARS's ratio is 1)
TOLERANCE = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FALLBACKS = ["_virtual_lars_step_torch", "_lars_vjp_torch", "_virtual_adamw_step_torch", "_adamw_vjp_torch",
             "_sgd_vjp_torch"]

_INPUTS = torch.Generator().manual_seed(11)


def fresh(dtype=torch.float64, device="cpu", shapes=SHAPES, scale=1.0):
    return [(scale * torch.randn(s, generator=_INPUTS, dtype=torch.float64)).to(dtype=dtype, device=device)
            for s in shapes]


def weights(dtype, device):
    params = fresh(dtype, device)
    params[ZERO].zero_()
    return params


@pytest.fixture(params=["compiled", "fallback"])
def path(request, monkeypatch):
    """Once through the compiled kernels (the fallbacks would fail), once through the fallbacks."""
    if request.param == "compiled":
        if not ops.HAS_EXTENSION:
            pytest.skip(f"metamask_fast._C not loaded ({ops._EXTENSION_ERROR})")
        for name in FALLBACKS:
            monkeypatch.setattr(optim_ops, name, lambda *a: pytest.fail("fallback called on the compiled path"))
        monkeypatch.setattr(ops, "_virtual_sgd_step_torch", lambda *a: pytest.fail("fallback called"))
    else:
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    return request.param


def assert_close_to(got, want, dtype):
    """Every element within the dtype's tolerance, relative to the tensor's largest value (at least 1)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        if w.numel():
            error = (g.double().cpu() - w.double().cpu()).abs().max().item()
            assert error <= TOLERANCE[dtype] * max(w.abs().max().item(), 1.0), (error, g.shape)


def as_float64(tensors):
    return [None if t is None else t.detach().double().cpu().clone() for t in tensors]


def call(fn, *args, into: bool, like, **kwargs):
    """``fn`` into fresh kept tensors (checking that those are what comes back) or into new tensors."""
    if not into:
        return fn(*args, **kwargs)
    kept = [torch.full_like(t, float("nan")) for t in like]
    got = fn(*args, **kwargs, out=kept)
    assert all(g is k for g, k in zip(got, kept))
    return got


# ------------------------------------------------------------------------------------------------ LARS

LARS_SETTINGS = [
    dict(weight_decay=wd, momentum=m, eta=eta, weight_decay_filter=f1, lars_adaptation_filter=f2)
    for wd, m, eta, f1, f2 in [(0.0, 0.9, 0.001, False, False), (1e-4, 0.9, 0.02, True, True),
                               (1e-2, 0.0, 0.5, False, True), (1e-4, 0.5, 0.02, True, False)]
]


def lars_reference(params, grads, buffers, lr, settings):
    """The optimizer itself: metamask_fast.optim.LARS steps float64 copies with the same buffers."""
    copies = [p.requires_grad_() for p in as_float64(params)]
    optimizer = LARS(copies, lr=lr, **settings)
    for p, g, b in zip(copies, as_float64(grads), as_float64(buffers)):
        p.grad = g
        if b is not None:
            optimizer.state[p]["mu"] = b
    optimizer.step()
    return [p.detach() for p in copies]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("settings", LARS_SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_virtual_lars_step_is_the_optimizers_step(path, device, dtype, settings, into):
    params, grads, buffers = weights(dtype, device), fresh(dtype, device), fresh(dtype, device)
    buffers[0] = buffers[4] = None  # before the first step
    saved = [None if t is None else t.clone() for t in params + buffers]
    got = call(optim_ops.virtual_lars_step, params, grads, buffers, like=params, into=into, lr=0.3, **settings)
    assert_close_to(got, lars_reference(params, grads, buffers, 0.3, settings), dtype)
    assert all(t is None or torch.equal(t, s) for t, s in zip(params + buffers, saved))


def lars_update_of_gradient(p, mu, lr, s, one_d):
    """LARS's θ' as a function of g, written from its definition, differentiable."""
    def update(g):
        d = g + s["weight_decay"] * p if not (s["weight_decay_filter"] and one_d) else g
        if not (s["lars_adaptation_filter"] and one_d):
            p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            if p_norm > 0 and d_norm > 0:
                d = s["eta"] * p_norm / d_norm * d
        return p - lr * (s["momentum"] * mu + d)
    return update


def vjp_reference(updates, grads, vectors):
    return [torch.autograd.functional.vjp(u, g, v)[1] if g.numel() else torch.zeros_like(g)
            for u, g, v in zip(updates, as_float64(grads), as_float64(vectors))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("settings", LARS_SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_lars_vjp_is_the_vjp_of_the_update(path, device, dtype, settings, into):
    params, grads, vectors = weights(dtype, device), fresh(dtype, device), fresh(dtype, device)
    lr = 0.3
    updates = [lars_update_of_gradient(p, torch.zeros_like(p), lr, settings, p.dim() == 1)
               for p in as_float64(params)]
    vjp_settings = {k: v for k, v in settings.items() if k != "momentum"}
    got = call(optim_ops.lars_vjp, params, grads, vectors, like=params, into=into, lr=lr, **vjp_settings)
    assert_close_to(got, vjp_reference(updates, grads, vectors), dtype)


# ----------------------------------------------------------------------------------------------- AdamW

ADAMW_SETTINGS = [dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), dict(betas=(0.3, 0.99), eps=1e-3,
                                                                              weight_decay=0.0)]


def adamw_state(dtype, device):
    """Moments of a few steps back (None for two weights: their first step), and per-weight step numbers."""
    exp_avgs = fresh(dtype, device, scale=0.1)
    exp_avg_sqs = [s.square() for s in fresh(dtype, device, scale=0.1)]
    for i in (0, 4):
        exp_avgs[i] = exp_avg_sqs[i] = None
    steps = [1.0 if m is None else float(3 + i) for i, m in enumerate(exp_avgs)]
    return exp_avgs, exp_avg_sqs, steps


def adamw_reference(params, grads, exp_avgs, exp_avg_sqs, steps, lr, settings):
    """torch.optim.AdamW (single-tensor implementation) steps float64 copies with the same state."""
    copies = [p.requires_grad_() for p in as_float64(params)]
    optimizer = torch.optim.AdamW(copies, lr=lr, foreach=False, **settings)
    for p, g, m, s, k in zip(copies, as_float64(grads), as_float64(exp_avgs), as_float64(exp_avg_sqs), steps):
        p.grad = g
        if m is not None:
            optimizer.state[p] = {"step": torch.tensor(k - 1, dtype=torch.float32), "exp_avg": m, "exp_avg_sq": s}
    optimizer.step()
    return [p.detach() for p in copies]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("settings", ADAMW_SETTINGS, ids=["default", "beta1-0.3"])
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_virtual_adamw_step_is_the_optimizers_step(path, device, dtype, settings, into):
    params, grads = fresh(dtype, device), fresh(dtype, device)
    exp_avgs, exp_avg_sqs, steps = adamw_state(dtype, device)
    saved = [None if t is None else t.clone() for t in params + exp_avgs + exp_avg_sqs]
    got = call(optim_ops.virtual_adamw_step, params, grads, exp_avgs, exp_avg_sqs, steps, like=params, into=into,
               lr=1e-3, **settings)
    want = adamw_reference(params, grads, exp_avgs, exp_avg_sqs, steps, 1e-3, settings)
    assert_close_to(got, want, dtype)
    assert all(t is None or torch.equal(t, s) for t, s in zip(params + exp_avgs + exp_avg_sqs, saved))


def adamw_update_of_gradient(m0, s0, step, lr, betas, eps):
    """AdamW's θ' − θ·(1 − lr·wd) as a function of g, from its definition (zeros for absent moments)."""
    beta1, beta2 = betas

    def update(g):
        m = beta1 * (0 if m0 is None else m0) + (1 - beta1) * g
        s = beta2 * (0 if s0 is None else s0) + (1 - beta2) * g * g
        return -lr / (1 - beta1 ** step) * m / (torch.sqrt(s / (1 - beta2 ** step)) + eps)
    return update


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("settings", ADAMW_SETTINGS, ids=["default", "beta1-0.3"])
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_adamw_vjp_is_the_vjp_of_the_update(path, device, dtype, settings, into):
    grads, vectors = fresh(dtype, device), fresh(dtype, device)
    grads[2] = torch.zeros_like(grads[2])  # with no state: s = 0, σ = 0 (the curvature term's 0 branch)
    vectors[2] = vectors[2] * 1e-3  # u = −lr/eps·v there: within float16's range
    exp_avgs, exp_avg_sqs, steps = adamw_state(dtype, device)
    exp_avgs[2] = exp_avg_sqs[2] = None
    steps[2] = 1.0
    lr, betas, eps = 1e-3, settings["betas"], settings["eps"]
    updates = [adamw_update_of_gradient(m, s, k, lr, betas, eps)
               for m, s, k in zip(as_float64(exp_avgs), as_float64(exp_avg_sqs), steps)]
    got = call(optim_ops.adamw_vjp, grads, exp_avgs, exp_avg_sqs, steps, vectors, like=grads, into=into, lr=lr,
               betas=betas, eps=eps)
    want = vjp_reference(updates, grads, vectors)
    want[2] = vectors[2].double().cpu() * (-lr / eps)  # σ = 0: (1−β₁)/eps · (−lr/(1−β₁)), the first term alone
    assert_close_to(got, want, dtype)


# ------------------------------------------------------------------------------------------------- SGD

SGD_SETTINGS = [dict(momentum=m, dampening=d, nesterov=n)
                for m, d, n in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True]) if not (n and (m == 0 or d))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_sgd_vjp_and_step_into_kept_tensors(path, device, dtype, settings, into):
    params, grads, buffers, vectors = (fresh(dtype, device) for _ in range(4))
    buffers[0] = None
    lr, wd = 0.05, 5e-4

    def update(p, b):
        def step(g):  # torch.optim.SGD's update of θ as a function of g
            d = g + wd * p
            if settings["momentum"] == 0:
                return p - lr * d
            moved = d if b is None else settings["momentum"] * b + (1 - settings["dampening"]) * d
            return p - lr * (d + settings["momentum"] * moved if settings["nesterov"] else moved)
        return step

    updates = [update(p, b) for p, b in zip(as_float64(params), as_float64(buffers))]
    got = call(optim_ops.sgd_vjp, vectors, buffers, like=vectors, into=into, lr=lr, **settings)
    assert_close_to(got, vjp_reference(updates, grads, vectors), dtype)
    stepped = call(ops.virtual_sgd_step, params, grads, buffers, like=params, into=into, lr=lr, weight_decay=wd,
                   **settings)
    assert_close_to(stepped, [u(g) for u, g in zip(updates, as_float64(grads))], dtype)


# ---------------------------------------------------------------------------------------- the op rules


@needs_extension
def test_lars_sums_do_not_depend_on_the_number_of_threads():
    # The compiled kernels' promise (chunk sums added in chunk order); torch's own norms, in the fallback,
    # reduce differently with other thread counts.
    params, grads, vectors = weights(torch.float32, "cpu"), fresh(torch.float32), fresh(torch.float32)
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        results.append(optim_ops.lars_vjp(params, grads, vectors, lr=0.1, weight_decay=1e-4) +
                       optim_ops.virtual_lars_step(params, grads, [None] * len(params), lr=0.1, weight_decay=1e-4))
    torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("op", ["lars", "adamw", "sgd", "sgd_vjp"])
def test_out_is_written_and_versions_bumped(path, op):
    params, grads, vectors = fresh(), fresh(), fresh()
    kept = [torch.empty_like(p) for p in params]
    saved = (kept[1] * torch.ones(1, requires_grad=True)).sum()  # a graph that saved kept[1]... after the write
    version = kept[1]._version
    calls = {
        "lars": lambda **o: optim_ops.virtual_lars_step(params, grads, [None] * len(params), lr=0.1, **o),
        "adamw": lambda **o: optim_ops.virtual_adamw_step(params, grads, [None] * len(params), [None] * len(params),
                                                          [1.0] * len(params), lr=0.1, **o),
        "sgd": lambda **o: ops.virtual_sgd_step(params, grads, [None] * len(params), lr=0.1, momentum=0.9, **o),
        "sgd_vjp": lambda **o: optim_ops.sgd_vjp(vectors, [None] * len(params), lr=0.1, momentum=0.9, **o),
    }
    new = calls[op]()
    into = calls[op](out=kept)
    assert into == kept or all(a is b for a, b in zip(into, kept))
    assert all(torch.equal(a, b) for a, b in zip(new, kept))
    assert kept[1]._version > version
    del saved


# Bad input: each wrapper names the argument, on both paths (the compiled checks match the fallback's).
def _bad_cases():
    p, g = fresh(shapes=[(3,), (4,)]), fresh(shapes=[(3,), (4,)])
    none = [None, None]
    return [
        (lambda: optim_ops.virtual_lars_step(p, [g[0], None], none, lr=0.1), ValueError, r"grads\[1\] is None"),
        (lambda: optim_ops.virtual_lars_step(p, g, none, lr=-1.0), ValueError, "`lr` must be >= 0"),
        (lambda: optim_ops.virtual_lars_step(p, g, none, lr=0.1, eta=0.0), ValueError, "`eta` must be > 0"),
        (lambda: optim_ops.virtual_lars_step(p, g, [None], lr=0.1), ValueError, "`buffers` must be a list as long"),
        (lambda: optim_ops.virtual_lars_step(p, g, none, lr=0.1, weight_decay_filter=1), TypeError,
         "`weight_decay_filter` must be a bool"),
        (lambda: optim_ops.virtual_lars_step(p, g, [None, torch.zeros(5, dtype=torch.float64)], lr=0.1), ValueError,
         r"buffers\[1\] must have the shape of params\[1\]"),
        (lambda: optim_ops.virtual_lars_step(p, g, none, lr=0.1, out=[p[0], torch.empty(4, dtype=torch.float64)]),
         ValueError, r"out\[0\] shares memory with params\[0\]"),
        (lambda: optim_ops.virtual_lars_step(p, g, none, lr=0.1, out=[g[1][:3], torch.empty(4, dtype=torch.float64)]),
         ValueError, r"out\[0\] shares memory with grads\[1\]"),
        (lambda: optim_ops.lars_vjp(p, g, g[:1], lr=0.1), ValueError, "`params` and `vectors` must be equally long"),
        (lambda: optim_ops.virtual_adamw_step(p, g, [None, g[1].clone()], none, [1, 2], lr=0.1), ValueError,
         r"exp_avgs\[1\] and exp_avg_sqs\[1\] must both be tensors or both be None"),
        (lambda: optim_ops.virtual_adamw_step(p, g, none, none, [1, 0.5], lr=0.1), ValueError,
         r"steps\[1\] must be >= 1"),
        (lambda: optim_ops.virtual_adamw_step(p, g, none, none, [1], lr=0.1), ValueError, "`steps` must be a list"),
        (lambda: optim_ops.adamw_vjp(g, none, none, [1, 1], g, lr=0.1, betas=(0.9, 1.0)), ValueError,
         r"`betas` must be in \[0, 1\)"),
        (lambda: optim_ops.adamw_vjp(g, none, none, [1, 1], g, lr=0.1, eps=float("nan")), ValueError,
         "`eps` must be a finite number"),
        (lambda: optim_ops.sgd_vjp(g, none, lr=0.1, nesterov=1), TypeError, "`nesterov` must be a bool"),
        (lambda: optim_ops.sgd_vjp(g, none, lr=0.1, out=[g[1], torch.empty(4, dtype=torch.float64)]), ValueError,
         r"out\[0\] must have the shape of vectors\[0\]"),
        (lambda: ops.virtual_sgd_step(p, [g[0], None], none, lr=0.1, out=[torch.empty_like(t) for t in p]),
         ValueError, "with `out`, every grad must be a tensor"),
        (lambda: ops.virtual_sgd_step(p, g, none, lr=0.1, out=[torch.empty(4, dtype=torch.float64)[:3], p[1]]),
         ValueError, r"out\[1\] shares memory with params\[1\]"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(path, case):
    fn, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        fn()


def _lists(n=3, shapes=((5,), (2, 3), (7,))):
    return fresh(shapes=list(shapes))


OPCHECK_CASES = {  # overload: (args, kwargs)
    "virtual_sgd_step.out": lambda: ((_lists(), _lists(), [None, *_lists()[1:]], 0.1, 0.9, 0.1, 5e-4, False),
                                     {"out": _lists()}),
    "virtual_lars_step.default": lambda: ((_lists(), _lists(), [None, *_lists()[1:]], 0.1, 1e-4, 0.9, 0.02, True,
                                           True), {}),
    "virtual_lars_step.out": lambda: ((_lists(), _lists(), [None, *_lists()[1:]], 0.1, 1e-4, 0.9, 0.02, False,
                                       True), {"out": _lists()}),
    "virtual_adamw_step.default": lambda: ((_lists(), _lists(), [None, *_lists()[1:]],
                                            [None, *[t.abs() for t in _lists()[1:]]], [1.0, 2.0, 5.0], 1e-3, 0.9,
                                            0.999, 1e-8, 1e-2), {}),
    "virtual_adamw_step.out": lambda: ((_lists(), _lists(), _lists(), [t.abs() for t in _lists()], [2.0, 2.0, 2.0],
                                        1e-3, 0.9, 0.999, 1e-8, 1e-2), {"out": _lists()}),
    "sgd_vjp.default": lambda: ((_lists(), [None, *_lists()[1:]], 0.1, 0.9, 0.0, True), {}),
    "sgd_vjp.out": lambda: ((_lists(), [None, *_lists()[1:]], 0.1, 0.9, 0.2, False), {"out": _lists()}),
    "lars_vjp.default": lambda: ((_lists(), _lists(), _lists(), 0.1, 1e-4, 0.02, True, True), {}),
    "lars_vjp.out": lambda: ((_lists(), _lists(), _lists(), 0.1, 1e-4, 0.02, False, False), {"out": _lists()}),
    "adamw_vjp.default": lambda: ((_lists(), [None, *_lists()[1:]], [None, *[t.abs() for t in _lists()[1:]]],
                                   [1.0, 3.0, 3.0], _lists(), 1e-3, 0.9, 0.999, 1e-8), {}),
    "adamw_vjp.out": lambda: ((_lists(), _lists(), [t.abs() for t in _lists()], [4.0, 4.0, 4.0], _lists(), 1e-3,
                               0.9, 0.999, 1e-8), {"out": _lists()}),
}


@needs_extension
@pytest.mark.parametrize("op", list(OPCHECK_CASES))
def test_opcheck(op):
    packet, overload = op.split(".")
    args, kwargs = OPCHECK_CASES[op]()
    torch.library.opcheck(getattr(getattr(torch.ops.metamask_fast, packet), overload), args, kwargs)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and the extension's CUDA kernels")
def test_cuda_kernels_give_the_cpu_kernels_bits():
    # Elementwise ops with host-computed scalars: the same bits on both devices (no FMA anywhere). LARS's
    # sums run in another order on the GPU: to rounding.
    params, grads, vectors = weights(torch.float32, "cpu"), fresh(torch.float32), fresh(torch.float32)
    exp_avgs, exp_avg_sqs, steps = adamw_state(torch.float32, "cpu")

    def both(fn, *lists, **kwargs):
        def on(device):
            return fn(*[[None if t is None else t.to(device) for t in lst] if isinstance(lst, list) and lst and
                        not isinstance(lst[0], float) else lst for lst in lists], **kwargs)
        return on("cpu"), [t.cpu() for t in on("cuda")]

    for cpu, cuda in [
        both(optim_ops.virtual_adamw_step, params, grads, exp_avgs, exp_avg_sqs, steps, lr=1e-3),
        both(optim_ops.adamw_vjp, grads, exp_avgs, exp_avg_sqs, steps, vectors, lr=1e-3),
        both(optim_ops.sgd_vjp, vectors, exp_avgs, lr=0.1, momentum=0.9, nesterov=True),
        both(ops.virtual_sgd_step, params, grads, exp_avgs, lr=0.1, momentum=0.9, weight_decay=5e-4,
             out=None),
    ]:
        assert all(torch.equal(a, b) for a, b in zip(cpu, cuda))
    for cpu, cuda in [both(optim_ops.virtual_lars_step, params, grads, exp_avgs, lr=0.3, weight_decay=1e-4, eta=0.02),
                      both(optim_ops.lars_vjp, params, grads, vectors, lr=0.3, weight_decay=1e-4, eta=0.02)]:
        assert_close_to(cuda, [c.double() for c in cpu], torch.float32)


# ---------------------------------------------------------------------------------------- in the step


def _network_optimizer(kind, network):
    if kind == "sgd":  # two groups with different rates: u = J_Uᵀ v through sgd_vjp, not one scale
        return torch.optim.SGD([{"params": network[:2], "lr": 0.02}, {"params": network[2:]}], lr=0.05,
                               momentum=0.9, weight_decay=5e-4)
    if kind == "lars":
        return LARS(network, lr=0.3, weight_decay=1e-4, eta=0.02, weight_decay_filter=True,
                    lars_adaptation_filter=True)
    return torch.optim.AdamW(network, lr=1e-3, weight_decay=0.05)


def _train(model, kind, batches, second_order):
    network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
    step = MetaMaskStep(model, _network_optimizer(kind, network), torch.optim.SGD([model.mask.logits], lr=0.05),
                        second_order=second_order)
    kept = []
    for x0, x1 in batches:
        step.step(x0, x1)
        kept.append({key: [t.data_ptr() for t in tensors] for key, tensors in step._kept_tensors.items()})
    return model, kept


@pytest.mark.parametrize("kind,ops_called", [("sgd", ["virtual_sgd_step", "sgd_vjp"]),
                                             ("lars", ["virtual_lars_step", "lars_vjp"]),
                                             ("adamw", ["virtual_adamw_step", "adamw_vjp"])])
@pytest.mark.parametrize("second_order", ["finite_difference", "exact"])
def test_metamask_step_runs_the_ops_into_kept_tensors_on_both_paths(kind, ops_called, second_order, monkeypatch):
    # The step's virtual update and VJP go through the compiled ops, into tensors it keeps from step to step,
    # and give what the fallbacks give (to rounding: LARS's norms are summed in float64 by the kernels).
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    model = MetaMaskModel(backbone, 4, bt_dims=(9, 9, 11), cl_dims=(8, 5)).double()
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randn(7, 1, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)) for _ in range(3)]
    if ops.HAS_EXTENSION:
        with torch.autograd.profiler.profile() as prof:
            compiled, kept = _train(copy.deepcopy(model), kind, batches, second_order)
        called = {event.name for event in prof.function_events}
        assert {f"metamask_fast::{op}" for op in ops_called} <= called, called
        assert kept[0] == kept[1] == kept[2] and {"virtual", "u"} <= {k[0] for k in kept[0] if isinstance(k, tuple)}
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    fallback, _ = _train(copy.deepcopy(model), kind, batches, second_order)
    assert not torch.equal(fallback.mask.logits, model.mask.logits)
    if ops.HAS_EXTENSION:
        for (name, a), b in zip(compiled.named_parameters(), fallback.parameters()):
            assert (a - b).abs().max() <= 1e-9 * max(b.abs().max().item(), 1.0), name
