"""MetaMaskStep's fast-step options: the exact second-order term, meta_interval and per-phase timings.

The exact term is checked against an independent float64 reference (a double backward through a deep copy
of the model with the authors-style NT-Xent of bench/baselines), and against the finite difference it
replaces, which must converge to it as r → 0 on a network with smooth activations.
"""

import copy
import math

import pytest
import torch
from torch import nn

from baselines.authors_style import authors_nt_xent_loss
from metamask_fast.meta import MetaMaskStep
from metamask_fast.models import MetaMaskModel
from test_meta import batches, optimizers, relative_differences, tiny_model


def smooth_model(seed):
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Tanh(),
        nn.Conv2d(5, 6, 3, stride=2), nn.BatchNorm2d(6), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
    )
    model = MetaMaskModel(backbone, 6, bt_dims=(9, 9, 10), cl_dims=(8, 7)).double()
    # Heads with smooth activations too, so that the finite difference converges at its full order.
    for head in (model.bt_head, model.cl_head):
        for i, layer in enumerate(head):
            if isinstance(layer, nn.ReLU):
                head[i] = nn.Tanh()
    return model


class ResidualNet(nn.Module):
    """In-place operations of the kinds real backbones use: ReLU(inplace=True), ``out += identity``,
    ``Tensor.relu_()`` and ``Tensor.tanh_()``, which the recorded forward must not let overwrite the values
    it keeps (tanh_'s own tangent needs its input)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = (self.stem(x) * 1.5).tanh_()
        out = self.bn(self.conv(h))
        out += h
        return self.pool(out.relu_())


class UntraceableNet(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the exact term reruns the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.sum() > 0:
            h = h * 1.5
        return h.tanh().mean((2, 3))


def model_with(backbone_class, seed):
    torch.manual_seed(seed)
    return MetaMaskModel(backbone_class(), 4, bt_dims=(6, 6, 7), cl_dims=(8, 5)).double()


def directions_for(model, seed):
    """A random v on every weight of the backbone and the contrastive head (the weights with an L_cl
    gradient), as the step forms it."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=g, dtype=p.dtype)
        for name, p in model.named_parameters()
        if name.startswith(("backbone.", "cl_head."))
    }


def reference_hvp(model, v, x0, x1, temperature=0.07):
    """∂_m ⟨∇_θ L_cl(θ, M), v⟩ by a double backward on a copy of the model, literally."""
    model = copy.deepcopy(model).train()
    params = dict(model.named_parameters())
    mask = model.mask()

    def z(x):
        return model.cl_head(model.backbone(x).flatten(1) * mask)

    loss = authors_nt_xent_loss(z(x0), z(x1), temperature)
    names = list(v)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    dot = sum((g * v[n]).sum() for g, n in zip(grads, names))
    (hvp,) = torch.autograd.grad(dot, [params["mask.logits"]])
    return hvp


def relative(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("make_model", [tiny_model, smooth_model], ids=["relu", "smooth"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_hvp_equals_double_backward_in_float64(make_model, seed):
    model = make_model(seed)
    step = MetaMaskStep(model, *optimizers(model), second_order="exact")
    x0, x1 = batches(seed + 5, steps=1)[0]
    v = directions_for(model, seed + 9)
    before = {name: b.clone() for name, b in model.named_buffers()}
    got = step._exact_hvp(v, x0, x1)
    want = reference_hvp(model, v, x0, x1)
    assert want.norm() > 1e-3  # a real second-order signal, not a vanishing one
    assert relative(got, want) <= 1e-8
    # The exact term reads no running statistics and moves none.
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())


@pytest.mark.parametrize("make_model", [tiny_model, smooth_model, lambda seed: model_with(ResidualNet, seed)],
                         ids=["relu", "smooth", "residual-in-place"])
def test_exact_hvp_from_recorded_forwards_equals_double_backward(make_model):
    # The step's path: step 2's forward recorded through the fx trace, the backbone's tangents afterwards.
    from metamask_fast import _tangents

    model = make_model(4)
    step = MetaMaskStep(model, *optimizers(model), second_order="exact")
    assert step._traced is not None
    x0, x1 = batches(8, steps=1)[0]
    v = directions_for(model, 2)
    records = [_tangents.record_forward(step._traced, x) for x in (x0, x1)]
    # The recorded forward is the backbone's forward.
    for (output, _), x in zip(records, (x0, x1)):
        torch.testing.assert_close(output, copy.deepcopy(model.backbone)(x), rtol=1e-13, atol=1e-13)
    got = step._exact_hvp(v, x0, x1, records)
    assert relative(got, reference_hvp(model, v, x0, x1)) <= 1e-8
    head_only = {n: t for n, t in v.items() if n.startswith("cl_head.")}
    assert relative(step._exact_hvp(head_only, x0, x1, records), reference_hvp(model, head_only, x0, x1)) <= 1e-8


def test_backbones_with_dropout_take_the_full_jvp():
    # A replay of recorded nodes would draw new dropout masks; the full jvp draws one, like each
    # finite-difference pass does.
    from metamask_fast import _tangents

    assert _tangents.trace_backbone(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.1))) is None

    class FunctionalDropout(nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.2, self.training)

    assert _tangents.trace_backbone(FunctionalDropout()) is None
    assert _tangents.trace_backbone(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())) is not None


