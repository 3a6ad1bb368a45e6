"""Builds the compiled ops, ``metamask_fast._C`` (metadata lives in pyproject.toml).

CPU kernels are always built. The CUDA kernels are added when a CUDA toolkit is found, unless
``METAMASK_FAST_CUDA=0``; they target sm_90 (H100/H200) and carry compute_90 PTX for newer GPUs. Beside
``_C`` the build writes its record (``metamask_fast/_build_info.json``: the fingerprint of the sources it
was made from, see ``metamask_fast/_build.py``), by which a source checkout recognises its own build.
"""

import datetime
import glob
import importlib.util
import json
import os
import sys
from pathlib import Path

# torch.utils.cpp_extension resolves CUDA_HOME once, at import. Its guess from the nvcc on PATH can land on
# the wrong folder and then fail to link cudart, so point it at the conventional toolkit folder first.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# One compile job per core; ninja's own default (cores + 2) oversubscribes small machines.
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).resolve().parent


def _load_build_module():
    """metamask_fast/_build.py on its own (importing the package would look for this very build)."""
    spec = importlib.util.spec_from_file_location("_metamask_fast_build", ROOT / "metamask_fast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


sources = sorted(glob.glob("csrc/*.cpp"))
# ATen's at::parallel_for is a header-inlined OpenMP loop: without -fopenmp it compiles to a serial loop.
# -ffp-contract=off here and --fmad=false below: no contraction of a + b*c into one fused multiply-add. The
# kernels promise the arithmetic of the PyTorch fallbacks operation for operation (each product and sum
# rounded), so the CPU and CUDA kernels agree bitwise; GCC contracts by default on FMA targets, nvcc always.
# -fno-math-errno and -fno-trapping-math: sqrt, and divisions whose result is selected away, may then
# vectorise (no errno to set, no floating-point trap to preserve); every result stays the same correctly
# rounded one (neither flag reorders or contracts arithmetic).
extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]}
if CUDA_HOME is not None and os.environ.get("METAMASK_FAST_CUDA", "1") != "0":
    extension = CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra_compile_args["nvcc"] = [
        "-O3",
        "--fmad=false",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
else:
    extension = CppExtension


class BuildExtensionWithRecord(BuildExtension):
    """torch's BuildExtension, then the build record beside ``_C`` (not for in-place builds: a checkout's
    own folder is never taken for an installed package)."""

    def run(self):
        super().run()
        if self.inplace:
            return
        build = _load_build_module()
        sources = build.source_fingerprint(ROOT)
        record = {
            "fingerprint": build.combined(sources),
            "sources": sources,
            "version": self.distribution.get_version(),
            "torch": torch.__version__,
            "cuda_kernels": extension is CUDAExtension,
            "cuda_toolkit": CUDA_HOME if extension is CUDAExtension else None,
            "cxx_flags": extra_compile_args["cxx"],
            "nvcc_flags": extra_compile_args.get("nvcc"),
            "built_from": str(ROOT),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        path = Path(self.build_lib) / "metamask_fast" / build.RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


setup(
    ext_modules=[
        extension("metamask_fast._C", sources, extra_compile_args=extra_compile_args, extra_link_args=["-fopenmp"])
    ],
    cmdclass={"build_ext": BuildExtensionWithRecord},
)
