"""``metamask_fast.data.BatchTwoViews``: each batched operation against ``torchvision.transforms.v2.functional``
at fixed parameters, the parameter distributions against the PIL recipe's, and per-sample randomness that no
batch, position or batch size changes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from metamask_fast.data import batch_augment as ba
from metamask_fast.data.batch_augment import BatchTwoViews

TOLERANCE = 1 / 255
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def images(batch: int, height: int, width: int, *, seed: int, channels: int = 3, layout: str = "contiguous"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, channels, height, width), generator=generator, dtype=torch.uint8)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def fresh_keys(n: int, seed: int) -> torch.Tensor:
    return torch.randint(-2**63, 2**63 - 1, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)


# ------------------------------------------------------------------------ each operation at fixed parameters


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("height, width, size", [(31, 29, 17), (33, 37, 45), (32, 32, 32), (96, 80, 64)])
def test_resized_crop_and_flip_equal_torchvision(height, width, size, layout):
    x = images(6, height, width, seed=height * width + size, layout=layout)
    generator = torch.Generator().manual_seed(size)
    boxes = [RandomResizedCrop.get_params(x[0], (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(6)]
    top, left, h, w = (torch.tensor(v) for v in zip(*boxes))
    flip = torch.rand(6, generator=generator) < 0.5
    ours = ba.resized_crop(x, top, left, h, w, size, flip=flip)
    for n, (i, j, bh, bw) in enumerate(boxes):
        theirs = TF.resized_crop(x[n].float() / 255, i, j, bh, bw, [size, size], antialias=False)
        if flip[n]:
            theirs = TF.horizontal_flip(theirs)
        torch.testing.assert_close(ours[n], theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("height, width", [(31, 29), (8, 13)])
def test_colour_operations_equal_torchvision(height, width, layout):
    x = images(5, height, width, seed=height + width, layout=layout).float() / 255
    x[0] = x[0, :1]  # a gray image: no hue, no saturation
    x[1, :, :2] = 0  # black and saturated corners
    x[1, 0, 2:4] = 1
    factors = torch.tensor([0.6, 0.83, 1.0, 1.21, 1.4], dtype=torch.float64)
    shifts = torch.tensor([-0.1, -0.037, 0.0, 0.05, 0.1], dtype=torch.float64)
    cases = [(ba.adjust_brightness, TF.adjust_brightness, factors), (ba.adjust_contrast, TF.adjust_contrast, factors),
             (ba.adjust_saturation, TF.adjust_saturation, factors), (ba.adjust_hue, TF.adjust_hue, shifts)]
    for ours_fn, theirs_fn, values in cases:
        ours = ours_fn(x, values)
        for n in range(5):
            torch.testing.assert_close(ours[n], theirs_fn(x[n], float(values[n])), atol=TOLERANCE, rtol=0,
                                       msg=lambda m, f=ours_fn.__name__: f"{f}: {m}")
    torch.testing.assert_close(ba.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, num_output_channels=3),
                               atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(ba.solarize(x), TF.solarize(x, threshold=128 / 255), atol=0, rtol=0)


@pytest.mark.parametrize("kernel, height, width", [(7, 64, 64), (9, 31, 45), (3, 5, 7)])
def test_gaussian_blur_equals_torchvision(kernel, height, width):
    x = images(4, height, width, seed=kernel).float() / 255
    sigma = torch.tensor([0.1, 0.77, 1.3, 2.0], dtype=torch.float64)
    ours = ba.gaussian_blur(x, kernel, sigma)
    for n in range(4):
        theirs = TF.gaussian_blur(x[n], [kernel, kernel], [float(sigma[n])] * 2)
        torch.testing.assert_close(ours[n], theirs, atol=TOLERANCE, rtol=0)


def torchvision_view(image: torch.Tensor, p: dict, n: int, size: int, kernel: int) -> torch.Tensor:
    """One view by torchvision's functional ops in the recipe's order, at the parameters of sample ``n``."""
    x = TF.resized_crop(image.float() / 255, int(p["top"][n]), int(p["left"][n]), int(p["height"][n]),
                        int(p["width"][n]), [size, size], antialias=False)
    if p["flip"][n]:
        x = TF.horizontal_flip(x)
    if p["jitter"][n]:
        for op in p["order"][n].tolist():
            name = ba._JITTER_OPS[op]
            x = getattr(TF, f"adjust_{name}")(x, float(p[name][n]))
    if p["grayscale"][n]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur"][n]:
        x = TF.gaussian_blur(x, [kernel, kernel], [float(p["sigma"][n])] * 2)
    if p["solarize"][n]:
        x = TF.solarize(x, threshold=128 / 255)
    return TF.normalize(x, MEAN, STD)


@pytest.mark.parametrize("recipe, height, width, size", [("simclr", 32, 32, 32), ("asymmetric", 41, 37, 33),
                                                          ("simclr", 70, 75, 64)])
def test_whole_views_equal_torchvision_in_the_recipes_order(recipe, height, width, size):
    augment = BatchTwoViews(recipe, size, MEAN, STD)
    x, keys = images(40, height, width, seed=size), fresh_keys(40, size)
    views = augment(x, keys)
    for view in (0, 1):
        p = augment.parameters(keys, view, height, width)
        assert p["jitter"].any() and (~p["jitter"]).any() and p["grayscale"].any()
        if augment.blur_kernel:
            assert p["blur"].any()
        for n in range(40):
            theirs = torchvision_view(x[n], p, n, size, augment.blur_kernel)
            # Normalised values: the tolerance scales with 1/std.
            torch.testing.assert_close(views[view][n], theirs, atol=TOLERANCE / min(STD), rtol=0)


def test_the_digits_view_is_the_digit_augmentations_warp_and_tone():
    """At fixed parameters: the warp of ``DigitAugmentation`` (affine_grid + grid_sample, zeros outside), then
    contrast and brightness about the image mean, then noise, clamped."""
    x = images(6, 16, 16, seed=3, channels=1)
    angle = torch.tensor([0.0, 0.2, -0.26, 0.1, 0.05, -0.1], dtype=torch.float64)
    zoom = torch.tensor([1.0, 0.85, 1.15, 0.9, 1.1, 1.0], dtype=torch.float64)
    shift_x = torch.tensor([0.0, 1.0, -0.5, 0.3, -1.0, 0.7], dtype=torch.float64)
    shift_y = torch.tensor([0.0, -1.0, 0.25, 0.6, 0.1, -0.4], dtype=torch.float64)
    contrast = torch.tensor([1.0, 0.8, 1.2, 1.1, 0.9, 1.05], dtype=torch.float64)
    brightness = torch.tensor([0.0, 0.1, -0.1, 0.05, -0.02, 0.0], dtype=torch.float64)
    params = dict(angle=angle, zoom=zoom, shift_x=shift_x, shift_y=shift_y, contrast=contrast,
                  brightness=brightness, noise_std=torch.zeros(6, dtype=torch.float64))
    uniforms = torch.rand(6, 2 * 16 * 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = ba._digits_view(x, params, 16, uniforms)
    inverse = 1 / zoom
    theta = torch.stack([torch.stack([angle.cos() * inverse, -angle.sin() * inverse, shift_x * 2 / 16], 1),
                         torch.stack([angle.sin() * inverse, angle.cos() * inverse, shift_y * 2 / 16], 1)], 1)
    float_images = x.double() / 255
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(float_images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (warped - mean) * contrast.view(-1, 1, 1, 1) + mean + brightness.view(-1, 1, 1, 1)
    torch.testing.assert_close(ours.double(), jittered.clamp(0, 1), atol=TOLERANCE, rtol=0)
    # The noise: a normal deviate per pixel (Box–Muller of the uniforms), times noise_std.
    noisy = ba._digits_view(x, {**params, "noise_std": torch.full((6,), 0.05, dtype=torch.float64)}, 16, uniforms)
    u = uniforms.view(6, 2, 16, 16)
    normal = torch.sqrt(-2 * torch.log(1 - u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])
    torch.testing.assert_close(noisy.double(), (jittered + 0.05 * normal[:, None]).clamp(0, 1), atol=TOLERANCE, rtol=0)


# ----------------------------------------------------------------------------------------- distributions

N = 10_000


def ks_statistic(a, b) -> float:
    """The two-sample Kolmogorov–Smirnov statistic (the largest gap between the empirical CDFs)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    points = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, points, "right") / len(a) - np.searchsorted(b, points, "right") / len(b))))


