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
``--resume PATH`` resumes from another one. SIGINT, SIGTERM and SIGUSR1 on any process finish the current step
(all processes stop at the same one), write a checkpoint and exit (130, 143, 138); after SIGUSR1 under SLURM
(``--requeue``, by default when SLURM_JOB_ID is set) the job asks ``scontrol requeue $SLURM_JOB_ID`` once the
checkpoint is on disk. Under ``torchrun --nproc-per-node N -m metamask_fast.train`` the global batch is split over
the processes and the losses see the gathered embeddings (:mod:`metamask_fast.distributed`).

``--method barlowtwins`` and ``--method simclr`` train the same network on one loss alone, with the mask
frozen at the identity (no sigmoid, every entry 1, no optimizer).

This module reads as the loop runs: the command line (:func:`parse_config`), the parts a run trains
(:func:`build_training`; :func:`fresh_state`, or :func:`metamask_fast.runfolder.restore` from a checkpoint),
the loop (:func:`train`: :func:`train_one_epoch`, :func:`epoch_record` and :func:`evaluate` per epoch, then
:func:`finish`), :func:`main`, and last the signal and divergence helpers. The data is
:mod:`metamask_fast.data`, the step :mod:`metamask_fast.meta`, the run folder :mod:`metamask_fast.runfolder`,
what a run reports :mod:`metamask_fast.reporting`.

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
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from metamask_fast import config as cfg
from metamask_fast import distributed as mmdist
from metamask_fast.config import ConfigError, TrainConfig
from metamask_fast.data import DatasetError
from metamask_fast.data.pipeline import Data, load_data, loader_failure
from metamask_fast.evaluate import (batch_correlation, dimension_analysis, knn_accuracy, knn_features, knn_metric,
                                    knn_references)
from metamask_fast.info import engine as engine_record
from metamask_fast.info import engine_line
from metamask_fast.meta import MetaMaskStep, SingleLossStep
from metamask_fast.models import MetaMaskModel, build_model
from metamask_fast.optim import LARS
from metamask_fast.reporting import (Report, knn_references_by_label, mask_statistics, print_summary, process_resources,
                                     run_summary)
from metamask_fast.runfolder import (
    CHECKPOINT,
    RunState,
    checkpoint_state,
    open_run_folder,
    prepare_run_folder,
    restore,
    save,
    write_failure,
    write_text,
)
from metamask_fast.runs import last_line

__all__ = ["TrainConfig", "build_parser", "parse_config", "build_model", "train", "main", "knn_metric"]

PROG = "metamask_fast.train"


class RunStopped(Exception):
    """The run cannot go on (non-finite steps, a checkpoint that cannot be written); ``str()`` says why
    and what is kept. Exit code 1."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGUSR1 arrived (on any process); the run stopped after a step and wrote a checkpoint."""

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
        if field.type in ("bool", "bool | None"):
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


# ---------------------------------------------------------------------------------------------- the parts


@dataclasses.dataclass
class Training:
    """What a run trains: the model, the network's and the mask's optimizers with their schedules,
    and the step that drives them (:class:`~metamask_fast.meta.MetaMaskStep`, or
    :class:`~metamask_fast.meta.SingleLossStep` for the baselines, which have no mask optimizer)."""

    model: MetaMaskModel
    net_optimizer: torch.optim.Optimizer
    mask_optimizer: torch.optim.Optimizer | None
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    stepper: MetaMaskStep | SingleLossStep
    # The learning-rate factor per step when the schedulers step after every step (warm-up); None: they step
    # after every epoch.
    step_schedule: WarmupCosine | None = None


def build_training(config: TrainConfig, ctx: mmdist.DistContext, device: torch.device,
                   steps_per_epoch: int) -> Training:
    """The model (initialised under ``config.seed``), its optimizers, schedules and step."""
    torch.manual_seed(config.seed)
    model = build_model(config)
    if config.sync_bn and ctx.is_distributed:
        model = mmdist.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)

    net_optimizer = build_optimizer(config, [p for name, p in model.named_parameters() if name != "mask.logits"])
    optimizers = [net_optimizer]
    if config.method != "metamask":
        stepper = SingleLossStep(model, net_optimizer, method=config.method, lambd=config.lambd,
                                 temperature=config.temperature, distributed=ctx.is_distributed,
                                 precision=config.precision, channels_last=config.channels_last,
                                 scale_loss=config.scale_loss)
        mask_optimizer = None
    else:
        mask_optimizer = torch.optim.SGD([model.mask.logits], lr=config.mask_lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        optimizers.append(mask_optimizer)
        stepper = MetaMaskStep(model, net_optimizer, mask_optimizer, weight_cl=config.weight_cl,
                               scale_loss=config.scale_loss, lambd=config.lambd, temperature=config.temperature,
                               second_order=config.second_order, fd_radius=config.fd_radius,
                               meta_interval=config.meta_interval, precision=config.precision,
                               channels_last=config.channels_last, distributed=ctx.is_distributed)
    schedule = None
    if config.warmup_epochs == 0:  # cosine per epoch
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=config.epochs) for o in optimizers]
    else:
        schedule = WarmupCosine(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimizers]
    return Training(model, net_optimizer, mask_optimizer, schedulers, stepper,
                    step_schedule=schedule)


