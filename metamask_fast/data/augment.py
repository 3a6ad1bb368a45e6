"""The augmentation recipes: the digits' weak affine/contrast/noise views and SimCLR's views of images.

Both with each dataset's normalisation: the digits' views are made for whole batches of tensors, SimCLR's for
PIL images (CIFAR, STL-10, image folders).

:class:`DigitAugmentation` draws every random number from a caller-supplied ``torch.Generator``, so a run is
reproducible from its seed; :func:`simclr_augmentation` and :func:`eval_transform` are torchvision
transforms, run per image in the loader processes (:mod:`metamask_fast.data.pipeline` seeds them per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import transforms

from metamask_fast.config import AUGMENTATIONS
from metamask_fast.data.formats import DATASETS, ImageSet, pil_image

__all__ = ["AUGMENTATIONS", "DigitAugmentation", "simclr_augmentation", "view_augmentations", "eval_transform",
           "TwoViews"]


# Per-channel mean and std of each dataset's training images, for normalisation.
_STATISTICS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, for arbitrary photographs
}


@dataclass(frozen=True)
class DigitAugmentation:
    """Weak, label-preserving augmentation for centred digits; call it once per view.

    Per image, independently: a random affine warp (rotation ``±max_rotation_deg``, zoom uniform in
    ``[min_zoom, max_zoom]``, translation ``±max_shift_px`` pixels on each axis, bilinear resampling with a
    black border), then contrast and brightness jitter about the image mean,
    ``x ← (x − mean)·c + mean + b`` with ``c ∈ [1 − contrast, 1 + contrast]`` and ``b ∈ [−brightness,
    brightness]``, then Gaussian noise whose standard deviation is drawn from ``[0, max_noise_std]``, and a
    clamp back to ``[0, 1]``. There is deliberately no flip: a mirrored 2 or 5 is not the same digit.
    SPEC §5 measured that this weak recipe beats strong augmentation on this set.
    """

    max_rotation_deg: float = 15.0
    min_zoom: float = 0.85
    max_zoom: float = 1.15
    max_shift_px: float = 1.0
    contrast: float = 0.2
    brightness: float = 0.1
    max_noise_std: float = 0.05

    def __post_init__(self):
        for name in ("max_rotation_deg", "max_shift_px", "contrast", "brightness", "max_noise_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not all(isinstance(z, (int, float)) and math.isfinite(z) for z in (self.min_zoom, self.max_zoom)) or not (
            0 < self.min_zoom <= self.max_zoom
        ):
            raise ValueError(
                f"min_zoom and max_zoom must satisfy 0 < min_zoom <= max_zoom, got {self.min_zoom!r}, {self.max_zoom!r}"
            )

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view of every image of ``images`` (``float [N, C, H, W]`` in ``[0, 1]``); same shape and dtype."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.numel() == 0:
            raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but images are on {images.device}; create the generator "
                "on the images' device"
            )
        n, _, height, width = images.shape

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            u = torch.rand(n, *shape, generator=generator, device=images.device, dtype=images.dtype)
            return low + (high - low) * u

        # grid_sample maps each output location to the input location it reads, so the matrix is the
        # inverse of the warp applied to the content: rotate by -angle and divide by the zoom.
        angle = uniform(-1.0, 1.0) * math.radians(self.max_rotation_deg)
        inverse_zoom = 1.0 / uniform(self.min_zoom, self.max_zoom)
        cos, sin = torch.cos(angle) * inverse_zoom, torch.sin(angle) * inverse_zoom
        # With align_corners=False a pixel is 2/size wide in the normalised [-1, 1] coordinates.
        shift = uniform(-self.max_shift_px, self.max_shift_px, 2) * torch.tensor(
            [2.0 / width, 2.0 / height], device=images.device, dtype=images.dtype
        )
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        per_image = (n, 1, 1, 1)
        mean = warped.mean(dim=(1, 2, 3), keepdim=True)
        contrast = uniform(1.0 - self.contrast, 1.0 + self.contrast).view(per_image)
        brightness = uniform(-self.brightness, self.brightness).view(per_image)
        jittered = (warped - mean) * contrast + mean + brightness

        noise_std = uniform(0.0, self.max_noise_std).view(per_image)
        noise = torch.randn(warped.shape, generator=generator, device=images.device, dtype=images.dtype)
        return (jittered + noise_std * noise).clamp_(0.0, 1.0)


def simclr_augmentation(name: str, size: int, *, saturation: float = 0.4,
                        solarize: float = 0.0) -> transforms.Compose:
    """SimCLR's augmentation for a PIL image of dataset ``name``: random resized crop to ``size`` (scale 0.08
    to 1), horizontal flip, colour jitter 0.4/0.4/``saturation``/0.1 with p=0.8, grayscale with p=0.2,
    Gaussian blur with p=0.5 only from 64 px up (SimCLR leaves it out on CIFAR's 32 px), solarization (at
    128) with p=``solarize`` when it is above 0, then the dataset's normalisation."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    steps = [
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, saturation, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ]
    if size >= 64:
        kernel = 2 * (size // 20) + 1  # about a tenth of the image, odd
        steps.append(transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    if solarize > 0:
        steps.append(transforms.RandomSolarize(128, p=solarize))
    mean, std = _STATISTICS[name]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def view_augmentations(recipe: str, name: str, size: int) -> tuple[transforms.Compose, transforms.Compose]:
    """The two views' augmentations of ``recipe``: ``"simclr"`` the same for both
    (:func:`simclr_augmentation`); ``"asymmetric"`` solo-learn's Barlow Twins pair on CIFAR, saturation 0.2
    for both and solarization with p=0.2 on the second view only."""
    if recipe == "simclr":
        view = simclr_augmentation(name, size)
        return view, view
    if recipe == "asymmetric":
        return (simclr_augmentation(name, size, saturation=0.2),
                simclr_augmentation(name, size, saturation=0.2, solarize=0.2))
    raise ValueError(f"recipe must be one of {AUGMENTATIONS}, got {recipe!r}")


def eval_transform(name: str, size: int) -> transforms.Compose:
    """The evaluation view of a PIL image of dataset ``name``: resized (shorter side) and centre-cropped to
    ``size`` when it is not already that size, then the dataset's normalisation. No randomness."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    mean, std = _STATISTICS[name]
    return transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class TwoViews(torch.utils.data.Dataset):
    """``(view_0, view_1, label)`` per image of an :class:`ImageSet`: two independent draws of ``transform``
    on the same image (label -1 where there is none)."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = pil_image(self.images, index)
        label = -1 if self.images.labels is None else int(self.images.labels[index])
        return self.transform(image), self.transform(image), label
