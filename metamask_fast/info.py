"""What this installation of metamask_fast runs on: ``python -m metamask_fast.info [--json]``.

Paste its output into bug reports. It lists the versions (metamask_fast, Python, torch, torchvision,
triton, the CUDA runtime torch ships and the driver), the build (where the Python code and the compiled
parts come from, the fingerprint of the sources the build was made from and whether it matches them), the
compiled ops (loaded or why not, their kernels per device type, the CPU loops picked), each device (CPU and
CUDA: name, compute capability, memory, whether the Triton loss can run there and which loss backend
``"auto"`` picks) and the environment switches in effect. A part that cannot be determined says why.

:func:`engine` is the short form every training run prints at its start and records in ``summary.json``
and its checkpoint.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

import torch

import metamask_fast
from metamask_fast import _build, ops
from metamask_fast.config import OneLineArgumentParser
from metamask_fast.functional import _triton_problem, bt_loss_backend

#: The environment variables that change what metamask_fast (or its build) does.
SWITCHES = (
    "METAMASK_FAST_NO_EXT",
    "METAMASK_FAST_BACKEND",
    "METAMASK_FAST_CUDA",
    "TRITON_INTERPRET",
    "CUDA_HOME",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
)
_OPS = ("global_norm", "add_scaled_", "add_scaled", "virtual_sgd_step")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver_version() -> str:
    """The CUDA driver's version, from the driver library itself (no GPU needs to be usable)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1" if sys.platform.startswith("linux") else "nvcuda.dll")
    except OSError:
        return "unknown: no CUDA driver (libcuda cannot be loaded)"
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return "unknown: cuDriverGetVersion failed"
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def versions() -> dict[str, str]:
    return {
        "metamask_fast": metamask_fast.__version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "torchvision": _package_version("torchvision"),
        "triton": _package_version("triton"),
        "cuda_runtime": torch.version.cuda or "none: this torch is a CPU build",
        "cuda_driver": _driver_version(),
    }


def build() -> dict:
    """Where the Python code and the compiled parts come from, and whether the build matches its sources."""
    status = _build.STATUS
    record = status.record or {}
    report = {
        "origin": status.origin,
        "package": status.package_dir,
        "compiled_parts_from": status.build_dir,
        "fingerprint": record.get("fingerprint"),
        "built_from": record.get("built_from"),
        "built_at": record.get("built_at"),
        "built_with_torch": record.get("torch"),
        "cuda_kernels_built": record.get("cuda_kernels"),
    }
    if status.origin == "installed":
        report["matches_sources"] = _installed_build_freshness(record)
    elif status.problem is None:
        report["matches_sources"] = "yes: this checkout's csrc/, kernels/ and setup.py are the ones it was built from"
    else:
        report["matches_sources"] = f"no: {status.problem}"
    return report


def _installed_build_freshness(record: dict) -> str:
    """An installed package is its own build; say also whether the checkout it was built from has moved on."""
    if not record:
        return "unknown: the installed package has no build record (installed by an older version)"
    source = Path(record.get("built_from") or "")
    if not all((source / part).exists() for part in _build.SOURCES):
        return f"yes (installed package; the checkout it was built from, {source}, is not here to compare)"
    changed = _build.changed_sources(record, source)
    if changed:
        return (f"yes for this installed package; the checkout it was built from ({source}) has changed since "
                f"({', '.join(changed)}): run `pip install .` there to use those changes")
    return f"yes (installed package; the checkout it was built from, {source}, is unchanged)"


def compiled_ops() -> dict:
    report: dict = {"loaded": ops.HAS_EXTENSION}
    if not ops.HAS_EXTENSION:
        report["why_not"] = ops._EXTENSION_ERROR
        return report
    from metamask_fast import _C

    report["from"] = _C.__file__
    report["kernels"] = {op: sorted(ops._kernel_devices(op)) for op in _OPS}
    report["cpu_loops"] = _C.cpu_loops() if hasattr(_C, "cpu_loops") else "unknown: this build does not report it"
    return report