def test_exact_step_on_an_untraceable_backbone():
    model = model_with(UntraceableNet, 5)
    step = MetaMaskStep(model, *optimizers(model), second_order="exact")
    assert step._traced is None
    x0, x1 = batches(9, steps=1)[0]
    v = directions_for(model, 3)
    assert relative(step._exact_hvp(v, x0, x1), reference_hvp(model, v, x0, x1)) <= 1e-8
    for x0, x1 in batches(10, steps=2):
        assert all(map(math.isfinite, step.step(x0, x1).values()))


def test_exact_step_matches_the_finite_difference_on_a_residual_in_place_network():
    # ReLU networks are smooth almost everywhere: with a small radius the two agree closely.
    exact, _ = train(model_with(ResidualNet, 6), 2, second_order="exact")
    fd, _ = train(model_with(ResidualNet, 6), 2, fd_radius=1e-6)
    diffs = relative_differences(exact.model, fd.model)
    assert max(diffs.values()) <= 1e-6, max(diffs, key=diffs.get)


def test_exact_hvp_on_a_subset_of_the_weights():
    # Weights without a direction (here: the first conv) enter as constants.
    model = smooth_model(3)
    step = MetaMaskStep(model, *optimizers(model), second_order="exact")
    x0, x1 = batches(7, steps=1)[0]
    v = {n: t for n, t in directions_for(model, 4).items() if not n.startswith("backbone.0.")}
    assert relative(step._exact_hvp(v, x0, x1), reference_hvp(model, v, x0, x1)) <= 1e-8


def test_finite_difference_converges_to_exact_on_a_smooth_network():
    model = smooth_model(2)
    step = MetaMaskStep(model, *optimizers(model))
    x0, x1 = batches(3, steps=1)[0]
    v = directions_for(model, 6)
    exact = step._exact_hvp(v, x0, x1)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    errors = []
    for radius in (1e-2, 1e-3, 1e-4, 1e-5):
        step.fd_radius = radius
        errors.append(relative(step._finite_difference_hvp(v, buffers, x0, x1), exact))
    # Central differences: the error falls with r² (measured: 4e-3, 4e-5, 4e-7, 4e-9), far from rounding
    # in float64 at these radii.
    for coarse, fine in zip(errors, errors[1:]):
        assert fine <= coarse / 50
    assert errors[-1] <= 1e-8


def train(model, steps, **options):
    step = MetaMaskStep(model, *optimizers(model), **options)
    results = [step.step(x0, x1) for x0, x1 in batches(11, steps=steps)]
    return step, results


def test_exact_step_tracks_the_finite_difference_step_on_a_smooth_network():
    exact, _ = train(smooth_model(4), 3, second_order="exact")
    fd, _ = train(smooth_model(4), 3, second_order="finite_difference", fd_radius=1e-5)
    first, _ = train(smooth_model(4), 3, second_order="none")
    mask = exact.model.mask.logits
    # The second-order term moves the mask measurably, and the two estimates of it agree.
    assert relative(first.model.mask.logits, mask) > 1e-3
    assert relative(fd.model.mask.logits, mask) <= 1e-7
    diffs = relative_differences(exact.model, fd.model)
    assert max(diffs.values()) <= 1e-7, max(diffs, key=diffs.get)


