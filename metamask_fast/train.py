"""Self-supervised MetaMask training: ``python -m metamask_fast.train [--config PRESET] [--flag value ...]``.

With no arguments the command trains :class:`~metamask_fast.backbones.DigitsConvNet` (64-d features) with
MetaMask (Barlow Twins + 10·NT-Xent on mask-multiplied features, the mask trained by the meta-gradient of
SPEC §1) on the 1,437 training digits that scikit-learn ships, and evaluates the masked features with a
weighted kNN (cosine, k=200, T=0.1) on the 360 test digits, next to two references: raw pixels and the same
network at its random initialisation. ``--config cifar10-authors`` is the authors' CIFAR-10 recipe,
``--config cifar10-fast`` a quicker one; ``--dataset cifar100|stl10|folder --data-dir DIR`` read other data
(:mod:`metamask_fast.data`). Every setting is in :class:`metamask_fast.config.TrainConfig`;
``--help`` lists them.

The run folder (``--output-dir``, by default ``runs/<dataset>-<method>-<hash of the settings>``) gets
``config.yaml`` (the resolved settings), ``metrics.jsonl`` (one record per epoch), ``checkpoint.pt`` (written
atomically every ``checkpoint_every`` steps and at every epoch's end), ``summary.json``, ``backbone.pt`` and
``mask.pt`` (plain state dicts) and PNG plots. Re-running the same command resumes from the checkpoint;
``--resume PATH`` resumes from another one. SIGINT/SIGTERM finish the current step, write a checkpoint and
exit (130/143). Under ``torchrun --nproc-per-node N -m metamask_fast.train`` the global batch is split over
the processes and the losses see the gathered embeddings (:mod:`metamask_fast.distributed`).

``--method barlowtwins`` and ``--method simclr`` train the same network on one loss alone, with the mask
frozen at the identity (no sigmoid, every entry 1, no optimizer).

Digits defaults: 50 epochs, batch 128 (11 steps per epoch), SGD momentum 0.9 and weight decay 5e-4 for both
optimizers, lr 3e-5 for the network and 0.3 for the mask, cosine per epoch, finite-difference second order.
Seed 0 on the 2-core CPU, 126 s: kNN top-1 (k=200) 77.50 % at random initialisation, 91.67 % after
training (best evaluation 92.50 %), raw pixels 91.11 %. Measured earlier on the 2-core CPU (kNN k=20, ``--knn-k 20``; raw pixels 96.39 %): seeds 0/1/2 reach
98.06/95.00/96.11 % against 93.06/90.56/91.94 % at random initialisation; with the mask at the network's
rate (3e-5) 96.39/95.83/95.00 %. Network lr sweep (MetaMask, 20 epochs, seed 0): 3e-4 → 93.9 %,
1e-4 → 94.7 %, 3e-5 → 95.8 %; Barlow Twins alone (15 epochs): 1e-3 → 93.6 %, 1e-4 → 95.8 %. The Barlow
Twins gradient is large here (the loss starts near 300), so the authors' lr 1e-3 is too large for this
network. As SPEC §5 found, training brings a random network to about raw-pixel quality on this easy set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from metamask_fast import config as cfg
from metamask_fast import distributed as mmdist
from metamask_fast.backbones import DigitsConvNet, cifar_resnet
from metamask_fast.config import ConfigError, TrainConfig
from metamask_fast.data import DigitsSplit, load_digits_split
from metamask_fast.data import DatasetError, ImageSet, load_images
from metamask_fast.evaluate import extract_features, knn_top1_accuracy
from metamask_fast.info import engine as engine_record
from metamask_fast.info import engine_line
from metamask_fast.meta import MetaMaskStep, SingleLossStep
from metamask_fast.models import MetaMaskModel
from metamask_fast.data.pipeline import DigitsBatches, ImageBatches, evaluation_loader
from metamask_fast.runs import last_line

__all__ = ["TrainConfig", "build_parser", "parse_config", "build_model", "train", "main", "knn_metric"]

PROG = "metamask_fast.train"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# What a run writes before its first checkpoint: a folder holding only these (for the same settings) is
# restarted, anything else in a folder without a checkpoint is refused.
_EARLY_FILES = {"config.yaml", "metrics.jsonl", "tensorboard"}
_CHECKPOINT_KEYS = ("identity", "model", "net_optimizer", "mask_optimizer", "schedulers", "step_count", "epoch",
                    "batch", "step", "sums", "counts", "best", "references", "training_seconds", "rng", "finished",
                    "bad_steps")
# Splits: self-supervised training, the kNN memory bank, the kNN queries.
_SPLITS = {"cifar10": ("train", "train", "test"), "cifar100": ("train", "train", "test"),
           "stl10": ("train+unlabeled", "train", "test"), "folder": ("train", "train", "test")}


class RunStopped(Exception):
    """The run cannot go on (non-finite steps, a checkpoint that cannot be written); ``str()`` says why
    and what is kept. Exit code 1."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run stopped after a step and wrote a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)
        self.signum, self.step = signum, step


