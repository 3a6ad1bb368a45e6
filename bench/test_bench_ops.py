"""The meta-step sweeps on a real weight list: the authors' per-parameter loops, the best ``torch._foreach``
sequence (the fallbacks of ``metamask_fast.ops``) and the compiled ops, side by side per op.

The list: the weights that the virtual step touches in the authors' setting, a CIFAR ResNet-18 backbone and
the contrastive head 512→2048→256 (about 12.8 M float32 values in 70 tensors), with momentum buffers and
gradients of the same shapes. One group per op and device; ``python bench/report.py`` prints the ratios.
"""

import copy

import pytest
import torch
from torch import nn

from metamask_fast import ops
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
# The fewest weight-list-sized arrays each op must read or write: its memory traffic, for GB/s.
ARRAYS_MOVED = {"virtual_sgd_step": 4, "add_scaled": 3, "add_scaled_": 3, "global_norm": 1}
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
