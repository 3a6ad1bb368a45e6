"""Barlow Twins loss, forward + backward: the authors' D × D formulation against this package's paths.

Implementations, in one benchmark group per device, dtype and shape so the ratios of one run are side by
side (``python bench/report.py`` prints them against ``authors`` and ``authors_compiled``):

- ``authors``: :func:`baselines.authors_style.authors_barlow_twins_loss`, eager;
- ``authors_compiled``: the same function under ``torch.compile(dynamic=False)``, one graph per shape and
  dtype. Its boolean-mask scaling (``c_diff[~eye] *= lambd``) is data-dependent, so Dynamo compiles the
  standardisation, ``aᵀb`` and ``(C - I)²`` and runs the mask step and the sum eagerly (a graph break);
  that is what compiling the authors' code as written gives. The compile happens in an untimed warm-up call;
- ``reference``: ``barlow_twins_loss(..., backend="torch")``, the Gram / tiled-C path;
- ``triton`` (CUDA only): ``barlow_twins_loss(..., backend="triton")``, the fused Triton op.

CPU: float32 at (N, D) = (256, 2048), (512, 2048), (256, 8192), (2048, 2048). CUDA: those and (512, 8192)
in float32, the D = 8192 shapes also in bfloat16 (inputs created in bfloat16). On CUDA ``extra_info``
records ``peak_extra_memory_mb``: the peak of allocated memory during the measured calls above what was
allocated before them (the inputs), in MiB; the input gradients (2·N·D elements) are part of it.
"""

import pytest
import torch

from baselines.authors_style import authors_barlow_twins_loss
from metamask_fast.functional import barlow_twins_loss

CPU_SHAPES = [(256, 2048), (512, 2048), (256, 8192), (2048, 2048)]
CUDA_SHAPES = CPU_SHAPES + [(512, 8192)]
CUDA_BF16_SHAPES = [(256, 8192), (512, 8192)]
CASES = [("cpu", torch.float32, n, d) for n, d in CPU_SHAPES]
if torch.cuda.is_available():
    CASES += [("cuda", torch.float32, n, d) for n, d in CUDA_SHAPES]
    CASES += [("cuda", torch.bfloat16, n, d) for n, d in CUDA_BF16_SHAPES]
CASE_IDS = [f"{dev}-{str(dtype).removeprefix('torch.')}-N{n}-D{d}" for dev, dtype, n, d in CASES]

# One graph per (shape, dtype, device): up to 11 in one process, more than Dynamo's default limit of 8
# cache entries per function, past which it would silently run the function eagerly.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
_authors_compiled = torch.compile(authors_barlow_twins_loss, dynamic=False)

# Dynamo's failed attempt to compile the mask step's backward is reported as this warning, then it runs
# that step eagerly, as intended (see the module docstring).
pytestmark = pytest.mark.filterwarnings("ignore:Error detected in IndexPutBackward0:UserWarning")

IMPLEMENTATIONS = {
    "authors": authors_barlow_twins_loss,
    "authors_compiled": _authors_compiled,
    "reference": lambda a, b: barlow_twins_loss(a, b, backend="torch"),
    "triton": lambda a, b: barlow_twins_loss(a, b, backend="triton"),
}
CUDA_ONLY = {"triton"}


# On the GPU each compile costs tens of seconds of a short lease: the compiled baseline runs at the shape
# of the target only.
CUDA_COMPILED_SHAPES = {(512, 8192)}


def _params():
    for case, case_id in zip(CASES, CASE_IDS):
        device, _, n, d = case
        for impl in IMPLEMENTATIONS:
            if impl in CUDA_ONLY and device != "cuda":
                continue
            if impl == "authors_compiled" and device == "cuda" and (n, d) not in CUDA_COMPILED_SHAPES:
                continue
            yield pytest.param(impl, *case, id=f"{case_id}-{impl}")


@pytest.mark.parametrize("impl,device,dtype,n,d", list(_params()))
def test_barlow_twins_forward_backward(benchmark, impl, device, dtype, n, d):
    benchmark.group = f"barlow_twins fwd+bwd {device} {str(dtype).removeprefix('torch.')} N={n} D={d}"
    g = torch.Generator(device=device).manual_seed(0)
    z_a = torch.randn(n, d, device=device, dtype=dtype, generator=g, requires_grad=True)
    z_b = torch.randn(n, d, device=device, dtype=dtype, generator=g, requires_grad=True)
    loss_fn = IMPLEMENTATIONS[impl]

    def forward_backward():
        z_a.grad = z_b.grad = None
        loss_fn(z_a, z_b).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    # Untimed: the compile (and on CUDA any autotuning and the allocator's first growth).
    if impl == "authors_compiled" or device == "cuda":
        forward_backward()
        z_a.grad = z_b.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if device == "cpu":
        slow = impl.startswith("authors") and d > 4096  # several seconds a call
        benchmark.pedantic(forward_backward, rounds=3 if slow else 10, warmup_rounds=1)
    else:
        benchmark.pedantic(forward_backward, rounds=30, warmup_rounds=2)
    if device == "cuda":
        benchmark.extra_info["peak_extra_memory_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
