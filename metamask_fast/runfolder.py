"""The run folder: its name, the rules for reusing one, atomic writes, and the checkpoint's state in and out.

A run writes ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``, ``summary.json``, ``backbone.pt``,
``mask.pt`` and PNG plots into one folder (``runs/<dataset>-<method>-<hash of the settings>`` by default).
Every file is written through :func:`atomic_write` (a temporary file, fsync, rename), so a kill or a full
disk never leaves a half-written file in place of a complete one. :func:`prepare_run_folder` decides, before
anything is written, whether a command starts afresh, resumes, or is refused because the folder holds
something else. Refusals are :class:`~metamask_fast.config.ConfigError` naming the argument to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
from pathlib import Path

import torch

from metamask_fast import config as cfg
from metamask_fast.config import ConfigError, TrainConfig

__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "prepare_run_folder", "open_run_folder", "is_partial_write",
           "atomic_write", "save", "write_text", "write_failure", "read_records", "rng_state", "set_rng_state",
           "RunState", "checkpoint_state", "restore"]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# What a run writes before its first checkpoint: a folder holding only these (for the same settings) is
# restarted, anything else in a folder without a checkpoint is refused.
_EARLY_FILES = {"config.yaml", "metrics.jsonl", "tensorboard"}
_CHECKPOINT_KEYS = ("identity", "model", "net_optimizer", "mask_optimizer", "schedulers", "step_count", "epoch",
                    "batch", "step", "sums", "counts", "best", "references", "training_seconds", "rng", "finished",
                    "bad_steps")


def _default_output_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.dataset}-{config.method}-{cfg.describe(config)}"


def _read_checkpoint(path: Path, where: str) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{where}: cannot read checkpoint {path} ({detail[:200]}); remove it or pass "
                          "another --output-dir") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{where}: {path} is not a metamask_fast.train checkpoint")
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ConfigError(f"{where}: {path} is incomplete (no {', '.join(missing)}); remove it or pass another "
                          "--output-dir")
    return checkpoint


def _check_same_run(checkpoint: dict, config: TrainConfig, path: Path, where: str) -> None:
    theirs, ours = checkpoint["identity"], cfg.identity(config)
    differing = [f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} now" for key in ours if theirs.get(key) != ours[key]]
    if differing:
        raise ConfigError(f"{where}: {path} was written by a run with other settings ({'; '.join(differing[:3])}"
                          f"{'; …' if len(differing) > 3 else ''}); use the same settings to resume it, or "
                          "another --output-dir")


def prepare_run_folder(config: TrainConfig, resume: str | None, origin) -> tuple[Path, dict | None]:
    """The run folder and the checkpoint to continue from (None: a fresh start). Nothing is created or
    changed here; every refusal is a :class:`ConfigError`.

    A folder's own checkpoint always wins: re-running a command continues the folder it writes to, also a
    command that first started it with ``--resume`` from another run's checkpoint."""
    source = None
    if resume is not None:
        source = Path(resume)
        if source.is_dir():
            source = source / CHECKPOINT
        if not source.is_file():
            raise ConfigError(f"argument --resume: no checkpoint at {resume!r}")
    folder = Path(config.output_dir) if config.output_dir else (
        source.parent if source is not None else _default_output_dir(config))
    where = cfg.where(origin, "output_dir")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{where}: {str(folder)!r} exists and is not a directory")
    own = folder / CHECKPOINT
    if own.is_file():
        checkpoint = _read_checkpoint(own, where)
        _check_same_run(checkpoint, config, own, where)
        checkpoint["source_folder"] = str(folder)  # where its metrics.jsonl is (not saved again)
        return folder, checkpoint
    if source is not None:
        checkpoint = _read_checkpoint(source, "argument --resume")
        _check_same_run(checkpoint, config, source, "argument --resume")
        if folder.is_dir() and not _only_early_files(folder, config):
            raise ConfigError(f"{where}: {str(folder)!r} is not empty; resume into an empty folder")
        checkpoint["source_folder"] = str(source.parent)
        return folder, checkpoint
    if folder.is_dir() and not _only_early_files(folder, config):
        raise ConfigError(f"{where}: {str(folder)!r} is not empty and holds no checkpoint of this run; "
                          "refusing to overwrite it")
    return folder, None


def is_partial_write(path: Path) -> bool:
    """A temporary file of :func:`atomic_write` left by a process killed while writing."""
    return path.name.startswith(".") and ".tmp-" in path.name


def _only_early_files(folder: Path, config: TrainConfig) -> bool:
    """Whether ``folder`` holds nothing or only what a run with these settings writes before its first
    checkpoint (and partial writes of a killed one)."""
    present = {p.name for p in folder.iterdir() if not is_partial_write(p)}
    return not present or (present <= _EARLY_FILES and _same_early_config(folder, config))


