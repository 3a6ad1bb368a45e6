"""Writing extracted embeddings to disk, for other tools (t-SNE/UMAP viewers, notebooks, spreadsheets).

:func:`write_embeddings` writes ``features`` (``[N, D]``), ``labels`` (``[N]`` or None) and ``names`` (N
strings, e.g. image file names) in one of two layouts, chosen by the suffix of ``path``:

- ``<stem>.pt``: one ``torch.save`` of ``{"features": [N, D] float tensor, "labels": [N] int64 tensor or
  None, "names": list of N str}``; read back with ``torch.load(path)``.
- ``<stem>.npy``: ``features`` to ``<stem>.npy`` (``np.load``); ``labels`` to ``<stem>.labels.npy`` (int64;
  not written when ``labels`` is None); ``names`` to ``<stem>.names.txt``, UTF-8, one per line (read back
  with ``Path.read_text(encoding="utf-8").splitlines()``, so a name may not hold a line break).

With ``csv=True`` also ``<stem>.csv``: UTF-8, the header ``name,label,f0,…,f{D-1}`` and one row per sample,
written by the :mod:`csv` module (a name with commas, quotes or line breaks is quoted), the label empty when
``labels`` is None, each feature as ``repr(float(x))`` so that ``float(field)`` gives back the value exactly.
CSV is for inspection; it is slow and large for big sets.

``<stem>`` is ``path`` without its suffix. The features keep their dtype and values (bfloat16, which NumPy
has no type for, is written as float32 in the ``.npy`` layout); tensors are copied to the CPU first.

Nothing is overwritten: when any of the files to write exists, :class:`FileExistsError` names it and
nothing is written. Each file is written to a temporary file in the same folder, flushed to disk, then
renamed to its name (``os.replace``), so a reader never sees half a file; if writing one fails, the files
this call already wrote are removed again. (Another process creating one of the names between the check
and the rename would still be overwritten; the check is not a lock.)
"""

from __future__ import annotations

import csv as csv_module
import io
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["write_embeddings", "SUFFIXES"]

SUFFIXES = (".pt", ".npy")


def write_embeddings(
    path: str | os.PathLike,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    names: Sequence[str],
    *,
    csv: bool = False,
) -> list[Path]:
    """Write the embeddings in the layout the suffix of ``path`` selects (see the module docstring);
    returns the written paths: the features file first, then labels, names and CSV where written.

    ``features`` a floating-point tensor ``[N, D]`` (N, D ≥ 1; non-finite values are written as they are),
    ``labels`` an int64 tensor ``[N]`` (-1 for unlabeled samples is fine) or None, ``names`` a list or tuple
    of N strings. The folder of ``path`` must exist.
    """
    path = _check_arguments(path, features, labels, names, csv)
    features = features.detach().to("cpu").contiguous().clone()
    labels = None if labels is None else labels.detach().to("cpu").contiguous().clone()
    names = list(names)
    stem = path.with_suffix("")

    writers: list[tuple[Path, Callable]] = []
    if path.suffix == ".pt":
        record = {"features": features, "labels": labels, "names": names}
        writers.append((path, lambda f: torch.save(record, f)))
    else:
        array = (features.float() if features.dtype == torch.bfloat16 else features).numpy()
        writers.append((path, lambda f: np.save(f, array, allow_pickle=False)))
        if labels is not None:
            writers.append((_sibling(stem, ".labels.npy"), lambda f: np.save(f, labels.numpy(), allow_pickle=False)))
        lines = "".join(name + "\n" for name in names).encode("utf-8")
        writers.append((_sibling(stem, ".names.txt"), lambda f: f.write(lines)))
    if csv:
        writers.append((_sibling(stem, ".csv"), lambda f: _write_csv(f, features, labels, names)))

    for target, _ in writers:
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{str(target)!r} exists; write_embeddings does not overwrite, so nothing was "
                                  f"written (choose another path or remove it)")
    written: list[Path] = []
    try:
        for target, write in writers:
            _write_atomically(target, write)
            written.append(target)
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise
    return written



def _check_arguments(path, features, labels, names, csv: bool) -> Path:
    """:func:`write_embeddings`' checks, each error naming its argument; returns ``path`` as a Path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"path must end in one of {SUFFIXES} (the layout to write), got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    if not isinstance(csv, bool):
        raise TypeError(f"csv must be a bool, got {type(csv).__name__}")
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must be a non-empty [N, D] tensor, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    count = features.shape[0]
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 tensor, got {labels.dtype}")
        if labels.shape != (count,):
            raise ValueError(f"labels must have shape ({count},) (one per row of features), got {tuple(labels.shape)}")
    if not isinstance(names, (list, tuple)):
        raise TypeError(f"names must be a list of str, got {type(names).__name__}")
    if len(names) != count:
        raise ValueError(f"names must hold one name per row of features ({count}), got {len(names)}")
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"names[{index}] must be a str, got {type(name).__name__}")
        if (path.suffix == ".npy" or csv) and not _encodable(name):
            raise ValueError(f"names[{index}] = {name!r} cannot be encoded as UTF-8 (a lone surrogate, as "
                             f"os.fsdecode gives for undecodable file names), which the text files need")
        if path.suffix == ".npy" and _breaks_lines(name):
            raise ValueError(f"names[{index}] = {name!r} holds a line break, which <stem>.names.txt (one name "
                             f"per line) cannot hold; use a .pt path or remove it")
    return path


def _sibling(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _breaks_lines(name: str) -> bool:
    probe = f"x{name}x"
    return probe.splitlines() != [probe]


def _write_csv(f, features: torch.Tensor, labels: torch.Tensor | None, names: list[str]) -> None:
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    try:
        writer = csv_module.writer(text)
        writer.writerow(["name", "label", *(f"f{i}" for i in range(features.shape[1]))])
        label_list = labels.tolist() if labels is not None else [None] * len(names)
        for name, label, row in zip(names, label_list, features.double().tolist()):
            writer.writerow([name, "" if label is None else str(label), *map(repr, row)])
        text.flush()
    finally:
        text.detach()  # leave the binary file open: _write_atomically closes it


def _write_atomically(target: Path, write: Callable) -> None:
    """Run ``write(binary_file)`` on a new temporary file next to ``target``, then rename it to ``target``."""
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never reuse an existing file; mode 0o666 so the umask decides the permissions, as for open().
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