def test_meta_interval_runs_the_meta_step_on_every_kth_call():
    every, every_results = train(tiny_model(5), 6)
    third, third_results = train(tiny_model(5), 6, meta_interval=3)
    assert [r["meta_step"] for r in third_results] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert all(r["meta_step"] == 1.0 for r in every_results)
    assert "mask_grad_norm" in third_results[0] and "mask_grad_norm" not in third_results[1]
    assert third.step_count == 6
    # The first call is identical; after it the mask only moves on calls 0 and 3.
    assert third_results[0] == every_results[0]
    masks = []
    step = MetaMaskStep(model := tiny_model(5), *optimizers(model), meta_interval=3)
    for x0, x1 in batches(11, steps=6):
        step.step(x0, x1)
        masks.append(model.mask.logits.detach().clone())
    moved = [not torch.equal(a, b) for a, b in zip(masks, masks[1:])]
    assert moved == [False, False, True, False, False]
    # The network's weights move on every call.
    assert relative(third.model.backbone[0].weight, tiny_model(5).backbone[0].weight) > 0


def test_meta_interval_resumes_from_step_count():
    step = MetaMaskStep(model := tiny_model(6), *optimizers(model), meta_interval=4)
    step.step_count = 7  # a resumed run: calls 7 (skipped) and 8 (meta)
    (a0, a1), (b0, b1) = batches(2, steps=2)
    assert step.step(a0, a1)["meta_step"] == 0.0
    assert step.step(b0, b1)["meta_step"] == 1.0


@pytest.mark.parametrize("second_order", ["finite_difference", "exact", "none"])
def test_timings_report_every_phase(second_order):
    step, results = train(tiny_model(7), 2, second_order=second_order, timings=True, meta_interval=2)
    meta, regular = results
    phases = ("time_regular", "time_virtual", "time_outer", "time_second_order")
    assert all(isinstance(meta[k], float) and meta[k] >= 0 for k in phases)
    assert set(k for k in regular if k.startswith("time_")) == {"time_regular"}
    _, untimed = train(tiny_model(7), 1, second_order=second_order)
    assert not any(k.startswith("time_") for k in untimed[0])


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"second_order": "newton"}, ValueError, "second_order must be one of"),
        ({"meta_interval": 0}, ValueError, "meta_interval must be an integer >= 1"),
        ({"meta_interval": 2.0}, ValueError, "meta_interval"),
        ({"meta_interval": True}, ValueError, "meta_interval"),
        ({"timings": "yes"}, TypeError, "timings must be a bool"),
    ],
)
def test_bad_options_name_themselves(options, error, message):
    model = tiny_model(0)
    with pytest.raises(error, match=message):
        MetaMaskStep(model, *optimizers(model), **options)