def build_optimizer(config: TrainConfig, network: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The network's optimizer of ``config.optimizer`` over ``network``; with ``config.lr_biases``, the 1-d
    weights (biases, norms) in a second group at that rate, as official Barlow Twins does."""
    groups: list = network
    if config.lr_biases is not None:
        groups = [{"params": [p for p in network if p.ndim != 1]},
                  {"params": [p for p in network if p.ndim == 1], "lr": config.lr_biases}]
    if config.optimizer == "lars":
        return LARS(groups, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum, eta=config.eta,
                    weight_decay_filter=config.exclude_bias_norm, lars_adaptation_filter=config.exclude_bias_norm)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.adam_eps,
                                 weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class WarmupCosine:
    """The learning-rate factor at step ``s`` (official Barlow Twins' and solo-learn's schedule): ``s / w``
    during the ``w`` warm-up steps, then a cosine from 1 to 0 over the remaining steps of ``total``."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def fresh_state(config: TrainConfig, data: Data, training: Training, ctx: mmdist.DistContext,
                device: torch.device) -> RunState:
    """The state of a run that starts now: the same weights on every process, and (digits) the kNN of
    raw pixels and of the network at its random initialisation, the references of the summary."""
    state = RunState()
    if ctx.is_distributed:
        mmdist.broadcast_module(training.model)
    if data.digits is not None and ctx.is_main:
        state.references = knn_references(training.model, data, config, device)
    return state


@dataclasses.dataclass
class Run:
    """A run in progress: its settings, data, folder and parts, where it stands, and its checkpoints."""

    config: TrainConfig
    data: Data
    folder: Path
    ctx: mmdist.DistContext
    training: Training
    state: RunState
    engine: dict
    resumed_at: float = 0.0  # time.perf_counter() when this process began training

    def training_seconds(self) -> float:
        """Seconds of training in all, resumed runs included."""
        return self.state.training_seconds + time.perf_counter() - self.resumed_at

    def checkpoint(self, *, finished: bool = False, seconds: float | None = None) -> dict:
        return checkpoint_state(self.config, self.training, self.state, engine=self.engine, finished=finished,
                                seconds=self.training_seconds() if seconds is None else seconds)

    def save_checkpoint(self) -> None:
        """Write the checkpoint (main process), then wait for every process."""
        if self.ctx.is_main:
            try:
                save(self.checkpoint(), self.folder / CHECKPOINT)
            except OSError as error:
                raise RunStopped(write_failure(self.folder / CHECKPOINT, error, self.state.step)) from None
        mmdist.barrier()

    def stop_if_requested(self, stopper: _Stopper) -> None:
        """After a signal on any process: a checkpoint, then :class:`Interrupted` (all at the same step, naming
        the same signal)."""
        signum = _stop_requested(stopper, self.ctx)
        if signum is not None:
            self.save_checkpoint()
            raise Interrupted(signum, self.state.step)


# ---------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, data: Data, folder: Path, checkpoint: dict | None, ctx: mmdist.DistContext,
          started: float, engine: dict) -> dict:
    """Run (or continue) the training of ``config`` (resolved); returns the summary, also written to
    ``folder/summary.json``. Raises :class:`Interrupted` after a signal (a checkpoint is written first).
    ``engine`` (:func:`metamask_fast.info.engine`: what the run runs on) is recorded in both."""
    device = torch.device(config.device)
    training = build_training(config, ctx, device, data.batches.batches_per_epoch)
    state = (fresh_state(config, data, training, ctx, device) if checkpoint is None
             else restore(checkpoint, training))
    run = Run(config, data, folder, ctx, training, state, engine)
    # Resuming into a new folder starts from the source run's records.
    source = Path(checkpoint["source_folder"]) if checkpoint is not None else folder
    report = Report(config, folder, source, state.step, config.epochs * data.batches.batches_per_epoch, ctx.is_main)
    run.resumed_at = time.perf_counter()
    training.model.train()
    try:
        with _Stopper() as stopper:
            while state.epoch < config.epochs:
                rates = _learning_rates(run)
                epoch_started, first_batch = time.perf_counter(), state.batch
                train_one_epoch(run, report, stopper)
                record = epoch_record(run, rates, epoch_started, first_batch)
                if (state.epoch + 1) % config.knn_every == 0 or state.epoch + 1 == config.epochs:
                    evaluate(run, record)
                report.epoch(record)
                if training.step_schedule is None:
                    _step_schedulers(training.schedulers)
                state.next_epoch()
                run.stop_if_requested(stopper)
                run.save_checkpoint()  # also after the last epoch: the final outputs below can be redone from it
    finally:
        report.close()
    return finish(run, report.records, started)


