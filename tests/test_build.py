"""Which build a ``metamask_fast`` import runs: from the repository root (a source checkout first on
``sys.path``) and from any other folder, with a fresh build, a stale one and none at all; and
``python -m metamask_fast.info``, which reports it.

Each case runs in a fresh interpreter. The stale and build-less checkouts are copies of this repository's
sources in a temporary folder; the repository itself is never modified. The fresh cases need the
installed build to be this checkout's (as after README's ``pip install .``): where it is not, they fail
with the line that says to run ``pip install .``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metamask_fast
from metamask_fast import _build

REPO = Path(__file__).resolve().parents[1]
INSTALLED = Path(metamask_fast.__file__).resolve().parent
# What a fresh interpreter imported: where the package and its compiled parts come from.
PROBE = """
import json, sys, torch, metamask_fast, metamask_fast.ops as ops
from metamask_fast import _build
from metamask_fast.functional import barlow_twins_loss
try:
    import metamask_fast.kernels.barlow_twins as kernels
    kernels_file = kernels.__file__
except ImportError as error:
    kernels_file = None
z_a, z_b = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).split(3)
auto_is_torch = bool(barlow_twins_loss(z_a, z_b) == barlow_twins_loss(z_a, z_b, backend="torch"))
try:
    barlow_twins_loss(z_a, z_b, backend="triton")
    triton_error = None
except RuntimeError as error:
    triton_error = str(error)
norm = float(ops.global_norm([torch.full((3,), 2.0), torch.full((1,), 2.0)]))
print(json.dumps({
    "package": metamask_fast.__file__,
    "origin": _build.STATUS.origin,
    "has_extension": ops.HAS_EXTENSION,
    "extension_error": ops._EXTENSION_ERROR,
    "extension_file": sys.modules["metamask_fast._C"].__file__ if ops.HAS_EXTENSION else None,
    "kernels_file": kernels_file,
    "triton_error": triton_error,
    "auto_is_torch": auto_is_torch,
    "norm": norm,
}))
"""


def environment(**extra: str) -> dict[str, str]:
    """This environment without the switches that would force the fallbacks, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("METAMASK_FAST_NO_EXT", "METAMASK_FAST_BACKEND")}
    return {**env, **extra}


