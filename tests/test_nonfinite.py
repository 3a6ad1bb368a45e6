"""A NaN or an infinity in a loss or a gradient never reaches the weights or the mask.

Step 1 of MetaMaskStep and SingleLossStep's step: a non-finite loss or gradient makes the call change nothing
(weights, momentum buffers, BatchNorm running statistics, mask, mask optimizer) and report ``skipped=1.0``;
the next finite call then gives bitwise what a model that never saw the bad call gives. The meta part of
MetaMaskStep: the mask and its optimizer are left alone (``mask_skipped=1.0``), the network keeps its finite
step 1. Injected: into the input batch, into a loss (a patched loss function), into a gradient (a hook on
a parameter, or a loss whose backward is NaN while its value is finite). In float64, on a small conv model
with BatchNorm.
"""

import contextlib
import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from metamask_fast import distributed as mmdist
from metamask_fast import meta
from metamask_fast.meta import MetaMaskStep, SingleLossStep
from metamask_fast.models import MetaMaskModel

NAN, INF = float("nan"), float("inf")
META_KINDS = ["finite_difference", "exact", "none"]
SINGLE_KINDS = ["barlowtwins", "simclr"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: with more threads than idle cores (a CI job alongside), OpenMP's waiting
    made a step ~100x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, channels=1):
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )
    return MetaMaskModel(backbone, 6, bt_dims=(10, 12), cl_dims=(10, 7)).double()


def make_step(model, kind, distributed=False, **options):
    if kind in META_KINDS:
        network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
        net = torch.optim.SGD(network, lr=0.05, momentum=0.9, weight_decay=5e-4)
        mask = torch.optim.SGD([model.mask.logits], lr=0.5, momentum=0.9, weight_decay=5e-4)
        return MetaMaskStep(model, net, mask, second_order=kind, distributed=distributed, **options)
    network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
    optimizer = torch.optim.SGD(network, lr=0.05, momentum=0.9, weight_decay=5e-4)
    return SingleLossStep(model, optimizer, method=kind, lambd=5e-3, temperature=0.5, distributed=distributed,
                          **options)


def batches(seed=1, steps=4, n=8, channels=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, channels, 6, 6, generator=g, dtype=torch.float64),
             torch.randn(n, channels, 6, 6, generator=g, dtype=torch.float64)) for _ in range(steps)]


def optimizers(step):
    if isinstance(step, MetaMaskStep):
        return {"net": step.net_optimizer, "mask": step.mask_optimizer}
    return {"net": step.optimizer}


def state(step) -> dict[str, torch.Tensor]:
    """Copies of everything a step may change: parameters, buffers, every optimizer's state tensors."""
    out = {f"model.{name}": t.detach().clone() for name, t in step.model.state_dict(keep_vars=True).items()}
    for label, optimizer in optimizers(step).items():
        for index, (param, entries) in enumerate(optimizer.state.items()):
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    out[f"{label}.{index}.{key}"] = value.detach().clone()
    return out


def assert_bitwise_equal(got: dict, want: dict, what=""):
    assert got.keys() == want.keys(), what
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}{key}"


def network_keys(snapshot):
    return {k for k in snapshot if not k.startswith(("model.mask.", "mask."))}


# ------------------------------------------------------------------------------------------ injections


def poisoned_input(x, value):
    x = x.clone()
    x[1, 0, 2, 3] = value
    return x


class Calls:
    """Wraps a function; on the calls numbered in ``bad`` (1-based), ``corrupt(result)`` is returned."""

    def __init__(self, function, bad, corrupt):
        self.function, self.bad, self.corrupt, self.count = function, set(bad), corrupt, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        result = self.function(*args, **kwargs)
        return self.corrupt(result) if self.count in self.bad else result


def loss_value(value):
    """A non-finite loss that still depends on the embeddings: NaN gradients for NaN, finite ones for inf."""
    return (lambda loss: loss * NAN) if value != value else (lambda loss: loss + value)