def compiled_ops_on(device: torch.device) -> tuple[bool, str | None]:
    """Whether the meta step's sweeps run compiled kernels on ``device``, and why not."""
    if not ops.HAS_EXTENSION:
        return False, ops._EXTENSION_ERROR
    missing = [op for op in _OPS if device.type not in ops._kernel_devices(op)]
    if not missing:
        return True, None
    if device.type == "cuda":
        return False, "the build has no CUDA kernels (built without a CUDA toolkit, or with METAMASK_FAST_CUDA=0)"
    return False, f"no {device.type} kernels for {', '.join(missing)}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loss_backends(device: torch.device) -> dict:
    """The Triton loss on ``device``: can it run, and what ``"auto"`` picks for float32 and bfloat16."""
    problem = _triton_problem(device)
    report = {"triton_loss_runs": problem is None}
    if problem is not None:
        report["triton_loss_why_not"] = problem
    for dtype in (torch.float32, torch.bfloat16):
        backend, why = bt_loss_backend(device, dtype)
        report[f"auto_bt_loss_{str(dtype).removeprefix('torch.')}"] = backend if why is None else f"{backend} ({why})"
    return report


def devices() -> list[dict]:
    cpu = torch.device("cpu")
    compiled, why = compiled_ops_on(cpu)
    found = [{
        "device": "cpu",
        "name": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "compiled_ops": compiled if why is None else f"{compiled} ({why})",
        **_loss_backends(cpu),
    }]
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        found.append({"device": "cuda", "name": f"none: {why} (driver: {_driver_version()})"})
        return found
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        properties = torch.cuda.get_device_properties(device)
        compiled, why = compiled_ops_on(device)
        found.append({
            "device": str(device),
            "name": properties.name,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "compiled_ops": compiled if why is None else f"{compiled} ({why})",
            **_loss_backends(device),
        })
    return found


def environment() -> dict[str, str]:
    return {name: os.environ[name] for name in SWITCHES if name in os.environ}


def collect() -> dict:
    """Everything :mod:`metamask_fast.info` reports, as one JSON-ready dict. A section that cannot be
    determined holds ``{"error": why}``."""
    report = {}
    for section in (versions, build, compiled_ops, devices, environment):
        try:
            report[section.__name__] = section()
        except Exception as error:  # noqa: BLE001  (a report of what is broken must not break itself)
            report[section.__name__] = {"error": f"cannot be determined: {type(error).__name__}: {error}"}
    return report


def engine(device: str | torch.device, precision: str) -> dict:
    """What a run on ``device`` at ``precision`` (``"fp32"`` or ``"bf16"``) runs on: compiled ops or not
    (and why not), the Barlow Twins loss backend ``"auto"`` picks (and why it skips Triton), the device
    and the precision, with the build's fingerprint."""
    device = torch.device(device)
    compiled, compiled_why = compiled_ops_on(device)
    bt_loss, bt_loss_why = bt_loss_backend(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    record = (_build.STATUS.record or {}) if _build.STATUS is not None else {}
    return {
        "compiled_ops": compiled,
        "compiled_ops_why_not": compiled_why,
        "bt_loss": bt_loss,
        "bt_loss_why_not_triton": bt_loss_why,
        "device": str(device),
        "device_name": name,
        "precision": precision,
        "build": record.get("fingerprint"),
        "metamask_fast": metamask_fast.__version__,
        "torch": str(torch.__version__),  # a plain str: checkpoints are read with weights_only=True
    }


def engine_line(record: dict) -> str:
    """:func:`engine`'s record as one line, its keys as in ``summary.json``; a skipped fast path is named
    with its reason."""
    compiled = "true" if record["compiled_ops"] else f"false ({record['compiled_ops_why_not']})"
    bt_loss = record["bt_loss"]
    if record["bt_loss_why_not_triton"] is not None:
        bt_loss += f" (Triton skipped: {record['bt_loss_why_not_triton']})"
    return (f"engine: compiled_ops: {compiled}, bt_loss: {bt_loss}, device: {record['device']} "
            f"({record['device_name']}), precision: {record['precision']}")


def _text(report: dict) -> str:
    lines = []
    for section, content in report.items():
        lines.append(f"{section}:")
        items = content if isinstance(content, list) else [content]
        if isinstance(content, dict) and not content:
            lines.append("  (none set)")
        for item in items:
            for i, (key, value) in enumerate(item.items()):
                if isinstance(value, dict):  # the kernels each op registered
                    value = ", ".join(f"{k} [{', '.join(v) or 'none'}]" for k, v in value.items())
                if isinstance(content, list):  # one entry per device
                    prefix = "  - " if i == 0 else "    "
                else:
                    prefix = "  "
                lines.append(f"{prefix}{key}: {value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="metamask_fast.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
