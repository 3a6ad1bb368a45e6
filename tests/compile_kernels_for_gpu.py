"""Compile every Triton kernel of the fused loss for an H100/H200 (sm_90) without a GPU.

Triton's own compiler and ptxas take the kernels from Python to a cubin, so type errors, illegal
shapes, unsupported dot precisions and shared-memory overflows show up on a CPU-only machine. Run in a
process without ``TRITON_INTERPRET`` (which would turn the kernels into interpreted functions):
``python tests/compile_kernels_for_gpu.py`` prints one line per kernel and exits non-zero on failure.
"""

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels_for_gpu.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from metamask_fast.kernels import barlow_twins as bt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H200_SHARED_MEMORY = 227 * 1024
INPUT_POINTERS = {"za_ptr", "zb_ptr", "z_self_ptr", "z_other_ptr", "w_ptr", "grad_za_ptr", "grad_zb_ptr"}
FLOAT_SCALARS = {"eps", "s", "k"}

KERNELS = {
    bt._column_stats_kernel: dict(UNBIASED=True, BLOCK_N=bt.STATS_BLOCK_N, BLOCK_D=bt.STATS_BLOCK_D),
    bt._gram_kernel: dict(BLOCK_M=bt.GRAM_BLOCK_M, BLOCK_K=bt.GRAM_BLOCK_K),
    bt._gram_backward_kernel: dict(
        BLOCK_M=bt.GRAM_BWD_BLOCK_M, BLOCK_D=bt.GRAM_BWD_BLOCK_D, BLOCK_K=bt.GRAM_BWD_BLOCK_K
    ),
    bt._cross_corr_sq_kernel: dict(BLOCK_D=bt.CORR_BLOCK_D, BLOCK_N=bt.CORR_BLOCK_N),
    bt._cross_corr_backward_kernel: dict(
        BLOCK_I=bt.CORR_BWD_BLOCK_I, BLOCK_J=bt.CORR_BWD_BLOCK_J, BLOCK_N=bt.CORR_BWD_BLOCK_N
    ),
    bt._standardize_backward_kernel: dict(BLOCK_N=bt.STATS_BLOCK_N, BLOCK_D=bt.STATS_BLOCK_D),
}


def signature(kernel, constexprs, dtype):
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INPUT_POINTERS:
            types[name] = "*" + dtype
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return types


def main() -> int:
    failures = 0
    cases = itertools.product(KERNELS.items(), ["fp32", "bf16", "fp16"], [False, True])
    for (kernel, constexprs), dtype, weighted in cases:
        constexprs = dict(constexprs, HAS_WEIGHT=weighted)
        label = f"{kernel.__name__} {dtype} {'weight' if weighted else 'no-weight'}"
        try:
            source = ASTSource(fn=kernel, signature=signature(kernel, constexprs, dtype), constexprs=constexprs)
            compiled = triton.compile(source, target=TARGET, options={"num_warps": 4})
        except Exception as error:  # the compiler's own message is the diagnosis
            failures += 1
            print(f"FAIL {label}: {type(error).__name__}: {error}")
            continue
        shared = compiled.metadata.shared
        if shared > H200_SHARED_MEMORY:
            failures += 1
            print(f"FAIL {label}: {shared} bytes of shared memory")
        else:
            print(f"ok   {label}: {shared} bytes of shared memory")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
