"""MetaMaskStep against the authors-style step of bench/baselines, in float64, and its contract."""

import copy

import pytest
import torch
from torch import nn

from baselines.authors_style import AuthorsStyleMetaMaskStep
from metamask_fast.meta import MetaMaskStep
from metamask_fast.models import MetaMaskModel


def tiny_model(seed):
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 7, 3, stride=2), nn.BatchNorm2d(7), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )
    return MetaMaskModel(backbone, 7, bt_dims=(13, 13, 17), cl_dims=(12, 9)).double()


def optimizers(model, lr=1e-2, mask_lr=1e-2, momentum=0.9):
    network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
    net = torch.optim.SGD(network, lr=lr, momentum=momentum, weight_decay=5e-4)
    mask = torch.optim.SGD([model.mask.logits], lr=mask_lr, momentum=0.9, weight_decay=5e-4)
    return net, mask


def batches(seed, steps=3, n=11):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
             torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)) for _ in range(steps)]


def relative_differences(model_a, model_b):
    """Per tensor ‖a - b‖ / ‖b‖, with ‖all network weights‖ as the scale where a tensor is near zero."""
    params_b = dict(model_b.named_parameters())
    total = torch.cat([p.detach().flatten() for n, p in params_b.items() if not n.startswith("mask.")]).norm()
    out = {}
    for name, a in model_a.named_parameters():
        b = params_b[name].detach()
        scale = b.norm() if name.startswith("mask.") or b.norm() > 1e-6 * total else total
        out[name] = float((a.detach() - b).norm() / scale)
    return out


def run_both(second_order, seed, momentum=0.9):
    ours = tiny_model(seed)
    theirs = copy.deepcopy(ours)
    step = MetaMaskStep(ours, *optimizers(ours, momentum=momentum), second_order=second_order)
    baseline = AuthorsStyleMetaMaskStep(theirs, *optimizers(theirs, momentum=momentum),
                                        second_order=second_order == "finite_difference")
    for x0, x1 in batches(seed + 1):
        got, want = step.step(x0, x1), baseline.step(x0, x1)
        for key in ("loss", "loss_bt", "loss_cl"):
            assert got[key] == pytest.approx(want[key], rel=1e-12)
    return ours, theirs


