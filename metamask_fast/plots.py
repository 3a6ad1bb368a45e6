"""PNG plots of a training run: its per-epoch metrics, the learned mask and a cross-correlation matrix.

:func:`write_plots` writes into an existing run folder, and returns the paths it wrote:

- ``loss.png``: one panel per key of ``loss``, ``loss_bt``, ``loss_cl`` that some record holds, against the
  record's ``epoch``; a panel whose values are all > 0 and span a factor of 10 or more has a log y-scale.
  Written when some record holds one of the three.
- ``knn.png``: every key ``knn_…_top1`` (not the ``…_top1_best``/``…_top1_last`` variants, nor keys holding
  ``_best_``/``_last_``) against ``epoch``, drawn at the epochs where the record holds it, its last value
  written beside its last point; each of ``references`` (what the monitor is compared with: raw pixels,
  the network at random initialisation) a labelled horizontal line with its value. Written when some
  record holds one.
- ``mask.png``: the mask values sorted descending against their rank. Written when ``mask`` is given.
- ``dims.png``: what the mask learned, :func:`metamask_fast.evaluate.dimension_analysis`'s result ``dims``:
  kNN top-1 keeping the ``n`` dimensions with the highest mask values, the ``n`` lowest and ``n`` at random,
  against ``n`` on a log scale, with every dimension's value as a horizontal line. Written when ``dims`` is
  given.
- ``correlation.png``: a heat map of the square cross-correlation matrix, diverging colour map on the fixed
  range -1..1, with a colour bar. A matrix larger than 512×512 is block-averaged first (blocks of
  ``f×f`` with ``f = ceil(D / 512)``, the last block of a row or column smaller when ``f`` does not divide
  ``D``), and the title says so. Written when ``correlation`` is given.

A record is a dict like a line of ``metrics.jsonl``: ``epoch`` a number, the other keys numbers or None.
A key a record does not hold, or holds None, is left out of that epoch (the line joins the epochs that
hold it); a non-finite value breaks the line there. Keys other than the ones above are ignored, so a
record may hold anything else (``loss_cl_virtual`` on only some epochs, ``lr``, …).

The figures are drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure`` and
``FigureCanvasAgg``), never ``pyplot``: no global figure registry or current figure, no display needed,
and rcParams are read, never changed, so calls from other processes or threads do not see each other's
figures (matplotlib's font and text caches are still shared within a process). Each file is written to
a temporary file in ``run_dir`` and then renamed over its name, so a viewer never reads half a PNG.
matplotlib is imported on the first call, not with this module.
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["write_plots", "LOSS_KEYS", "MAX_HEATMAP_SIZE"]

LOSS_KEYS = ("loss", "loss_bt", "loss_cl")
# The largest side of the drawn correlation heat map; larger matrices are block-averaged down to it.
MAX_HEATMAP_SIZE = 512

_DPI = 100


def write_plots(
    run_dir: str | os.PathLike,
    records: Sequence[Mapping[str, object]],
    *,
    mask: torch.Tensor | None = None,
    correlation: torch.Tensor | None = None,
    references: Mapping[str, float] | None = None,
    dims: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write the plots of the module docstring into ``run_dir``; returns the written paths, in the order
    ``loss.png``, ``knn.png``, ``mask.png``, ``correlation.png``, ``dims.png`` (those written).

    ``run_dir`` must be an existing directory (``FileNotFoundError`` / ``NotADirectoryError`` otherwise);
    ``records`` a non-empty list of dicts, each with a numeric ``epoch``; ``mask`` a non-empty 1-D
    floating-point tensor of finite values; ``correlation`` a non-empty square ``[D, D]`` floating-point
    tensor of finite values; ``references`` a mapping of labels to finite accuracies; ``dims`` a dimension
    analysis (lists ``dims``, ``highest``, ``lowest``, ``random`` of one length, and ``all``). Existing
    files of the same names are replaced.
    """
    run_dir = _check_run_dir(run_dir)
    epochs = _check_records(records)
    if mask is not None:
        mask = _check_tensor("mask", mask, dims=1)
    if correlation is not None:
        correlation = _check_tensor("correlation", correlation, dims=2)
        if correlation.shape[0] != correlation.shape[1]:
            raise ValueError(f"correlation must be a square [D, D] matrix, got shape {tuple(correlation.shape)}")

    references = _check_references(references)
    dims = _check_dims(dims)
    written = []
    loss_series = {key: _series(records, epochs, key) for key in LOSS_KEYS}
    loss_series = {key: xy for key, xy in loss_series.items() if xy[0]}
    if loss_series:
        written.append(_save(run_dir / "loss.png", _loss_figure(loss_series)))
    knn_keys = sorted({key for record in records for key in record if _is_knn_top1_key(key)})
    knn_series = {key: _series(records, epochs, key) for key in knn_keys}
    knn_series = {key: xy for key, xy in knn_series.items() if xy[0]}
    if knn_series:
        written.append(_save(run_dir / "knn.png", _knn_figure(knn_series, references)))
    if mask is not None:
        written.append(_save(run_dir / "mask.png", _mask_figure(mask)))
    if correlation is not None:
        written.append(_save(run_dir / "correlation.png", _correlation_figure(correlation)))
    if dims is not None:
        written.append(_save(run_dir / "dims.png", _dims_figure(dims)))
    return written


