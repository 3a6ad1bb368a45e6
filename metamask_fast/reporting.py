"""What a run reports: the progress bar (or log lines), TensorBoard, the mask's statistics and the final summary.

``metrics.jsonl`` (one record per epoch) and ``summary.json`` are written by the loop
(:mod:`metamask_fast.train`) through :mod:`metamask_fast.runfolder`; the PNG plots by
:func:`metamask_fast.plots.write_plots`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from metamask_fast.config import TrainConfig
from metamask_fast.evaluate import knn_metric
from metamask_fast.models import MetaMaskModel

__all__ = ["Progress", "tensorboard_writer", "mask_statistics", "print_summary"]

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


def mask_statistics(model: MetaMaskModel) -> dict[str, float]:
    with torch.no_grad():
        mask = model.mask()
        return {"mask_mean": mask.mean().item(), "mask_std": mask.std().item(),
                "mask_min": mask.min().item(), "mask_max": mask.max().item()}


def print_summary(summary: dict, config: TrainConfig, folder: Path) -> None:
    metric = knn_metric(config)
    protocol = f"kNN top-1 (k={config.knn_k}, T={config.knn_temperature:g}, cosine, masked features)"
    if summary.get(f"{metric}_last") is not None:
        print(f"{protocol}:")
        for label, key in (("raw pixels", "knn_raw_pixels"), ("network at random init", "knn_random_init")):
            if key in summary:
                print(f"  {label:<32}{100 * summary[key]:6.2f}%")
        trained = f"{config.method} after {config.epochs} epoch{'s' if config.epochs != 1 else ''}"
        print(f"  {trained:<32}{100 * summary[f'{metric}_last']:6.2f}%  (best {100 * summary[f'{metric}_best']:.2f}%)")
    print(f"{summary['seconds']:.1f} s in this process ({summary['training_seconds']:.1f} s of training in all, "
          f"resumed runs included); run folder: {folder}")
