"""Data: what a run trains and is evaluated on, from the files to the two views of each batch.

- :mod:`~metamask_fast.data.digits`: the embedded digits and their fixed train/test split.
- :mod:`~metamask_fast.data.formats`: CIFAR-10/100, STL-10 and image folders read from disk in
  torchvision's layouts (:func:`load_images`, :class:`ImageSet`, :class:`DatasetError`).
- :mod:`~metamask_fast.data.augment`: the augmentation recipes (:class:`DigitAugmentation`,
  :func:`simclr_augmentation`, :func:`eval_transform`, :class:`TwoViews`).
- :mod:`~metamask_fast.data.batch_augment`: the same recipes on whole uint8 batches on their own device, with
  per-sample randomness from keys (:class:`BatchTwoViews`).
- :mod:`~metamask_fast.data.pipeline`: samplers, batches and loaders that a run can resume at any step, on
  one process or many (:class:`DigitsBatches`, :class:`ImageBatches`, :func:`evaluation_loader`).

Every public name of the five is importable from ``metamask_fast.data`` itself.
"""

from metamask_fast.data.digits import DIGITS_IMAGE_SIZE, DIGITS_SPLIT_SEED, DigitsSplit, load_digits_split
from metamask_fast.data.formats import DATASETS, DatasetError, ImageSet, load_images, pil_image
from metamask_fast.data.augment import (
    AUGMENTATIONS,
    DigitAugmentation,
    TwoViews,
    eval_transform,
    simclr_augmentation,
    view_augmentations,
)
from metamask_fast.data.batch_augment import BATCH_RECIPES, BatchTwoViews, key_uniforms
from metamask_fast.data.pipeline import (
    UNREADABLE,
    DigitsBatches,
    EpochBatchSampler,
    ImageBatches,
    LabeledImages,
    SeededTwoViews,
    epoch_order,
    evaluation_loader,
    mix,
    readable_image,
    shuffled_batches,
)

__all__ = [
    "DIGITS_IMAGE_SIZE", "DIGITS_SPLIT_SEED", "DigitsSplit", "load_digits_split",
    "DATASETS", "DatasetError", "ImageSet", "load_images", "pil_image",
    "AUGMENTATIONS", "DigitAugmentation", "TwoViews", "eval_transform", "simclr_augmentation", "view_augmentations",
    "BATCH_RECIPES", "BatchTwoViews", "key_uniforms",
    "UNREADABLE", "DigitsBatches", "EpochBatchSampler", "ImageBatches", "LabeledImages", "SeededTwoViews",
    "epoch_order", "evaluation_loader", "mix", "readable_image", "shuffled_batches",
]