# With 10,000 samples on each side, a KS statistic above 0.03 has probability below 0.1 % under equal
# distributions; a rate is within 4.5 standard deviations.
KS_BOUND = 0.03


def rate_close(flags: torch.Tensor, p: float) -> bool:
    return abs(flags.double().mean().item() - p) <= 4.5 * math.sqrt(p * (1 - p) / flags.numel()) + 1e-12


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40), (96, 96), (50, 17)])
def test_crop_boxes_follow_torchvisions_distribution(height, width):
    augment = BatchTwoViews("simclr", 32, MEAN, STD)
    ours = augment.parameters(fresh_keys(N, height + width), 0, height, width)
    torch.manual_seed(height * width)
    image = torch.zeros(3, height, width)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(N)])
    top, left, h, w = theirs.unbind(1)
    assert (ours["top"] >= 0).all() and (ours["top"] + ours["height"] <= height).all()
    assert (ours["left"] >= 0).all() and (ours["left"] + ours["width"] <= width).all()
    for name, mine, reference in (("area", ours["height"] * ours["width"], h * w),
                                  ("ratio", ours["width"] / ours["height"], w / h),
                                  ("top", ours["top"], top), ("left", ours["left"], left)):
        assert ks_statistic(mine, reference) < KS_BOUND, name


