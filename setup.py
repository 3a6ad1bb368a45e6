"""Builds the compiled ops, ``metamask_fast._C`` (metadata lives in pyproject.toml).

CPU kernels are always built. The CUDA kernels are added when a CUDA toolkit is found, unless
``METAMASK_FAST_CUDA=0``; they target sm_90 (H100/H200) and carry compute_90 PTX for newer GPUs.
"""

import glob
import os

# torch.utils.cpp_extension resolves CUDA_HOME once, at import. Its guess from the nvcc on PATH can land on
# the wrong folder and then fail to link cudart, so point it at the conventional toolkit folder first.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# One compile job per core; ninja's own default (cores + 2) oversubscribes small machines.
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob("csrc/*.cpp"))
# ATen's at::parallel_for is a header-inlined OpenMP loop: without -fopenmp it compiles to a serial loop.
extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
if CUDA_HOME is not None and os.environ.get("METAMASK_FAST_CUDA", "1") != "0":
    extension = CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra_compile_args["nvcc"] = [
        "-O3",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
else:
    extension = CppExtension

setup(
    ext_modules=[
        extension("metamask_fast._C", sources, extra_compile_args=extra_compile_args, extra_link_args=["-fopenmp"])
    ],
    cmdclass={"build_ext": BuildExtension},
)
