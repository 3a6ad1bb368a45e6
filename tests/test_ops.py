"""Tests of metamask_fast.ops.global_norm on both paths: the compiled op and the PyTorch fallback.

The compiled-op tests skip, with the import error as the reason, only when metamask_fast._C cannot be
loaded (or METAMASK_FAST_NO_EXT=1); the fallback and wrapper tests always run.
"""

import os
import subprocess
import sys

import pytest
import torch

from metamask_fast import ops

requires_extension = pytest.mark.skipif(
    not ops.HAS_EXTENSION, reason=f"metamask_fast._C not loaded ({ops._EXTENSION_ERROR})"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def compiled(tensors):
    return torch.ops.metamask_fast.global_norm.default(list(tensors))


IMPLS = [
    pytest.param(compiled, marks=requires_extension, id="compiled"),
    pytest.param(ops._global_norm_torch, id="fallback"),
    pytest.param(ops.global_norm, id="wrapper"),
]
# Relative tolerances that float32 accumulation (CUDA kernel, fallbacks) meets for the inputs below.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def odd_tensors(dtype, seed, device="cpu"):
    """Tensors of awkward shapes, scales and strides; 200k elements span several kernel chunks."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    base = randn(9, 40)
    return [
        randn(37) * 1e3,
        randn(5, 7),
        randn(3, 1, 129) * 1e-2,
        randn(0),
        randn(200_000),
        base.t(),  # transposed
        base[::2, 3:],  # sliced
        randn(3, 1).expand(3, 50),  # stride 0
    ]


def reference(tensors):
    return torch.cat([t.detach().double().flatten() for t in tensors]).norm()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(impl, dtype, seed):
    tensors = odd_tensors(dtype, seed)
    out = impl(tensors)
    assert out.shape == () and out.dtype == dtype and out.device == tensors[0].device
    torch.testing.assert_close(out.double(), reference(tensors), rtol=TOLERANCE[dtype], atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_and_empty_tensors(impl):
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(impl([x]), x.norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(impl((x, torch.empty(0, 3, dtype=torch.float64))), x.norm(), rtol=1e-12, atol=0)
    zero = impl([torch.empty(0), torch.empty(2, 0)])
    assert zero.item() == 0.0 and zero.dtype == torch.float32


@requires_extension
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_cpu_rounds_once(seed):
    """The CPU kernel accumulates in float64, so a float32 result is the exact norm rounded to float32."""
    tensors = odd_tensors(torch.float32, seed)
    torch.testing.assert_close(compiled(tensors).double(), reference(tensors), rtol=2**-24, atol=0)


@requires_extension
def test_compiled_is_deterministic_across_thread_counts():
    tensors = odd_tensors(torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = compiled(tensors)
        torch.set_num_threads(max(2, threads))
        parallel = [compiled(tensors) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for out in parallel:
        assert torch.equal(out, serial)


@requires_extension
def test_wrapper_runs_compiled_op(monkeypatch):
    def fail(tensors):
        raise AssertionError("the fallback ran although the extension is loaded")

    monkeypatch.setattr(ops, "_global_norm_torch", fail)
    tensors = odd_tensors(torch.float32, seed=4)
    assert torch.equal(ops.global_norm(tensors), compiled(tensors))


def test_wrapper_falls_back_without_extension(monkeypatch):
    calls = []

    def spy(tensors):
        calls.append(tensors)
        return torch.zeros(())

    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    monkeypatch.setattr(ops, "_global_norm_torch", spy)
    ops.global_norm((torch.ones(2), torch.ones(3)))
    assert len(calls) == 1 and isinstance(calls[0], list)


@requires_extension
def test_extension_disabled_by_environment(tmp_path):
    # From an empty folder, so the package imported is the one this process uses, not a source tree.
    code = "import metamask_fast.ops as o; print(o.HAS_EXTENSION)"
    env = {k: v for k, v in os.environ.items() if k != "METAMASK_FAST_NO_EXT"}
    loaded = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, check=True,
                            capture_output=True, text=True)
    disabled = subprocess.run([sys.executable, "-c", code], env={**env, "METAMASK_FAST_NO_EXT": "1"},
                              cwd=tmp_path, check=True, capture_output=True, text=True)
    assert (loaded.stdout.strip(), disabled.stdout.strip()) == ("True", "False")


# ---------------------------------------------------------------------------------------------------------
# autograd and torch.library registrations


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    g = torch.Generator().manual_seed(5)
    tensors = [
        torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 4, generator=g, dtype=torch.float64).t().requires_grad_(),
        torch.randn(0, dtype=torch.float64, requires_grad=True),
    ]

    def fn(*ts):
        return impl(list(ts))

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_at_zero_norm_is_zero(impl):
    tensors = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    impl(tensors).backward()
    for t in tensors:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_only_for_tensors_that_require_it(impl):
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64)
    norm = impl([a, b])
    norm.backward()
    torch.testing.assert_close(a.grad, a.detach() / norm.detach())
    assert b.grad is None


@requires_extension
@pytest.mark.parametrize(
    "make",
    [
        lambda: [torch.randn(5, requires_grad=True), torch.randn(2, 3).t().requires_grad_()],
        lambda: [torch.randn(4, 4, dtype=torch.float64), torch.empty(0, dtype=torch.float64)],
    ],
    ids=["requires_grad", "no_grad"],
)
def test_opcheck(make):
    torch.library.opcheck(torch.ops.metamask_fast.global_norm.default, (make(),))


@pytest.mark.parametrize("impl", [ops.global_norm, ops._global_norm_torch], ids=["wrapper", "fallback"])
def test_torch_compile_fullgraph(impl):
    tensors = [torch.randn(6), torch.randn(2, 5)]
    expected = impl(tensors)
    torch.testing.assert_close(torch.compile(impl, fullgraph=True, backend="aot_eager")(tensors), expected)


# ---------------------------------------------------------------------------------------------------------
# bad input: every error names `tensors`

BAD_INPUTS = {
    "not_a_list": (lambda: torch.ones(3), TypeError),
    "empty": (lambda: [], ValueError),
    "not_a_tensor": (lambda: [torch.ones(2), 3.0], TypeError),
    "integer": (lambda: [torch.ones(2, dtype=torch.int64)], TypeError),
    "complex": (lambda: [torch.ones(2, dtype=torch.complex64)], TypeError),
    "mixed_dtype": (lambda: [torch.ones(2), torch.ones(2, dtype=torch.float64)], ValueError),
    "mixed_device": (lambda: [torch.ones(2), torch.ones(2, device="meta")], ValueError),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_wrapper_rejects_bad_input(case):
    make, error = BAD_INPUTS[case]
    with pytest.raises(error, match="`tensors`"):
        ops.global_norm(make())


@requires_extension
@pytest.mark.parametrize("case", ["integer", "complex", "mixed_dtype", "mixed_device"])
def test_compiled_op_rejects_bad_input(case):
    """The C++ checks (and, for the meta tensor, the fake kernel) raise the same errors as the wrapper."""
    make, error = BAD_INPUTS[case]
    with pytest.raises(error, match="`tensors`"):
        compiled(make())


# ---------------------------------------------------------------------------------------------------------
# CUDA (runs on a GPU machine)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    cuda = odd_tensors(dtype, seed=6, device="cuda")
    cpu = [t.cpu() for t in cuda]
    for impl in (ops.global_norm, ops._global_norm_torch):
        out = impl(cuda)
        assert out.device == cuda[0].device and out.dtype == dtype and out.shape == ()
        torch.testing.assert_close(out.cpu().double(), reference(cpu), rtol=10 * TOLERANCE[dtype], atol=0)


@requires_cuda
@requires_extension
def test_cuda_compiled_op():
    if "cuda" not in ops._GLOBAL_NORM_DEVICES:
        pytest.skip("metamask_fast._C was built without CUDA kernels")
    cuda = odd_tensors(torch.float32, seed=7, device="cuda")
    cpu = [t.cpu() for t in cuda]
    out = compiled(cuda)
    torch.testing.assert_close(out.cpu().double(), reference(cpu), rtol=1e-5, atol=0)
    assert torch.equal(compiled(cuda), out)  # deterministic: no atomics
    assert compiled([torch.empty(0, device="cuda")]).item() == 0.0
    with pytest.raises(ValueError, match="`tensors`"):
        compiled([cuda[0], cpu[1]])
    grads = [torch.randn(3, 4, dtype=torch.float64, device="cuda", requires_grad=True)]
    assert torch.autograd.gradcheck(lambda t: compiled([t]), grads)
    torch.library.opcheck(torch.ops.metamask_fast.global_norm.default, ([t.requires_grad_() for t in cuda[:3]],))


# ---------------------------------------------------------------------------------------------------------
# The CUDA path: right over the whole range by itself, and no host sync


@requires_extension
def test_a_compiled_norm_off_the_cpu_reads_nothing_back(monkeypatch):
    # Meta tensors carry no values, so any read of the norm on the host (a range check: a sync on CUDA)
    # raises. Off the CPU the wrapper must hand the compiled op's result back as it is.
    monkeypatch.setattr(ops, "_GLOBAL_NORM_DEVICES", ops._GLOBAL_NORM_DEVICES | {"meta"})
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        tensors = [torch.empty(5, 3, device="meta", dtype=dtype), torch.empty(7, device="meta", dtype=dtype)]
        norm = ops.global_norm(tensors)
        assert norm.device.type == "meta" and norm.shape == () and norm.dtype == dtype


# Values whose squares leave float32 (1e20, 1e-23) or float64 (1e200, 1e-200, denormals): the op itself,
# through torch.ops and under torch.compile where no Python check runs, must still be right.
EXTREMES = [(torch.float32, 1e20), (torch.float32, 1e-23), (torch.float32, 1e-44), (torch.float64, 1e200),
            (torch.float64, 1e-200), (torch.float64, 1e-320), (torch.float64, 1e307), (torch.bfloat16, 1e30)]


@requires_cuda
@requires_extension
@pytest.mark.parametrize("dtype, value", EXTREMES, ids=[f"{d}-{v:g}".replace("torch.", "") for d, v in EXTREMES])
def test_cuda_op_is_right_at_the_ends_of_the_range(dtype, value):
    x = torch.full((4,), value, dtype=dtype, device="cuda")
    tensors = [x, torch.zeros(70_000, dtype=dtype, device="cuda"), x[:1]]  # several chunks
    want = torch.linalg.vector_norm(torch.cat([t.cpu().double().flatten() for t in tensors])).to(dtype)
    for norm in (compiled(tensors), torch.compile(ops.global_norm, fullgraph=True)(tensors)):
        assert norm.dtype == dtype and torch.isfinite(norm).item()
        assert norm.item() == pytest.approx(want.item(), rel=TOLERANCE[dtype])


@requires_cuda
@requires_extension
def test_cuda_op_propagates_inf_and_nan_next_to_huge_values():
    huge = torch.full((5,), 1e300, dtype=torch.float64, device="cuda")
    for special in (float("inf"), float("nan")):
        odd = torch.tensor([1.0, special], dtype=torch.float64, device="cuda")
        got = compiled([huge, torch.zeros(40_000, dtype=torch.float64, device="cuda"), odd]).item()
        assert (got == float("inf")) if special == float("inf") else (got != got)


@requires_cuda
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_wrapper_does_not_sync(dtype):
    tensors = odd_tensors(dtype, 3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.global_norm(tensors)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_fallback_recheck_copies_one_tensor_at_a_time(monkeypatch):
    # The recheck of an out-of-range norm (here 1e30 in float32) used to hold float64 copies of every tensor
    # at once; now at most one tensor's copy (and its scaled copy) at a time.
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    tensors = [torch.full((1 << 22,), 1e30 if i == 0 else 1.0, device="cuda") for i in range(8)]  # 16 MiB each
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    norm = ops.global_norm(tensors)
    extra = torch.cuda.max_memory_allocated() - before
    assert norm.item() == pytest.approx(1e30 * 2048, rel=1e-6)
    assert extra <= 3 * (1 << 22) * 8, extra  # two float64 copies of one tensor, not eight
