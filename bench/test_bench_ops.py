"""The meta-step sweeps on a real weight list: the authors' per-parameter loops, the best ``torch._foreach``
sequence (the fallbacks of ``metamask_fast.ops`` and ``metamask_fast.optim_ops``, into new tensors and into
kept ones) and the compiled ops, side by side per op. The optimizers' virtual updates and VJPs (SGD, LARS
with cifar10-lars' settings, AdamW) have no authors' loop: the authors unroll SGD only.

The list: the weights that the virtual step touches in the authors' setting, a CIFAR ResNet-18 backbone and
the contrastive head 512→2048→256 (about 12.8 M float32 values in 70 tensors), with momentum buffers and
gradients of the same shapes. One group per op and device; ``python bench/report.py`` prints the ratios.
"""

import copy

import pytest
import torch
from torch import nn

from metamask_fast import ops, optim_ops
from metamask_fast.models import projection_head
from test_bench_step import cifar_resnet18

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LR, MOMENTUM, WEIGHT_DECAY, RADIUS = 1e-3, 0.9, 5e-4, 1e-2


def weight_lists(device):
    torch.manual_seed(0)
    model = nn.ModuleList([cifar_resnet18(), projection_head(512, (2048, 256))]).to(device)
    params = [p.detach() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.randn_like(p) for p in params]
    kept = [torch.empty_like(p) for p in params]  # output tensors kept from call to call
    return params, grads, buffers, kept


def authors_virtual_step(params, grads, buffers):
    """The authors' loop: deep copies of every gradient, then per weight a deep-copied buffer."""
    grads = copy.deepcopy(grads)
    out = []
    for weight, d_p, buffer in zip(params, grads, buffers):
        d_p = d_p.add(weight, alpha=WEIGHT_DECAY)
        buf = copy.deepcopy(buffer)
        buf.mul_(MOMENTUM).add_(d_p)
        out.append(weight - buf * LR)
    return out


def authors_perturb(params, vector):
    """The authors' θ + R·v: copy every weight into the shadow model, then add in place, weight by weight."""
    shadow = [torch.empty_like(p) for p in params]
    for s, p in zip(shadow, params):
        s.copy_(p)
    for s, v in zip(shadow, vector):
        s.add_(v, alpha=RADIUS)
    return shadow


def foreach_perturb_into(params, vector, kept):
    """The best ``torch._foreach`` form with kept output tensors: copy, then add in place (two sweeps)."""
    torch._foreach_copy_(kept, params)
    torch._foreach_add_(kept, vector, alpha=RADIUS)
    return kept


def authors_add_(tensors, vector):
    for t, v in zip(tensors, vector):
        t.add_(v, alpha=RADIUS)


def authors_norm(vector):
    return torch.cat([v.reshape(-1) for v in vector]).norm()