# ------------------------------------------------------------------------------------------- checks


def _check_run_dir(run_dir: object) -> Path:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}")
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"run_dir {str(path)!r} does not exist; create the run folder first")
    if not path.is_dir():
        raise NotADirectoryError(f"run_dir {str(path)!r} is not a directory")
    return path


def _check_records(records: object) -> list[float]:
    """The records' epochs, after checking ``records`` is a non-empty sequence of dicts with numeric epochs."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a list of dicts (metrics.jsonl lines), got {type(records).__name__}")
    if not records:
        raise ValueError("records must not be empty: there is nothing to plot")
    epochs = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"records[{index}] must be a dict, got {type(record).__name__}")
        epoch = record.get("epoch")
        if not _is_number(epoch) or not math.isfinite(epoch):
            raise ValueError(f"records[{index}] must hold a finite number under 'epoch', got {epoch!r}")
        epochs.append(float(epoch))
    return epochs


def _check_references(references: object) -> dict[str, float]:
    if references is None:
        return {}
    if not isinstance(references, Mapping):
        raise TypeError(f"references must be a mapping of labels to accuracies, got {type(references).__name__}")
    for label, value in references.items():
        if not isinstance(label, str) or not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"references must map labels (str) to finite numbers, got {label!r}: {value!r}")
    return {label: float(value) for label, value in references.items()}


_DIMS_CURVES = ("highest", "lowest", "random")


def _check_dims(dims: object) -> dict | None:
    if dims is None:
        return None
    if not isinstance(dims, Mapping):
        raise TypeError(f"dims must be a dimension analysis (a mapping), got {type(dims).__name__}")
    counts = dims.get("dims")
    if not isinstance(counts, Sequence) or not counts or not all(_is_number(n) and n >= 1 for n in counts):
        raise ValueError("dims['dims'] must be a non-empty list of dimension counts >= 1")
    for key in _DIMS_CURVES:
        values = dims.get(key)
        if not isinstance(values, Sequence) or len(values) != len(counts) or not all(map(_is_number, values)):
            raise ValueError(f"dims[{key!r}] must be a list of numbers as long as dims['dims']")
    if not _is_number(dims.get("all")):
        raise ValueError("dims['all'] must be a number")
    return dict(dims)


def _check_tensor(name: str, tensor: object, *, dims: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {dims}-D tensor, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains non-finite values")
    return tensor.detach().to("cpu", torch.float64)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_knn_top1_key(key: object) -> bool:
    return (isinstance(key, str) and key.startswith("knn_") and key.endswith("_top1")
            and "_best_" not in key and "_last_" not in key)


def _series(records, epochs: list[float], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records holding a number under ``key``."""
    xs, ys = [], []
    for epoch, record in zip(epochs, records):
        value = record.get(key)
        if value is None:
            continue
        if not _is_number(value):
            raise ValueError(f"records: the record of epoch {epoch:g} holds {value!r} under {key!r}, not a number")
        xs.append(epoch)
        ys.append(float(value))
    return xs, ys


# ------------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float, columns: int = 1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover  (matplotlib is an optional dependency)
        raise ImportError("metamask_fast.plots needs matplotlib: pip install matplotlib") from error
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _marker(count: int) -> str | None:
    # Markers show lone points (a key present on one epoch) that a line alone would not draw.
    return "o" if count <= 50 else None