def build_parser() -> argparse.ArgumentParser:
    parser = cfg.OneLineArgumentParser(
        prog=PROG,
        description="Self-supervised MetaMask training (and its Barlow Twins / SimCLR baselines) with a kNN "
                    "monitor. Settings come from the defaults (the embedded digits run), then --config, then "
                    "these flags.",
    )
    parser.add_argument("--config", default=None,
                        help=f"a preset ({', '.join(cfg.preset_names())}) or a YAML file of settings")
    parser.add_argument("--resume", default=None,
                        help="a checkpoint (or run folder) to continue from; by default a run resumes from "
                             "the checkpoint in its own run folder")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        name, (_, help_text) = field.name, cfg.FIELD_SPECS[field.name]
        default = getattr(defaults, name)
        shown = "auto" if default is None else (",".join(map(str, default)) if isinstance(default, tuple) else default)
        if field.type == "bool":
            parser.add_argument(cfg.flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default {shown})")
        else:
            parser.add_argument(cfg.flag(name), dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
                                help=f"{help_text} (default {shown})")
    return parser


def parse_config(argv: Sequence[str] | None) -> tuple[TrainConfig, str | None, dict[str, str]]:
    """The settings from defaults, ``--config`` and flags (checked, not yet resolved), the ``--resume``
    value, and where each explicitly given setting came from (for error messages).

    Bad input raises :class:`ConfigError`; ``--help`` raises ``SystemExit(0)``; a malformed command line
    (an unknown flag, a missing value) ``SystemExit(2)`` after one line on stderr.
    """
    args = vars(build_parser().parse_args(argv))
    preset, resume = args.pop("config"), args.pop("resume")
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if preset is not None:
        loaded, label = cfg.load_yaml(preset)
        values.update(loaded)
        origin.update({name: f"key {name!r} in {label}" for name in loaded})
    values.update(cfg.from_strings(args))
    origin.update({name: f"argument {cfg.flag(name)}" for name in args})
    config = TrainConfig(**values)
    cfg.check(config, lambda name: origin.get(name, f"argument {cfg.flag(name)}"))
    return config, resume, origin


def _where(origin: dict[str, str], name: str) -> str:
    return origin.get(name, f"argument {cfg.flag(name)}")


def _resolve_device(requested: str | None) -> str:
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    message = f"argument --device: must be cpu, cuda or cuda:N, got {requested!r}"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(message) from None
    if device.type == "cpu" and device.index is None:
        return "cpu"
    if device.type != "cuda":
        raise ConfigError(message)
    if not torch.cuda.is_available():
        raise ConfigError(f"argument --device: CUDA is not available on this machine, got {requested!r}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"argument --device: {requested!r} does not exist ({torch.cuda.device_count()} CUDA device(s))"
        )
    return str(device)


# ---------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """Training batches and the kNN monitor's labelled splits (``None`` when the dataset has no labels)."""

    batches: DigitsBatches | ImageBatches
    num_train: int
    memory: DigitsSplit | ImageSet | None = None
    queries: ImageSet | None = None
    digits: DigitsSplit | None = None