def mid_size_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    )
    return MetaMaskModel(backbone, 64, bt_dims=(256, 256, 256), cl_dims=(128, 64))


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("second_order", ["finite_difference", "exact"])
def test_bf16_autocast_step_follows_the_float32_step(second_order):
    base = mid_size_model()
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 3, 16, 16, generator=g), torch.randn(64, 3, 16, 16, generator=g)
    updates, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        seen = []
        model.backbone[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        step = MetaMaskStep(model, *optimizers(model, lr=1e-3, mask_lr=1.0), second_order=second_order,
                            precision=precision)
        result = step.step(x0, x1)
        assert all(map(math.isfinite, result.values()))
        assert model.mask.logits.dtype == torch.float32 and model.backbone[0].weight.dtype == torch.float32
        mask_update = (model.mask.logits - base.mask.logits).detach()
        weight_update = torch.cat([(a - b).detach().flatten()
                                   for a, b in zip(model.backbone.parameters(), base.backbone.parameters())])
        updates[precision], dtypes[precision] = (mask_update, weight_update), seen
    # Regular step, step 2 and step 3 (two views each) in bfloat16; the finite difference's two passes in
    # float32 (the exact term runs through the recorded forward: no further conv forward).
    assert dtypes["fp32"] == [torch.float32] * len(dtypes["fp32"])
    expected = [torch.bfloat16] * 6 + ([torch.float32] * 4 if second_order == "finite_difference" else [])
    assert dtypes["bf16"] == expected
    # Measured: cosines 0.97 (mask) and 0.99 (weights) between the bfloat16 and float32 updates.
    assert cosine(updates["bf16"][0], updates["fp32"][0]) >= 0.9
    assert cosine(updates["bf16"][1], updates["fp32"][1]) >= 0.97


def test_channels_last_step_equals_the_contiguous_step():
    contiguous, _ = train(tiny_model(8), 3)
    model = tiny_model(8)
    step = MetaMaskStep(model, *optimizers(model), channels_last=True)
    weight = model.backbone[3].weight  # (7, 4, 3, 3): the layouts differ (with one input channel they coincide)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    with torch.autograd.profiler.profile() as prof:
        for x0, x1 in batches(11, steps=3):
            step.step(x0, x1)
    diffs = relative_differences(model, contiguous.model)
    assert max(diffs.values()) <= 1e-12, max(diffs, key=diffs.get)
    assert not model.backbone[3].weight.is_contiguous()  # still channels_last after the steps
    from metamask_fast import ops

    if ops.HAS_EXTENSION:  # the channels_last weights went through the compiled sweeps
        names = {e.name for e in prof.function_events}
        assert {"metamask_fast::virtual_sgd_step", "metamask_fast::add_scaled_"} <= names


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"precision": "fp16"}, ValueError, "precision must be one of"),
        ({"channels_last": 1}, TypeError, "channels_last must be a bool"),
    ],
)
def test_bad_precision_and_layout_options(options, error, message):
    model = tiny_model(0)
    with pytest.raises(error, match=message):
        MetaMaskStep(model, *optimizers(model), **options)


def test_bf16_needs_a_float32_model():
    model = tiny_model(0)  # float64
    with pytest.raises(ValueError, match="precision='bf16' autocasts float32 weights"):
        MetaMaskStep(model, *optimizers(model), precision="bf16")


class _Cat(nn.Module):  # concatenation, split and chunk: tangents through lists and tuples
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], dim=1)
        left, right = torch.split(h, [2, 3], dim=1)
        first, second = right.chunk(2, dim=2)
        values, _ = torch.max(left, dim=1, keepdim=True)
        return torch.cat([first.mean((2, 3)), second.mean((2, 3)), values.mean((2, 3))], dim=1)


class _ViewTail(nn.Module):  # out.view(out.size(0), -1): size() yields ints, not tensors
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3, stride=2), nn.BatchNorm2d(2)

    def forward(self, x):
        out = torch.nn.functional.relu(self.bn(self.conv(x)), inplace=True)
        return out.view(out.size(0), -1)


class _Tied(nn.Module):  # one weight in two layers, a bias-only first layer, a keyword call, a get_attr weight
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(36, 6)
        self.first.weight.requires_grad_(False)
        self.one, self.two = nn.Linear(6, 6), nn.Linear(6, 6, bias=False)
        self.two.weight = self.one.weight
        self.scale = nn.Parameter(torch.ones(6))
        self.register_buffer("shift", torch.full((6,), 0.5))

    def forward(self, x):
        h = self.first(input=x.flatten(1))
        return self.two(torch.tanh(self.one(h))) * self.scale + self.shift


@pytest.mark.parametrize("backbone_class", [_Cat, _ViewTail, _Tied, ResidualNet], ids=lambda c: c.__name__)
def test_recorded_tangents_equal_the_full_jvp(backbone_class):
    from torch.func import functional_call, jvp

    from metamask_fast import _tangents

    torch.manual_seed(0)
    backbone = backbone_class().double()
    trace = _tangents.trace_backbone(backbone)
    assert trace is not None
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    directions = {n: torch.randn_like(p) for n, p in backbone.named_parameters() if p.requires_grad}
    output, env = _tangents.record_forward(trace, x)
    with torch.no_grad():
        got = _tangents.forward_tangent(trace, env, directions)
    buffers = _tangents.batch_statistics_buffers(backbone)
    weights = {n: p.detach() for n, p in backbone.named_parameters()}
    want_output, want = jvp(lambda w: functional_call(backbone, ({**weights, **w}, buffers), (x,)),
                            ({n: weights[n] for n in directions},), (directions,))
    torch.testing.assert_close(output, want_output, rtol=1e-13, atol=1e-13)
    assert relative(got, want) <= 1e-12