def _loss_figure(series: dict[str, tuple[list[float], list[float]]]):
    figure, axes = _figure(4.2 * len(series), 3.4, columns=len(series))
    for ax, (key, (xs, ys)) in zip(axes, series.items()):
        ax.plot(xs, ys, marker=_marker(len(xs)), markersize=3, linewidth=1.2)
        finite = [y for y in ys if math.isfinite(y)]
        if finite and min(finite) > 0 and max(finite) >= 10 * min(finite):
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3, which="both")
    figure.suptitle("training loss (epoch means)")
    return figure


_REFERENCE_STYLES = ("--", ":", "-.")


def _knn_figure(series: dict[str, tuple[list[float], list[float]]], references: dict[str, float]):
    figure, (ax,) = _figure(6.4, 4.0)
    for key, (xs, ys) in series.items():
        line, = ax.plot(xs, ys, marker=_marker(len(xs)), markersize=3, linewidth=1.2, label=key)
        if math.isfinite(ys[-1]):
            ax.annotate(f"{100 * ys[-1]:.2f}%", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4),
                        fontsize="small", color=line.get_color())
    for index, (label, value) in enumerate(references.items()):
        ax.axhline(value, color="0.35", linewidth=1.0, linestyle=_REFERENCE_STYLES[index % len(_REFERENCE_STYLES)],
                   label=f"{label} ({100 * value:.2f}%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("kNN monitor")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def _dims_figure(dims: dict):
    figure, (ax,) = _figure(6.4, 4.0)
    labels = {"highest": "highest mask values", "lowest": "lowest mask values", "random": "random"}
    for key in _DIMS_CURVES:
        label = labels[key] + (f" (mean of {dims['draws']})" if key == "random" and "draws" in dims else "")
        ax.plot(dims["dims"], dims[key], marker="o", markersize=3, linewidth=1.2, label=label)
    ax.axhline(dims["all"], color="0.35", linewidth=1.0, linestyle="--",
               label=f"all {max(dims['dims'])} dimensions ({100 * dims['all']:.2f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("dimensions kept")
    ax.set_ylabel("kNN top-1 accuracy")
    ax.set_title("what the mask learned: kNN on the kept dimensions")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return figure


def _mask_figure(mask: torch.Tensor):
    values = np.sort(mask.numpy())[::-1]
    ranks = np.arange(values.size)
    figure, (ax,) = _figure(6.4, 3.6)
    ax.fill_between(ranks, values, step="post", alpha=0.35, linewidth=0)
    ax.step(ranks, values, where="post", linewidth=1.2)
    ax.set_xlim(0, max(values.size - 1, 1))
    ax.set_xlabel("rank (sorted descending)")
    ax.set_ylabel("mask value")
    ax.set_title(f"dimensional mask, D = {values.size}: mean {values.mean():.3f}, "
                 f"min {values.min():.3f}, max {values.max():.3f}")
    ax.grid(True, alpha=0.3)
    return figure


def _block_average(matrix: np.ndarray, factor: int) -> np.ndarray:
    """Means of the ``factor × factor`` blocks of ``matrix`` (partial blocks at the far edges)."""
    starts = np.arange(0, matrix.shape[0], factor)
    sizes = np.diff(np.append(starts, matrix.shape[0])).astype(np.float64)
    sums = np.add.reduceat(np.add.reduceat(matrix, starts, axis=0), starts, axis=1)
    return sums / np.outer(sizes, sizes)


def _correlation_figure(correlation: torch.Tensor):
    size = correlation.shape[0]
    matrix = correlation.numpy()
    title = f"cross-correlation {size}×{size}"
    if size > MAX_HEATMAP_SIZE:
        factor = math.ceil(size / MAX_HEATMAP_SIZE)
        matrix = _block_average(matrix, factor)
        title += f"\n(block-averaged {factor}×{factor} to {matrix.shape[0]}×{matrix.shape[1]})"
    figure, (ax,) = _figure(6.0, 5.2)
    # The extent keeps the axes in the matrix's own dimension indices when it was block-averaged.
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest",
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    figure.colorbar(image, ax=ax, shrink=0.85)
    ax.set_title(title)
    ax.set_xlabel("dimension")
    ax.set_ylabel("dimension")
    return figure


def _save(path: Path, figure) -> Path:
    """Render ``figure`` to ``path`` through a temporary file in the same folder, then free it."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        figure.clear()
        temporary.unlink(missing_ok=True)
    return path
