"""A finished run folder as the evaluation commands see it: its settings, network and features of a split.

A finished (or checkpointed) run's settings, the trained backbone with its mask, and the frozen, masked
features of a dataset split.

Shared by ``python -m metamask_fast.linear`` and ``python -m metamask_fast.embed``. Errors are
:class:`~metamask_fast.config.ConfigError` whose message starts with the argument to fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metamask_fast import config as cfg
from metamask_fast.config import ConfigError, TrainConfig
from metamask_fast.data import load_digits_split
from metamask_fast.data import DatasetError, load_images
from metamask_fast.models import MetaMaskModel, build_model

__all__ = ["load_run", "split_features", "resolve_device", "last_line"]


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"argument --device: must be cpu, cuda or cuda:N, got {requested!r}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"argument --device: {requested!r} is not available on this machine")
    return device


def load_run(run_dir: str | Path, device: torch.device) -> tuple[TrainConfig, MetaMaskModel]:
    """The settings (``config.yaml``) and the trained network (``backbone.pt``, ``mask.pt``) of a run
    folder, in evaluation mode on ``device``. The heads are not needed for evaluation and stay untrained."""
    folder = Path(run_dir)
    for name in ("config.yaml", "backbone.pt", "mask.pt"):
        if not (folder / name).is_file():
            raise ConfigError(f"argument --run: {str(folder)!r} has no {name}; pass the folder of a finished "
                              "python -m metamask_fast.train run")
    try:  # every value checked as the trainer checks --config files
        values, _ = cfg.load_yaml(str(folder / "config.yaml"))
    except ConfigError as error:
        raise ConfigError(f"argument --run: {str(error).removeprefix('argument --config: ')}") from None
    config = cfg.resolve(cfg.written_config(values))
    model = build_model(config)
    try:
        model.backbone.load_state_dict(torch.load(folder / "backbone.pt", map_location="cpu", weights_only=True))
        model.mask.load_state_dict(torch.load(folder / "mask.pt", map_location="cpu", weights_only=True))
    except Exception as error:  # noqa: BLE001 - any unreadable or mismatched file gets the same answer
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"argument --run: cannot load the weights in {folder} ({detail[:200]})") from None
    return config, model.to(device).eval()


@torch.no_grad()
def split_features(model: MetaMaskModel, config: TrainConfig, split: str, device: torch.device, *,
                   data_dir: str | None = None, workers: int = 2,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``model.features`` (masked backbone features, float32, CPU) of every image of ``split`` in the
    deterministic evaluation transform, their labels (None without labels; -1 for unlabelled images) and
    names (file paths relative to the data folder for image folders, ``<split>/<index>`` otherwise)."""
    model.eval()
    if config.dataset == "digits":
        if split not in ("train", "test"):
            raise ConfigError(f"argument --split: the digits have the splits train and test, got {split!r}")
        digits = load_digits_split()
        images, labels = (digits.train_images, digits.train_labels) if split == "train" else (
            digits.test_images, digits.test_labels)
        features = torch.cat([model.features(batch.to(device)).float().cpu() for batch in images.split(batch_size)])
        return features, labels, [f"{split}/{i}" for i in range(len(labels))]
    from metamask_fast.data.pipeline import UNREADABLE, evaluation_loader

    root = data_dir or config.data_dir
    try:
        images = load_images(config.dataset, root, split)
    except DatasetError as error:
        raise ConfigError(f"argument --data-dir: {error}") from None
    except ValueError as error:
        raise ConfigError(f"argument --split: {error}") from None
    loader = evaluation_loader(config.dataset, images, config.image_size, workers, batch_size)
    features, flags = [], []
    try:
        for batch, batch_labels in loader:
            features.append(model.features(batch.to(device)).float().cpu())
            flags.append(batch_labels)
    except DatasetError as error:  # no image of the split can be read (single bad images are skipped)
        raise ConfigError(f"argument --data-dir: {last_line(error)}") from None
    features, keep = torch.cat(features), torch.cat(flags) != UNREADABLE  # unreadable images are left out
    if isinstance(images.images, list):
        base = Path(root)
        names = [str(p.relative_to(base)) if p.is_relative_to(base) else str(p) for p in images.images]
    else:
        names = [f"{split}/{i}" for i in range(len(images))]
    labels = None if images.labels is None else images.labels[keep]
    return features[keep], labels, [name for name, kept in zip(names, keep.tolist()) if kept]


# The labelled split that evaluations train on or take neighbours from (STL-10: its 5,000 labelled training
# images, not the unlabelled split that pre-training also reads).
LABELLED_TRAIN_SPLIT = "train"


def labelled_features(model: MetaMaskModel, config: TrainConfig, device: torch.device, *, data_dir: str | None,
                      workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train features, train labels, test features, test labels)`` of a run's labelled training split
    (its labelled images only) and test split, by :func:`split_features`; ``ConfigError`` naming ``--run``
    when a split has no labels."""
    train = split_features(model, config, LABELLED_TRAIN_SPLIT, device, data_dir=data_dir, workers=workers)
    test = split_features(model, config, "test", device, data_dir=data_dir, workers=workers)
    for name, labels in (("train", train[1]), ("test", test[1])):
        if labels is None or bool((labels < 0).all()):
            raise ConfigError(f"argument --run: the {name} split of {config.dataset} has no labels")
    keep = train[1] >= 0
    return train[0][keep], train[1][keep], test[0], test[1]


def last_line(error: Exception) -> str:
    """The message of ``error``; a DataLoader worker's error carries the worker's traceback, whose last line
    is the original ``Type: message``."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    line = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return line.removeprefix(prefix).removeprefix(f"{type(error).__name__}: ")
