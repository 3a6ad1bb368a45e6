"""The fused Triton Barlow Twins loss against the float64 transcription of SPEC §1 (``test_functional``).

Without a GPU the kernels run on CPU tensors in Triton's interpreter: ``TRITON_INTERPRET=1`` is set by
tests/conftest.py before Triton is first imported (and again below, for a run of this file from elsewhere). Every test here runs the
Triton path itself; the ones that need a GPU say so and skip cleanly without one.
"""

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_functional import reference_barlow_twins  # noqa: E402  (one oracle for both backends)

from metamask_fast import _fused_loss  # noqa: E402
from metamask_fast.functional import barlow_twins_loss, nt_xent_loss  # noqa: E402
from metamask_fast.kernels import barlow_twins as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Odd shapes: both paths (N < D: Gram, N >= D: tiled C), ragged tiles, a split Gram reduction (20, 600),
# several C tiles (130, 97) and tiny matrices. (N = 2 has its own test: its gradient is exactly zero.)
SHAPES = [(37, 70), (64, 33), (5, 129), (20, 600), (130, 97), (3, 2)]
UPSTREAM = -1.7

_INPUTS = torch.Generator().manual_seed(3)


def inputs(shape, dtype=torch.float32, weighted=False):
    """Correlated views with offsets and scales (so the standardisation matters) and an optional weight."""
    n, d = shape
    z_a = torch.randn(n, d, generator=_INPUTS, dtype=torch.float64) * 2 + 0.7
    z_b = 0.6 * z_a + torch.randn(n, d, generator=_INPUTS, dtype=torch.float64)
    weight = torch.rand(d, generator=_INPUTS, dtype=torch.float64) + 0.2 if weighted else None
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(z_a), cast(z_b), cast(weight)


def float64_reference(z_a, z_b, weight, lambd, normalize, upstream=UPSTREAM):
    """Loss and gradients of the transcription, in float64 on the CPU, from the very same input values."""
    given = (z_a, z_b) + ((weight,) if weight is not None else ())
    leaves = [t.detach().cpu().double().requires_grad_() for t in given]
    loss = reference_barlow_twins(leaves[0], leaves[1], lambd, leaves[2] if weight is not None else None, normalize)
    return loss.detach(), torch.autograd.grad(loss * upstream, leaves)