def test_traces_that_would_replay_wrongly_are_declined():
    from metamask_fast import _tangents

    class ReadAfterInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.conv(x)
            z = torch.nn.functional.relu(y, inplace=True)
            return (y + z).mean((2, 3))  # reads y after the in-place ReLU changed it

    class Random(nn.Module):
        def forward(self, x):
            return x * torch.rand_like(x)

    assert _tangents.trace_backbone(ReadAfterInPlace()) is None
    assert _tangents.trace_backbone(Random()) is None
    assert _tangents.trace_backbone(nn.Sequential(nn.Conv2d(1, 2, 3), nn.RReLU())) is None


def test_trace_reads_live_buffers_after_the_model_moves():
    # fx copies root-level attributes at trace time; the recorded forward must use the live ones.
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.register_buffer("shift", torch.zeros(4, 1, 1))

        def forward(self, x):
            return (self.conv(x) + self.shift).tanh().mean((2, 3))

    model = model_with(Shifted, 3).float()
    step = MetaMaskStep(model, *optimizers(model), second_order="exact")
    model.double()
    model.backbone.shift.fill_(0.25)
    x0, x1 = batches(4, steps=1)[0]
    from metamask_fast import _tangents

    output, _ = _tangents.record_forward(step._traced, x0)
    torch.testing.assert_close(output, model.backbone(x0), rtol=1e-13, atol=1e-13)
    v = directions_for(model, 1)
    assert relative(step._exact_hvp(v, x0, x1, [_tangents.record_forward(step._traced, x) for x in (x0, x1)]),
                    reference_hvp(model, v, x0, x1)) <= 1e-8


@pytest.mark.parametrize("second_order", ["finite_difference", "exact", "none"])
def test_frozen_layer_left_in_the_optimizer(second_order):
    # SGD over every non-mask parameter after freezing the first conv: the step leaves it as it is.
    model = tiny_model(9)
    model.backbone[0].weight.requires_grad_(False)
    frozen = model.backbone[0].weight.detach().clone()
    step = MetaMaskStep(model, *optimizers(model), second_order=second_order)
    for x0, x1 in batches(12, steps=2):
        assert all(map(math.isfinite, step.step(x0, x1).values()))
    assert torch.equal(model.backbone[0].weight, frozen)
    assert not torch.equal(model.backbone[0].bias, tiny_model(9).backbone[0].bias)


def test_bf16_step_reports_float32_losses():
    model = mid_size_model()
    step = MetaMaskStep(model, *optimizers(model, lr=1e-3), precision="bf16")
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(32, 3, 16, 16, generator=g), torch.randn(32, 3, 16, 16, generator=g)
    result = step.step(x0, x1)
    # bfloat16 keeps 8 significant bits: a float32 loss is almost never representable in it.
    as_bf16 = [float(torch.tensor(result[k]).to(torch.bfloat16)) for k in ("loss", "loss_bt", "loss_cl")]
    assert as_bf16 != [result[k] for k in ("loss", "loss_bt", "loss_cl")]


def test_compiled_backbone_step_equals_the_eager_step():
    eager, eager_results = train(tiny_model(10), 2)
    compiled, compiled_results = train(tiny_model(10), 2, compile_backbone=True)
    diffs = relative_differences(compiled.model, eager.model)
    assert max(diffs.values()) <= 1e-10, max(diffs, key=diffs.get)
    for got, want in zip(compiled_results, eager_results):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    with pytest.raises(TypeError, match="compile_backbone must be a bool"):
        MetaMaskStep(model := tiny_model(0), *optimizers(model), compile_backbone="yes")
