"""The trainer's input pipeline: how many two-view images per second it feeds a training step.

Batched augmentation (:class:`metamask_fast.data.BatchTwoViews`) against the PIL recipe it replaces, CIFAR size,
batch 512: the PIL path one image at a time in this process (one core; the loader's workers each add about
that), the batched path on one thread and on all threads of the CPU, and on CUDA where there is one. The
target: the batched path on one thread ≥ 5× the PIL path per core. Its crop-and-resize building block is
compared with the alternatives it was chosen over (``roi_align``, which clamps at the image's edge instead of
the box's).

CIFAR-shaped data (uint8 32×32 RGB images in memory, as the CIFAR reader returns them) through
:class:`metamask_fast.data.pipeline.ImageBatches`: the SimCLR augmentation twice per image, seeded per sample,
decoded and augmented in ``workers`` processes, batch 256. One round is one epoch of 8 batches (2,048
images) after the workers have started. Compare ``images_per_second`` with the step's images/s in
test_bench_step.py: the loader keeps the model busy when it is the larger of the two. With ``workers=0`` the
main process augments; each worker adds about that rate until the cores run out.
"""

import os

import pytest
import torch
from torchvision.ops import roi_align

from metamask_fast.data import BatchTwoViews, ImageSet
from metamask_fast.data import batch_augment
from metamask_fast.data.augment import _STATISTICS, view_augmentations
from metamask_fast.data.pipeline import ImageBatches, SeededTwoViews, mix

IMAGES, BATCH = 2048, 256
WORKERS = sorted({0, 2, min(8, os.cpu_count() or 1)})


@pytest.mark.parametrize("impl", [f"workers_{n}" for n in WORKERS])
def test_two_view_loader(benchmark, impl):
    workers = int(impl.removeprefix("workers_"))
    generator = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator),
                      torch.zeros(IMAGES, dtype=torch.int64), None)
    batches = ImageBatches("cifar10", images, 32, BATCH, seed=0, device=torch.device("cpu"), workers=workers)
    next(iter(batches.epoch(0)))  # start the (persistent) workers outside the timing
    epochs = iter(range(1, 10**6))

    def one_epoch():
        count = 0
        for x0, _ in batches.epoch(next(epochs)):
            count += x0.shape[0]
        return count

    benchmark.group = "two-view loader, CIFAR-shaped, batch 256"
    count = benchmark.pedantic(one_epoch, rounds=3, iterations=1)
    assert count == IMAGES
    if benchmark.stats:  # None under --benchmark-disable (CI's smoke run)
        benchmark.extra_info["images_per_second"] = IMAGES / benchmark.stats.stats.median


AUGMENT_BATCH = 512
AUGMENT_CASES = ["pil_loader", "batched_1_thread", f"batched_{os.cpu_count()}_threads", "batched_cuda"]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def cifar_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (AUGMENT_BATCH, 3, 32, 32), dtype=torch.uint8, generator=generator)
    keys = torch.tensor([mix(0, 1, i) for i in range(AUGMENT_BATCH)], dtype=torch.int64)
    return images.to(device), keys.to(device)


@pytest.mark.parametrize("impl", AUGMENT_CASES)
def test_two_view_augmentation(benchmark, impl, threads):
    if impl == "batched_cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images, keys = cifar_batch("cuda" if impl == "batched_cuda" else "cpu")
    if impl == "pil_loader":
        threads(1)
        dataset = SeededTwoViews(ImageSet(images, None, None), view_augmentations("simclr", "cifar10", 32), seed=0)

        def run():
            views = [dataset[(1, i)] for i in range(AUGMENT_BATCH)]
            return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
    else:
        threads(1 if impl == "batched_1_thread" else os.cpu_count())
        augment = BatchTwoViews("simclr", 32, *_STATISTICS["cifar10"])

        def run():
            views = augment(images, keys)
            if images.is_cuda:
                torch.cuda.synchronize()
            return views

    benchmark.group = f"two-view augmentation, CIFAR size, batch {AUGMENT_BATCH}"
    x0, x1 = benchmark.pedantic(run, rounds=3 if impl == "pil_loader" else 7, iterations=1, warmup_rounds=1)
    assert x0.shape == x1.shape == (AUGMENT_BATCH, 3, 32, 32)
    if benchmark.stats:
        benchmark.extra_info["images_per_second"] = AUGMENT_BATCH / benchmark.stats.stats.median


@pytest.mark.parametrize("impl", ["grid_sample", "roi_align"])
def test_crop_building_block(benchmark, impl, threads):
    """Crop-and-resize of a CIFAR batch to 32 px, one thread: ``grid_sample`` at per-image positions (what
    BatchTwoViews uses) against torchvision's ``roi_align`` (one sample per bin)."""
    threads(1)
    images, keys = cifar_batch()
    p = BatchTwoViews("simclr", 32, *_STATISTICS["cifar10"]).parameters(keys, 0, 32, 32)
    if impl == "grid_sample":
        def run():
            return batch_augment.resized_crop(images, p["top"], p["left"], p["height"], p["width"], 32, flip=p["flip"])
    else:
        boxes = torch.stack([torch.arange(AUGMENT_BATCH), p["left"], p["top"], p["left"] + p["width"],
                             p["top"] + p["height"]], dim=1).to(torch.float32)

        def run():
            return roi_align(images.to(torch.float32), boxes, (32, 32), 1.0, sampling_ratio=1, aligned=True) / 255
    benchmark.group = f"crop and resize, CIFAR size, batch {AUGMENT_BATCH}, one thread"
    assert benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1).shape == (AUGMENT_BATCH, 3, 32, 32)
