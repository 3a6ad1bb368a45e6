"""The settings of a training run: defaults, YAML presets, command-line overrides and their checks.

Precedence, lowest first: the defaults of :class:`TrainConfig` (the embedded-digits run), a preset or YAML
file given with ``--config``, then the command-line flags. Every field is a flag (``--batch-size`` for
``batch_size``) and a YAML key; an unknown key, a value of the wrong type or out of range is a
:class:`ConfigError` whose message names the flag or the key and the file, and says what is allowed.

Presets ship with the package (``metamask_fast/presets/*.yaml``); ``--config NAME`` picks one of them, any
other value is read as a path to a YAML file of the same form (a flat mapping of field names to values).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = ["ConfigError", "TrainConfig", "PRESETS_DIR", "preset_names", "load_yaml", "resolve", "check",
           "RUNTIME_FIELDS", "identity", "describe", "to_yaml", "written_config", "dataset_default"]

PRESETS_DIR = Path(__file__).with_name("presets")

METHODS = ("metamask", "barlowtwins", "simclr")
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "folder")
BACKBONES = ("digits_convnet", "resnet18", "resnet34", "resnet50")
SECOND_ORDER_MODES = ("finite_difference", "exact", "none")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "lars", "adamw")
AUGMENTATIONS = ("simclr", "asymmetric")
AUGMENT_PLACES = ("device", "workers", "batch")


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad input ends a command with exit code 2 and one line on stderr: no usage dump, no traceback.
    Flags must be spelled out (no abbreviations: ``--epoch`` is not ``--epochs``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class ConfigError(ValueError):
    """A bad setting; ``str()`` is the one line the command prints (it starts with the flag or the key)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. ``None`` means "chosen from the other settings" (see :func:`resolve`)."""

    # data
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    image_size: int | None = None
    augmentation: str = "simclr"
    augment_on: str | None = None  # auto: device
    workers: int | None = None
    # model
    backbone: str | None = None
    bt_dims: tuple[int, ...] | None = None
    cl_dims: tuple[int, ...] | None = None
    sync_bn: bool = False
    # objective and meta step
    method: str = "metamask"
    weight_cl: float = 10.0
    lambd: float = 5e-3
    temperature: float = 0.07
    second_order: str = "finite_difference"
    fd_radius: float = 1e-2
    meta_interval: int = 1
    scale_loss: float = 1.0
    # optimisation (the network's optimizer, SGD with momentum for the mask; cosine annealing per epoch, or per
    # step after a linear warm-up)
    epochs: int = 50
    batch_size: int | None = None  # per dataset: DATASET_DEFAULTS
    optimizer: str | None = None  # per dataset: DATASET_DEFAULTS
    lr: float | None = None  # per optimizer: DEFAULT_LR
    lr_biases: float | None = None
    mask_lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eta: float = 0.02
    exclude_bias_norm: bool = False
    betas: tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_epochs: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    # run
    seed: int = 0
    device: str | None = None
    output_dir: str | None = None
    checkpoint_every: int = 500
    knn_every: int | None = None  # auto: epochs // 10 (at least 1): ten points or more on the curve
    knn_k: int | None = None  # per dataset: DATASET_DEFAULTS
    knn_temperature: float = 0.1
    log_every: int = 50
    progress: bool = True
    max_bad_steps: int = 10
    requeue: bool | None = None  # auto: when SLURM_JOB_ID is set


# Settings that change how a run executes, not what it computes: a run may resume with other values.
RUNTIME_FIELDS = ("data_dir", "download", "workers", "device", "output_dir", "checkpoint_every", "knn_every",
                  "log_every", "progress", "max_bad_steps", "requeue")

# The network's learning rate per optimizer when none is given, each tuned on the digits. SGD: the Barlow Twins
# gradient is large on the digits net (the loss starts near 300 for 512 dimensions), and larger rates pushed kNN
# accuracy below the random network's (sweep in metamask_fast/train.py). LARS: 2-epoch digits runs above the
# random network (issue 17's note). AdamW: the digits recipe below (issue 18's search, bench/RESULTS.md).
DEFAULT_LR = {"sgd": 3e-5, "lars": 0.3, "adamw": 2e-3}
DEFAULT_LARS_LR_BIASES = 3e-5

# The optimizer, batch size and kNN neighbours of a dataset when none is given. The digits' recipe comes from issue
# 18's search (bench/RESULTS.md): AdamW at batch 256 rises above raw pixels within 50 epochs, where SGD's stayed at
# them; k = 20 neighbours, because the 1,437 training digits hold about 144 images a class and k = 200 averages
# over more than one. Every other dataset keeps the values all runs had before (SGD, batch 128, k = 200).
DATASET_DEFAULTS = {"digits": {"optimizer": "adamw", "batch_size": 256, "knn_k": 20}}
_GENERAL_DEFAULTS = {"optimizer": "sgd", "batch_size": 128, "knn_k": 200}


def dataset_default(dataset: str, name: str) -> Any:
    """The value of setting ``name`` (optimizer, batch_size or knn_k) that a run on ``dataset`` gets when none
    is given."""
    return DATASET_DEFAULTS.get(dataset, {}).get(name, _GENERAL_DEFAULTS[name])

# The SPEC §1 heads for the ResNets; the digits net's 64-d features get the authors' shapes scaled down.
_HEADS = {"digits_convnet": ((512, 512, 512), (256, 128))}
_SPEC_HEADS = ((2048, 2048, 2048), (2048, 256))
_NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "stl10": 96, "folder": 64}


def _number(kind: type, *, minimum: float | None = None, strict: bool = False, maximum: float | None = None,
            optional: bool = False) -> Callable[[Any], Any]:
    def convert(value):
        if value is None and optional:
            return None
        if isinstance(value, str):
            text = value.strip()
            if optional and text.lower() in ("auto", "null", "none"):
                return None
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"must be {_describe_number(kind, minimum, strict, maximum)}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()
        ):
            raise ValueError(f"must be {_describe_number(kind, minimum, strict, maximum)}, got {value!r}")
        try:
            value = kind(value)
            float(value)
        except (OverflowError, ValueError):
            raise ValueError(f"is too large, got {str(value)[:20]}…") from None
        bad = not math.isfinite(value) or (minimum is not None and (value <= minimum if strict else value < minimum))
        if bad or (maximum is not None and value > maximum):
            raise ValueError(f"must be {_describe_number(kind, minimum, strict, maximum)}, got {value!r}")
        return value

    return convert


def _describe_number(kind, minimum, strict, maximum) -> str:
    noun = "an integer" if kind is int else "a finite number"
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if strict else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return noun + (" " + " and ".join(parts) if parts else "")


def _choice(options: tuple[str, ...], *, optional: bool = False) -> Callable[[Any], Any]:
    def convert(value):
        if value is None and optional:
            return None
        if optional and isinstance(value, str) and value.lower() == "auto":
            return None
        if not isinstance(value, str) or value not in options:
            raise ValueError(f"must be one of {', '.join(options)}{' or auto' if optional else ''}, got {value!r}")
        return value

    return convert


def _boolean(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise ValueError(f"must be true or false, got {value!r}")


def _optional_boolean(value):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "null", "none")):
        return None
    return _boolean(value)


def _text(*, optional: bool = False) -> Callable[[Any], Any]:
    def convert(value):
        if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "null", "none"))):
            return None
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ValueError(f"must be a non-empty string, got {value!r}")
        return str(value)

    return convert


def _betas(value):
    items = value.split(",") if isinstance(value, str) else value
    message = f"must be two numbers in [0, 1) (e.g. 0.9,0.999), got {value!r}"
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        raise ValueError(message)
    try:
        betas = tuple(_number(float, minimum=0)(item) for item in items)
    except ValueError:
        raise ValueError(message) from None
    if not all(beta < 1 for beta in betas):
        raise ValueError(message)
    return betas


def _dims(value):
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"must be a list of positive integers (e.g. 2048,2048,2048) or auto, got {value!r}")
    try:
        dims = tuple(_number(int, minimum=1)(item) for item in items)
    except ValueError:
        raise ValueError(f"must be a list of positive integers (e.g. 2048,2048,2048) or auto, got {value!r}") from None
    return dims


# Per field: the converter that checks a value from YAML or the command line, and the flag's help.
FIELD_SPECS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "dataset": (_choice(DATASETS), "digits (embedded, the default), cifar10, cifar100, stl10 or folder"),
    "data_dir": (_text(), "folder holding the dataset in torchvision's layout (folder: the image folder)"),
    "download": (_boolean, "let torchvision download CIFAR/STL-10 into --data-dir (needs a network)"),
    "image_size": (_number(int, minimum=8, optional=True),
                   "training image size; auto: 16 digits, 32 CIFAR, 96 STL-10, 64 folders"),
    "augmentation": (_choice(AUGMENTATIONS), "two-view recipe of CIFAR/STL/folders: simclr (the same "
                     "for both views) or asymmetric (solo-learn's Barlow Twins pair: saturation 0.2, solarization "
                     "p=0.2 on the second view)"),
    "augment_on": (_choice(AUGMENT_PLACES, optional=True), "where the two views are made: device (whole uint8 "
                   "batches on the training device, per-sample random keys; CIFAR, STL-10 and the digits are kept "
                   "there, image folders decoded by the loader processes), workers (PIL, one image at a time in "
                   "the loader processes; not for the digits) or batch (the digits only: one random stream per "
                   "batch, as runs made before this setting); auto: device (bench/RESULTS.md)"),
    "workers": (_number(int, minimum=0, optional=True),
                "data-loading processes (image datasets); auto: min(8, CPU cores)"),
    "backbone": (_choice(BACKBONES, optional=True), "auto: digits_convnet for digits, resnet18 otherwise"),
    "bt_dims": (_dims, "Barlow Twins head widths; auto: 2048,2048,2048 (512,512,512 on the digits net)"),
    "cl_dims": (_dims, "contrastive head widths; auto: 2048,256 (256,128 on the digits net)"),
    "sync_bn": (_boolean, "with several processes, BatchNorm statistics over all of them"),
    "method": (_choice(METHODS), "metamask, or a baseline on one loss with the mask fixed at 1: barlowtwins, simclr"),
    "weight_cl": (_number(float, minimum=0), "weight of the contrastive loss"),
    "lambd": (_number(float, minimum=0), "Barlow Twins off-diagonal weight"),
    "temperature": (_number(float, minimum=0, strict=True), "NT-Xent temperature"),
    "second_order": (_choice(SECOND_ORDER_MODES), "the mask's meta-gradient: finite_difference (the authors'), "
                                                  "exact or none (first order)"),
    "fd_radius": (_number(float, minimum=0, strict=True), "radius r of the finite difference"),
    "scale_loss": (_number(float, minimum=0, strict=True), "weight of the Barlow Twins loss (solo-learn's "
                                                          "scale_loss)"),
    "meta_interval": (_number(int, minimum=1), "the mask's meta step on every k-th step"),
    "epochs": (_number(int, minimum=1), "training epochs"),
    "batch_size": (_number(int, minimum=2, optional=True), "images per step over all processes (the last "
                   "incomplete batch of an epoch is dropped); auto: 256 digits, 128 otherwise"),
    "optimizer": (_choice(OPTIMIZERS, optional=True), "the network's optimizer: sgd (momentum), lars (official "
                  "Barlow Twins') or adamw; the mask's is SGD with momentum; auto: adamw digits, sgd otherwise"),
    "lr": (_number(float, minimum=0, strict=True, optional=True),
           "learning rate of the network (cosine); auto: 3e-5 sgd, 0.3 lars, 2e-3 adamw (tuned on the digits)"),
    "lr_biases": (_number(float, minimum=0, strict=True, optional=True),
                  "learning rate of the network's 1-d weights (biases, norms) as a group of their own, as "
                  "official Barlow Twins does; auto: 3e-5 for lars (LARS does not adapt zero-initialised "
                  "biases, which then step by lr times their gradient), --lr otherwise"),
    "mask_lr": (_number(float, minimum=0, strict=True), "SGD learning rate of the mask (metamask only)"),
    "momentum": (_number(float, minimum=0, maximum=1), "momentum of the network's SGD or LARS and of the mask's SGD"),
    "weight_decay": (_number(float, minimum=0), "weight decay of both optimizers (decoupled for adamw)"),
    "eta": (_number(float, minimum=0, strict=True), "LARS trust coefficient (solo-learn's 0.02; official Barlow "
                                                    "Twins' 0.001)"),
    "exclude_bias_norm": (_boolean, "LARS: no weight decay and no adaptation for 1-d weights (biases, norms)"),
    "betas": (_betas, "AdamW's betas"),
    "adam_eps": (_number(float, minimum=0, strict=True), "AdamW's eps"),
    "warmup_epochs": (_number(int, minimum=0), "epochs of linear warm-up (per step, from 0) before the cosine "
                                               "schedule, which then runs per step"),
    "precision": (_choice(PRECISIONS), "fp32, or bf16 autocast for the forwards (losses and weights in fp32)"),
    "channels_last": (_boolean, "channels_last memory format for the backbone (faster convolutions on GPUs)"),
    "seed": (_number(int, minimum=0, maximum=2**63 - 1), "seed of the weights, the data order and the augmentations"),
    "device": (_text(optional=True), "cpu, cuda or cuda:N; auto: cuda when available (torchrun: cuda:LOCAL_RANK)"),
    "output_dir": (_text(optional=True), "run folder; auto: runs/<dataset>-<method>-<hash of the settings>. "
                                         "Re-running the same command resumes the run in it"),
    "checkpoint_every": (_number(int, minimum=1), "steps between checkpoints (also at every epoch's end)"),
    "knn_every": (_number(int, minimum=1, optional=True), "epochs between kNN evaluations (also after the last "
                  "epoch); auto: epochs // 10, at least 1, so that the curve has ten points or more"),
    "knn_k": (_number(int, minimum=1, optional=True), "neighbours of the kNN monitor (in the metric's name); auto: "
              "20 digits (about 144 training images a class), 200 otherwise"),
    "knn_temperature": (_number(float, minimum=0, strict=True), "temperature of the kNN monitor's weights"),
    "log_every": (_number(int, minimum=1), "steps between progress lines when stderr is not a terminal"),
    "progress": (_boolean, "progress bar (or lines) on stderr"),
    "max_bad_steps": (_number(int, minimum=1), "consecutive steps with a non-finite loss or gradient (each "
                                               "skipped without any update) after which the run stops"),
    "requeue": (_optional_boolean, "after SIGUSR1 (SLURM's --signal=USR1@SECONDS before a time limit or "
                                   "pre-emption) and the checkpoint, ask scontrol requeue $SLURM_JOB_ID; auto: when "
                                   "SLURM_JOB_ID is set"),
}
assert set(FIELD_SPECS) == {f.name for f in fields(TrainConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def where(origin: dict[str, str], name: str) -> str:
    """Where setting ``name`` came from, for an error message: ``origin``'s entry, else its flag."""
    return origin.get(name, f"argument {flag(name)}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (YAML itself keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(source: str) -> tuple[dict[str, Any], str]:
    """The checked mapping of preset ``source`` (a name of :func:`preset_names` or a path) and its label."""
    path = PRESETS_DIR / f"{source}.yaml" if source in preset_names() else Path(source)
    label = f"preset {source!r}" if path.parent == PRESETS_DIR else str(path)
    if not path.is_file():
        raise ConfigError(
            f"argument --config: {source!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file"
        )
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"argument --config: cannot read {label}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"argument --config: {label} must be a mapping of settings, got {type(data).__name__}")
    values = {}
    for key, value in data.items():
        if key not in FIELD_SPECS:
            raise ConfigError(f"key {key!r} in {label}: not a setting (known: {', '.join(FIELD_SPECS)})")
        values[key] = _convert(key, value, f"key {key!r} in {label}")
    return values, label


def _convert(name: str, value: Any, where: str) -> Any:
    try:
        return FIELD_SPECS[name][0](value)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def from_strings(values: dict[str, Any], where: Callable[[str], str] = lambda name: f"argument {flag(name)}"):
    """Converted values (from the command line), each error naming its flag."""
    return {name: _convert(name, value, where(name)) for name, value in values.items()}


def resolve(config: TrainConfig) -> TrainConfig:
    """``config`` with every ``None`` that has a natural value filled in (device and output folder are left
    to the trainer, which knows the machine)."""
    backbone = config.backbone or ("digits_convnet" if config.dataset == "digits" else "resnet18")
    bt_dims, cl_dims = _HEADS.get(backbone, _SPEC_HEADS)
    optimizer = config.optimizer or dataset_default(config.dataset, "optimizer")
    return dataclasses.replace(
        config,
        backbone=backbone,
        optimizer=optimizer,
        batch_size=config.batch_size or dataset_default(config.dataset, "batch_size"),
        knn_k=config.knn_k or dataset_default(config.dataset, "knn_k"),
        bt_dims=config.bt_dims or bt_dims,
        cl_dims=config.cl_dims or cl_dims,
        image_size=config.image_size or _NATIVE_SIZE[config.dataset],
        lr=DEFAULT_LR[optimizer] if config.lr is None else config.lr,
        lr_biases=(DEFAULT_LARS_LR_BIASES if config.lr_biases is None and optimizer == "lars"
                   else config.lr_biases),
        augment_on=config.augment_on or "device",
        workers=min(8, os.cpu_count() or 1) if config.workers is None else config.workers,
        knn_every=config.knn_every or max(1, config.epochs // 10),
        requeue=bool(os.environ.get("SLURM_JOB_ID")) if config.requeue is None else config.requeue,
    )


def check(config: TrainConfig, where: Callable[[str], str]) -> None:
    """Checks between settings (each value alone was checked on the way in)."""
    if config.backbone == "digits_convnet" and config.dataset != "digits":
        raise ConfigError(f"{where('backbone')}: digits_convnet is for the 16x16 digits; use resnet18 or resnet50 "
                          f"for {config.dataset}")
    if config.dataset == "digits" and config.augment_on == "workers":
        raise ConfigError(f"{where('augment_on')}: the digits are augmented on the device (whole batches); "
                          "workers is for CIFAR, STL-10 and image folders")
    if config.dataset != "digits" and config.augment_on == "batch":
        raise ConfigError(f"{where('augment_on')}: batch is the digits' earlier recipe; use device or workers for "
                          f"{config.dataset}")
    if config.dataset == "digits" and config.augmentation != "simclr":
        raise ConfigError(f"{where('augmentation')}: the digits have their own recipe; {config.augmentation} "
                          "is for CIFAR, STL-10 and image folders")
    optimizer = config.optimizer or dataset_default(config.dataset, "optimizer")
    if config.exclude_bias_norm and optimizer != "lars":
        raise ConfigError(f"{where('exclude_bias_norm')}: only with --optimizer lars, got --optimizer {optimizer}"
                          f"{'' if config.optimizer else ' (the default for ' + config.dataset + ')'}")
    if config.warmup_epochs >= config.epochs:
        raise ConfigError(f"{where('warmup_epochs')}: must be below --epochs {config.epochs}, got "
                          f"{config.warmup_epochs}")
    if config.requeue and not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError(f"{where('requeue')}: SLURM_JOB_ID is not set; requeueing asks SLURM to requeue this job "
                          "(scontrol requeue $SLURM_JOB_ID), so it needs a SLURM job")
    if config.dataset == "digits" and config.image_size not in (None, 16):
        raise ConfigError(f"{where('image_size')}: the digits are 16x16, got {config.image_size}")


# Settings added after the first checkpoint format, with the value every run before them had: a run at that
# value has the identity (and default folder name) it had then, so that existing run folders still resume.
LATER_FIELDS = {"augmentation": "simclr", "optimizer": "sgd", "lr_biases": None, "eta": 0.02,
                "exclude_bias_norm": False, "betas": [0.9, 0.999], "adam_eps": 1e-8, "warmup_epochs": 0,
                "scale_loss": 1.0}


def _augment_on_before(dataset: str) -> str:
    """How runs made before ``augment_on`` existed augmented: the digits a batch at a time, the rest in workers."""
    return "batch" if dataset == "digits" else "workers"


def identity(config: TrainConfig) -> dict[str, Any]:
    """The settings that define what a run computes (everything but :data:`RUNTIME_FIELDS`), as JSON types;
    settings of :data:`LATER_FIELDS` (and ``augment_on``, whose earlier value depends on the dataset) only where
    they differ from the value runs had before them."""
    values = json.loads(json.dumps(dataclasses.asdict(config)))
    earlier = {**LATER_FIELDS, "augment_on": _augment_on_before(config.dataset)}
    return {key: value for key, value in values.items()
            if key not in RUNTIME_FIELDS and not (key in earlier and value == earlier[key])}


def written_config(values: dict[str, Any]) -> TrainConfig:
    """The settings of a run folder's ``config.yaml`` (``values``, read as YAML): a setting added after the
    folder was written takes the value runs had before it (:data:`LATER_FIELDS`), not today's default."""
    earlier = {**LATER_FIELDS, "augment_on": _augment_on_before(values.get("dataset", TrainConfig.dataset))}
    merged = {**{key: value for key, value in earlier.items() if key not in values}, **values}
    return TrainConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in merged.items()})


def describe(config: TrainConfig) -> str:
    """A short hash of :func:`identity`, for default run-folder names."""
    digest = hashlib.sha256(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()
    return digest[:8]


def to_yaml(config: TrainConfig) -> str:
    values = dataclasses.asdict(config)
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    return yaml.safe_dump(values, sort_keys=False)