def train_one_epoch(run: Run, report: Report, stopper: _Stopper) -> None:
    """The steps of the current epoch from the current batch on, with a checkpoint every
    ``checkpoint_every`` steps (and before stopping: a signal, too many skipped steps in a row)."""
    config, state, model = run.config, run.state, run.training.model
    batches_per_epoch = run.data.batches.batches_per_epoch
    for x0, x1 in run.data.batches.epoch(state.epoch, state.batch):
        result = _step(run, x0, x1)
        # A skipped step (non-finite loss or gradient) changed nothing; its values stay out of the epoch's
        # means, and enough of them in a row stop the run.
        skipped = result.get("skipped", 0.0) == 1.0
        state.bad_steps = state.bad_steps + 1 if skipped else 0
        if skipped and not _weights_finite(model):
            # An update overflowed the weights themselves (a far too large learning rate): no later step can
            # recover. The last checkpoint on disk predates it and is kept.
            raise FloatingPointError(f"the network's weights became non-finite in epoch {state.epoch + 1}; "
                                     f"try a smaller --lr (now {config.lr})")
        state.add(result, skipped)
        state.batch += 1
        state.step += 1
        if run.training.step_schedule is not None:
            _step_schedulers(run.training.schedulers)
        report.step(state.step, state.epoch + 1, result)
        if state.bad_steps >= config.max_bad_steps:
            run.save_checkpoint()
            raise RunStopped(
                f"{state.bad_steps} consecutive steps (up to step {state.step}) had a non-finite loss or gradient "
                f"and were skipped; {run.folder / CHECKPOINT} holds the last good state (step "
                f"{state.step - state.bad_steps}, plus the skipped steps' position in the data); try a smaller "
                f"--lr (now {config.lr}) or a larger --max-bad-steps")
        run.stop_if_requested(stopper)
        if state.step % config.checkpoint_every == 0 and state.batch < batches_per_epoch:
            run.save_checkpoint()


def _step(run: Run, x0: torch.Tensor, x1: torch.Tensor) -> dict[str, float]:
    """One training step; when the network itself has blown up (the losses refuse non-finite embeddings),
    one line that names the learning rate instead of a traceback."""
    try:
        return run.training.stepper.step(x0, x1)
    except (ValueError, ArithmeticError) as error:
        if not _has_diverged(run.training.model, x0):
            raise
        raise FloatingPointError(f"the network became non-finite in epoch {run.state.epoch + 1}; try a "
                                 f"smaller --lr (now {run.config.lr})") from error


def _learning_rates(run: Run) -> dict[str, float]:
    """The network's learning rate (its first group's) and the mask's at the current epoch's first step, as
    the epoch's record shows them. With per-step schedules, from the schedule, so that a run resumed in the
    middle of an epoch records what the uninterrupted run does."""
    training = run.training
    optimizers = [training.net_optimizer] + ([training.mask_optimizer] if training.mask_optimizer else [])
    first_step = run.state.epoch * run.data.batches.batches_per_epoch
    # LambdaLR sets each rate to initial_lr · factor(step): the same product, the same bits.
    rates = [group["lr"] if training.step_schedule is None else group["initial_lr"] * training.step_schedule(first_step)
             for group in (optimizer.param_groups[0] for optimizer in optimizers)]
    return dict(zip(("lr", "mask_lr"), rates))


