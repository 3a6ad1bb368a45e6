"""Compile every Triton kernel of the fused loss for an H100/H200 (sm_90) without a GPU, as real launches
specialise them.

The host launchers of :mod:`metamask_fast.kernels.barlow_twins` run on CPU tensors of representative
shapes, strides and dtypes, with every kernel launch captured instead of run. Triton's own binder turns each
captured launch into what a real launch would compile: the signature, the constexprs (unit strides included)
and the attributes (16-divisible integers and 16-byte aligned pointers). Triton's compiler and ptxas then
build each distinct variant into an sm_90 cubin, so type errors, illegal shapes, unsupported dot precisions,
shared-memory overflows and register spills show up on a CPU-only machine. Run in a process without
``TRITON_INTERPRET`` (which would turn the kernels into interpreted functions):
``python tests/compile_kernels_for_gpu.py`` prints one line per variant and exits non-zero on a failure.
It also checks that batches of other sizes (a ragged last batch) reuse the variants of a full one.
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels_for_gpu.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from metamask_fast.kernels import barlow_twins as bt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H200_SHARED_MEMORY = 227 * 1024
# The backward kernels must not spill registers to local memory (contiguous inputs, every dtype).
NO_SPILLS = {"_cross_product_kernel", "_cross_apply_kernel", "_standardize_backward_sums_kernel",
             "_standardize_backward_kernel", "_gram_backward_kernel"}
BACKEND = make_backend(TARGET)
KERNELS = {name: kernel for name, kernel in vars(bt).items() if isinstance(kernel, JITFunction)
           and name.endswith("_kernel")}


def layouts(n, d, dtype):
    """(name, z_a, z_b) pairs of the layouts a caller can pass: contiguous, column-major, offset views."""
    def make(layout):
        if layout == "contiguous":
            return torch.empty(n, d, dtype=dtype)
        if layout == "column-major":
            return torch.empty(d, n, dtype=dtype).t()
        return torch.empty(n, d + 1, dtype=dtype)[:, 1:]  # 2 or 4 bytes in: not 16-byte aligned
    return [(layout, make(layout), make(layout)) for layout in ("contiguous", "column-major", "offset")]


def captured_launches(n, d, dtype, weighted, unbiased, layout):
    """Every kernel launch (kernel name, args, kwargs) of one forward and one backward."""
    launches = []

    def capture(name):
        def run(*args, grid, warmup, **kwargs):
            launches.append((name, args, kwargs))
        return run

    originals = {name: kernel.run for name, kernel in KERNELS.items()}
    try:
        for name, kernel in KERNELS.items():
            kernel.run = capture(name)
        (_, z_a, z_b), = [entry for entry in layouts(n, d, dtype) if entry[0] == layout]
        weight = torch.empty(d, dtype=dtype) if weighted else None
        loss, *saved = bt.barlow_twins_forward(z_a, z_b, weight, 5e-3, unbiased, 1e-5)
        bt.barlow_twins_backward(torch.ones(()), z_a, z_b, weight, 5e-3, unbiased, tuple(saved))
    finally:
        for name, kernel in KERNELS.items():
            kernel.run = originals[name]
    return launches


def variant(name, args, kwargs):
    """What a real launch of ``args`` compiles: (key, ASTSource, options)."""
    kernel = KERNELS[name]
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound, specialization, options)
    key = (name, str(specialization), str(options))
    return key, ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), options


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spilled bytes: stores + loads) of ``ptx`` for sm_90a, from ptxas -v."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", handle.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (shapes, dtypes, weighted, unbiased, layouts): every variant of both paths (N < D: Gram, N >= D: tiled C)
# at sizes that are multiples of 16, as a Linear layer's contiguous output gives them; sizes that are not,
# and the other layouts, for one dtype each.
CASES = [
    ([(256, 2048), (2048, 512)], ["fp32", "bf16", "fp16"], [False, True], [True, False], ["contiguous"]),
    ([(37, 70), (130, 97)], ["fp32"], [True], [True], ["contiguous"]),
    ([(256, 2048), (2048, 512)], ["bf16"], [True], [True], ["column-major", "offset"]),
]


def all_variants():
    found = {}
    for shapes, dtypes, weights, unbiased_modes, layout_names in CASES:
        for (n, d), dtype_name, weighted, unbiased, layout in itertools.product(
            shapes, dtypes, weights, unbiased_modes, layout_names
        ):
            for name, args, kwargs in captured_launches(n, d, DTYPES[dtype_name], weighted, unbiased, layout):
                key, source, options = variant(name, args, kwargs)
                if key not in found:
                    label = f"{name} {dtype_name} {'weight' if weighted else 'no-weight'} {layout} N{n}-D{d}"
                    found[key] = (label, source, options)
    return found


def ragged_batches_reuse_variants() -> list[str]:
    """Launch keys that a batch of N = 509 or 511 needs and N = 512 does not (should be none)."""
    def keys(n):
        return {variant(*launch)[0] for launch in captured_launches(n, 2048, torch.bfloat16, True, True, "contiguous")}
    full = keys(512)
    return sorted(str(key[:2]) for n in (509, 511) for key in keys(n) - full)


def main() -> int:
    failures = 0
    found = all_variants()
    for label, source, options in found.values():
        try:
            compiled = triton.compile(source, target=TARGET, options=options.__dict__)
            registers, spills = ptxas_report(compiled.asm["ptx"])
        except Exception as error:  # the compiler's own message is the diagnosis
            failures += 1
            print(f"FAIL {label}: {type(error).__name__}: {error}")
            continue
        shared = compiled.metadata.shared
        spills_forbidden = label.split()[0] in NO_SPILLS and " contiguous " in label
        status = "ok  " if shared <= H200_SHARED_MEMORY and not (spills and spills_forbidden) else "FAIL"
        failures += status == "FAIL"
        print(f"{status} {label}: {shared} bytes of shared memory, {registers} registers, {spills} bytes spilled")
    extra = ragged_batches_reuse_variants()
    if extra:
        failures += 1
        print(f"FAIL a ragged batch compiles {len(extra)} more variants: {extra}")
    print(f"{len(found)} variants, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