def _same_early_config(folder: Path, config: TrainConfig) -> bool:
    """Whether ``folder/config.yaml`` is the config of a run with these settings (stopped before its first
    checkpoint)."""
    try:
        written = cfg.yaml.safe_load((folder / "config.yaml").read_text())
        return cfg.identity(cfg.written_config(written)) == cfg.identity(config)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, fsync, then rename over ``path``: a reader
    sees the old file or the complete new one, never a part. A failed write (a full disk) raises
    ``OSError`` naming ``path``, and leaves the old file as it was and no temporary file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    except RuntimeError as error:  # torch.save reports a failed write of its zip container this way
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(errno.EIO, f"write failed ({first[:200]})", str(path)) from error
    finally:
        if temporary.exists():
            temporary.unlink()
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def write_failure(path: Path, error: OSError, step: int) -> str:
    return (f"cannot write {path}: {error.strerror or error}; the checkpoint already in the run folder (if any) "
            f"is intact, the run stopped at step {step}; make room or fix the folder, then run the same command "
            "to resume")


def save(obj, path: Path) -> None:
    atomic_write(path, lambda file: torch.save(obj, file))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def read_records(path: Path, up_to_step: int) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("step", math.inf) <= up_to_step:
                records.append(record)
    return records


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- checkpoint state


@dataclasses.dataclass
class RunState:
    """Where a run stands, besides its weights and optimizer states: the position in the data, the current
    epoch's running sums, the best kNN value, the references and the consecutive skipped steps."""

    epoch: int = 0
    batch: int = 0  # batches of the current epoch done
    step: int = 0
    training_seconds: float = 0.0  # of training before this process started (or resumed) the run
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    best: float | None = None
    bad_steps: int = 0  # consecutive skipped steps
    references: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, result: dict[str, float], skipped: bool) -> None:
        """A step's values into the epoch's sums (a skipped step's values stay out, but its flag counts)."""
        for key, value in result.items():
            if key == "skipped" or not skipped:
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.sums, self.counts = self.epoch + 1, 0, {}, {}


def checkpoint_state(config: TrainConfig, training, state: RunState, *, seconds: float, finished: bool,
                     engine: dict) -> dict:
    """The checkpoint of a run: ``training`` (:class:`metamask_fast.train.Training`: model, optimizers,
    schedulers, step) and ``state`` after its last step, ``seconds`` of training in all, and the random
    generators' states."""
    return {
        "format": CHECKPOINT_FORMAT,
        "identity": cfg.identity(config),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "model": training.model.state_dict(),
        "net_optimizer": training.net_optimizer.state_dict(),
        "mask_optimizer": None if training.mask_optimizer is None else training.mask_optimizer.state_dict(),
        "schedulers": [scheduler.state_dict() for scheduler in training.schedulers],
        "step_count": getattr(training.stepper, "step_count", state.step),
        "epoch": state.epoch, "batch": state.batch, "step": state.step,
        "sums": state.sums, "counts": state.counts, "best": state.best, "references": state.references,
        "bad_steps": state.bad_steps,
        "training_seconds": seconds,
        "rng": rng_state(),
        "finished": finished,
        "torch_version": str(torch.__version__),
        "engine": engine,
    }


def restore(checkpoint: dict, training) -> RunState:
    """Load ``checkpoint`` (from :func:`prepare_run_folder`) into ``training`` and the random generators;
    returns the run's state."""
    training.model.load_state_dict(checkpoint["model"])
    training.net_optimizer.load_state_dict(checkpoint["net_optimizer"])
    if training.mask_optimizer is not None:
        training.mask_optimizer.load_state_dict(checkpoint["mask_optimizer"])
    for scheduler, saved in zip(training.schedulers, checkpoint["schedulers"]):
        scheduler.load_state_dict(saved)
    if hasattr(training.stepper, "step_count"):
        training.stepper.step_count = checkpoint["step_count"]
    state = RunState(epoch=checkpoint["epoch"], batch=checkpoint["batch"], step=checkpoint["step"],
                     training_seconds=checkpoint["training_seconds"], sums=dict(checkpoint["sums"]),
                     counts=dict(checkpoint["counts"]), best=checkpoint["best"], bad_steps=checkpoint["bad_steps"],
                     references=dict(checkpoint["references"]))
    set_rng_state(checkpoint["rng"])
    return state


def open_run_folder(folder: Path, config: TrainConfig, origin) -> None:
    """Create ``folder`` (main process), remove the partial writes of a killed run, write ``config.yaml``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for partial in [p for p in folder.iterdir() if is_partial_write(p)]:
            partial.unlink()  # a write cut short by a kill; the complete file it was replacing is kept
        write_text(folder / "config.yaml", cfg.to_yaml(config))
    except OSError as error:
        raise ConfigError(f"{cfg.where(origin, 'output_dir')}: cannot write to {str(folder)!r}: "
                          f"{error.strerror or error}") from None