class _NaNGradient(torch.autograd.Function):
    """The identity, whose backward is NaN: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, NAN)


def gradient_hook(param, bad, value):
    """A hook on ``param`` that puts ``value`` into one element of its gradient on the hook's calls numbered
    in ``bad`` (1-based)."""
    calls = {"count": 0}

    def hook(grad):
        calls["count"] += 1
        if calls["count"] not in bad:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    return param.register_hook(hook)


@contextlib.contextmanager
def injected(monkeypatch, step, where, value, x0, x1):
    """Inject ``value`` at ``where`` for the next call of ``step``; yields that call's views."""
    model = step.model
    if where == "input":
        yield poisoned_input(x0, value), x1
        return
    if where == "loss_bt":
        monkeypatch.setattr(meta, "barlow_twins_loss", Calls(meta.barlow_twins_loss, {1}, loss_value(value)))
    elif where == "loss_cl":
        monkeypatch.setattr(meta, "nt_xent_loss", Calls(meta.nt_xent_loss, {1}, loss_value(value)))
    elif where == "grad":
        handle = gradient_hook(model.backbone[0].weight, {1}, value)
    else:
        raise AssertionError(where)
    try:
        yield x0, x1
    finally:
        monkeypatch.undo()
        if where == "grad":
            handle.remove()


def step1_cases():
    cases = []
    for kind in META_KINDS + SINGLE_KINDS:
        trained = {"barlowtwins": ["loss_bt"], "simclr": ["loss_cl"]}.get(kind, ["loss_bt", "loss_cl"])
        for where in ["input", *trained, "grad"]:
            for value in (NAN, INF):
                cases.append(pytest.param(kind, where, value, id=f"{kind}-{where}-{value}"))
    return cases


# ------------------------------------------------------------------------------------------ step 1


@pytest.mark.parametrize("kind, where, value", step1_cases())
def test_skipped_step_changes_nothing_and_the_next_step_is_as_if_it_never_happened(monkeypatch, kind, where,
                                                                                    value):
    model = tiny_model()
    reference = copy.deepcopy(model)
    step, ref_step = make_step(model, kind), make_step(reference, kind)
    data = batches()
    step.step(*data[0])
    ref_step.step(*data[0])
    before = state(step)
    assert any(k.endswith("momentum_buffer") for k in before)  # there are momentum buffers to protect

    with injected(monkeypatch, step, where, value, *data[1]) as (x0, x1):
        out = step.step(x0, x1)
    assert out["skipped"] == 1.0
    assert math.isfinite(out["loss"]) == (where == "grad")  # the losses are reported as they were
    assert all(isinstance(v, float) for v in out.values())
    if kind in META_KINDS:
        assert out["meta_step"] == 0.0 and "mask_skipped" not in out
        assert model.mask.logits.grad is None
    assert_bitwise_equal(state(step), before, "after the skipped step: ")
    assert all(p.grad is None for p in optimizers(step)["net"].param_groups[0]["params"])

    # Skipping was a no-op: the following steps equal those of a model that never saw the bad batch.
    for x0, x1 in data[2:]:
        got, want = step.step(x0, x1), ref_step.step(x0, x1)
        assert got == want
        assert got["skipped"] == 0.0
    assert_bitwise_equal(state(step), state(ref_step), "after the next steps: ")


@pytest.mark.parametrize("kind", META_KINDS + SINGLE_KINDS)
def test_a_bad_first_step_leaves_no_optimizer_state(kind):
    model = tiny_model()
    step = make_step(model, kind)
    before = state(step)
    x0, x1 = batches()[0]
    out = step.step(poisoned_input(x0, NAN), x1)
    assert out["skipped"] == 1.0
    assert_bitwise_equal(state(step), before)
    assert all(len(optimizer.state) == 0 for optimizer in optimizers(step).values())