def load_data(config: TrainConfig, device: torch.device, ctx: mmdist.DistContext, origin) -> Data:
    """The datasets of ``config`` (resolved). Missing or malformed files raise :class:`ConfigError`."""
    if config.dataset == "digits":
        split = load_digits_split()
        data = Data(None, split.train_images.shape[0], digits=split)
    else:
        train_split, memory_split, query_split = _SPLITS[config.dataset]
        where = _where(origin, "data_dir")
        try:
            images = load_images(config.dataset, config.data_dir, train_split, download=config.download)
            memory = queries = None
            if config.dataset != "folder" or (Path(config.data_dir) / "test").is_dir():
                memory = load_images(config.dataset, config.data_dir, memory_split)
                queries = load_images(config.dataset, config.data_dir, query_split)
                if memory.labels is None or queries.labels is None:
                    memory = queries = None
        except DatasetError as error:
            raise ConfigError(f"{where}: {error}") from None
        data = Data(None, len(images), memory=memory, queries=queries)
    if not 2 <= config.batch_size <= data.num_train:
        raise ConfigError(f"{_where(origin, 'batch_size')}: must be between 2 and the training set size "
                          f"{data.num_train}, got {config.batch_size}")
    if config.batch_size % ctx.world_size:
        raise ConfigError(f"{_where(origin, 'batch_size')}: must be a multiple of the number of processes "
                          f"{ctx.world_size}, got {config.batch_size}")
    memory_size = data.digits.train_images.shape[0] if data.digits is not None else (
        len(data.memory) if data.memory is not None else None)
    if memory_size is not None and config.knn_k > memory_size:
        raise ConfigError(f"{_where(origin, 'knn_k')}: must be at most the {memory_size} labelled training "
                          f"images, got {config.knn_k}")
    if data.digits is not None:
        data.batches = DigitsBatches(data.digits, config.batch_size, config.seed, device, ctx.rank, ctx.world_size)
    else:
        data.batches = ImageBatches(config.dataset, images, config.image_size, config.batch_size, config.seed, device,
                                    config.workers, ctx.rank, ctx.world_size)
    return data


# ---------------------------------------------------------------------------------------------- model


def build_model(config: TrainConfig) -> MetaMaskModel:
    """The network of ``config`` (resolved): backbone, heads, and the mask (trained for metamask, fixed at 1
    for the baselines)."""
    in_channels = 1 if config.dataset == "digits" else 3
    if config.backbone == "digits_convnet":
        backbone = DigitsConvNet(in_channels=in_channels)
    else:
        backbone = cifar_resnet(int(config.backbone.removeprefix("resnet")), in_channels=in_channels)
    feature_dim = backbone.feature_dim
    if config.method == "metamask":
        # The authors' mask: sigmoid of logits that start at 0, so every dimension starts at 0.5.
        return MetaMaskModel(backbone, feature_dim, config.bt_dims, config.cl_dims, mask_init=0.0, sigmoid=True)
    model = MetaMaskModel(backbone, feature_dim, config.bt_dims, config.cl_dims, mask_init=1.0, sigmoid=False)
    model.mask.logits.requires_grad_(False)
    return model


def knn_metric(config: TrainConfig) -> str:
    """The kNN monitor's metric name, which carries its protocol: ``knn_k200_t0.1_top1``."""
    return f"knn_k{config.knn_k}_t{config.knn_temperature:g}_top1"


# ---------------------------------------------------------------------------------------------- run folder


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
    where = _where(origin, "output_dir")
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


def _is_partial_write(path: Path) -> bool:
    """A temporary file of :func:`_atomic_write` left by a process killed while writing."""
    return path.name.startswith(".") and ".tmp-" in path.name


def _only_early_files(folder: Path, config: TrainConfig) -> bool:
    """Whether ``folder`` holds nothing or only what a run with these settings writes before its first
    checkpoint (and partial writes of a killed one)."""
    present = {p.name for p in folder.iterdir() if not _is_partial_write(p)}
    return not present or (present <= _EARLY_FILES and _same_early_config(folder, config))


def _same_early_config(folder: Path, config: TrainConfig) -> bool:
    """Whether ``folder/config.yaml`` is the config of a run with these settings (stopped before its first
    checkpoint)."""
    try:
        written = cfg.yaml.safe_load((folder / "config.yaml").read_text())
        return cfg.identity(TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in written.items()})) == cfg.identity(config)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _atomic_write(path: Path, write) -> None:
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


def _write_failure(path: Path, error: OSError, step: int) -> str:
    return (f"cannot write {path}: {error.strerror or error}; the checkpoint already in the run folder (if any) "
            f"is intact, the run stopped at step {step}; make room or fix the folder, then run the same command "
            "to resume")


def _save(obj, path: Path) -> None:
    _atomic_write(path, lambda file: torch.save(obj, file))


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda file: file.write(text.encode()))


def _read_records(path: Path, up_to_step: int) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("step", math.inf) <= up_to_step:
                records.append(record)
    return records


# ---------------------------------------------------------------------------------------------- training