def test_flip_jitter_grayscale_blur_and_solarize_rates_and_factors():
    keys = fresh_keys(N, 11)
    small, large = BatchTwoViews("asymmetric", 32, MEAN, STD), BatchTwoViews("simclr", 96, MEAN, STD)
    first, second = small.parameters(keys, 0, 32, 32), small.parameters(keys, 1, 32, 32)
    for p in (first, second):
        assert rate_close(p["flip"], 0.5) and rate_close(p["jitter"], 0.8) and rate_close(p["grayscale"], 0.2)
        assert not p["blur"].any()  # no blur below 64 px
        uniform = np.linspace(0, 1, N)
        assert ks_statistic(p["brightness"], 0.6 + 0.8 * uniform) < KS_BOUND
        assert ks_statistic(p["contrast"], 0.6 + 0.8 * uniform) < KS_BOUND
        assert ks_statistic(p["saturation"], 0.8 + 0.4 * uniform) < KS_BOUND  # saturation 0.2
        assert ks_statistic(p["hue"], -0.1 + 0.2 * uniform) < KS_BOUND
        # Every order of the four jitter operations, equally often (chi-square, 23 degrees of freedom, p < 1e-4).
        counts = {}
        for order in map(tuple, p["order"].tolist()):
            counts[order] = counts.get(order, 0) + 1
        assert set(counts) == set(itertools.permutations(range(4)))
        expected = N / 24
        assert sum((c - expected) ** 2 / expected for c in counts.values()) < 60
    assert not first["solarize"].any() and rate_close(second["solarize"], 0.2)
    # The two views draw independently.
    assert abs(torch.corrcoef(torch.stack([first["flip"].double(), second["flip"].double()]))[0, 1]) < 0.05
    big = large.parameters(keys, 0, 96, 96)
    assert rate_close(big["blur"], 0.5) and ks_statistic(big["sigma"], 0.1 + 1.9 * np.linspace(0, 1, N)) < KS_BOUND
    assert large.blur_kernel == 2 * (96 // 20) + 1


def test_digits_parameters_span_the_digit_augmentations_ranges():
    p = BatchTwoViews("digits", 16, (0.0,), (1.0,)).parameters(fresh_keys(N, 5), 0, 16, 16)
    uniform = np.linspace(0, 1, N)
    for name, low, high in (("angle", -math.radians(15), math.radians(15)), ("zoom", 0.85, 1.15),
                            ("shift_x", -1, 1), ("shift_y", -1, 1), ("contrast", 0.8, 1.2),
                            ("brightness", -0.1, 0.1), ("noise_std", 0, 0.05)):
        assert ks_statistic(p[name], low + (high - low) * uniform) < KS_BOUND, name


# ------------------------------------------------------------------------------ randomness from keys alone


@pytest.mark.parametrize("recipe, size, height, channels", [("simclr", 32, 32, 3), ("asymmetric", 64, 71, 3),
                                                             ("digits", 16, 16, 1)])
def test_a_samples_views_depend_on_its_image_and_key_alone(recipe, size, height, channels):
    mean, std = (MEAN, STD) if channels == 3 else ((0.0,), (1.0,))
    augment = BatchTwoViews(recipe, size, mean, std)
    x, keys = images(23, height, height, seed=size, channels=channels), fresh_keys(23, size)
    views = augment(x, keys)
    # Alone, in another batch at another position, and in a batch of a different size: the same bits.
    alone = augment(x[7:8], keys[7:8])
    order = torch.tensor([3, 7, 0, 15])
    shuffled = augment(x[order], keys[order])
    for view in (0, 1):
        assert torch.equal(alone[view][0], views[view][7])
        assert torch.equal(shuffled[view], views[view][order])
    again = augment(x, keys)
    assert all(torch.equal(a, b) for a, b in zip(again, views))
    assert not torch.equal(views[0], views[1])  # two different views
    other = augment(x, keys + 1)
    assert not torch.equal(other[0], views[0])
    assert views[0].dtype == torch.float32 and views[0].shape == (23, channels, size, size)


def test_key_uniforms_are_a_function_of_key_stream_and_counter():
    keys = torch.tensor([0, 1, -1, 2**62, -(2**63)], dtype=torch.int64)
    u = ba.key_uniforms(keys, 3, 7)
    assert u.dtype == torch.float64 and u.shape == (5, 7) and ((u >= 0) & (u < 1)).all()
    assert torch.equal(ba.key_uniforms(keys[[2, 0]], 3, 7), u[[2, 0]])
    assert torch.equal(ba.key_uniforms(keys, 3, 9)[:, :7], u)  # more numbers never change the first ones
    assert not torch.equal(ba.key_uniforms(keys, 4, 7), u)
    many = ba.key_uniforms(torch.arange(N, dtype=torch.int64), 0, 2)
    assert ks_statistic(many[:, 0], np.linspace(0, 1, N)) < KS_BOUND  # consecutive keys: still uniform
    assert abs(torch.corrcoef(many.T)[0, 1]) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_have_the_cpu_views_parameters_and_values():
    augment = BatchTwoViews("asymmetric", 64, MEAN, STD)
    x, keys = images(16, 72, 72, seed=1), fresh_keys(16, 1)
    cpu = augment(x, keys)
    cuda = augment(x.cuda(), keys.cuda())
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    for view in (0, 1):
        on_cpu, on_cuda = augment.parameters(keys, view, 72, 72), augment.parameters(keys.cuda(), view, 72, 72)
        assert all(torch.equal(on_cpu[k], on_cuda[k]) for k in on_cpu)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("arguments, error, needle", [
    (("imagenet", 32, MEAN, STD), ValueError, "recipe"),
    (("simclr", 0, MEAN, STD), ValueError, "size"),
    (("simclr", -3, MEAN, STD), ValueError, "size"),
    (("simclr", 32.0, MEAN, STD), ValueError, "size"),
    (("simclr", 32, MEAN, STD[:2]), ValueError, "mean and std"),
    (("simclr", 32, MEAN, (0.2, 0.0, 0.2)), ValueError, "std"),
    (("simclr", 32, "abc", STD), TypeError, "mean"),
    (("simclr", 32, MEAN, (0.2, float("nan"), 0.2)), ValueError, "std"),
])
def test_bad_settings_are_refused_by_name(arguments, error, needle):
    with pytest.raises(error, match=needle):
        BatchTwoViews(*arguments)


def test_bad_images_and_keys_are_refused_by_name():
    augment = BatchTwoViews("simclr", 32, MEAN, STD)
    x, keys = images(4, 32, 32, seed=0), fresh_keys(4, 0)
    for bad_images, bad_keys, error, needle in (
        (x.float(), keys, TypeError, "images must be uint8"),
        (x[0], keys, ValueError, "images must be a non-empty"),
        (x[:0], keys[:0], ValueError, "images must be a non-empty"),
        (x[:, :1], keys, ValueError, "images must have 3 channel"),
        (x.tolist(), keys, TypeError, "images must be a torch.Tensor"),
        (x, keys[:3], ValueError, r"keys must have shape \[4\]"),
        (x, keys.view(2, 2), ValueError, "keys must have shape"),
        (x, keys.int(), TypeError, "keys must be int64"),
        (x, keys.tolist(), TypeError, "keys must be a torch.Tensor"),
    ):
        with pytest.raises(error, match=needle):
            augment(bad_images, bad_keys)
    with pytest.raises(ValueError, match="view"):
        augment.parameters(keys, 2, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cifar_on_cuda_is_kept_there_or_in_host_memory_when_it_does_not_fit(monkeypatch):
    from metamask_fast.data import ImageSet
    from metamask_fast.data.pipeline import DeviceBatches

    pixels = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    images = ImageSet(pixels, None, None)
    device = torch.device("cuda")
    kept = DeviceBatches("cifar10", images, 32, 16, seed=0, device=device, workers=0)
    assert kept.images.is_cuda and kept.fallback is None and "on cuda" in kept.describe()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (pixels.numel(), 10**12))
    host = DeviceBatches("cifar10", images, 32, 16, seed=0, device=device, workers=0)
    assert not host.images.is_cuda and host.images.is_pinned()
    assert "would take more than half" in host.describe() and "host memory" in host.describe()
    for (a0, a1), (b0, b1) in zip(kept.epoch(0), host.epoch(0)):
        assert a0.is_cuda and b0.is_cuda and torch.equal(a0, b0) and torch.equal(a1, b1)
