"""The trainer's input pipeline: how many two-view images per second it feeds a training step.

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

from metamask_fast.data import ImageSet
from metamask_fast.data.pipeline import ImageBatches

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