def epoch_record(run: Run, rates: dict[str, float], epoch_started: float, first_batch: int) -> dict:
    """The epoch's line of ``metrics.jsonl`` (before the evaluation): the means of the step values, the
    learning rates at the epoch's first step (``rates``), the mask's statistics, images/s and seconds."""
    config, state, model = run.config, run.state, run.training.model
    means = {key: total / state.counts[key] for key, total in state.sums.items()}
    if not _weights_finite(model):
        raise FloatingPointError(f"the network's weights became non-finite in epoch {state.epoch + 1}; try "
                                 f"a smaller --lr (now {config.lr})")
    if not math.isfinite(means.get("loss", 0.0)):
        raise FloatingPointError(f"the loss became {means['loss']} in epoch {state.epoch + 1}; try a "
                                 f"smaller --lr (now {config.lr})")
    record = {"epoch": state.epoch + 1, "step": state.step, **means, "lr": rates["lr"]}
    if "skipped" in state.sums:
        record["skipped_steps"] = int(state.sums["skipped"])
    if "mask_lr" in rates:
        record["mask_lr"] = rates["mask_lr"]
    record.update(mask_statistics(model))
    seconds = time.perf_counter() - epoch_started
    # The batches this process ran (after a resume, part of the epoch).
    ran = (run.data.batches.batches_per_epoch - first_batch) * config.batch_size
    record["images_per_second"] = ran / seconds if seconds > 0 and ran else None
    record["seconds"] = run.training_seconds()
    record.update(process_resources())
    return record


def evaluate(run: Run, record: dict) -> None:
    """The kNN monitor (main process) into ``record``, with the best value so far."""
    config, state = run.config, run.state
    device = torch.device(config.device)
    try:
        accuracy = knn_accuracy(run.training.model, run.data, config, device) if run.ctx.is_main else None
    except ValueError as error:  # the evaluation refuses non-finite features
        if "non-finite" not in str(error):
            raise
        raise FloatingPointError(f"the network's features became non-finite in epoch {state.epoch + 1}; "
                                 f"try a smaller --lr (now {config.lr})") from None
    if accuracy is not None:
        metric = knn_metric(config)
        state.best = accuracy if state.best is None else max(state.best, accuracy)
        record[metric] = accuracy
        record[f"{metric}_best"] = state.best
    mmdist.barrier()


def _step_schedulers(schedulers) -> None:
    with warnings.catch_warnings():
        # A run resumed at an epoch's very end steps the schedulers before any optimizer step of this
        # process: torch warns, but the schedule is the saved one and stays right.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
        for scheduler in schedulers:
            scheduler.step()


def finish(run: Run, records: list[dict], started: float) -> dict:
    """The summary, and (main process) the final files: ``backbone.pt``, ``mask.pt``, ``summary.json``, the
    plots and the finished checkpoint."""
    config, model, folder = run.config, run.training.model, run.folder
    summary = run_summary(config, model, records, steps=run.state.step, train_images=run.data.num_train,
                          best=run.state.best, references=run.state.references,
                          training_seconds=run.training_seconds(), started=started,
                          world_size=run.ctx.world_size, engine=run.engine)
    if run.ctx.is_main:
        from metamask_fast.plots import write_plots

        device = torch.device(config.device)
        dims = _dimension_analysis(run, device)
        if dims is not None:
            summary["dimensions"] = dims
        try:
            save(model.backbone.state_dict(), folder / "backbone.pt")
            save(model.mask.state_dict(), folder / "mask.pt")
            write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
            if records:  # a run resumed from a lone final checkpoint has none
                write_plots(folder, records, mask=model.mask().detach().cpu() if config.method == "metamask" else None,
                            correlation=batch_correlation(model, run.data, config, device),
                            references=knn_references_by_label(run.state.references or {}), dims=dims)
            save(run.checkpoint(finished=True, seconds=summary["training_seconds"]), folder / CHECKPOINT)
        except OSError as error:
            raise RunStopped(write_failure(Path(error.filename or folder), error, run.state.step)) from None
    mmdist.barrier()
    return summary


def _dimension_analysis(run: Run, device: torch.device) -> dict | None:
    """What the mask learned (a MetaMask run with the kNN monitor's labelled splits): the dimensional analysis
    of :func:`metamask_fast.evaluate.dimension_analysis` on the monitor's features and protocol."""
    config, model = run.config, run.training.model
    if config.method != "metamask":
        return None
    features = knn_features(model, run.data, config, device)
    if features is None:
        return None
    return dimension_analysis(*features, model.mask().detach(), k=config.knn_k, temperature=config.knn_temperature)


