"""metamask_fast.distributed and the steps' ``distributed=True``: 2 Gloo ranks on the CPU, each with half of
the batch, against one process on the concatenated batch, in float64.

The ranks are spawned processes (torch.multiprocessing, a ``file://`` rendezvous in tmp_path); they write
what they computed to tmp_path and the test process compares it with its own single-process run.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from metamask_fast import distributed as mmdist
from metamask_fast.meta import MetaMaskStep, SingleLossStep
from metamask_fast.models import MetaMaskModel
from metamask_fast.optim import LARS

WORLD = 2
LOCAL = 5  # samples per rank; the global batch has WORLD * LOCAL
RTOL = 1e-6


# ------------------------------------------------------------------------------------------ fixtures


def tiny_model(seed):
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 7, 3, stride=2), nn.BatchNorm2d(7), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )
    return MetaMaskModel(backbone, 7, bt_dims=(9, 11), cl_dims=(9, 5)).double()


def batches(seed, steps):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * LOCAL
    return [(torch.randn(n, 3, 7, 7, generator=g, dtype=torch.float64),
             torch.randn(n, 3, 7, 7, generator=g, dtype=torch.float64)) for _ in range(steps)]


def make_step(model, kind, options, distributed):
    if kind == "metamask":
        network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
        options = dict(options)
        optimizer = options.pop("optimizer", "sgd")
        if optimizer == "lars":
            net = LARS(network, lr=0.05, weight_decay=5e-4, eta=0.02, weight_decay_filter=True,
                       lars_adaptation_filter=True)
        elif optimizer == "adamw":
            # The weights only: the biases before a BatchNorm (and the Barlow Twins head's last one) have a
            # gradient of rounding noise alone, which Adam's normalisation turns into full steps that differ
            # with the summation order of one process and two.
            net = torch.optim.AdamW([p for p in network if p.ndim > 1], lr=1e-3, weight_decay=5e-2)
        else:
            net = torch.optim.SGD(network, lr=0.05, momentum=0.9, weight_decay=5e-4)
        mask = torch.optim.SGD([model.mask.logits], lr=0.5, momentum=0.9, weight_decay=5e-4)
        return MetaMaskStep(model, net, mask, distributed=distributed, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return SingleLossStep(model, optimizer, method=kind, lambd=5e-3, temperature=0.5, distributed=distributed)


def train(model, kind, options, steps, rank=None):
    """``steps`` steps on the global batches, or on rank ``rank``'s slice of them."""
    step = make_step(model, kind, options, distributed=rank is not None)
    part = slice(None) if rank is None else slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = [step.step(x0[part], x1[part]) for x0, x1 in batches(seed=1, steps=steps)]
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "results": results}


# ------------------------------------------------------------------------------ the ranks' side


def _worker(rank, tmp, scenario, kwargs):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    ctx = mmdist.init_from_env("cpu", init_method=f"file://{tmp}/rendezvous")
    try:
        out = globals()[scenario](ctx, **kwargs)
        out["ctx"] = ctx
        mmdist.barrier()
        torch.save(out, f"{tmp}/rank{ctx.rank}.pt")
    finally:
        mmdist.shutdown()


def _scenario_train(ctx, kind, options, steps):
    model = tiny_model(seed=0)
    if ctx.rank != 0:  # broadcast_module must bring rank 0's weights and buffers
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.add_(1)
    mmdist.broadcast_module(model)
    model = mmdist.convert_sync_batchnorm(model)
    with pytest.raises(ValueError, match="second_order"):
        make_step(model, "metamask", {"second_order": "exact"}, distributed=True)
    return train(model, kind, options, steps, rank=ctx.rank)


