"""One MetaMask training step: the authors-style step of bench/baselines against MetaMaskStep.

The authors' model everywhere: a full-width CIFAR ResNet-18 with Barlow Twins head 2048-2048-2048 and
contrastive head 2048-256, on 32×32 inputs; N=32 on the CPU (a few seconds per step), N=512 on CUDA.
Cases: the authors-style step (``authors_second_order``, the baseline of the ratios), MetaMaskStep in its
faithful mode, with the exact second-order term, and with ``meta_interval=5`` (timed over whole cycles of
5 calls, reported per call), and a plain Barlow Twins step (both views forward, backward, SGD) as the unit
of cost. On CUDA also the faithful and exact modes in bfloat16 autocast with channels_last, and for every
case images/s, peak memory and the model-FLOP utilisation against the H200's dense bfloat16 peak (FLOPs
counted by ``torch.utils.flop_counter`` over one call: matmuls and convolutions, forward and backward).
"""

import copy
import statistics
import time

import pytest
import torch
from torch import nn

from baselines.authors_style import AuthorsStyleMetaMaskStep, authors_barlow_twins_loss
from metamask_fast.backbones import cifar_resnet
from metamask_fast.meta import MetaMaskStep
from metamask_fast.models import MetaMaskModel


def cifar_resnet18() -> nn.Module:
    return cifar_resnet(18)


AUTHORS_MODEL = dict(backbone=cifar_resnet18, feature_dim=512, bt_dims=(2048, 2048, 2048), cl_dims=(2048, 256),
                     image=(3, 32, 32))
SETTINGS = {"cpu": dict(AUTHORS_MODEL, batch=32, rounds=5), "cuda": dict(AUTHORS_MODEL, batch=512, rounds=5)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def optimizers(model):
    network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
    return (torch.optim.SGD(network, lr=1e-3, momentum=0.9, weight_decay=5e-4),
            torch.optim.SGD([model.mask.logits], lr=1e-3, momentum=0.9, weight_decay=5e-4))


class BarlowTwinsStep:
    """The unit of cost: both views forward, the Barlow Twins loss, backward, one SGD step."""

    def __init__(self, model, net_optimizer):
        self.model, self.optimizer = model, net_optimizer

    def step(self, x0, x1):
        loss = authors_barlow_twins_loss(self.model(x0)[0], self.model(x1)[0])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


STEPS = {
    "barlow_twins": lambda model: BarlowTwinsStep(model, optimizers(model)[0]),
    "authors_second_order": lambda model: AuthorsStyleMetaMaskStep(model, *optimizers(model)),
    "faithful": lambda model: MetaMaskStep(model, *optimizers(model)),
    "exact": lambda model: MetaMaskStep(model, *optimizers(model), second_order="exact"),
    "meta_interval_5": lambda model: MetaMaskStep(model, *optimizers(model), meta_interval=5),
}
CUDA_STEPS = {  # the mixed-precision configurations: bfloat16 on the CPU here has no fast kernels
    "faithful_bf16_channels_last": lambda model: MetaMaskStep(model, *optimizers(model), precision="bf16",
                                                              channels_last=True),
    "exact_bf16_channels_last": lambda model: MetaMaskStep(model, *optimizers(model), second_order="exact",
                                                           precision="bf16", channels_last=True),
}
CALLS_PER_ROUND = {"meta_interval_5": 5}  # a whole cycle of the schedule per round
H200_BF16_DENSE_FLOPS = 989e12  # the peak the model-FLOP utilisation is quoted against


def count_flops(call, calls: int) -> float | None:
    """FLOPs of ``calls`` calls (matmuls and convolutions, per torch.utils.flop_counter), per call."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            for _ in range(calls):
                call()
    except Exception:  # noqa: BLE001  (an op the counter cannot follow: report no MFU rather than fail)
        return None
    return counter.get_total_flops() / calls



@pytest.mark.parametrize(
    "impl,device",
    [(impl, device) for device in DEVICES for impl in list(STEPS) + (list(CUDA_STEPS) if device == "cuda" else [])],
)
def test_training_step(benchmark, impl, device):
    s = SETTINGS[device]
    benchmark.group = f"training step {device} N={s['batch']}"
    torch.manual_seed(0)
    model = MetaMaskModel(s["backbone"](), s["feature_dim"], bt_dims=s["bt_dims"], cl_dims=s["cl_dims"]).to(device)
    step = {**STEPS, **CUDA_STEPS}[impl](copy.deepcopy(model))
    x0 = torch.randn(s["batch"], *s["image"], device=device)
    x1 = torch.randn(s["batch"], *s["image"], device=device)

    def one_step():
        step.step(x0, x1)
        if device == "cuda":
            torch.cuda.synchronize()

    iterations = CALLS_PER_ROUND.get(impl, 1)
    benchmark.extra_info["batch"] = s["batch"]
    flops = None
    if device == "cuda":
        one_step()  # warm (allocator, cuDNN autotuning), then count FLOPs and measure memory from here
        torch.cuda.reset_peak_memory_stats()
        flops = count_flops(one_step, iterations)
    benchmark.pedantic(one_step, rounds=s["rounds"], iterations=iterations, warmup_rounds=1)
    if device == "cuda" and benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["images_per_s"] = s["batch"] / seconds
        benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if flops is not None:
            benchmark.extra_info["mfu_percent_of_bf16_peak"] = 100 * flops / seconds / H200_BF16_DENSE_FLOPS


@pytest.mark.parametrize("device", DEVICES)
def test_faithful_and_authors_steps_interleaved(benchmark, device):
    """The headline ratio measured the fairest way this shared machine allows: the authors-style step and
    the faithful MetaMaskStep alternate, call by call, on the same model, batch and seed, so that drift in
    the machine's speed hits both alike. ``extra_info`` holds both medians and their ratio."""
    s = SETTINGS[device]
    benchmark.group = f"training step {device} N={s['batch']}, interleaved"
    torch.manual_seed(0)
    model = MetaMaskModel(s["backbone"](), s["feature_dim"], bt_dims=s["bt_dims"], cl_dims=s["cl_dims"]).to(device)
    steps = {name: STEPS[name](copy.deepcopy(model)) for name in ("authors_second_order", "faithful")}
    x0 = torch.randn(s["batch"], *s["image"], device=device)
    x1 = torch.randn(s["batch"], *s["image"], device=device)
    times = {name: [] for name in steps}

    rounds = 1 if benchmark.disabled else s["rounds"]  # --benchmark-disable (CI): one pair, as a smoke test

    def pairs():
        for _ in range(rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step.step(x0, x1)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)

    for step in steps.values():  # warm-up
        step.step(x0, x1)
    benchmark.pedantic(pairs, rounds=1, iterations=1)
    authors, faithful = (statistics.median(times[name]) for name in ("authors_second_order", "faithful"))
    benchmark.extra_info.update(authors_median_ms=1e3 * authors, faithful_median_ms=1e3 * faithful,
                                faithful_over_authors=faithful / authors)