class _Stopper:
    """Turns SIGINT/SIGTERM into a flag the loop reads between steps (a step is never cut in half)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading_is_main():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mask_statistics(model: MetaMaskModel) -> dict[str, float]:
    with torch.no_grad():
        mask = model.mask()
        return {"mask_mean": mask.mean().item(), "mask_std": mask.std().item(),
                "mask_min": mask.min().item(), "mask_max": mask.max().item()}


def _weights_finite(model: MetaMaskModel) -> bool:
    """Whether every weight and buffer is finite (one pass per dtype through the compiled norm)."""
    from metamask_fast import ops

    tensors = [t.detach() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point() and t.numel()]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    return all(math.isfinite(float(ops.global_norm(group))) for group in by_dtype.values())


def _has_diverged(model: MetaMaskModel, images: torch.Tensor) -> bool:
    """Whether a weight, or an embedding of (finite) ``images`` in training mode, is inf or nan."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return True
    with torch.no_grad():
        return not all(torch.isfinite(z).all() for z in model(images))


@torch.no_grad()
def _loader_features(model: MetaMaskModel, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        features, labels = [], []
        for images, batch_labels in loader:
            features.append(model.features(images.to(device, non_blocking=True)).float())
            labels.append(batch_labels)
        features, labels = torch.cat(features), torch.cat(labels).to(device)
        keep = labels >= 0  # unreadable images (label -1) are left out of the evaluation
        return features[keep], labels[keep]
    finally:
        model.train(was_training)


def knn_accuracy(model: MetaMaskModel, data: Data, config: TrainConfig, device: torch.device) -> float | None:
    """The kNN monitor (masked features, cosine, k, T of ``config``), or None without labelled splits."""
    if data.digits is not None:
        split = data.digits
        return knn_top1_accuracy(
            extract_features(model, split.train_images.to(device)), split.train_labels.to(device),
            extract_features(model, split.test_images.to(device)), split.test_labels.to(device),
            k=config.knn_k, temperature=config.knn_temperature,
        )
    if data.memory is None:
        return None
    workers = min(config.workers, 4)
    train_features, train_labels = _loader_features(
        model, evaluation_loader(config.dataset, data.memory, config.image_size, workers), device)
    test_features, test_labels = _loader_features(
        model, evaluation_loader(config.dataset, data.queries, config.image_size, workers), device)
    return knn_top1_accuracy(train_features, train_labels, test_features, test_labels, k=config.knn_k,
                             temperature=config.knn_temperature)


@torch.no_grad()
def batch_correlation(model: MetaMaskModel, data: Data, config: TrainConfig, device: torch.device) -> torch.Tensor:
    """The Barlow Twins cross-correlation matrix (standardised embeddings, SPEC §1) of the two views of the
    first training batch, evaluation mode: the matrix the redundancy loss drives towards the identity."""
    was_training = model.training
    model.eval()
    try:
        x0, x1 = next(iter(data.batches.epoch(0)))
        z0, z1 = model(x0)[0].double(), model(x1)[0].double()
        z0, z1 = ((z - z.mean(0)) / z.std(0).clamp_min(1e-12) for z in (z0, z1))
        return (z0.T @ z1 / z0.shape[0]).float().cpu()
    finally:
        model.train(was_training)


class _Progress:
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


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def train(config: TrainConfig, data: Data, folder: Path, checkpoint: dict | None, ctx: mmdist.DistContext,
          started: float, engine: dict) -> dict:
    """Run (or continue) the training of ``config`` (resolved); returns the summary, also written to
    ``folder/summary.json``. Raises :class:`Interrupted` after a signal (a checkpoint is written first).
    ``engine`` (:func:`metamask_fast.info.engine`: what the run runs on) is recorded in both."""
    device = torch.device(config.device)
    main_process = ctx.is_main
    torch.manual_seed(config.seed)
    model = build_model(config)
    if config.sync_bn and ctx.is_distributed:
        model = mmdist.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)

    network_parameters = [p for name, p in model.named_parameters() if name != "mask.logits"]
    net_optimizer = torch.optim.SGD(network_parameters, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(net_optimizer, T_max=config.epochs)]
    mask_optimizer = None
    if config.method == "metamask":
        mask_optimizer = torch.optim.SGD([model.mask.logits], lr=config.mask_lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(mask_optimizer, T_max=config.epochs))
        stepper = MetaMaskStep(model, net_optimizer, mask_optimizer, weight_cl=config.weight_cl,
                               lambd=config.lambd, temperature=config.temperature,
                               second_order=config.second_order, fd_radius=config.fd_radius,
                               meta_interval=config.meta_interval, precision=config.precision,
                               channels_last=config.channels_last, distributed=ctx.is_distributed)
    else:
        stepper = SingleLossStep(model, net_optimizer, method=config.method, lambd=config.lambd,
                                 temperature=config.temperature, distributed=ctx.is_distributed,
                                 precision=config.precision, channels_last=config.channels_last)

    metric = knn_metric(config)
    batches_per_epoch = data.batches.batches_per_epoch
    references: dict[str, float] = {}
    if checkpoint is None:
        epoch, batch, step, training_seconds = 0, 0, 0, 0.0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        best: float | None = None
        bad_steps = 0  # consecutive skipped steps
        if ctx.is_distributed:
            mmdist.broadcast_module(model)
        if data.digits is not None and main_process:
            split = data.digits
            references["knn_raw_pixels"] = knn_top1_accuracy(
                split.train_images.flatten(1), split.train_labels, split.test_images.flatten(1), split.test_labels,
                k=config.knn_k, temperature=config.knn_temperature)
            references["knn_random_init"] = knn_accuracy(model, data, config, device)
    else:
        model.load_state_dict(checkpoint["model"])
        net_optimizer.load_state_dict(checkpoint["net_optimizer"])
        if mask_optimizer is not None:
            mask_optimizer.load_state_dict(checkpoint["mask_optimizer"])
        for scheduler, state in zip(schedulers, checkpoint["schedulers"]):
            scheduler.load_state_dict(state)
        if hasattr(stepper, "step_count"):
            stepper.step_count = checkpoint["step_count"]
        epoch, batch, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        training_seconds = checkpoint["training_seconds"]
        sums, counts, best = dict(checkpoint["sums"]), dict(checkpoint["counts"]), checkpoint["best"]
        bad_steps = checkpoint["bad_steps"]
        references = dict(checkpoint["references"])
        _set_rng_state(checkpoint["rng"])

    def state(finished: bool, seconds: float | None = None) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": cfg.identity(config),
            "config": json.loads(json.dumps(dataclasses.asdict(config))),
            "model": model.state_dict(),
            "net_optimizer": net_optimizer.state_dict(),
            "mask_optimizer": None if mask_optimizer is None else mask_optimizer.state_dict(),
            "schedulers": [scheduler.state_dict() for scheduler in schedulers],
            "step_count": getattr(stepper, "step_count", step),
            "epoch": epoch, "batch": batch, "step": step,
            "sums": sums, "counts": counts, "best": best, "references": references, "bad_steps": bad_steps,
            "training_seconds": training_seconds + time.perf_counter() - resumed_at if seconds is None else seconds,
            "rng": _rng_state(),
            "finished": finished,
            "torch_version": str(torch.__version__),
            "engine": engine,
        }

    def save_checkpoint(finished: bool = False) -> None:
        if main_process:
            try:
                _save(state(finished), folder / CHECKPOINT)
            except OSError as error:
                raise RunStopped(_write_failure(folder / CHECKPOINT, error, step)) from None
        mmdist.barrier()

    # The records up to the checkpoint: those of a killed run past it are redone. Resuming into a new
    # folder starts from the source run's records.
    source = Path(checkpoint["source_folder"]) if checkpoint is not None else folder
    records = _read_records(source / "metrics.jsonl", step) if main_process else []
    if main_process:
        _write_text(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    writer = _tensorboard(folder) if main_process else None
    images_per_step = config.batch_size
    progress = _Progress(config, config.epochs * batches_per_epoch, step, images_per_step, main_process)
    resumed_at = time.perf_counter()
    model.train()
    try:
        with _Stopper() as stopper:
            while epoch < config.epochs:
                lr = net_optimizer.param_groups[0]["lr"]
                epoch_started, first_batch = time.perf_counter(), batch
                for x0, x1 in data.batches.epoch(epoch, batch):
                    try:
                        result = stepper.step(x0, x1)
                    except (ValueError, ArithmeticError) as error:
                        # The losses refuse non-finite embeddings. When the network itself has blown up,
                        # the learning rate is the cause: say so in one line instead of a traceback.
                        if not _has_diverged(model, x0):
                            raise
                        raise FloatingPointError(f"the network became non-finite in epoch {epoch + 1}; try a "
                                                 f"smaller --lr (now {config.lr})") from error
                    # A skipped step (non-finite loss or gradient) changed nothing; its values stay out of the
                    # epoch's means, and enough of them in a row stop the run.
                    skipped = result.get("skipped", 0.0) == 1.0
                    bad_steps = bad_steps + 1 if skipped else 0
                    if skipped and not _weights_finite(model):
                        # An update overflowed the weights themselves (a far too large learning rate): no later
                        # step can recover. The last checkpoint on disk predates it and is kept.
                        raise FloatingPointError(f"the network's weights became non-finite in epoch {epoch + 1}; "
                                                 f"try a smaller --lr (now {config.lr})")
                    for key, value in result.items():
                        if key == "skipped" or not skipped:
                            sums[key] = sums.get(key, 0.0) + value
                            counts[key] = counts.get(key, 0) + 1
                    batch += 1
                    step += 1
                    progress.update(step, epoch + 1, result["loss"])
                    if writer is not None:
                        for key, value in result.items():
                            writer.add_scalar(f"step/{key}", value, step)
                    if bad_steps >= config.max_bad_steps:
                        save_checkpoint()
                        raise RunStopped(
                            f"{bad_steps} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                            f"and were skipped; {folder / CHECKPOINT} holds the last good state (step "
                            f"{step - bad_steps}, plus the skipped steps' position in the data); try a smaller "
                            f"--lr (now {config.lr}) or a larger --max-bad-steps")
                    if _stop_requested(stopper, ctx):
                        save_checkpoint()
                        raise Interrupted(stopper.signum or signal.SIGTERM, step)
                    if step % config.checkpoint_every == 0 and batch < batches_per_epoch:
                        save_checkpoint()
                means = {key: total / counts[key] for key, total in sums.items()}
                if not _weights_finite(model):
                    raise FloatingPointError(f"the network's weights became non-finite in epoch {epoch + 1}; try "
                                             f"a smaller --lr (now {config.lr})")
                if not math.isfinite(means.get("loss", 0.0)):
                    raise FloatingPointError(f"the loss became {means['loss']} in epoch {epoch + 1}; try a "
                                             f"smaller --lr (now {config.lr})")
                record = {"epoch": epoch + 1, "step": step, **means, "lr": lr}
                if "skipped" in sums:
                    record["skipped_steps"] = int(sums["skipped"])
                if mask_optimizer is not None:
                    record["mask_lr"] = mask_optimizer.param_groups[0]["lr"]
                record.update(_mask_statistics(model))
                seconds = time.perf_counter() - epoch_started
                # The batches this process ran (after a resume, part of the epoch).
                ran = (batches_per_epoch - first_batch) * images_per_step
                record["images_per_second"] = ran / seconds if seconds > 0 and ran else None
                record["seconds"] = training_seconds + time.perf_counter() - resumed_at
                if (epoch + 1) % config.knn_every == 0 or epoch + 1 == config.epochs:
                    try:
                        accuracy = knn_accuracy(model, data, config, device) if main_process else None
                    except ValueError as error:  # the evaluation refuses non-finite features
                        if "non-finite" not in str(error):
                            raise
                        raise FloatingPointError(f"the network's features became non-finite in epoch {epoch + 1}; "
                                                 f"try a smaller --lr (now {config.lr})") from None
                    if accuracy is not None:
                        best = accuracy if best is None else max(best, accuracy)
                        record[metric] = accuracy
                        record[f"{metric}_best"] = best
                    mmdist.barrier()
                if main_process:
                    records.append(record)
                    with open(folder / "metrics.jsonl", "a") as metrics_file:
                        metrics_file.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for key, value in record.items():
                            if value is not None:
                                writer.add_scalar(f"epoch/{key}", value, epoch + 1)
                with warnings.catch_warnings():
                    # A run resumed at an epoch's very end steps the schedulers before any optimizer step of
                    # this process: torch warns, but the schedule is the saved one and stays right.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                    for scheduler in schedulers:
                        scheduler.step()
                epoch, batch, sums, counts = epoch + 1, 0, {}, {}
                if _stop_requested(stopper, ctx):
                    save_checkpoint()
                    raise Interrupted(stopper.signum or signal.SIGTERM, step)
                save_checkpoint()  # also after the last epoch: the final outputs below can be redone from it
    finally:
        progress.close()
        if writer is not None:
            writer.close()

    last = records[-1].get(metric) if records else None
    summary = {
        "method": config.method,
        "dataset": config.dataset,
        "backbone": config.backbone,
        "epochs": config.epochs,
        "steps": step,
        "train_images": data.num_train,
        f"{metric}_last": last,
        f"{metric}_best": best,
        **references,
        "training_seconds": training_seconds + time.perf_counter() - resumed_at,
        **_mask_statistics(model),
        "seconds": time.perf_counter() - started,
        "world_size": ctx.world_size,
        "engine": engine,
    }
    if main_process:
        from metamask_fast.plots import write_plots

        try:
            _save(model.backbone.state_dict(), folder / "backbone.pt")
            _save(model.mask.state_dict(), folder / "mask.pt")
            _write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
            if records:  # a run resumed from a lone final checkpoint has none
                write_plots(folder, records, mask=model.mask().detach().cpu() if config.method == "metamask" else None,
                            correlation=batch_correlation(model, data, config, device))
            _save(state(finished=True, seconds=summary["training_seconds"]), folder / CHECKPOINT)
        except OSError as error:
            raise RunStopped(_write_failure(Path(error.filename or folder), error, step)) from None
    mmdist.barrier()
    return summary


def _stop_requested(stopper: _Stopper, ctx: mmdist.DistContext) -> bool:
    """Whether any process got a signal (all processes stop at the same step)."""
    requested = stopper.signum is not None
    if not ctx.is_distributed:
        return requested
    flag = torch.tensor([float(requested)], device=ctx.device if ctx.device.startswith("cuda") else "cpu")
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


def _print_summary(summary: dict, config: TrainConfig, folder: Path) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    ctx = None
    try:
        try:
            config, resume, origin = parse_config(argv)
        except SystemExit as exit_request:  # --help, or a malformed command line already reported
            return exit_request.code if isinstance(exit_request.code, int) else 2
        config = cfg.resolve(config)
        device = _resolve_device(config.device)
        ctx = mmdist.init_from_env(device)
        if ctx.is_distributed and device == "cuda":  # one GPU per process: cuda:LOCAL_RANK
            device = ctx.device
        config = dataclasses.replace(config, device=device)
        device = torch.device(config.device)
        if config.dataset == "digits" or config.workers == 0:
            torch.set_num_threads(max(1, torch.get_num_threads() // ctx.world_size))
        folder, checkpoint = prepare_run_folder(config, resume, origin)
        config = dataclasses.replace(config, output_dir=str(folder))
        if checkpoint is not None and checkpoint.get("finished"):
            print(f"{PROG}: the run in {checkpoint['source_folder']} already finished ({config.epochs} epochs); "
                  "nothing to do")
            return 0
        data = load_data(config, device, ctx, origin)
        engine = engine_record(config.device, config.precision)
        if ctx.is_main:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for partial in [p for p in folder.iterdir() if _is_partial_write(p)]:
                    partial.unlink()  # a write cut short by a kill; the complete file it was replacing is kept
                _write_text(folder / "config.yaml", cfg.to_yaml(config))
            except OSError as error:
                raise ConfigError(f"{_where(origin, 'output_dir')}: cannot write to {str(folder)!r}: "
                                  f"{error.strerror or error}") from None
            print(f"{PROG}: {engine_line(engine)}", flush=True)  # first: a run never hides what it runs on
            print(cfg.to_yaml(config), end="")
            if checkpoint is not None:
                print(f"{PROG}: resuming from {folder / CHECKPOINT} at epoch {checkpoint['epoch'] + 1}, "
                      f"step {checkpoint['step']}")
        mmdist.barrier()
        summary = train(config, data, folder, checkpoint, ctx, started, engine)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except DatasetError as error:  # an image that cannot be read, found while training
        print(f"{PROG}: error: argument --data-dir: {last_line(error)}", file=sys.stderr)
        return 2
    except (FloatingPointError, RunStopped) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, the last complete one is kept
        print(f"{PROG}: stopped by a second SIGINT without writing a checkpoint; the last complete checkpoint is "
              "kept; run the same command to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"{PROG}: stopped by {name} after step {stop.step}; checkpoint written to "
              f"{Path(config.output_dir) / CHECKPOINT}; run the same command to resume", file=sys.stderr)
        return 128 + stop.signum
    finally:
        mmdist.shutdown()
    if ctx.is_main:
        _print_summary(summary, config, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