@pytest.mark.parametrize("kind", META_KINDS + SINGLE_KINDS)
def test_finite_steps_report_not_skipped(kind):
    step = make_step(tiny_model(), kind)
    for x0, x1 in batches(steps=2):
        out = step.step(x0, x1)
        assert out["skipped"] == 0.0
        if kind in META_KINDS:
            assert out["mask_skipped"] == 0.0 and out["meta_step"] == 1.0
        assert all(math.isfinite(v) for v in out.values())


def test_unrelated_value_errors_of_the_losses_are_not_swallowed(monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("something unrelated")

    for kind in ("finite_difference", "barlowtwins"):
        step = make_step(tiny_model(), kind)
        monkeypatch.setattr(meta, "barlow_twins_loss", refuse)
        with pytest.raises(ValueError, match="something unrelated"):
            step.step(*batches()[0])
        monkeypatch.undo()


@pytest.mark.parametrize("method", SINGLE_KINDS)
def test_single_loss_step_reports_a_non_finite_untrained_loss_without_skipping(monkeypatch, method):
    model = tiny_model()
    reference = copy.deepcopy(model)
    step, ref_step = make_step(model, method), make_step(reference, method)
    other = "nt_xent_loss" if method == "barlowtwins" else "barlow_twins_loss"
    monkeypatch.setattr(meta, other, Calls(getattr(meta, other), {1}, lambda loss: loss * NAN))
    x0, x1 = batches()[0]
    out, want = step.step(x0, x1), ref_step.step(x0, x1)
    assert out["skipped"] == 0.0
    untrained = "loss_cl" if method == "barlowtwins" else "loss_bt"
    assert math.isnan(out[untrained])
    assert out["loss"] == want["loss"]
    assert_bitwise_equal(state(step), state(ref_step))


# ------------------------------------------------------------------------------------------ meta part


def meta_cases():
    # nt_xent_loss calls of one MetaMaskStep call: 1 step 1, 2 L_cl at θ_{t+1}, 3 L_cl at θ', 4 the second-
    # order term (the finite difference's θ + Rv pass, or the exact term's loss). Hook calls on a backbone
    # weight: 1 step 1's gradient, 2 step 2's gradient g.
    cases = []
    for kind in META_KINDS:
        for where in ["loss_next", "grad_next", "loss_virtual", "grad_virtual", "second_order"]:
            if where == "second_order" and kind == "none":
                continue
            for value in (NAN, INF):
                if where == "grad_virtual" and value == INF:
                    continue  # _NaNGradient: NaN only
                cases.append(pytest.param(kind, where, value, id=f"{kind}-{where}-{value}"))
    return cases


@pytest.mark.parametrize("kind, where, value", meta_cases())
def test_non_finite_meta_part_leaves_the_mask_and_keeps_the_network_step(monkeypatch, kind, where, value):
    # The reference skips its meta step on the second call by its schedule (meta_interval=2: calls 1 and 3
    # run it), which is what a mask-skipped call must amount to: step 1 only.
    model = tiny_model()
    reference = copy.deepcopy(model)
    step, ref_step = make_step(model, kind), make_step(reference, kind, meta_interval=2)
    data = batches()
    assert step.step(*data[0]) == ref_step.step(*data[0])
    before = state(step)

    handle = None
    if where == "grad_next":
        handle = gradient_hook(model.backbone[0].weight, {2}, value)
    else:
        number = {"loss_next": 2, "loss_virtual": 3, "grad_virtual": 3, "second_order": 4}[where]
        if where == "grad_virtual":
            corrupt = _NaNGradient.apply
        elif where == "second_order":  # these passes' losses are only differentiated: a non-finite term
            corrupt = lambda loss: loss * value  # noqa: E731
        else:
            corrupt = loss_value(value)
        monkeypatch.setattr(meta, "nt_xent_loss", Calls(meta.nt_xent_loss, {number}, corrupt))
    out = step.step(*data[1])
    monkeypatch.undo()
    if handle is not None:
        handle.remove()
    want = ref_step.step(*data[1])

    assert (out["skipped"], out["meta_step"], out["mask_skipped"]) == (0.0, 1.0, 1.0)
    assert want["meta_step"] == 0.0
    assert all(out[key] == want[key] for key in ("loss", "loss_bt", "loss_cl"))  # finite, at θ_t
    after = state(step)
    mask_keys = set(after) - network_keys(after)
    assert mask_keys  # mask logits and its momentum buffer
    assert_bitwise_equal({k: after[k] for k in mask_keys}, {k: before[k] for k in mask_keys}, "mask: ")
    assert model.mask.logits.grad is None
    # The network took its finite step 1, BatchNorm statistics as step 1 left them.
    assert not torch.equal(after["model.backbone.0.weight"], before["model.backbone.0.weight"])
    assert_bitwise_equal(after, state(ref_step), "after the mask-skipped step: ")
    assert step.step(*data[2]) == ref_step.step(*data[2])  # the third call, a meta step for both
    assert_bitwise_equal(state(step), state(ref_step), "after the next step: ")


# ------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("bad_call", [1, 2])
def test_skipped_steps_do_not_shift_the_meta_interval_schedule(bad_call):
    step = make_step(tiny_model(), "finite_difference", meta_interval=2)
    data = batches(steps=5)
    flags = []
    for call, (x0, x1) in enumerate(data):
        out = step.step(poisoned_input(x0, NAN) if call == bad_call else x0, x1)
        flags.append((out["meta_step"], out["skipped"]))
    assert step.step_count == 5
    want = [(0.0, 1.0) if call == bad_call else (1.0 if call % 2 == 0 else 0.0, 0.0) for call in range(5)]
    assert flags == want


# ------------------------------------------------------------------------------------------ distributed

WORLD, LOCAL = 2, 4


def _poisoned_run(kind, rank=None):
    """Four calls; call 2 with a NaN in one element of a backbone gradient (step 1), for MetaMaskStep call 3
    with one in step 2's gradient; with ``rank`` (distributed), on rank 1's local gradient only."""
    model = tiny_model(channels=3)
    if rank is not None:
        mmdist.broadcast_module(model)
        model = mmdist.convert_sync_batchnorm(model)
    step = make_step(model, kind, distributed=rank is not None)
    # Hook calls: per MetaMaskStep call, one for step 1 and one for step 2 (not on a skipped call).
    bad = {3, 5} if kind in META_KINDS else {2}
    handle = gradient_hook(model.backbone[0].weight, bad, NAN) if rank in (None, 1) else None
    part = slice(None) if rank is None else slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = [step.step(x0[part], x1[part]) for x0, x1 in batches(seed=2, n=WORLD * LOCAL, channels=3)]
    if handle is not None:
        handle.remove()
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "results": results}


