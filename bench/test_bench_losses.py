"""Barlow Twins loss, forward + backward: the authors' D × D formulation against the reference path.

Small shapes run on the CPU; the real sizes run behind a CUDA check. Every case of one shape shares a
benchmark group, so the ratios in one run are side by side (``python bench/report.py`` prints them).
"""

import pytest
import torch

from baselines.authors_style import authors_barlow_twins_loss
from metamask_fast.functional import barlow_twins_loss

CPU_SHAPES = [(256, 2048), (256, 8192)]
CUDA_SHAPES = [(256, 2048), (512, 2048), (256, 8192), (2048, 2048), (512, 8192)]
CASES = [("cpu", n, d) for n, d in CPU_SHAPES]
if torch.cuda.is_available():
    CASES += [("cuda", n, d) for n, d in CUDA_SHAPES]

IMPLEMENTATIONS = {
    "authors": authors_barlow_twins_loss,
    "reference": lambda a, b: barlow_twins_loss(a, b, backend="torch"),
}


@pytest.mark.parametrize("device,n,d", CASES, ids=[f"{dev}-N{n}-D{d}" for dev, n, d in CASES])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_barlow_twins_forward_backward(benchmark, impl, device, n, d):
    benchmark.group = f"barlow_twins fwd+bwd {device} N={n} D={d}"
    g = torch.Generator(device=device).manual_seed(0)
    z_a = torch.randn(n, d, device=device, generator=g, requires_grad=True)
    z_b = torch.randn(n, d, device=device, generator=g, requires_grad=True)
    loss_fn = IMPLEMENTATIONS[impl]

    def forward_backward():
        z_a.grad = z_b.grad = None
        loss_fn(z_a, z_b).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    slow_cpu = device == "cpu" and impl == "authors" and d > 4096
    benchmark.pedantic(forward_backward, rounds=3 if slow_cpu else 10, warmup_rounds=1)
    if device == "cuda":
        benchmark.extra_info["peak_extra_memory_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
