"""The digits: scikit-learn's 1,797 embedded 8×8 images, upsampled, with a fixed stratified train/test split.

scikit-learn ships ``load_digits`` (1,797 greyscale 8×8 digits, values 0..16) inside the package, so the
default training run needs no download. The images are scaled to ``[0, 1]`` and upsampled bilinearly to
16×16 so that a small convolutional network has room for two stride-2 stages (SPEC §5).

Their augmentation is :class:`metamask_fast.data.augment.DigitAugmentation`; their batches,
:class:`metamask_fast.data.pipeline.DigitsBatches`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DIGITS_IMAGE_SIZE",
    "DIGITS_SPLIT_SEED",
    "DigitsSplit",
    "load_digits_split",
]

DIGITS_IMAGE_SIZE = 16
# The split never depends on the training seed: every run is evaluated on the same 360 test images.
DIGITS_SPLIT_SEED = 0
_DIGITS_MAX_VALUE = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """Train and test images (``float32 [N, 1, S, S]`` in ``[0, 1]``) with their ``int64 [N]`` labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.train_labels, self.test_labels]).max()) + 1

    def to(self, device: torch.device | str) -> "DigitsSplit":
        return DigitsSplit(*(t.to(device) for t in (self.train_images, self.train_labels,
                                                       self.test_images, self.test_labels)))


def load_digits_split(
    test_fraction: float = 0.2, seed: int = DIGITS_SPLIT_SEED, image_size: int = DIGITS_IMAGE_SIZE
) -> DigitsSplit:
    """scikit-learn's digits, split stratified by class into train and test (1,437 / 360 by default).

    Pixels are divided by 16 (their maximum) and the 8×8 images are resized to ``image_size`` with bilinear
    interpolation (``align_corners=False``, so the image keeps its extent).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
        0.0 < test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed
    )

    def to_images(pixels) -> torch.Tensor:
        images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / _DIGITS_MAX_VALUE
        if images.shape[-1] != image_size:
            images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
        return images.clamp_(0.0, 1.0).contiguous()

    def to_labels(targets) -> torch.Tensor:
        return torch.as_tensor(targets, dtype=torch.int64)

    return DigitsSplit(to_images(train_x), to_labels(train_y), to_images(test_x), to_labels(test_y))