def _worker(rank, tmp):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    mmdist.init_from_env("cpu", init_method=f"file://{tmp}/rendezvous")
    try:
        out = {kind: _poisoned_run(kind, rank) for kind in ("finite_difference", "barlowtwins")}
        mmdist.barrier()
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        mmdist.shutdown()


def test_distributed_ranks_take_the_same_decision_after_averaging(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for kind, flags in (("finite_difference", [(0.0, 0.0), (1.0, None), (0.0, 1.0), (0.0, 0.0)]),
                        ("barlowtwins", [(0.0, None), (1.0, None), (0.0, None), (0.0, None)])):
        want = _poisoned_run(kind)
        for out in [want] + [o[kind] for o in outs]:
            assert [(r["skipped"], r.get("mask_skipped")) for r in out["results"]] == flags, kind
        for rank, out in enumerate(outs):
            got = out[kind]
            for name, value in want["state"].items():
                if name.endswith("num_batches_tracked"):
                    assert torch.equal(got["state"][name], value), (kind, rank, name)
                else:
                    torch.testing.assert_close(got["state"][name], value, rtol=1e-9, atol=1e-12,
                                               msg=f"{kind} rank {rank} {name}")
        # The ranks hold the same weights, bitwise.
        for name in want["state"]:
            assert torch.equal(outs[0][kind]["state"][name], outs[1][kind]["state"][name]), (kind, name)