def _gather_inputs():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(WORLD * LOCAL, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    return y, w


def _scenario_gather(ctx):
    y, w = _gather_inputs()
    w.requires_grad_()
    local = y[ctx.rank * LOCAL : (ctx.rank + 1) * LOCAL] * 1.0
    gathered = mmdist.gather(local @ w)
    loss = _gather_loss_of_projection(gathered)
    (grad,) = torch.autograd.grad(loss, [w])
    mmdist.average_gradients([grad, None])
    return {"gathered": gathered.detach(), "loss": loss.detach(), "grad": grad}


def _gather_loss_of_projection(z):
    z = (z - z.mean(0)) / z.std(0)
    c = z.T @ z / z.shape[0]
    return ((c - torch.eye(c.shape[0], dtype=c.dtype)) ** 2).sum() + torch.logsumexp(z @ z.T, 1).mean()


def _batchnorm_layers():
    torch.manual_seed(5)
    layers = [nn.BatchNorm1d(3, momentum=None), nn.BatchNorm2d(4, momentum=0.3)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    return [layer.double() for layer in layers]


def _batchnorm_inputs(steps=2):
    g = torch.Generator().manual_seed(6)
    return [(torch.randn(WORLD * LOCAL, 3, 2, generator=g, dtype=torch.float64) * 3 + 1,
             torch.randn(WORLD * LOCAL, 4, 3, 2, generator=g, dtype=torch.float64) * 2 - 1) for _ in range(steps)]


def run_batchnorm(layers, inputs, rank=None):
    """Two training steps through each layer; the loss mixes the samples of the global batch. Returns the
    inputs' gradients (global), the layers' parameter gradients (averaged) and their final state."""
    part = slice(None) if rank is None else slice(rank * LOCAL, (rank + 1) * LOCAL)
    out = {"x_grads": [], "param_grads": [], "outputs": []}
    for xs in inputs:
        for layer, x in zip(layers, xs):
            x = x[part].clone().requires_grad_()
            y = layer(x)
            y_all = y if rank is None else mmdist.gather(y)
            loss = (y_all.flatten(1) ** 3).sum() + (y_all.flatten(1).sum(0) ** 2).sum()
            grads = list(torch.autograd.grad(loss, [x, layer.weight, layer.bias]))
            mmdist.average_gradients(grads[1:])
            # The sum over the ranks of everyone's loss is differentiated: each rank's input gradient is
            # WORLD times its part of the global one.
            x_grad = grads[0] if rank is None else mmdist.gather(grads[0]) / WORLD
            out["x_grads"].append(x_grad)
            out["param_grads"].append(grads[1:])
            out["outputs"].append(y_all.detach())
    out["state"] = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    return out


def _scenario_batchnorm(ctx):
    layers = [mmdist.convert_sync_batchnorm(layer) for layer in _batchnorm_layers()]
    assert all(isinstance(layer, mmdist.SyncBatchNorm) for layer in layers)
    out = run_batchnorm(layers, _batchnorm_inputs(), rank=ctx.rank)
    for layer in layers:  # eval mode: the running statistics, no communication
        layer.eval()
    with torch.no_grad():
        out["eval"] = [layer(x[ctx.rank * LOCAL : (ctx.rank + 1) * LOCAL])
                       for layer, x in zip(layers, _batchnorm_inputs()[0])]
    return out


def run_ranks(tmp_path, scenario, **kwargs):
    mp.spawn(_worker, args=(str(tmp_path), scenario, kwargs), nprocs=WORLD, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, out in enumerate(outs):
        ctx = out["ctx"]
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_distributed, ctx.device) == (
            rank, WORLD, rank, True, "cpu")
        assert ctx.is_main == (rank == 0)
    return outs


# ------------------------------------------------------------------------------------------ checks


def assert_close(got, want, what, rtol=RTOL, scale=0.0):
    """‖got - want‖ ≤ rtol · max(‖want‖, scale)."""
    error = float((got - want).norm() / max(float(want.norm()), scale, 1e-300))
    assert error <= rtol, f"{what}: relative error {error:.3g}"


def assert_same_training(got, want, initial):
    """Weights and mask compared by their change from ``initial`` (a stricter test than the weights
    themselves); BatchNorm buffers by value, num_batches_tracked exactly; the reported losses."""
    assert got["state"].keys() == want["state"].keys()
    # Some weights barely move (the last BatchNorm shift before the standardising Barlow Twins loss has no
    # gradient but rounding): their change is compared on the scale of all the weights' change.
    total = torch.cat([(value - initial[name]).flatten() for name, value in want["state"].items()
                       if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]).norm()
    for name, value in want["state"].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got["state"][name], value), name
        elif name.endswith(("running_mean", "running_var")):
            assert_close(got["state"][name], value, name)
        else:
            assert_close(got["state"][name] - initial[name], value - initial[name], name, scale=1e-3 * float(total))
    for got_step, want_step in zip(got["results"], want["results"], strict=True):
        assert got_step.keys() == want_step.keys()
        for key in want_step:
            if not key.startswith("time_"):
                assert got_step[key] == pytest.approx(want_step[key], rel=RTOL, abs=1e-12), key


METAMASK_CASES = [
    pytest.param({"second_order": "finite_difference"}, 2, id="finite_difference"),
    pytest.param({"second_order": "none"}, 2, id="first_order"),
    pytest.param({"second_order": "finite_difference", "meta_interval": 2}, 3, id="meta_interval_2"),
    pytest.param({"second_order": "finite_difference", "optimizer": "lars"}, 2, id="lars"),
    pytest.param({"second_order": "finite_difference", "optimizer": "adamw"}, 2, id="adamw"),
]


@pytest.mark.parametrize("options, steps", METAMASK_CASES)
def test_metamask_step_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path, options, steps):
    initial = {k: v.clone() for k, v in tiny_model(seed=0).state_dict().items()}
    want = train(tiny_model(seed=0), "metamask", options, steps)
    for got in run_ranks(tmp_path, "_scenario_train", kind="metamask", options=options, steps=steps):
        assert_same_training(got, want, initial)


