"""Two-view augmentation of whole uint8 batches on their own device, with per-sample randomness from keys.

:class:`BatchTwoViews` is the batched twin of the per-image recipes of :mod:`metamask_fast.data.augment`:
called as ``x0, x1 = aug(images, keys)`` on a uint8 ``[B, C, H, W]`` batch on any device and an int64 ``[B]``
tensor of per-sample keys, it returns two normalised float32 views ``[B, C, size, size]`` on the images'
device.

Randomness. Every random parameter of sample ``i`` (crop box, flip, jitter factors and order, grayscale,
blur, solarization; the digits' warp, contrast and noise) is a function of ``keys[i]`` alone: a counter-based
hash (SplitMix64) of the key, the view and the parameter's slot, turned into uniforms in float64 on the CPU.
The parameters are therefore the same bits on every device, whatever batch the sample sits in, its position
and the batch size; the image operations after them are per-sample elementwise arithmetic and gathers (no
reduction or matrix product across samples), so a sample's output does not depend on its batch either.

Distributions are those of the PIL recipes (torchvision's ``RandomResizedCrop`` with scale 0.08–1 and ratio
3/4–4/3, its ten attempts and its fallback; flip p=0.5; ``ColorJitter`` in a random order of its four
operations, applied with p=0.8; grayscale p=0.2; Gaussian blur p=0.5 from 64 px up; solarization), and each
operation at fixed parameters is that of ``torchvision.transforms.v2.functional`` on float images (resizing
bilinear without antialiasing; tests). The PIL path rounds to uint8 after every operation; this one keeps
float32 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BATCH_RECIPES", "BatchTwoViews", "key_uniforms"]

BATCH_RECIPES = ("simclr", "asymmetric", "digits")

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea and Flood, 2014) on uint64 arrays: a bijective 64-bit mix."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key_uniforms(keys: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """``float64 [B, count]`` uniforms in ``[0, 1)`` for each key: number ``j`` of stream ``stream`` of key
    ``k`` is a hash of ``(k, stream, j)`` alone (53 random bits), computed on the CPU."""
    k = keys.detach().to("cpu", torch.int64).numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix64(_splitmix64(k) ^ _splitmix64(np.uint64(stream) * np.uint64(0x632BE59BD9B4E019)))
        counters = np.arange(count, dtype=np.uint64)
        z = _splitmix64(base[:, None] + counters[None, :] * np.uint64(0xD1B54A32D192ED03))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


# Streams of a view: each parameter its own, so that adding one never changes another's numbers.
_CROP, _FLIP, _JITTER, _ORDER, _GRAYSCALE, _BLUR, _SOLARIZE, _WARP, _TONE, _NOISE = range(10)
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries ten boxes before its central fallback


@dataclass(frozen=True)
class _ViewRecipe:
    saturation: float = 0.4
    solarize: float = 0.0


class BatchTwoViews:
    """Two augmented, normalised views of a uint8 batch on its own device (see the module docstring).

    ``recipe``: ``"simclr"`` (SimCLR's views, the same recipe for both), ``"asymmetric"`` (solo-learn's Barlow
    Twins pair: saturation 0.2, solarization p=0.2 on the second view) or ``"digits"`` (the digits' weak
    affine/contrast/noise views of :class:`~metamask_fast.data.augment.DigitAugmentation`). ``size``: the
    views' side; ``mean``, ``std``: per-channel normalisation of values in ``[0, 1]``."""

    def __init__(self, recipe: str, size: int, mean: Sequence[float], std: Sequence[float]):
        if not isinstance(recipe, str) or recipe not in BATCH_RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(BATCH_RECIPES)}, got {recipe!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.mean, self.std = _channel_values("mean", mean), _channel_values("std", std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std must have one value per channel each, got {len(self.mean)} and "
                             f"{len(self.std)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0 for every channel, got {list(self.std)}")
        self.recipe, self.size = recipe, size
        if recipe == "asymmetric":
            self.views = (_ViewRecipe(saturation=0.2), _ViewRecipe(saturation=0.2, solarize=0.2))
        else:
            self.views = (_ViewRecipe(), _ViewRecipe())
        self.digits = None
        if recipe == "digits":
            from metamask_fast.data.augment import DigitAugmentation

            self.digits = DigitAugmentation()
        # The blur of SimCLR's recipe, from 64 px up: a kernel of about a tenth of the image, odd.
        self.blur_kernel = 2 * (size // 20) + 1 if size >= 64 and recipe != "digits" else 0

    def __repr__(self) -> str:
        return f"BatchTwoViews({self.recipe!r}, size={self.size}, mean={list(self.mean)}, std={list(self.std)})"

    # ------------------------------------------------------------------------------------------ parameters

    def parameters(self, keys: torch.Tensor, view: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """The random parameters of view ``view`` (0 or 1) for each key, as CPU tensors (float64 where
        continuous): what :meth:`__call__` applies. For the image recipes: ``top``, ``left``, ``height``,
        ``width`` (the crop box), ``flip``, ``jitter`` (applied or not), ``brightness``, ``contrast``,
        ``saturation``, ``hue``, ``order`` (``[B, 4]``, a permutation of the four jitter operations in that
        order), ``grayscale``, ``blur``, ``sigma``, ``solarize``. For the digits: ``angle`` (radians),
        ``zoom``, ``shift_x``, ``shift_y`` (pixels), ``contrast``, ``brightness``, ``noise_std``."""
        keys = _check_keys(keys, None)
        if view not in (0, 1):
            raise ValueError(f"view must be 0 or 1, got {view!r}")
        stream = lambda slot, count: key_uniforms(keys, 64 * view + slot, count)  # noqa: E731
        if self.digits is not None:
            d = self.digits
            warp, tone = stream(_WARP, 4), stream(_TONE, 3)
            return {"angle": (2 * warp[:, 0] - 1) * math.radians(d.max_rotation_deg),
                    "zoom": d.min_zoom + (d.max_zoom - d.min_zoom) * warp[:, 1],
                    "shift_x": (2 * warp[:, 2] - 1) * d.max_shift_px,
                    "shift_y": (2 * warp[:, 3] - 1) * d.max_shift_px,
                    "contrast": 1 - d.contrast + 2 * d.contrast * tone[:, 0],
                    "brightness": (2 * tone[:, 1] - 1) * d.brightness,
                    "noise_std": d.max_noise_std * tone[:, 2]}
        recipe = self.views[view]
        params = _crop_boxes(stream(_CROP, 4 * _ATTEMPTS), height, width)
        params["flip"] = stream(_FLIP, 1)[:, 0] < 0.5
        jitter = stream(_JITTER, 5)
        params["jitter"] = jitter[:, 0] < 0.8
        params["brightness"] = 0.6 + 0.8 * jitter[:, 1]
        params["contrast"] = 0.6 + 0.8 * jitter[:, 2]
        params["saturation"] = 1 - recipe.saturation + 2 * recipe.saturation * jitter[:, 3]
        params["hue"] = -0.1 + 0.2 * jitter[:, 4]
        params["order"] = torch.argsort(stream(_ORDER, 4), dim=1)  # uniform over the 24 orders
        params["grayscale"] = stream(_GRAYSCALE, 1)[:, 0] < 0.2
        blur = stream(_BLUR, 2)
        params["blur"] = (blur[:, 0] < 0.5) & (self.blur_kernel > 0)
        params["sigma"] = 0.1 + 1.9 * blur[:, 1]
        params["solarize"] = stream(_SOLARIZE, 1)[:, 0] < recipe.solarize
        return params

    # ---------------------------------------------------------------------------------------------- views

    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = _check_images(images, len(self.mean))
        keys = _check_keys(keys, images.shape[0])
        if self.recipe != "digits" and images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels for the {self.recipe} recipe, got {images.shape[1]}")
        return self.view(images, keys, 0), self.view(images, keys, 1)

    def view(self, images: torch.Tensor, keys: torch.Tensor, view: int) -> torch.Tensor:
        """View ``view`` (0 or 1) alone, for checked inputs."""
        height, width = images.shape[-2:]
        params = self.parameters(keys, view, height, width)
        device = images.device
        if self.digits is not None:
            x = _digits_view(images, params, self.size, key_uniforms(keys, 64 * view + _NOISE, 2 * self.size ** 2))
        else:
            on = {name: value.to(device) for name, value in params.items()}
            x = resized_crop(images, on["top"], on["left"], on["height"], on["width"], self.size, flip=on["flip"])
            x = _jitter(x, params, on)
            x = _where_rows(params["grayscale"], x, lambda rows: grayscale(rows).expand_as(rows))
            if self.blur_kernel:
                x = _where_rows(params["blur"], x,
                                lambda rows, s=on["sigma"][params["blur"].to(device)]: gaussian_blur(rows, self.blur_kernel, s))
            x = _where_rows(params["solarize"], x, solarize)
        mean = torch.tensor(self.mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        return (x - mean) / std


# -------------------------------------------------------------------------------------------- the parameters


def _crop_boxes(uniforms: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """torchvision's ``RandomResizedCrop.get_params`` for each row of ``uniforms`` (four per attempt): up to
    ten attempts of an area fraction in [0.08, 1] and a log-uniform ratio in [3/4, 4/3], the first box that fits
    placed uniformly; otherwise the central crop at the nearest allowed ratio."""
    area = float(height * width)
    u = uniforms.view(-1, _ATTEMPTS, 4)
    target = area * (0.08 + 0.92 * u[..., 0])
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[..., 1]
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * ratio))  # Python's round: half to even, as torch.round
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1))  # randint(0, height - h + 1)
    left = torch.floor(u[..., 3] * (width - w + 1))
    first = torch.where(fits.any(1), fits.to(torch.int8).argmax(1), -1)
    # The fallback: the whole image, or the central crop at the nearest ratio of the range.
    in_ratio = width / height
    if in_ratio < 3 / 4:
        fw, fh = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        fw, fh = int(round(height * (4 / 3))), height
    else:
        fw, fh = width, height
    rows = torch.arange(u.shape[0])
    pick = first.clamp(min=0)
    chosen = first >= 0

    def take(values: torch.Tensor, fallback: float) -> torch.Tensor:
        return torch.where(chosen, values[rows, pick], torch.full_like(values[:, 0], fallback)).to(torch.int64)

    return {"top": take(top, (height - fh) // 2), "left": take(left, (width - fw) // 2),
            "height": take(h, fh), "width": take(w, fw)}


# ------------------------------------------------------------------------------------ operations on a batch


def resized_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, size: int, *, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box ``(top, left, height, width)`` resized bilinearly to ``size × size`` (half-pixel
    centres, edges clamped to the box, no antialiasing: ``torchvision.transforms.v2.functional.resized_crop``
    with ``antialias=False``), mirrored left-right where ``flip``; float32 in ``[0, 1]`` from uint8 (or the
    same scale from float input).

    One ``grid_sample`` at per-image sample positions that never leave the box (each output pixel reads its
    own position only, so no image changes another's result)."""
    device = images.device
    h, w = images.shape[-2:]
    out = torch.arange(size, device=device, dtype=torch.float32) + 0.5

    def axis(start, length, extent):  # each output pixel's source position in [-1, 1] coordinates: [B, size]
        scale = (length.to(torch.float32) / size)[:, None]
        source = torch.minimum((out[None, :] * scale - 0.5).clamp(min=0), (length - 1).to(torch.float32)[:, None])
        return (2 * (source + start.to(torch.float32)[:, None]) + 1) / extent - 1

    gy, gx = axis(top, height, h), axis(left, width, w)
    if flip is not None:
        gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    result = F.grid_sample(images.to(torch.float32), grid, mode="bilinear", padding_mode="border",
                           align_corners=False)
    return result / 255 if images.dtype == torch.uint8 else result


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` luma of RGB images."""
    r, g, b = images.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1).to(images.dtype)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1).to(images.dtype) * images).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean luma."""
    return _blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's luma."""
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` turns (in [-0.5, 0.5]), through HSV: value and chroma stay, the hue
    in sixths of a turn ``h`` moves, and each channel is ``min + chroma·clamp(·, 0, 1)`` of its distance to ``h``
    (red ``|h − 3| − 1``, green ``2 − |h − 2|``, blue ``2 − |h − 4|``)."""
    r, g, b = images.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = value - low
    # The hue in sixths of a turn, by the sector of the largest channel (red first, then green, as torchvision).
    sector = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * chroma, r - g + 4 * chroma))
    hue = torch.where(chroma > 0, sector / torch.where(chroma > 0, chroma, 1), 0)
    hue = torch.remainder(hue + 6 * shift.view(-1, 1, 1).to(images.dtype), 6.0)
    red = (hue - 3).abs_().sub_(1).clamp_(0, 1)
    green = (hue - 2).abs_().neg_().add_(2).clamp_(0, 1)
    blue = (hue - 4).abs_().neg_().add_(2).clamp_(0, 1)
    chroma, low = chroma.unsqueeze(1), low.unsqueeze(1)
    return torch.stack([red, green, blue], dim=1).mul_(chroma).add_(low)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above 128/255 (torchvision's ``solarize`` at 128 on uint8 images)."""
    return torch.where(images >= 128 / 255, 1 - images, images)


def gaussian_blur(images: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur of odd width ``kernel`` with a standard deviation per image, reflecting at
    the edges (torchvision's ``gaussian_blur``), as per-image weighted sums of shifted copies."""
    half = kernel // 2
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma.to(torch.float32)[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)
    padded = torch.nn.functional.pad(images, (half, half, half, half), mode="reflect")
    h, w = images.shape[-2:]
    rows = sum(weights[:, t].view(-1, 1, 1, 1) * padded[..., :, t:t + w] for t in range(kernel))
    return sum(weights[:, t].view(-1, 1, 1, 1) * rows[..., t:t + h, :] for t in range(kernel))


_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _jitter(x: torch.Tensor, params: dict, on: dict) -> torch.Tensor:
    """ColorJitter on the images whose ``jitter`` is set, each running the four operations in its own
    ``order``: the images of one order (24 at most) as a sub-batch, taken out and put back once."""
    functions = dict(zip(_JITTER_OPS, (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)))
    order = params["order"]
    codes = ((order[:, 0] * 4 + order[:, 1]) * 4 + order[:, 2]) * 4 + order[:, 3]
    for code in torch.unique(codes[params["jitter"]]).tolist():
        chosen = (params["jitter"] & (codes == code)).nonzero()[:, 0]
        index = chosen.to(x.device)
        rows = x.index_select(0, index)
        for op in order[chosen[0]].tolist():
            name = _JITTER_OPS[op]
            rows = functions[name](rows, on[name][index])
        x.index_copy_(0, index, rows)
    return x


def _where_rows(rows: torch.Tensor, x: torch.Tensor, function) -> torch.Tensor:
    """``x`` with ``function`` applied to the images where ``rows`` (a CPU bool tensor) is set."""
    if not rows.any():
        return x
    index = rows.nonzero()[:, 0].to(x.device)
    return x.index_copy_(0, index, function(x.index_select(0, index)))


def _digits_view(images: torch.Tensor, params: dict, size: int, noise_uniforms: torch.Tensor) -> torch.Tensor:
    """The digits' recipe: an affine warp (rotation, zoom, shift; bilinear, zeros outside), contrast and
    brightness about the image mean, Gaussian noise (Box–Muller from the key's uniforms), clamped to [0, 1]."""
    device = images.device
    b, c, h, w = images.shape
    # Each output pixel reads the input at the inverse warp of its centre, in [-1, 1] coordinates
    # (align_corners=False), as DigitAugmentation's affine_grid.
    inverse_zoom = 1.0 / params["zoom"]
    cos, sin = torch.cos(params["angle"]) * inverse_zoom, torch.sin(params["angle"]) * inverse_zoom
    tx, ty = params["shift_x"] * 2.0 / w, params["shift_y"] * 2.0 / h
    theta = torch.stack([cos, -sin, tx, sin, cos, ty], dim=1).to(device, torch.float32)
    grid = (2 * torch.arange(size, device=device, dtype=torch.float32) + 1) / size - 1
    gy, gx = grid.view(1, size, 1), grid.view(1, 1, size)
    t = [theta[:, i].view(b, 1, 1) for i in range(6)]
    # The affine map of each output position, elementwise (affine_grid's batched matrix product could round
    # differently with the batch size), then one grid_sample with zeros outside the image.
    source = torch.stack([t[0] * gx + t[1] * gy + t[2], t[3] * gx + t[4] * gy + t[5]], dim=-1)
    warped = F.grid_sample(images.to(torch.float32), source, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    if images.dtype == torch.uint8:
        warped = warped / 255
    per_image = (b, 1, 1, 1)
    tone = {name: params[name].to(device, torch.float32).view(per_image)
            for name in ("contrast", "brightness", "noise_std")}
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (warped - mean) * tone["contrast"] + mean + tone["brightness"]
    u = noise_uniforms.view(b, 2, size, size)
    normal = torch.sqrt(-2 * torch.log1p(-u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])  # float64, on the CPU
    noise = normal.to(device, torch.float32).view(b, 1, size, size).expand(b, c, size, size)
    return (jittered + tone["noise_std"] * noise).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ checks


def _channel_values(name: str, values) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty sequence of numbers, one per channel, got {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must hold finite numbers, got {list(values)}")
    return tuple(float(v) for v in values)


def _check_images(images, channels: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (values 0..255), got {images.dtype}")
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must be a non-empty [B, C, H, W] tensor, got shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        raise ValueError(f"images must have {channels} channel(s), one per mean/std value, got {images.shape[1]}")
    return images


def _check_keys(keys, batch: int | None) -> torch.Tensor:
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    if keys.dim() != 1 or (batch is not None and keys.shape[0] != batch):
        expected = f"[{batch}] (one per image)" if batch is not None else "[B]"
        raise ValueError(f"keys must have shape {expected}, got {tuple(keys.shape)}")
    return keys
