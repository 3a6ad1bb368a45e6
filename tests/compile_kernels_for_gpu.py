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

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from metamask_fast.kernels import barlow_twins as bt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H200_SHARED_MEMORY = 227 * 1024
# Pointers of the input dtype (the embeddings, the weight, the gradient written for them); the rest are
# float32 work buffers. Scalars are i32 unless listed as float; k arrives as an int, lambd and eps as floats.
INPUT_POINTERS = {"za_ptr", "zb_ptr", "z_ptr", "z_self_ptr", "z_other_ptr", "w_ptr", "grad_z_ptr"}
FLOAT_SCALARS = {"eps", "lambd", "inv_n2"}

# Every constexpr variant the launchers use, per kernel (HAS_WEIGHT and the dot precision are added below).
KERNELS = [
    (bt._column_stats_kernel, dict(UNBIASED=unbiased, BLOCK_N=bt.STATS_BLOCK_N, BLOCK_D=bt.STATS_BLOCK_D))
    for unbiased in (True, False)
] + [
    (bt._gram_kernel, dict(BLOCK_M=bt.GRAM_BLOCK_M, BLOCK_K=bt.GRAM_BLOCK_K)),
    (bt._gram_backward_kernel,
     dict(BLOCK_M=bt.GRAM_BWD_BLOCK_M, BLOCK_D=bt.GRAM_BWD_BLOCK_D, BLOCK_K=bt.GRAM_BWD_BLOCK_K)),
    (bt._cross_corr_sq_kernel, dict(BLOCK_D=bt.CORR_BLOCK_D, BLOCK_N=bt.CORR_BLOCK_N)),
    (bt._cross_corr_backward_kernel,
     dict(BLOCK_I=bt.CORR_BWD_BLOCK_I, BLOCK_J=bt.CORR_BWD_BLOCK_J, BLOCK_N=bt.CORR_BWD_BLOCK_N)),
] + [
    (bt._standardize_backward_kernel,
     dict(ADD_TO_GRAD_W=add, BLOCK_N=bt.STATS_BLOCK_N, BLOCK_D=bt.STATS_BLOCK_D))
    for add in (False, True)
]
# Kernels that take no weight and no dtype-dependent pointer: one variant each.
PLAIN_KERNELS = [
    (bt._gram_finish_kernel, dict(BLOCK=bt.FINISH_BLOCK)),
    (bt._loss_kernel, dict(BLOCK=bt.LOSS_BLOCK)),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def variants():
    """(label, kernel, constexprs, dtype) for every variant a launch can ask for."""
    for (kernel, constexprs), dtype, weighted in itertools.product(KERNELS, DTYPES, [False, True]):
        constexprs = dict(constexprs, HAS_WEIGHT=weighted)
        if "DOT_PRECISION" in kernel.arg_names:
            constexprs["DOT_PRECISION"] = bt.dot_precision(DTYPES[dtype])
        flags = " ".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("BLOCK"))
        yield f"{kernel.__name__} {dtype} {flags}", kernel, constexprs, dtype
    for kernel, constexprs in PLAIN_KERNELS:
        yield kernel.__name__, kernel, constexprs, "fp32"


def main() -> int:
    failures = 0
    for label, kernel, constexprs, dtype in variants():
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
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