@pytest.mark.parametrize("method", ["barlowtwins", "simclr"])
def test_single_loss_step_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path, method):
    initial = {k: v.clone() for k, v in tiny_model(seed=0).state_dict().items()}
    want = train(tiny_model(seed=0), method, {}, 2)
    for got in run_ranks(tmp_path, "_scenario_train", kind=method, options={}, steps=2):
        assert_same_training(got, want, initial)


def test_gather_and_average_gradients_give_the_gradient_of_the_global_loss(tmp_path):
    y, w = _gather_inputs()
    w.requires_grad_()
    z = y @ w
    loss = _gather_loss_of_projection(z)
    (grad,) = torch.autograd.grad(loss, [w])
    for out in run_ranks(tmp_path, "_scenario_gather"):
        assert torch.equal(out["gathered"], z.detach())  # concatenation in rank order
        assert_close(out["loss"], loss.detach(), "loss")
        assert_close(out["grad"], grad, "gradient")


def test_sync_batchnorm_on_two_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    layers = _batchnorm_layers()
    inputs = _batchnorm_inputs()
    want = run_batchnorm(layers, inputs)
    for layer in layers:
        layer.eval()
    with torch.no_grad():
        want_eval = [layer(x) for layer, x in zip(layers, inputs[0])]
    for rank, got in enumerate(run_ranks(tmp_path, "_scenario_batchnorm")):
        for key in ("x_grads", "outputs"):
            for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
                assert_close(a, b, f"{key}[{i}]")
        for i, (a, b) in enumerate(zip(got["param_grads"], want["param_grads"], strict=True)):
            assert_close(a[0], b[0], f"weight grad {i}")
            assert_close(a[1], b[1], f"bias grad {i}")
        for a, b in zip(got["state"], want["state"], strict=True):
            assert a.keys() == b.keys()
            assert torch.equal(a["num_batches_tracked"], b["num_batches_tracked"])
            for name in ("weight", "bias", "running_mean", "running_var"):
                assert_close(a[name], b[name], name)
        for a, b in zip(got["eval"], want_eval, strict=True):
            assert_close(a, b[rank * LOCAL : (rank + 1) * LOCAL], "eval output")


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_without_process_group_is_batchnorm(momentum):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), plain)
    reference = nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5, momentum=momentum))
    reference.load_state_dict(model.state_dict())
    synced = mmdist.convert_sync_batchnorm(model)
    assert synced is model and isinstance(model[1], mmdist.SyncBatchNorm)
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm)
    assert model[1].weight is plain.weight and model[1].running_mean is plain.running_mean  # shared
    assert list(model.state_dict()) == list(reference.state_dict())
    for mode in ("train", "train", "eval"):
        model.train(mode == "train")
        reference.train(mode == "train")
        x = torch.randn(4, 2, 6, 5)
        got, want = model(x), reference(x)
        assert torch.equal(got, want)
        grads = torch.autograd.grad((got**2).sum(), list(model.parameters()))
        want_grads = torch.autograd.grad((want**2).sum(), list(reference.parameters()))
        for a, b in zip(grads, want_grads):
            assert torch.equal(a, b)
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), name
    plain_again = nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5))
    plain_again.load_state_dict(model.state_dict())  # a checkpoint of the converted model loads into a plain one


def test_collectives_without_process_group_are_identities():
    z = torch.randn(3, 2)
    assert mmdist.gather(z) is z
    grads = [torch.ones(2), None]
    mmdist.average_gradients(grads)
    assert torch.equal(grads[0], torch.ones(2)) and grads[1] is None
    mmdist.broadcast_module(nn.Linear(2, 2))
    mmdist.barrier()
    mmdist.shutdown()


def test_init_from_env_without_world_size_initialises_nothing(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = mmdist.init_from_env("cpu")
    assert ctx == mmdist.DistContext(rank=0, world_size=1, local_rank=0, is_distributed=False, device="cpu")
    assert ctx.is_main and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert mmdist.init_from_env("cpu").world_size == 1 and not torch.distributed.is_initialized()
    with pytest.raises(Exception):
        ctx.rank = 1  # frozen
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        mmdist.init_from_env("cpu")


def test_distributed_option_is_checked():
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="second_order"):
        make_step(model, "metamask", {"second_order": "exact"}, distributed=True)
    with pytest.raises(ValueError, match="distributed"):  # no process group
        make_step(model, "metamask", {}, distributed=True)
    with pytest.raises(ValueError, match="distributed"):
        make_step(model, "simclr", {}, distributed=True)
    with pytest.raises(TypeError, match="distributed"):
        make_step(model, "metamask", {}, distributed="yes")
