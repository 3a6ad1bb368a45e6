"""What a run reports: progress, metrics.jsonl, TensorBoard, the mask's statistics and the summary.

:class:`Report` writes while the run trains; :func:`run_summary` is ``summary.json`` and
:func:`print_summary` its lines on stdout. The PNG plots are :func:`metamask_fast.plots.write_plots`; the
files are written atomically through :mod:`metamask_fast.runfolder`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from metamask_fast.config import TrainConfig
from metamask_fast.evaluate import knn_metric
from metamask_fast.models import MetaMaskModel
from metamask_fast.runfolder import read_records, write_text

__all__ = ["Report", "Progress", "tensorboard_writer", "mask_statistics", "run_summary", "print_summary",
           "REFERENCE_LABELS", "knn_references_by_label", "process_resources", "MEASURED_KEYS"]

PROG = "metamask_fast.train"

class Progress:
    """A tqdm bar with images/s and ETA on a terminal; plain lines every ``log_every`` steps otherwise."""

    def __init__(self, config: TrainConfig, total: int, initial: int, images_per_step: int, enabled: bool):
        self.config, self.total, self.images_per_step = config, total, images_per_step
        self.enabled = enabled and config.progress
        self.bar = None
        self.started, self.start_step = time.perf_counter(), initial
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=config.method, unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, step: int, epoch: int, loss: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}", img_s=f"{rate * self.images_per_step:.0f}",
                                 refresh=False)
        elif step % self.config.log_every == 0 or step == self.total:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
            print(f"{PROG}: epoch {epoch}/{self.config.epochs} step {step}/{self.total} loss {loss:.4g} "
                  f"{rate * self.images_per_step:.0f} img/s eta {eta_text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder / "tensorboard"))


# The values of an epoch's record that depend on the machine and the moment, not on what the run computes: a
# resumed run's records equal an uninterrupted run's without them.
MEASURED_KEYS = ("seconds", "images_per_second", "rss_mb", "open_files", "threads")


def process_resources() -> dict[str, float | int]:
    """This process's resident memory (MB), open file descriptors and threads, as ``/proc`` says (Linux; empty
    elsewhere): an epoch's record holds them, so that growth over a long run shows."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        open_files = len(os.listdir("/proc/self/fd")) - 1  # less the one listing them
        threads = len(os.listdir("/proc/self/task"))
    except (OSError, ValueError, IndexError):
        return {}
    return {"rss_mb": round(resident_pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1), "open_files": open_files,
            "threads": threads}


def mask_statistics(model: MetaMaskModel) -> dict[str, float]:
    with torch.no_grad():
        mask = model.mask()
        return {"mask_mean": mask.mean().item(), "mask_std": mask.std().item(),
                "mask_min": mask.min().item(), "mask_max": mask.max().item()}


# What the kNN monitor is compared with (evaluate.knn_references): (label, key of the summary).
REFERENCE_LABELS = (("raw pixels", "knn_raw_pixels"), ("network at random init", "knn_random_init"))


def knn_references_by_label(references: dict[str, float]) -> dict[str, float]:
    """The references a run holds, by their label (for the kNN plot)."""
    return {label: references[key] for label, key in REFERENCE_LABELS if references.get(key) is not None}


def print_summary(summary: dict, config: TrainConfig, folder: Path) -> None:
    metric = knn_metric(config)
    protocol = f"kNN top-1 (k={config.knn_k}, T={config.knn_temperature:g}, cosine, masked features)"
    if summary.get(f"{metric}_last") is not None:
        print(f"{protocol}:")
        for label, key in REFERENCE_LABELS:
            if key in summary:
                print(f"  {label:<32}{100 * summary[key]:6.2f}%")
        trained = f"{config.method} after {config.epochs} epoch{'s' if config.epochs != 1 else ''}"
        print(f"  {trained:<32}{100 * summary[f'{metric}_last']:6.2f}%  (best {100 * summary[f'{metric}_best']:.2f}%)")
    print(f"{summary['seconds']:.1f} s in this process ({summary['training_seconds']:.1f} s of training in all, "
          f"resumed runs included); run folder: {folder}")


class Report:
    """What a run reports while it trains: progress on stderr, one record per epoch in ``metrics.jsonl``,
    and TensorBoard scalars per step and per epoch (the files on the main process only).

    ``metrics.jsonl`` starts as the records up to ``step`` (those of a killed run past its checkpoint are
    redone) from ``source`` (the run folder the checkpoint came from; the run's own otherwise)."""

    def __init__(self, config: TrainConfig, folder: Path, source: Path, step: int, total_steps: int,
                 main_process: bool):
        self.folder, self.main_process = folder, main_process
        self.records = read_records(source / "metrics.jsonl", step) if main_process else []
        if main_process:
            write_text(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
        self.writer = tensorboard_writer(folder) if main_process else None
        self.progress = Progress(config, total_steps, step, config.batch_size, main_process)

    def step(self, step: int, epoch: int, result: dict[str, float]) -> None:
        self.progress.update(step, epoch, result["loss"])
        if self.writer is not None:
            for key, value in result.items():
                self.writer.add_scalar(f"step/{key}", value, step)

    def epoch(self, record: dict) -> None:
        if not self.main_process:
            return
        self.records.append(record)
        with open(self.folder / "metrics.jsonl", "a") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if value is not None:
                    self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def run_summary(config: TrainConfig, model: MetaMaskModel, records: list[dict], *, steps: int, train_images: int,
                best: float | None, references: dict[str, float], training_seconds: float, started: float,
                world_size: int, engine: dict) -> dict:
    """The final summary (``summary.json``; the last three lines on stdout come from it)."""
    metric = knn_metric(config)
    return {
        "method": config.method,
        "dataset": config.dataset,
        "backbone": config.backbone,
        "epochs": config.epochs,
        "steps": steps,
        "train_images": train_images,
        f"{metric}_last": records[-1].get(metric) if records else None,
        f"{metric}_best": best,
        **references,
        "training_seconds": training_seconds,
        **mask_statistics(model),
        "seconds": time.perf_counter() - started,
        "world_size": world_size,
        "engine": engine,
    }
