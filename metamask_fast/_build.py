"""Which build of the compiled parts a ``metamask_fast`` import uses, and whether it matches its sources.

The compiled parts are ``metamask_fast._C`` (compiled from ``csrc/``) and ``metamask_fast.kernels`` (the
Triton kernels of ``kernels/``). Both exist only in an installed package: ``pip install .`` builds them, and
``setup.py`` writes :data:`RECORD` next to them, the fingerprint of the sources they were made from
(:func:`source_fingerprint`).

A ``metamask_fast`` imported from a source checkout (``python -m metamask_fast.…`` started in the repository
root puts the checkout first on ``sys.path``) has neither. :func:`attach` then looks for the installed
package further down ``sys.path``. When its record matches the checkout's ``csrc/``, ``kernels/`` and
``setup.py``, a finder makes ``metamask_fast._C`` and ``metamask_fast.kernels`` import from the installed
package, and the checkout runs the same code paths as an installed package. Otherwise (no installed build,
or one made from other sources) those two imports fail with the reason, one line on stderr says it and
names the fix (``pip install .``), and every op runs its PyTorch fallback.

Standard library only: ``setup.py`` loads this file by its path to write the record.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: The file an installed build carries beside ``_C``: its fingerprint and how it was built.
RECORD = "_build_info.json"
#: The sources a build is made from, relative to the repository root.
SOURCES = ("csrc", "kernels", "setup.py")
#: The modules that come from a build rather than from the Python sources.
BUILT_MODULES = ("metamask_fast._C", "metamask_fast.kernels")
_SKIPPED_SUFFIXES = (".pyc", ".pyo", ".so", ".o")


def _source_files(root: Path, source: str) -> list[Path]:
    path = root / source
    if path.is_file():
        return [path]
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".") and name != "__pycache__")
        found += [
            Path(folder, name) for name in files if not name.startswith(".") and not name.endswith(_SKIPPED_SUFFIXES)
        ]
    return sorted(found)


def source_fingerprint(root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of each of :data:`SOURCES` under ``root``: over every file's path (relative to ``root``)
    and content, hidden files, ``__pycache__`` and compiled files left out. A missing source hashes as
    empty."""
    root = Path(root)
    fingerprint = {}
    for source in SOURCES:
        digest = hashlib.sha256()
        for path in _source_files(root, source):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        fingerprint[source] = digest.hexdigest()
    return fingerprint


def combined(fingerprint: dict[str, str]) -> str:
    """One hex digest for a whole fingerprint (the build's name in reports)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def read_record(package_dir: Path) -> dict | None:
    """The build record in ``package_dir``, or None when there is none or it cannot be read."""
    try:
        record = json.loads((package_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sources"), dict) else None


def changed_sources(record: dict, root: Path) -> list[str]:
    """The entries of :data:`SOURCES` whose content under ``root`` differs from ``record``'s."""
    now = source_fingerprint(root)
    return [source for source in SOURCES if record["sources"].get(source) != now[source]]


@dataclass
class BuildStatus:
    """Where this ``metamask_fast`` comes from and which build of its compiled parts it uses.

    ``origin`` is ``"installed"`` (an installed package, its build beside it), ``"checkout"`` (a source
    checkout using the matching installed build), ``"checkout, stale build"`` or ``"checkout, no build"``
    (a source checkout running the PyTorch fallbacks; ``problem`` says why)."""

    origin: str
    package_dir: str
    build_dir: str | None = None
    record: dict | None = None
    problem: str | None = None


class _BuildFinder(importlib.abc.MetaPathFinder):
    """Resolves :data:`BUILT_MODULES` for a source checkout: from ``build_dir``, or, without a usable
    build, raises ``ImportError`` with the reason (so that no stray artefact in the checkout is used)."""

    def __init__(self, build_dir: str | None, problem: str | None):
        self.build_dir, self.problem = build_dir, problem

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in BUILT_MODULES:
            return None
        if self.build_dir is None:
            raise ImportError(f"{fullname} is not available: {self.problem}", name=fullname)
        return importlib.machinery.PathFinder.find_spec(fullname, [self.build_dir])


def _installed_package_dir(root: Path) -> Path | None:
    """The folder of a ``metamask_fast`` package on ``sys.path`` outside the checkout at ``root``."""
    entries = []
    for entry in sys.path:
        try:
            if Path(entry or os.getcwd()).resolve() != root:
                entries.append(entry)
        except OSError:
            continue
    spec = importlib.machinery.PathFinder.find_spec("metamask_fast", entries)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate(package_dir: Path) -> BuildStatus:
    """The :class:`BuildStatus` of the ``metamask_fast`` package in ``package_dir`` (no side effects)."""
    package_dir = package_dir.resolve()
    root = package_dir.parent
    if not all((root / source).exists() for source in SOURCES):
        return BuildStatus("installed", str(package_dir), str(package_dir), read_record(package_dir))
    installed = _installed_package_dir(root)
    if installed is None:
        return BuildStatus(
            "checkout, no build", str(package_dir),
            problem=f"this source checkout ({root}) has no installed build; run `pip install .` to build it",
        )
    record = read_record(installed)
    if record is None:
        return BuildStatus(
            "checkout, stale build", str(package_dir),
            problem=f"the installed metamask_fast in {installed} has no build record (an older install); "
                    "run `pip install .` to rebuild it",
        )
    changed = changed_sources(record, root)
    if changed:
        return BuildStatus(
            "checkout, stale build", str(package_dir), record=record,
            problem=f"the installed build in {installed} was made from other sources than this checkout's "
                    f"({', '.join(changed)} differ); run `pip install .` to rebuild it",
        )
    return BuildStatus("checkout", str(package_dir), str(installed), record)


#: This process's status, set by :func:`attach` when ``metamask_fast`` is imported.
STATUS: BuildStatus | None = None


def attach(package_dir: str) -> BuildStatus:
    """Locate the build for the package in ``package_dir``; for a source checkout, install the finder of
    :data:`BUILT_MODULES` and, without a usable build, say so in one line on stderr (once per process
    tree: not again in worker processes)."""
    global STATUS
    STATUS = locate(Path(package_dir))
    if STATUS.origin != "installed":
        sys.meta_path.insert(0, _BuildFinder(STATUS.build_dir, STATUS.problem))
        if STATUS.problem is not None and multiprocessing.parent_process() is None:
            print(f"metamask_fast: running the PyTorch fallbacks: {STATUS.problem}", file=sys.stderr, flush=True)
    return STATUS