def relative_error(got, want):
    return ((got.detach().cpu().double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def triton_loss_and_grads(z_a, z_b, weight, lambd, normalize, upstream=UPSTREAM):
    # detach() keeps the strides (clone() would make a strided view contiguous).
    leaves = [t.detach().requires_grad_() for t in (z_a, z_b) + ((weight,) if weight is not None else ())]
    loss = barlow_twins_loss(
        leaves[0], leaves[1], lambd, weight=leaves[2] if weight is not None else None,
        normalize=normalize, backend="triton",
    )
    assert "barlow_twins_fused" in type(loss.grad_fn).__name__ or "barlow_twins_fused" in str(
        loss.grad_fn.next_functions
    ), "the Triton op was not called"
    return loss, torch.autograd.grad(loss * upstream, leaves)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
@pytest.mark.parametrize("normalize", ["std", "bn"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
def test_triton_loss_and_gradients_match_float64(shape, normalize, weighted):
    z_a, z_b, weight = inputs(shape, weighted=weighted)
    lambd = 0.0137
    loss, grads = triton_loss_and_grads(z_a, z_b, weight, lambd, normalize)
    want_loss, want_grads = float64_reference(z_a, z_b, weight, lambd, normalize)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert relative_error(loss, want_loss) <= 1e-4
    for name, got, want in zip(["z_a", "z_b", "weight"], grads, want_grads):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert relative_error(got, want) <= 1e-4, name


@pytest.mark.parametrize("shape", [(37, 70), (64, 33)], ids=["N37-D70", "N64-D33"])
@pytest.mark.parametrize("gram", [True, False], ids=["gram-path", "tiled-C-path"])
def test_both_paths_on_the_same_shape(shape, gram):
    # The op picks the path by shape; the host functions take it forced, so each path meets both regimes.
    z_a, z_b, weight = inputs(shape, weighted=True)
    loss, *saved = kernels.barlow_twins_forward(z_a, z_b, weight, 5e-3, True, 1e-5, gram=gram)
    assert (saved[-1].numel() > 0) == gram
    upstream = torch.tensor(UPSTREAM, device=DEVICE)
    grads = kernels.barlow_twins_backward(upstream, z_a, z_b, weight, 5e-3, True, tuple(saved))
    want_loss, want_grads = float64_reference(z_a, z_b, weight, 5e-3, "std")
    assert relative_error(loss, want_loss) <= 1e-4
    for got, want in zip(grads, want_grads):
        assert relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("normalize", ["std", "bn"])
@pytest.mark.parametrize("offset", [0.7, 300.0], ids=["offset0.7", "offset300"])
def test_row_splits_match_float64(normalize, offset):
    # N = 2600 over D = 40: the column statistics, the tiled backward's bᵀa and the standardisation's
    # backward each split the rows into 5 slices (the last one shorter) and combine them; with a mean 300
    # times the spread, Chan's combination of the slices' centred moments must not cancel.
    generator = torch.Generator().manual_seed(8)
    z_a = torch.randn(2600, 40, generator=generator, dtype=torch.float64) + offset
    z_b = 0.5 * z_a + torch.randn(2600, 40, generator=generator, dtype=torch.float64)
    weight = torch.rand(40, generator=generator, dtype=torch.float64) + 0.2
    z_a, z_b, weight = (t.to(device=DEVICE, dtype=torch.float32) for t in (z_a, z_b, weight))
    assert kernels._row_splits(2600, 1, kernels.STATS_BLOCK_N) == (5, 576)
    loss, grads = triton_loss_and_grads(z_a, z_b, weight, 5e-3, normalize)
    want_loss, want_grads = float64_reference(z_a, z_b, weight, 5e-3, normalize)
    assert relative_error(loss, want_loss) <= 1e-4
    for got, want in zip(grads, want_grads):
        assert relative_error(got, want) <= 1e-4


# Half precision: the inputs are rounded, the arithmetic is float32, the outputs are rounded back.
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE), ids=str)
@pytest.mark.parametrize("shape", [(37, 70), (64, 33)], ids=["N37-D70", "N64-D33"])
def test_half_precision_inputs(dtype, shape):
    z_a, z_b, weight = inputs(shape, dtype=dtype, weighted=True)
    loss, grads = triton_loss_and_grads(z_a, z_b, weight, 5e-3, "bn")
    want_loss, want_grads = float64_reference(z_a, z_b, weight, 5e-3, "bn")
    assert loss.dtype == dtype
    assert relative_error(loss, want_loss) <= HALF_TOLERANCE[dtype]
    for got, want in zip(grads, want_grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert relative_error(got, want) <= HALF_TOLERANCE[dtype]


def _tf32_truncated(x):
    return (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _tf32_rounded(x):  # cvt.rna.tf32.f32: to nearest, ties away from zero
    return ((x.astype(np.float32).view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def hardware_dot(interpreter_dot):
    """The interpreter's ``tl.dot`` replaced by what sm_90 tensor cores compute from float32 operands:
    ``"tf32"`` truncates both operands to TF32 (``wgmma .tf32`` drops the low 13 mantissa bits), ``"tf32x3"``
    sums ``big·big + big·small + small·big`` of operands split by round-to-nearest; float32 accumulation.
    The interpreter itself computes every float32 dot exactly."""
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle

    def dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        x, y = a.data, b.data
        if x.dtype != np.float32 or input_precision == ir.INPUT_PRECISION.IEEE:
            return interpreter_dot(self, a, b, acc, input_precision, max_num_imprecise_acc)
        if input_precision == ir.INPUT_PRECISION.TF32:
            product = np.matmul(_tf32_truncated(x), _tf32_truncated(y), dtype=np.float32)
        else:
            x_big, y_big = _tf32_rounded(x), _tf32_rounded(y)
            x_small, y_small = _tf32_rounded(x - x_big), _tf32_rounded(y - y_big)
            product = sum(np.matmul(p, q, dtype=np.float32) for p, q in ((x_big, y_small), (x_small, y_big),
                                                                          (x_big, y_big)))
        return TensorHandle(product + acc.data, acc.dtype.scalar)

    return dot


# Converged views (C ≈ I, the regime where truncation hurt most), N ≫ D (tiled C path) and N < D (Gram path).
HARDWARE_CASES = [(torch.float16, (512, 64)), (torch.bfloat16, (1024, 32)), (torch.float16, (40, 96)),
                  (torch.bfloat16, (48, 160)), (torch.float32, (512, 64)), (torch.float32, (48, 160))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="emulates the GPU's dot in Triton's interpreter")
@pytest.mark.parametrize("dtype, shape", HARDWARE_CASES, ids=[f"{d}-N{n}-D{k}".replace("torch.", "")
                                                              for d, (n, k) in HARDWARE_CASES])
def test_loss_and_gradients_under_the_hardware_dot(dtype, shape, monkeypatch):
    # Before operands were rounded, truncation gave losses 1.8e-3 to 4.6e-2 low here (float32 arithmetic
    # otherwise exact to ~1e-6) and gradients up to 7 times the exact dot's error.
    from triton.runtime.interpreter import InterpreterBuilder

    n, d = shape
    generator = torch.Generator().manual_seed(11)
    z_a = torch.randn(n, d, generator=generator, dtype=torch.float64)
    z_b = (z_a + 0.05 * torch.randn(n, d, generator=generator, dtype=torch.float64)).to(dtype)
    z_a = z_a.to(dtype)
    want_loss, want_grads = float64_reference(z_a, z_b, None, 5e-3, "std", upstream=1.0)

    def run():
        loss, *saved = kernels.barlow_twins_forward(z_a, z_b, None, 5e-3, True, 1e-5)  # the float32 loss
        grads = kernels.barlow_twins_backward(torch.tensor(1.0), z_a, z_b, None, 5e-3, True, tuple(saved))[:2]
        return relative_error(loss, want_loss), [relative_error(g, w) for g, w in zip(grads, want_grads)]

    exact_loss, exact_grads = run()
    monkeypatch.setattr(InterpreterBuilder, "create_dot", hardware_dot(InterpreterBuilder.create_dot))
    loss_error, grad_errors = run()
    assert loss_error <= (1e-6 if dtype == torch.float32 else 5e-4), (loss_error, exact_loss)
    for error, exact in zip(grad_errors, exact_grads):
        assert error <= 1.1 * exact + 1e-6, (error, exact)


@pytest.mark.parametrize("shape", [(37, 70), (64, 33)], ids=["N37-D70", "N64-D33"])
def test_strided_inputs(shape):
    # Every-other column of a wider matrix and a column-major (transposed) matrix: the kernels take strides.
    n, d = shape
    wide, _, weight = inputs((n, 2 * d), weighted=True)
    z_a = wide[:, ::2]
    z_b = inputs((d, n))[0].T
    weight = weight[::2]
    assert not z_a.is_contiguous() and not z_b.is_contiguous() and not weight.is_contiguous()
    loss, grads = triton_loss_and_grads(z_a, z_b, weight, 5e-3, "std")
    want_loss, want_grads = float64_reference(z_a, z_b, weight, 5e-3, "std")
    assert relative_error(loss, want_loss) <= 1e-4
    for got, want in zip(grads, want_grads):
        assert relative_error(got, want) <= 1e-4


def test_two_samples():
    # With N = 2 every standardised column is ±1/√2 whatever the input, so the gradient is zero.
    z_a, z_b, weight = inputs((2, 5), weighted=True)
    loss, grads = triton_loss_and_grads(z_a, z_b, weight, 5e-3, "std")
    want_loss, want_grads = float64_reference(z_a, z_b, weight, 5e-3, "std")
    assert relative_error(loss, want_loss) <= 1e-4
    assert want_grads[0].abs().max() < 1e-12
    for got in grads[:2]:
        assert got.abs().max() <= 1e-5
    assert relative_error(grads[2], want_grads[2]) <= 1e-4


@pytest.mark.parametrize("shape", [(37, 70), (20, 600), (64, 33)], ids=["gram", "gram-split", "tiled-C"])
def test_deterministic(shape):
    # Every sum has a fixed order (no atomics): bitwise equal results, which matters on a GPU.
    z_a, z_b, weight = inputs(shape, weighted=True)
    first = triton_loss_and_grads(z_a, z_b, weight, 5e-3, "std")
    second = triton_loss_and_grads(z_a, z_b, weight, 5e-3, "std")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("shape", [(37, 70), (64, 33)], ids=["N37-D70", "N64-D33"])
def test_torch_compile_fullgraph(shape):
    z_a, z_b, weight = inputs(shape, weighted=True)
    # Inductor on a GPU; on the CPU the interpreted kernels run under the graph that aot_eager traces.
    compiled = torch.compile(
        lambda a, b, w: barlow_twins_loss(a, b, weight=w, backend="triton") * UPSTREAM,
        fullgraph=True,
        backend="inductor" if DEVICE == "cuda" else "aot_eager",
    )
    leaves = [t.clone().requires_grad_() for t in (z_a, z_b, weight)]
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want_loss, want_grads = float64_reference(z_a, z_b, weight, 5e-3, "std")
    assert relative_error(got, want_loss * UPSTREAM) <= 1e-4
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g, w) <= 1e-4


@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
def test_opcheck(weighted):
    for shape, unbiased in [((37, 70), True), ((64, 33), False)]:
        z_a, z_b, weight = inputs(shape, weighted=weighted)
        args = (z_a.requires_grad_(), z_b.requires_grad_(), weight, 5e-3, unbiased, 1e-5)
        torch.library.opcheck(_fused_loss.barlow_twins_fused, args)
        saved = _fused_loss.barlow_twins_fused(*args)[1:]
        upstream = torch.tensor(UPSTREAM, device=DEVICE)
        backward_args = (upstream, z_a.detach(), z_b.detach(), weight, 5e-3, unbiased, *saved)
        torch.library.opcheck(_fused_loss.barlow_twins_fused_backward, backward_args)


def test_auto_uses_triton_only_on_cuda(monkeypatch):
    z_a, z_b, _ = inputs((37, 70))
    calls = []
    real = _fused_loss.barlow_twins_fused
    monkeypatch.setattr(_fused_loss, "barlow_twins_fused", lambda *a: calls.append(1) or real(*a))
    barlow_twins_loss(z_a, z_b, backend="auto")
    assert calls == ([1] if DEVICE == "cuda" else [])
    monkeypatch.setenv("METAMASK_FAST_BACKEND", "triton")
    barlow_twins_loss(z_a, z_b)
    assert len(calls) == (2 if DEVICE == "cuda" else 1)
    # NT-Xent has no Triton kernel: the environment's preference leaves it on PyTorch.
    assert torch.isfinite(nt_xent_loss(z_a, z_b))


def test_bad_input_on_the_triton_backend():
    z = inputs((4, 3))[0]
    with pytest.raises(TypeError, match="z_a: backend='triton'.*float64"):
        barlow_twins_loss(z.double(), z.double(), backend="triton")
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(z[:1], z[:1], backend="triton")
    with pytest.raises(ValueError, match="dimension"):
        barlow_twins_loss(z[:, :0], z[:, :0], backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        barlow_twins_loss(z, z.half(), backend="triton")
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(z, z[:, :2], backend="triton")
    with pytest.raises(ValueError, match="weight"):
        barlow_twins_loss(z, z, weight=torch.ones(4, device=DEVICE), backend="triton")
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        nt_xent_loss(z, z, backend="triton")
    for name, bad in [("z_a", torch.tensor(float("nan"))), ("z_b", torch.tensor(float("-inf")))]:
        z_a, z_b = z.clone(), z.clone()
        (z_a if name == "z_a" else z_b)[1, 2] = bad
        with pytest.raises(ValueError, match=f"{name} contains non-finite"):
            barlow_twins_loss(z_a, z_b, backend="triton")
    weight = torch.ones(3, device=DEVICE)
    weight[0] = float("inf")
    with pytest.raises(ValueError, match="weight contains non-finite"):
        barlow_twins_loss(z, z + 1, weight=weight, backend="triton")


def test_double_backward_is_a_clear_error():
    z_a, z_b, _ = inputs((37, 70))
    z_a.requires_grad_()
    (grad,) = torch.autograd.grad(barlow_twins_loss(z_a, z_b, backend="triton"), z_a, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad.square().sum().backward()


def test_torch_compile_dynamic_shapes():
    # dynamic=True makes the shapes and the float arguments symbolic; two shapes, one graph.
    compiled = torch.compile(
        lambda a, b, lambd: barlow_twins_loss(a, b, lambd, backend="triton"), fullgraph=True, dynamic=True,
        backend="inductor" if DEVICE == "cuda" else "aot_eager",
    )
    for shape, lambd in [((37, 70), 5e-3), ((41, 75), 0.02)]:
        z_a, z_b, _ = inputs(shape)
        want, _ = float64_reference(z_a, z_b, None, lambd, "std")
        assert relative_error(compiled(z_a, z_b, lambd), want) <= 1e-4


def test_cpu_tensor_without_interpreter_is_a_clear_error(tmp_path):
    # A fresh process without TRITON_INTERPRET: the kernels are compiled ones, which cannot take CPU tensors.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from metamask_fast.functional import barlow_twins_loss\n"
        "try:\n"
        "    barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    # From another folder, so that the installed package is imported, not a source checkout.
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "backend='triton' cannot run" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


@needs_gpu
@pytest.mark.parametrize("shape", [(512, 2048), (256, 4096), (1100, 300)], ids=lambda s: f"N{s[0]}-D{s[1]}")
def test_gpu_real_sizes_match_float64(shape):
    z_a, z_b, weight = inputs(shape, weighted=True)
    loss, grads = triton_loss_and_grads(z_a, z_b, weight, 5e-3, "std")
    want_loss, want_grads = float64_reference(z_a, z_b, weight, 5e-3, "std")
    assert relative_error(loss, want_loss) <= 1e-4
    for got, want in zip(grads, want_grads):
        assert relative_error(got, want) <= 1e-4


@needs_gpu
def test_gpu_peak_memory_has_no_d_by_d_tensor():
    n, d = 512, 8192
    z_a, z_b, _ = inputs((n, d))
    z_a.requires_grad_()
    z_b.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    barlow_twins_loss(z_a, z_b, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < d * d * 4 / 4, f"{extra / 2**20:.1f} MB: as much as a quarter of a D × D float32 matrix"


def test_kernels_compile_for_the_h200():
    # Triton's compiler and ptxas run without a GPU: the interpreter above checks the math, this checks
    # that every kernel variant a real launch asks for (each dtype, with and without weight, the integer
    # and pointer specialisations of real arguments) becomes an sm_90 cubin within shared memory, that the
    # backward kernels do not spill registers, and that a ragged last batch compiles nothing new.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_kernels_for_gpu.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    variants = int(out.stdout.splitlines()[-1].split()[0])
    assert out.stdout.endswith(f"{variants} variants, 0 failures\n") and out.stdout.count("ok   ") == variants
    assert variants >= 80  # every kernel, dtype, weight and specialisation the launchers ask for


class _RecordedKernel:
    """Stands in for a kernel: records the grid of each launch instead of running it."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append((self.name, math.prod(grid)))


@pytest.mark.parametrize("shape", [(65536, 256), (16384, 512)], ids=["N65536-D256", "N16384-D512"])
def test_row_reducing_kernels_fill_an_h100(shape, monkeypatch):
    # The column statistics and the standardisation's backward used to launch cdiv(D, 64) programs over
    # all N (N = 65,536, D = 256: 4 programs), the tiled path's forward (D / 64)² (16) and its backward
    # cdiv(D, 32) (D = 512: 16), on a GPU of 132 streaming multiprocessors. The kernels that reduce over
    # the rows now split them.
    grids = []
    for name, kernel in vars(kernels).items():
        if name.endswith("_kernel") and hasattr(kernel, "__getitem__"):
            monkeypatch.setattr(kernels, name, _RecordedKernel(name, grids))
    n, d = shape
    z_a, z_b = torch.empty(n, d), torch.empty(n, d)
    loss, *saved = kernels.barlow_twins_forward(z_a, z_b, None, 5e-3, True, 1e-5)
    kernels.barlow_twins_backward(torch.ones(()), z_a, z_b, None, 5e-3, True, tuple(saved))
    busy = {"_column_stats_kernel", "_standardize_backward_sums_kernel", "_standardize_backward_kernel",
            "_cross_product_kernel", "_cross_apply_kernel"}
    assert busy <= {name for name, _ in grids}
    for name, programs in grids:
        if name in busy:
            assert programs >= 132, (name, programs)


def test_kernels_launch_inside_the_tensors_device(monkeypatch):
    # Triton launches on the current CUDA device: forward and backward must make the tensors' device
    # current around their launches (without a guard, cuda:1 tensors under a current cuda:0 crash).
    entered, active = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        entered.append(device)
        active.append(device)
        yield
        active.pop()

    def launched_inside(launcher):
        def launch(z_a, *args):
            assert active == [z_a.device], (active, z_a.device)
            return launcher(z_a, *args)
        return launch

    monkeypatch.setattr(_fused_loss, "_launch_device", recording_guard)
    monkeypatch.setattr(kernels, "barlow_twins_forward", launched_inside(kernels.barlow_twins_forward))
    real_backward = kernels.barlow_twins_backward
    monkeypatch.setattr(kernels, "barlow_twins_backward",
                        lambda grad, z_a, *args: launched_inside(lambda *a: real_backward(grad, *a))(z_a, *args))
    z_a, z_b, weight = inputs((37, 70), weighted=True)
    triton_loss_and_grads(z_a, z_b, weight, 5e-3, "std")
    assert entered == [z_a.device, z_a.device] and active == []


def test_the_launch_guard_makes_a_cuda_device_current(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: made_current.append(device) or contextlib.nullcontext())
    with _fused_loss._launch_device(torch.device("cuda", 1)):
        pass
    with _fused_loss._launch_device(torch.device("cpu")):
        pass
    assert made_current == [torch.device("cuda", 1)]


def test_auto_never_picks_triton_on_rocm(monkeypatch):
    # AMD's Triton backend rejects the float32 path's tf32x3 dots, and "auto" promises never to fail.
    from metamask_fast.functional import _triton_problem

    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    problem = _triton_problem(torch.device("cuda", 0))
    assert problem is not None and "ROCm" in problem


def test_metamask_step_on_the_triton_loss(monkeypatch):
    # The training step picks its loss backend like any caller: forced to Triton through the environment,
    # two float32 steps give the weights and mask of the PyTorch path (the BT head's gradients come from
    # the fused backward).
    import copy

    from torch import nn

    from metamask_fast.meta import MetaMaskStep
    from metamask_fast.models import MetaMaskModel

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(20, 11), nn.BatchNorm1d(11), nn.ReLU())
    reference = MetaMaskModel(backbone, 11, bt_dims=(19, 19, 23), cl_dims=(13, 7)).to(DEVICE)
    fused = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randn(9, 20, generator=g).to(DEVICE) for _ in range(2)) for _ in range(2)]

    def train(model, backend):
        monkeypatch.setenv("METAMASK_FAST_BACKEND", backend)
        network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
        step = MetaMaskStep(
            model,
            torch.optim.SGD(network, lr=0.05, momentum=0.9, weight_decay=5e-4),
            torch.optim.SGD([model.mask.logits], lr=0.05, momentum=0.9),
        )
        return [step.step(x0, x1)["loss_bt"] for x0, x1 in batches]

    calls = []
    real = _fused_loss.barlow_twins_fused
    monkeypatch.setattr(_fused_loss, "barlow_twins_fused", lambda *a: calls.append(1) or real(*a))
    losses_fused = train(fused, "triton")
    assert len(calls) == 2
    losses_reference = train(reference, "torch")
    assert losses_fused == pytest.approx(losses_reference, rel=1e-5)
    # All weights as one vector: some are analytically unchanged (the bias before the standardisation gets
    # a zero gradient), so their own relative error would be rounding over rounding.
    def flat(model):
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n != "mask.logits"])

    assert relative_error(flat(fused), flat(reference).cpu().double()) <= 1e-5
    assert relative_error(fused.mask.logits, reference.mask.logits.detach().cpu().double()) <= 1e-4
    assert not torch.equal(fused.mask.logits, torch.zeros_like(fused.mask.logits))
