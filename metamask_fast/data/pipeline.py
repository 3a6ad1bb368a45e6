"""Training batches that a run can resume at any step, on one process or many.

Every random choice of the input pipeline is a function of ``(seed, epoch, …)`` alone, never of a generator
that has run for a while: epoch ``e``'s order is ``randperm`` under the seed ``mix(seed, e)``; on image
datasets each sample's two views are drawn under ``mix(seed, e, index)`` (inside the loading worker, so the
result does not depend on how many workers there are); on the digits each batch's views are drawn under
``mix(seed, e, batch)``. So step ``k`` of epoch ``e`` gets the same images and augmentations whether the run
got there in one go or was stopped and resumed, and with ``world_size`` processes each one takes its
``1/world_size`` slice of the same global batch, in rank order: the global batch, and so the losses
computed on the gathered embeddings, equal those of one process.

Each epoch is ``num_samples // batch_size`` full batches; the incomplete last one is dropped (equal
batches keep BatchNorm and the Barlow Twins statistics comparable from step to step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torchvision.transforms import functional as TF

from metamask_fast import config as cfg
from metamask_fast import distributed as mmdist
from metamask_fast.config import ConfigError, TrainConfig
from metamask_fast.data.augment import _STATISTICS, DigitAugmentation, eval_transform, view_augmentations
from metamask_fast.data.batch_augment import BatchTwoViews
from metamask_fast.data.digits import DigitsSplit, load_digits_split
from metamask_fast.data.formats import DatasetError, ImageSet, load_images, pil_image

__all__ = ["LoaderFailed", "loader_failure", "mix", "epoch_order", "EpochBatchSampler", "readable_image", "SeededTwoViews", "UNREADABLE",
           "LabeledImages", "DigitsBatches", "ImageBatches", "DecodedImages", "DeviceBatches", "evaluation_loader",
           "shuffled_batches", "Data", "load_data"]


def mix(*values: int) -> int:
    """A 63-bit seed from integers (a hash, so nearby inputs give unrelated seeds)."""
    digest = hashlib.blake2b(",".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_keys(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """The int64 random keys ``mix(seed, epoch, i)`` of the samples ``index`` (BatchTwoViews' per-sample keys)."""
    return torch.tensor([mix(seed, epoch, i) for i in index.tolist()], dtype=torch.int64)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(mix(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


class EpochBatchSampler:
    """Batches of ``(epoch, index)`` pairs for :class:`SeededTwoViews`: this rank's slice of each global
    batch of epoch :attr:`epoch`, from batch :attr:`start` on. Set both before iterating (the sampler runs in
    the main process, so persistent workers see the change)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes {world_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch)
        local = self.batch_size // self.world_size
        for batch in range(self.start, self.batches_per_epoch):
            first = batch * self.batch_size + self.rank * local
            yield [(self.epoch, int(i)) for i in order[first:first + local]]


def readable_image(images: ImageSet, index: int):
    """``(image, index)`` of image ``index``, or when that file cannot be read (a corrupt or truncated file
    in an image folder), a warning and the next readable image ``(image, other_index)`` instead: one bad
    file does not stop a run. :class:`DatasetError` when no image at all can be read."""
    for offset in range(len(images)):
        candidate = (index + offset) % len(images)
        try:
            return pil_image(images, candidate), candidate
        except DatasetError as error:
            where = str(images.images[candidate]) if isinstance(images.images, list) else (id(images), candidate)
            if where not in _REPORTED:  # once per file and process, on stderr (a warning filter may hide
                _REPORTED.add(where)    # warnings, and those of worker processes)
                print(f"metamask_fast: warning: {error}; skipped (the next readable image is used in its place)",
                      file=sys.stderr, flush=True)
    raise DatasetError("no image of the dataset can be read")


_REPORTED: set = set()


class SeededTwoViews(torch.utils.data.Dataset):
    """Two augmented views of image ``index``, drawn under the seed ``mix(seed, epoch, index)`` for the key
    ``(epoch, index)``. ``transform``: one augmentation for both views, or a pair, one per view. The
    process's own random state is left as it was. An unreadable image is skipped: :func:`readable_image`."""

    def __init__(self, images: ImageSet, transform, seed: int):
        self.images, self.seed = images, seed
        self.views = tuple(transform) if isinstance(transform, (tuple, list)) else (transform, transform)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, _ = readable_image(self.images, index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix(self.seed, epoch, index))  # the CPU generator only: fast
            return self.views[0](image), self.views[1](image)


UNREADABLE = -2


class LabeledImages(torch.utils.data.Dataset):
    """``(image, label)`` through the deterministic evaluation transform; label -1 where there is none, and
    :data:`UNREADABLE` for an image that cannot be read (:func:`readable_image`; evaluations drop it)."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, used = readable_image(self.images, index)
        if used != index:
            return self.transform(image), UNREADABLE
        label = -1 if self.images.labels is None else int(self.images.labels[index])
        return self.transform(image), label


class DigitsBatches:
    """The digits' training batches, both views made on the device a whole batch at a time.

    With ``per_sample`` (``--augment-on device``, the default): :class:`BatchTwoViews`'s digits recipe on a uint8
    copy of the images, sample ``index`` of epoch ``e`` under the key ``mix(seed, e, index)``, each rank making
    the views of its own slice. Without (``--augment-on batch``, how runs made before that setting augmented):
    :class:`DigitAugmentation` on the float images under one generator per global batch, seeded
    ``mix(seed, e, batch)``, each rank making the whole global batch's views and keeping its rows."""

    def __init__(self, split: DigitsSplit, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, *, per_sample: bool = True):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes {world_size}")
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world_size, self.per_sample = rank, world_size, per_sample
        if per_sample:
            self.images = (split.train_images * 255).round_().to(device, torch.uint8)
            self.augment = BatchTwoViews("digits", split.train_images.shape[-1], (0.0,), (1.0,))
        else:
            self.images = split.train_images.to(device)
            self.augment = DigitAugmentation()

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def describe(self) -> str:
        return (f"digits train, {self.num_samples:,} images, {_megabytes(self.images)} on {self.device}, both views "
                f"made there a batch at a time{'' if self.per_sample else ' (one random stream per batch)'}")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.per_sample:
            yield from self._per_sample_epoch(epoch, start)
            return
        order = epoch_order(self.num_samples, self.seed, epoch).to(self.device)
        local = self.batch_size // self.world_size
        for batch in range(start, self.batches_per_epoch):
            # Both views of the whole global batch, then this rank's rows: the same numbers on any number
            # of processes.
            images = self.images[order[batch * self.batch_size:(batch + 1) * self.batch_size]]
            generator = torch.Generator(device=self.device).manual_seed(mix(self.seed, epoch, batch))
            views = self.augment(images, generator), self.augment(images, generator)
            rows = slice(self.rank * local, (self.rank + 1) * local)
            yield views[0][rows], views[1][rows]

    def _per_sample_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.num_samples, self.seed, epoch)
        local = self.batch_size // self.world_size
        for batch in range(start, self.batches_per_epoch):
            first = batch * self.batch_size + self.rank * local
            index = order[first:first + local]
            keys = sample_keys(self.seed, epoch, index)
            yield self.augment(self.images[index.to(self.device)], keys)


class _SampledBatches:
    """Training batches of the samples an :class:`EpochBatchSampler` (``self.sampler``) picks."""

    sampler: EpochBatchSampler

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch


def _sampled_loader(dataset, sampler: EpochBatchSampler, workers: int, device: torch.device):
    """A :class:`torch.utils.data.DataLoader` of ``dataset`` over ``sampler``'s batches: worker processes that
    stay alive between epochs, pinned memory on CUDA, copies that overlap the step."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


class LoaderFailed(RuntimeError):
    """A loader process died or raised (beyond the unreadable images :func:`readable_image` skips); ``str()``
    names the cause."""


def loader_failure(error: BaseException) -> str | None:
    """The cause, when ``error`` is a loader process's failure: :class:`LoaderFailed`, or the error that
    PyTorch's DataLoader raises in the main process when a worker dies (from its SIGCHLD handler, at any point
    of the step) or raises (re-raised as the worker's type, its message naming the worker); else None."""
    if isinstance(error, DatasetError):  # an unreadable dataset, not a failed process
        return None
    if isinstance(error, LoaderFailed):
        return str(error)
    return _last_line(error) if "DataLoader worker" in str(error) else None


def _last_line(error: BaseException) -> str:
    """The last line of ``error``'s message: for a worker's error re-raised by DataLoader, the worker's own."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _loader_batches(loader) -> Iterator:
    """The batches of ``loader``; a worker that dies or raises is :class:`LoaderFailed` (the message keeps the
    worker's own last line: ``ValueError: ...``; DataLoader's re-raise drops nothing else we need)."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DatasetError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a worker raised, or its death
            cause = _last_line(error)
            if not cause.startswith(type(error).__name__) and "DataLoader worker" not in cause:
                cause = f"{type(error).__name__}: {cause}"
            raise LoaderFailed(cause) from error
        yield batch


def _processes(workers: int) -> str:
    return f"{workers} loader process{'es' if workers != 1 else ''}" if workers else "the main process"


class ImageBatches(_SampledBatches):
    """An image dataset's training batches, both views made by PIL one image at a time in the loader
    (:func:`_sampled_loader`)."""

    def __init__(self, name: str, images: ImageSet, size: int, batch_size: int, seed: int, device: torch.device,
                 workers: int, rank: int = 0, world_size: int = 1, augmentation: str = "simclr"):
        self.sampler = EpochBatchSampler(len(images), batch_size, seed, rank, world_size)
        self.device = device
        self.loader = _sampled_loader(SeededTwoViews(images, view_augmentations(augmentation, name, size), seed),
                                      self.sampler, workers, device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start = epoch, start
        for x0, x1 in _loader_batches(self.loader):
            yield x0.to(self.device, non_blocking=True), x1.to(self.device, non_blocking=True)

    def describe(self) -> str:
        return (f"{self.sampler.num_samples:,} training images, both views made by PIL in "
                f"{_processes(self.loader.num_workers)}")


class DecodedImages(torch.utils.data.Dataset):
    """``(image, key)`` for the key ``(epoch, index)`` of :class:`EpochBatchSampler`: image ``index`` (the next
    readable one when its file cannot be read, :func:`readable_image`) resized to ``size`` on its shorter side
    and centre-cropped, as uint8 ``[3, size, size]``, and its random key ``mix(seed, epoch, index)``."""

    def __init__(self, images: ImageSet, size: int, seed: int):
        self.images, self.size, self.seed = images, size, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, _ = readable_image(self.images, index)
        square = TF.center_crop(TF.resize(image, self.size), self.size)
        return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1), mix(self.seed, epoch, index)


class DeviceBatches(_SampledBatches):
    """An image dataset's training batches, both views made on the training device a whole batch at a time by
    :class:`~metamask_fast.data.batch_augment.BatchTwoViews`, sample ``index`` of epoch ``e`` under the key
    ``mix(seed, e, index)`` (the per-sample seed of the PIL path). So a sample's views depend on its image and key
    alone: resuming, the number of processes and their slices of the global batch change nothing.

    In-memory images (CIFAR, STL-10) stay as uint8 on the training device, or in host memory when they would
    take more than half of the device's free memory (:attr:`fallback` says so). An image folder's files are
    decoded in ``workers`` loader processes (:class:`DecodedImages`: the central square at the training size;
    the PIL path crops from the whole image)."""

    def __init__(self, name: str, images: ImageSet, size: int, batch_size: int, seed: int, device: torch.device,
                 workers: int, rank: int = 0, world_size: int = 1, augmentation: str = "simclr"):
        self.sampler = EpochBatchSampler(len(images), batch_size, seed, rank, world_size)
        self.augment = BatchTwoViews(augmentation, size, *_STATISTICS[name])
        self.name, self.seed, self.device = name, seed, device
        self.images, self.loader, self.fallback = None, None, None
        if isinstance(images.images, torch.Tensor):
            self.images = images.images
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                if self.images.numel() <= free // 2:
                    self.images = self.images.to(device)
                else:
                    self.images = self.images.pin_memory()
                    self.fallback = (f"the {_megabytes(self.images)} of training images would take more than half of "
                                     f"{device}'s free {free / 1e6:,.0f} MB: they stay in host memory, each batch is "
                                     "copied over")
        else:
            self.loader = _sampled_loader(DecodedImages(images, size, seed), self.sampler, workers, device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start = epoch, start
        if self.loader is not None:
            for images, keys in _loader_batches(self.loader):
                yield self.augment(images.to(self.device, non_blocking=True), keys)
            return
        for batch in self.sampler:
            index = torch.tensor([i for _, i in batch])
            keys = sample_keys(self.seed, epoch, index)
            images = self.images[index.to(self.images.device)]
            yield self.augment(images.to(self.device, non_blocking=True), keys)

    def describe(self) -> str:
        if self.loader is not None:
            return (f"{self.name} train, {self.num_samples:,} images decoded in {_processes(self.loader.num_workers)}, "
                    f"both views made on {self.device} a batch at a time")
        place = f"host memory ({self.fallback})" if self.fallback else str(self.device)
        return (f"{self.name} train, {self.num_samples:,} images, {_megabytes(self.images)} on {place}, both views "
                "made there a batch at a time")


def _megabytes(tensor: torch.Tensor) -> str:
    return f"{tensor.numel() * tensor.element_size() / 1e6:,.1f} MB"


def evaluation_loader(name: str, images: ImageSet, size: int, workers: int, batch_size: int = 256):
    """Batches of ``(images, labels)`` of a split in the evaluation transform, in the split's order."""
    return torch.utils.data.DataLoader(LabeledImages(images, eval_transform(name, size)), batch_size=batch_size,
                                       num_workers=workers)


def shuffled_batches(num_samples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch: a fresh permutation cut into ``num_samples // batch_size`` full batches.

    The incomplete last batch is dropped, so every batch has exactly ``batch_size`` samples: the
    batch-standardised Barlow Twins loss needs N ≥ 2, and equal batches keep BatchNorm and the loss scale
    the same from step to step. A different permutation each epoch means no sample is dropped for good.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= num_samples:
        raise ValueError(f"batch_size must be an integer in [1, num_samples={num_samples}], got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    order = torch.randperm(num_samples, generator=generator, device=generator.device)
    for start in range(0, num_samples - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


# ---------------------------------------------------------------------------------------------- a run's data


# Splits: self-supervised training, the kNN memory bank, the kNN queries.
_SPLITS = {"cifar10": ("train", "train", "test"), "cifar100": ("train", "train", "test"),
           "stl10": ("train+unlabeled", "train", "test"), "folder": ("train", "train", "test")}


@dataclasses.dataclass
class Data:
    """Training batches and the kNN monitor's labelled splits (``None`` when the dataset has no labels)."""

    batches: DigitsBatches | ImageBatches | DeviceBatches
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
        where = cfg.where(origin, "data_dir")
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
        raise ConfigError(f"{cfg.where(origin, 'batch_size')}: must be between 2 and the training set size "
                          f"{data.num_train}, got {config.batch_size}")
    if config.batch_size % ctx.world_size:
        raise ConfigError(f"{cfg.where(origin, 'batch_size')}: must be a multiple of the number of processes "
                          f"{ctx.world_size}, got {config.batch_size}")
    memory_size = data.digits.train_images.shape[0] if data.digits is not None else (
        len(data.memory) if data.memory is not None else None)
    if memory_size is not None and config.knn_k > memory_size:
        raise ConfigError(f"{cfg.where(origin, 'knn_k')}: must be at most the {memory_size} labelled training "
                          f"images, got {config.knn_k}")
    if data.digits is not None:
        data.batches = DigitsBatches(data.digits, config.batch_size, config.seed, device, ctx.rank, ctx.world_size,
                                     per_sample=config.augment_on == "device")
    else:
        batches = DeviceBatches if config.augment_on == "device" else ImageBatches
        data.batches = batches(config.dataset, images, config.image_size, config.batch_size, config.seed, device,
                               config.workers, ctx.rank, ctx.world_size, augmentation=config.augmentation)
    return data