@pytest.mark.parametrize("second_order", ["finite_difference", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_equals_authors_style_step_in_float64(second_order, seed):
    ours, theirs = run_both(second_order, seed)
    diffs = relative_differences(ours, theirs)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-9, (worst, diffs[worst])
    assert diffs["mask.logits"] <= 1e-9


@pytest.mark.parametrize("second_order", ["finite_difference", "exact", "none"])
def test_running_statistics_move_once_per_step(second_order):
    # The reference: before each step, a copy of the model at θ_t with the same buffers runs the regular
    # step's forwards (both views, both heads) in training mode; its BatchNorm statistics after that are
    # what ours must hold after the whole step. (The authors' step moves them a second time in step 2.)
    ours = tiny_model(3)
    step = MetaMaskStep(ours, *optimizers(ours), second_order=second_order)
    reference = copy.deepcopy(ours)
    for x0, x1 in batches(4):
        reference.load_state_dict(ours.state_dict())
        with torch.no_grad():
            reference.train()
            reference(x0)
            reference(x1)
        step.step(x0, x1)
        want = dict(reference.named_buffers())
        for name, got in ours.named_buffers():
            torch.testing.assert_close(got, want[name], rtol=1e-12, atol=1e-14, msg=name)
    assert int(ours.backbone[1].num_batches_tracked) == 2 * 3  # two views per step, three steps


def test_without_momentum_buffer_equals_authors_style_step():
    ours, theirs = run_both("finite_difference", seed=3, momentum=0.0)
    assert max(relative_differences(ours, theirs).values()) <= 1e-9


def test_second_order_term_changes_the_mask_measurably():
    # The comparison above is only meaningful if the finite-difference term is far above its tolerance.
    first, _ = run_both("none", seed=0)
    second, _ = run_both("finite_difference", seed=0)
    m1, m2 = first.mask.logits.detach(), second.mask.logits.detach()
    assert float((m1 - m2).norm() / m2.norm()) > 1e-6


def test_mask_gets_no_gradient_from_the_main_loss():
    model = tiny_model(5)
    net_opt, mask_opt = optimizers(model)
    step = MetaMaskStep(model, net_opt, mask_opt)
    mask_before = model.mask.logits.detach().clone()
    seen = {}
    net_step, mask_step = net_opt.step, mask_opt.step

    def spy_net_step(*args, **kwargs):
        seen["mask_grad_at_net_step"] = model.mask.logits.grad
        result = net_step(*args, **kwargs)
        seen["mask_after_net_step"] = model.mask.logits.detach().clone()
        return result

    def spy_mask_step(*args, **kwargs):
        seen.setdefault("mask_steps", []).append(model.mask.logits.grad.clone())
        return mask_step(*args, **kwargs)

    net_opt.step, mask_opt.step = spy_net_step, spy_mask_step
    (x0, x1), = batches(6, steps=1)
    step.step(x0, x1)
    assert seen["mask_grad_at_net_step"] is None
    assert torch.equal(seen["mask_after_net_step"], mask_before)
    assert len(seen["mask_steps"]) == 1 and seen["mask_steps"][0].abs().sum() > 0
    assert not torch.equal(model.mask.logits.detach(), mask_before)


def test_step_returns_finite_floats():
    model = tiny_model(2)
    (x0, x1), = batches(2, steps=1)
    out = MetaMaskStep(model, *optimizers(model)).step(x0, x1)
    assert {"loss", "loss_bt", "loss_cl", "loss_cl_virtual", "mask_grad_norm"} <= set(out)
    assert all(isinstance(v, float) and v == v for v in out.values())
    assert out["loss"] == pytest.approx(out["loss_bt"] + 10.0 * out["loss_cl"])


def test_bad_arguments_name_themselves():
    model = tiny_model(0)
    net_opt, mask_opt = optimizers(model)
    with pytest.raises(TypeError, match="model"):
        MetaMaskStep(nn.Linear(2, 2), net_opt, mask_opt)
    with pytest.raises(TypeError, match="net_optimizer"):
        MetaMaskStep(model, torch.optim.Adam(net_opt.param_groups[0]["params"]), mask_opt)
    with pytest.raises(ValueError, match="net_optimizer"):
        MetaMaskStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mask_opt)
    with pytest.raises(ValueError, match="mask_optimizer"):
        MetaMaskStep(model, net_opt, torch.optim.SGD(model.bt_head.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="second_order"):
        MetaMaskStep(model, net_opt, mask_opt, second_order="exactly")
    for name in ("fd_radius", "temperature"):
        with pytest.raises(ValueError, match=name):
            MetaMaskStep(model, net_opt, mask_opt, **{name: 0.0})
    step = MetaMaskStep(model, net_opt, mask_opt)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="x0 and x1"):
        step.step(x, x[:3])
    with pytest.raises(ValueError, match="x0"):
        step.step(x[:1], x[:1])
    with pytest.raises(TypeError, match="x1"):
        step.step(x, x.numpy())
    with pytest.raises(TypeError, match="x0"):
        step.step(x.float(), x.float())


def test_finite_difference_term_is_zero_along_a_zero_direction():
    model = tiny_model(4)
    step = MetaMaskStep(model, *optimizers(model))
    (x0, x1), = batches(4, steps=1)
    zero = {name: torch.zeros_like(p) for name, p in model.named_parameters() if name.startswith("cl_head.")}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    hvp = step._finite_difference_hvp(zero, buffers, x0, x1)
    assert torch.equal(hvp, torch.zeros_like(model.mask.logits))
    nan = {name: torch.full_like(t, float("nan")) for name, t in zero.items()}
    with pytest.raises(FloatingPointError, match="diverged"):
        step._finite_difference_hvp(nan, buffers, x0, x1)


def test_virtual_weights_follow_each_parameter_group():
    # Two groups with their own lr, momentum, dampening, weight decay and nesterov: θ' must be what a real
    # SGD step with the same gradients would give, group by group.
    model = tiny_model(7)
    backbone = list(model.backbone.parameters())
    heads = list(model.bt_head.parameters()) + list(model.cl_head.parameters())
    net_opt = torch.optim.SGD([
        dict(params=backbone, lr=0.03, momentum=0.5, dampening=0.2, weight_decay=1e-3),
        dict(params=heads, lr=0.011, momentum=0.9, nesterov=True, weight_decay=0.0),
    ], lr=0.1)
    mask_opt = torch.optim.SGD([model.mask.logits], lr=0.01)
    step = MetaMaskStep(model, net_opt, mask_opt)
    (x0, x1), (y0, y1) = batches(8, steps=2)
    step.step(x0, x1)  # creates the momentum buffers

    grads = [None if p.shape[0] % 2 else torch.randn_like(p) for p in step._params]
    virtual = step._virtual_weights(grads)
    real = copy.deepcopy((model, net_opt))
    real_model, real_opt = real
    for p, g in zip([p for group in real_opt.param_groups for p in group["params"]], grads):
        p.grad = g
    real_opt.step()
    real_params = dict(real_model.named_parameters())
    assert set(virtual) == {name for name, g in zip(step._names, grads) if g is not None}
    for name, weight in virtual.items():
        torch.testing.assert_close(weight, real_params[name].detach(), rtol=1e-14, atol=1e-15)


def test_optimizer_state_loaded_after_the_step_is_built_is_used():
    """``load_state_dict`` replaces the optimizer's group dicts; the virtual step must read the live ones
    (a resumed run loads its optimizer after building the step, at a later cosine lr)."""
    results = []
    for late_load in (False, True):
        torch.manual_seed(0)
        model = MetaMaskModel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1)),
                              4, (6, 5), (6, 3)).double()
        net = [p for n, p in model.named_parameters() if n != "mask.logits"]
        lr = 0.5 if late_load else 0.01
        net_optimizer = torch.optim.SGD(net, lr=lr, momentum=0.9)
        mask_optimizer = torch.optim.SGD([model.mask.logits], lr=0.1)
        step = MetaMaskStep(model, net_optimizer, mask_optimizer)
        if late_load:
            state = net_optimizer.state_dict()
            state["param_groups"][0]["lr"] = 0.01
            net_optimizer.load_state_dict(state)
        x = torch.randn(2, 6, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        step.step(x[0], x[1])
        results.append(model.mask.logits.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("method", ["barlowtwins", "simclr"])
def test_single_loss_step_honours_bf16_and_channels_last(method):
    from metamask_fast.meta import SingleLossStep

    updates = {}
    for precision, channels_last in (("fp32", False), ("fp32", True), ("bf16", False)):
        torch.manual_seed(0)
        model = MetaMaskModel(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)),
                              8, (16, 16), (16, 8))
        before = [p.detach().clone() for p in model.parameters()]
        step = SingleLossStep(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method, lambd=5e-3,
                              temperature=0.5, precision=precision, channels_last=channels_last)
        x = torch.randn(2, 12, 3, 9, 9, generator=torch.Generator().manual_seed(1))
        result = step.step(x[0], x[1])
        assert all(isinstance(v, float) for v in result.values())
        if channels_last:
            assert model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
        updates[precision, channels_last] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    reference = updates["fp32", False]
    # channels_last only reorders the convolution's float32 sums
    assert ((updates["fp32", True] - reference).norm() / reference.norm()).item() < 1e-3
    bf16 = updates["bf16", False]
    assert not torch.equal(bf16, reference)  # the forwards really ran in bfloat16
    assert torch.nn.functional.cosine_similarity(bf16, reference, dim=0) > 0.95