def run_probe(cwd: Path, *python_flags: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, *python_flags, "-c", PROBE], cwd=cwd, env=env or environment(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def copy_checkout(destination: Path) -> Path:
    """A copy of this repository's sources (package, kernels, C++/CUDA sources and setup.py)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for folder in ("metamask_fast", "kernels", "csrc"):
        shutil.copytree(REPO / folder, destination / folder, ignore=ignore)
    shutil.copy2(REPO / "setup.py", destination / "setup.py")
    return destination


def assert_compiled(probe: dict, package_under: Path) -> None:
    assert Path(probe["package"]).resolve().is_relative_to(package_under.resolve()), probe["package"]
    assert probe["has_extension"], probe["extension_error"]
    assert Path(probe["extension_file"]).resolve().parent == INSTALLED, probe["extension_file"]
    assert Path(probe["kernels_file"]).resolve().parent.parent == INSTALLED, probe["kernels_file"]
    assert probe["norm"] == 4.0


def assert_fallback(probe: dict, stderr: str, *reason: str) -> None:
    assert not probe["has_extension"] and probe["kernels_file"] is None
    assert probe["norm"] == 4.0 and probe["auto_is_torch"]  # the PyTorch fallbacks
    # One line, naming the fix; the same reason reaches the ops and an explicit Triton request.
    assert stderr.count("\n") == 1 and stderr.startswith("metamask_fast: running the PyTorch fallbacks: "), stderr
    for text in ("pip install .", *reason):
        assert text in stderr, stderr
        assert text in probe["extension_error"] and text in probe["triton_error"], probe


def test_repository_root_runs_the_installed_build():
    probe, stderr = run_probe(REPO)
    assert probe["origin"] == "checkout"
    assert_compiled(probe, REPO / "metamask_fast")
    assert stderr == ""


def test_another_folder_runs_the_installed_package(tmp_path):
    probe, stderr = run_probe(tmp_path)
    assert probe["origin"] == "installed"
    assert_compiled(probe, INSTALLED)
    assert stderr == ""


def test_a_copy_of_the_checkout_runs_the_same_build(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    probe, stderr = run_probe(checkout)
    assert probe["origin"] == "checkout"
    assert_compiled(probe, checkout / "metamask_fast")
    assert stderr == ""


@pytest.mark.parametrize("changed", ["csrc/cpu_loops.h", "csrc/cuda/global_norm_cuda.cu", "kernels/barlow_twins.py",
                                     "setup.py"])
def test_a_stale_build_is_refused_with_one_line(tmp_path, changed):
    checkout = copy_checkout(tmp_path / "checkout")
    with open(checkout / changed, "a") as source:
        source.write("\n// edited after the install\n" if not changed.endswith(".py") else "\n# edited\n")
    # A compiled module left in the checkout (an old in-place build) is not picked up either.
    shutil.copy2(INSTALLED / Path(_C_file()).name, checkout / "metamask_fast" / Path(_C_file()).name)
    probe, stderr = run_probe(checkout)
    assert probe["origin"] == "checkout, stale build"
    assert_fallback(probe, stderr, changed.split("/")[0], str(INSTALLED))

    # From another folder the installed package runs, whole and compiled; nothing is said.
    probe, stderr = run_probe(tmp_path)
    assert probe["origin"] == "installed"
    assert_compiled(probe, INSTALLED)
    assert stderr == ""


def _C_file() -> str:
    from metamask_fast import _C

    return _C.__file__


def without_installed_package(destination: Path) -> Path:
    """A folder that offers everything of the installed package's site-packages but metamask_fast."""
    destination.mkdir()
    for entry in INSTALLED.parent.iterdir():
        if entry.name != "metamask_fast" and not entry.name.startswith("metamask_fast-"):
            (destination / entry.name).symlink_to(entry)
    return destination


def test_a_checkout_without_any_install_says_so_and_runs_the_fallbacks(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    site = without_installed_package(tmp_path / "site")
    env = environment(PYTHONPATH=str(site))
    probe, stderr = run_probe(checkout, "-S", env=env)  # -S: no site-packages but the folder above
    assert probe["origin"] == "checkout, no build"
    assert_fallback(probe, stderr, "no installed build", str(checkout))
    info = subprocess.run([sys.executable, "-S", "-m", "metamask_fast.info", "--json"], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["build"]["origin"] == "checkout, no build" and not report["compiled_ops"]["loaded"]
    assert report["build"]["matches_sources"].startswith("no: this source checkout")


def test_a_run_from_the_repository_root_records_its_engine(tmp_path):
    # README's command, from the repository root, as a user runs it (one epoch).
    folder = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "metamask_fast.train", "--epochs", "1", "--no-progress",
                          "--output-dir", str(folder)], cwd=REPO, env=environment(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("metamask_fast.train: engine: compiled_ops: true, bt_loss: torch (Triton skipped: "), first
    assert first.endswith(", device: cpu (" + first.split(", device: cpu (")[1]) and "precision: fp32" in first
    engine = json.loads((folder / "summary.json").read_text())["engine"]
    assert (engine["compiled_ops"], engine["bt_loss"], engine["device"], engine["precision"]) == (
        True, "torch", "cpu", "fp32")
    assert engine["build"] == _build.combined(_build.source_fingerprint(REPO))
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["engine"] == engine


# ---------------------------------------------------------------------------------------------------------
# python -m metamask_fast.info


def run_info(cwd: Path, *arguments: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metamask_fast.info", *arguments], cwd=cwd,
                          env=environment(**extra_env), capture_output=True, text=True, timeout=300)


def cpu_has_avx() -> bool:
    flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    return " avx " in f" {flags[0].split(':', 1)[1]} "


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_info_reports_versions_build_ops_devices_and_switches(tmp_path, where):
    import torchvision

    out = run_info(REPO if where == "root" else tmp_path, "--json", METAMASK_FAST_BACKEND="torch")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    report = json.loads(out.stdout)

    versions = report["versions"]
    assert versions["metamask_fast"] == metamask_fast.__version__
    assert versions["python"].endswith(".".join(map(str, sys.version_info[:3])))
    assert (versions["torch"], versions["torchvision"]) == (torch.__version__, torchvision.__version__.split("+")[0])
    assert versions["cuda_runtime"] == (torch.version.cuda or "none: this torch is a CPU build")

    build = report["build"]
    assert build["origin"] == ("checkout" if where == "root" else "installed")
    assert build["fingerprint"] == _build.combined(_build.source_fingerprint(REPO))
    assert build["matches_sources"].startswith("yes")
    assert Path(build["compiled_parts_from"]).resolve() == INSTALLED

    ops_report = report["compiled_ops"]
    assert ops_report["loaded"] and Path(ops_report["from"]).resolve().parent == INSTALLED
    for op in ("global_norm", "add_scaled_", "add_scaled", "virtual_sgd_step"):
        assert "cpu" in ops_report["kernels"][op]
        assert ("cuda" in ops_report["kernels"][op]) == build["cuda_kernels_built"]
    if Path("/proc/cpuinfo").exists():
        assert ops_report["cpu_loops"] == ("avx" if cpu_has_avx() else "default")

    cpu = report["devices"][0]
    assert cpu["device"] == "cpu" and cpu["cores"] == os.cpu_count() and cpu["compiled_ops"] is True
    assert cpu["auto_bt_loss_float32"] == "torch (METAMASK_FAST_BACKEND=torch)"
    cuda = report["devices"][1:]
    assert len(cuda) == max(torch.cuda.device_count(), 1)
    assert report["environment"] == {"METAMASK_FAST_BACKEND": "torch", **{
        name: os.environ[name] for name in ("TRITON_INTERPRET", "CUDA_HOME", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                                            "METAMASK_FAST_CUDA") if name in os.environ}}


def test_info_as_text_and_a_bad_flag(tmp_path):
    out = run_info(tmp_path)
    assert out.returncode == 0, out.stderr
    for section in ("versions:", "build:", "compiled_ops:", "devices:", "environment:", "matches_sources: yes"):
        assert section in out.stdout
    bad = run_info(tmp_path, "--jsn")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("metamask_fast.info: error: unrecognized arguments: --jsn")


def test_the_engine_names_the_loss_backend_and_why(monkeypatch):
    from metamask_fast import info

    monkeypatch.delenv("METAMASK_FAST_BACKEND", raising=False)
    record = info.engine("cpu", "fp32")
    assert (record["bt_loss"], record["device"], record["precision"]) == ("torch", "cpu", "fp32")
    assert "CUDA" in record["bt_loss_why_not_triton"]  # 'auto' keeps CPU tensors on PyTorch
    assert "bt_loss: torch (Triton skipped: " in info.engine_line(record)
    # Forced through the environment (the tests run Triton's interpreter on the CPU), the run uses Triton.
    monkeypatch.setenv("METAMASK_FAST_BACKEND", "triton")
    record = info.engine("cpu", "bf16")
    assert (record["bt_loss"], record["bt_loss_why_not_triton"], record["precision"]) == ("triton", None, "bf16")
    assert "bt_loss: triton, device: cpu" in info.engine_line(record)