CASES = {
    "virtual_sgd_step": {
        "authors": lambda p, g, b, kept: authors_virtual_step(p, g, b),
        "foreach": lambda p, g, b, kept: ops._virtual_sgd_step_torch(p, g, b, LR, MOMENTUM, 0.0, WEIGHT_DECAY, False),
        "compiled": lambda p, g, b, kept: ops.virtual_sgd_step(p, g, b, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    },
    # θ + R·v into new tensors, and into tensors kept from call to call (what MetaMaskStep does).
    "add_scaled (θ + R·v)": {
        "authors": lambda p, g, b, kept: authors_perturb(p, g),
        "foreach": lambda p, g, b, kept: ops._add_scaled_torch(p, g, RADIUS),
        "foreach_into_kept": lambda p, g, b, kept: foreach_perturb_into(p, g, kept),
        "compiled": lambda p, g, b, kept: ops.add_scaled(p, g, RADIUS),
        "compiled_into_kept": lambda p, g, b, kept: ops.add_scaled(p, g, RADIUS, out=kept),
    },
    "add_scaled_ (in place)": {
        "authors": lambda p, g, b, kept: authors_add_(b, g),
        "foreach": lambda p, g, b, kept: ops._add_scaled__torch(b, g, RADIUS),
        "compiled": lambda p, g, b, kept: ops.add_scaled_(b, g, RADIUS),
    },
    "global_norm": {
        "authors": lambda p, g, b, kept: authors_norm(g),
        "foreach": lambda p, g, b, kept: ops._global_norm_torch(g),
        "compiled": lambda p, g, b, kept: ops.global_norm(g),
    },
}
LARS = dict(lr=0.3, weight_decay=1e-4, eta=0.02, weight_decay_filter=True, lars_adaptation_filter=True)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
STEPS = 10.0


def squares(b):
    """A second moment (non-negative) per weight, made once per list."""
    key = id(b)
    if key not in _SQUARES:
        _SQUARES[key] = [x.square() for x in b]
    return _SQUARES[key]


def foreach_into(kept, results):
    """The fallback's results copied into the kept tensors: the ``_foreach`` way to fill them."""
    torch._foreach_copy_(kept, results)
    return kept


def optimizer_cases(foreach, compiled):
    """``foreach`` (new tensors), ``foreach_into_kept``, ``compiled`` and ``compiled_into_kept`` of an op
    from its fallback ``foreach(p, g, b)`` and its wrapper ``compiled(p, g, b, out=)``."""
    return {
        "foreach": lambda p, g, b, kept: foreach(p, g, b),
        "foreach_into_kept": lambda p, g, b, kept: foreach_into(kept, foreach(p, g, b)),
        "compiled": lambda p, g, b, kept: compiled(p, g, b, out=None),
        "compiled_into_kept": lambda p, g, b, kept: compiled(p, g, b, out=kept),
    }


_SQUARES = {}
SGD = (LR, MOMENTUM, 0.0, WEIGHT_DECAY, False)
CASES.update({
    # Into kept tensors: what MetaMaskStep does with every optimizer.
    "virtual_sgd_step_into_kept": optimizer_cases(
        lambda p, g, b: ops._virtual_sgd_step_torch(p, g, b, *SGD),
        lambda p, g, b, out: ops.virtual_sgd_step(p, g, b, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                                  out=out)),
    "virtual_lars_step": optimizer_cases(
        lambda p, g, b: optim_ops._virtual_lars_step_torch(
            p, g, b, LARS["lr"], LARS["weight_decay"], MOMENTUM, LARS["eta"], True, True),
        lambda p, g, b, out: optim_ops.virtual_lars_step(p, g, b, momentum=MOMENTUM, out=out, **LARS)),
    "virtual_adamw_step": optimizer_cases(
        lambda p, g, b: optim_ops._virtual_adamw_step_torch(
            p, g, b, squares(b), [STEPS] * len(p), ADAMW["lr"], *ADAMW["betas"], ADAMW["eps"], 0.05),
        lambda p, g, b, out: optim_ops.virtual_adamw_step(p, g, b, squares(b), [STEPS] * len(p), weight_decay=0.05,
                                                          out=out, **ADAMW)),
    # The VJPs u = J_Uᵀ v, with the buffers' values as v.
    "sgd_vjp": optimizer_cases(
        lambda p, g, b: optim_ops._sgd_vjp_torch(b, p, LR, MOMENTUM, 0.0, False),
        lambda p, g, b, out: optim_ops.sgd_vjp(b, p, lr=LR, momentum=MOMENTUM, out=out)),
    "lars_vjp": optimizer_cases(
        lambda p, g, b: optim_ops._lars_vjp_torch(
            p, g, b, LARS["lr"], LARS["weight_decay"], LARS["eta"], True, True),
        lambda p, g, b, out: optim_ops.lars_vjp(p, g, b, out=out, **LARS)),
    "adamw_vjp": optimizer_cases(
        lambda p, g, b: optim_ops._adamw_vjp_torch(
            g, b, squares(b), [STEPS] * len(p), p, ADAMW["lr"], *ADAMW["betas"], ADAMW["eps"]),
        lambda p, g, b, out: optim_ops.adamw_vjp(g, b, squares(b), [STEPS] * len(p), p, out=out, **ADAMW)),
})
# The fewest weight-list-sized arrays each op must read or write: its memory traffic, for GB/s (LARS: the
# norms' pass reads θ and g, and the VJP's also v, before the update's pass).
ARRAYS_MOVED = {"virtual_sgd_step": 4, "add_scaled": 3, "add_scaled_": 3, "global_norm": 1,
                "virtual_sgd_step_into_kept": 4, "virtual_lars_step": 6, "virtual_adamw_step": 5, "sgd_vjp": 2,
                "lars_vjp": 7, "adamw_vjp": 5}
PARAMS = [
    pytest.param(op, impl, device, id=f"{device}-{op.split()[0]}-{impl}")
    for device in DEVICES
    for op, impls in CASES.items()
    for impl in impls
]
_LISTS = {}


@pytest.mark.parametrize("op,impl,device", PARAMS)
def test_meta_step_op(benchmark, op, impl, device):
    if impl.startswith("compiled") and not ops.HAS_EXTENSION:
        pytest.skip(f"metamask_fast._C not loaded ({ops._EXTENSION_ERROR})")
    benchmark.group = f"meta-step op {op} {device}"
    if device not in _LISTS:
        _LISTS[device] = weight_lists(device)
    params, grads, buffers, kept = _LISTS[device]
    values = sum(p.numel() for p in params)
    benchmark.extra_info["values_millions"] = values / 1e6
    benchmark.extra_info["mbytes_moved"] = ARRAYS_MOVED[op.split()[0]] * values * params[0].element_size() / 1e6
    fn = CASES[op][impl]

    def run():
        fn(params, grads, buffers, kept)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=15 if device == "cpu" else 50, warmup_rounds=2)


@pytest.mark.parametrize("device", DEVICES)
def test_copy_bandwidth_reference(benchmark, device):
    """One flat copy of the weight list's size: the memory bandwidth the sweeps above are bounded by, in the
    same run (``report.py`` prints GB/s for both)."""
    benchmark.group = f"meta-step op memory copy (bandwidth reference) {device}"
    if device not in _LISTS:
        _LISTS[device] = weight_lists(device)
    params = _LISTS[device][0]
    values = sum(p.numel() for p in params)
    source = torch.randn(values, device=device)
    target = torch.empty_like(source)
    benchmark.extra_info["values_millions"] = values / 1e6
    benchmark.extra_info["mbytes_moved"] = 2 * values * source.element_size() / 1e6

    def run():
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=15 if device == "cpu" else 50, warmup_rounds=2)