def agreed_start(config: TrainConfig, resume: str | None, origin, ctx: mmdist.DistContext) -> tuple[Path, dict | None]:
    """:func:`~metamask_fast.runfolder.prepare_run_folder` on rank 0 alone, its outcome (the folder, the checkpoint
    to continue from, or the refusal) sent to every rank: the ranks of a group cannot start from different
    checkpoints, even where another node's view of the folder lags (a network file system) or lacks it."""
    if not ctx.is_distributed:
        return prepare_run_folder(config, resume, origin)
    outcome = None
    if ctx.is_main:
        try:
            folder, checkpoint = prepare_run_folder(config, resume, origin)
            outcome = {"folder": str(folder), "checkpoint": checkpoint}
        except ConfigError as error:
            outcome = {"error": str(error)}
    outcome = mmdist.broadcast_object(outcome, ctx.device)
    if "error" in outcome:
        raise ConfigError(outcome["error"])
    return Path(outcome["folder"]), outcome["checkpoint"]


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
        folder, checkpoint = agreed_start(config, resume, origin, ctx)
        config = dataclasses.replace(config, output_dir=str(folder))
        if checkpoint is not None and checkpoint.get("finished"):
            print(f"{PROG}: the run in {checkpoint['source_folder']} already finished ({config.epochs} epochs); "
                  "nothing to do")
            return 0
        data = load_data(config, device, ctx, origin)
        engine = engine_record(config.device, config.precision)
        if ctx.is_main:
            open_run_folder(folder, config, origin)
            print(f"{PROG}: {engine_line(engine)}", flush=True)  # first: a run never hides what it runs on
            print(f"{PROG}: data: {data.batches.describe()}", flush=True)
            print(cfg.to_yaml(config), end="")
            if checkpoint is not None:
                restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if ctx.is_distributed else "0"
                print(f"{PROG}: resuming from {folder / CHECKPOINT} at epoch {checkpoint['epoch'] + 1}, "
                      f"step {checkpoint['step']}{f' (torchrun restart {restart})' if restart != '0' else ''}")
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
        then = "run the same command to resume"
        if stop.signum == signal.SIGUSR1 and config.requeue and ctx.is_main:
            then = _requeue(os.environ["SLURM_JOB_ID"])
        print(f"{PROG}: stopped by {name} after step {stop.step}; checkpoint written to "
              f"{Path(config.output_dir) / CHECKPOINT}; {then}", file=sys.stderr)
        return 128 + stop.signum
    except Exception as error:  # last: the errors above are Exceptions too
        cause = loader_failure(error)
        if cause is None:
            raise
        print(f"{PROG}: error: a data loader process failed ({cause}); the last checkpoint in {config.output_dir} "
              "is intact; run the same command to resume", file=sys.stderr)
        return 1
    finally:
        mmdist.shutdown()
    if ctx.is_main:
        print_summary(summary, config, folder)
    return 0


# ---------------------------------------------------------------------------------------------- signals and divergence


# The signals that stop a run after its current step, in the order in which one names the stop when several
# arrived: Ctrl-C, SIGTERM (scancel, a time limit, torchrun stopping its workers), SIGUSR1 (SLURM's warning before
# a time limit or pre-emption, with --signal=USR1@SECONDS), the one signal that requeues the job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class _Stopper:
    """Turns the :data:`STOP_SIGNALS` into flags the loop reads between steps (a step is never cut in half)."""

    def __init__(self):
        self.received: set[int] = set()
        self._previous = {}

    @property
    def signum(self) -> int | None:
        return next((s for s in STOP_SIGNALS if s in self.received), None)

    def __enter__(self):
        if threading_is_main():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signal.SIGINT in self.received and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received.add(signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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


def _stop_requested(stopper: _Stopper, ctx: mmdist.DistContext) -> int | None:
    """The signal that stops the run, when any process got one of :data:`STOP_SIGNALS` (every process stops at
    the same step and names the same signal), else None."""
    if not ctx.is_distributed:
        return stopper.signum
    flags = torch.tensor([float(s in stopper.received) for s in STOP_SIGNALS],
                         device=ctx.device if ctx.device.startswith("cuda") else "cpu")
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return next((s for s, flag in zip(STOP_SIGNALS, flags.tolist()) if flag), None)


def _requeue(job: str) -> str:
    """Ask SLURM to requeue job ``job`` (its checkpoint is on disk); what happens next, for the stop's line."""
    command = ["scontrol", "requeue", job]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()
        failure = None if result.returncode == 0 else (said[-1] if said else f"exit code {result.returncode}")
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = last_line(error)
    if failure is None:
        return f"asked SLURM to requeue job {job} ({' '.join(command)}); the requeued job resumes from it"
    return f"{' '.join(command)} failed ({failure}); requeue the job or run the same command to resume"


if __name__ == "__main__":
    sys.exit(main())
