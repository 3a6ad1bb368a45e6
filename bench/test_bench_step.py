"""One MetaMask training step: the authors-style step of bench/baselines against MetaMaskStep.

The authors' model everywhere: a full-width CIFAR ResNet-18 with Barlow Twins head 2048-2048-2048 and
contrastive head 2048-256, on 32×32 inputs; N=32 on the CPU (a few seconds per step), N=512 on CUDA.
Cases: the authors-style step (``authors_second_order``, the baseline of the ratios), MetaMaskStep in its
faithful mode, with the exact second-order term, and with ``meta_interval=5`` (timed over whole cycles of
5 calls, reported per call), and a plain Barlow Twins step (both views forward, backward, SGD) as the unit
of cost.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from baselines.authors_style import AuthorsStyleMetaMaskStep, authors_barlow_twins_loss
from metamask_fast.meta import MetaMaskStep
from metamask_fast.models import MetaMaskModel


def cifar_resnet18() -> nn.Module:
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


AUTHORS_MODEL = dict(backbone=cifar_resnet18, feature_dim=512, bt_dims=(2048, 2048, 2048), cl_dims=(2048, 256),
                     image=(3, 32, 32))
SETTINGS = {"cpu": dict(AUTHORS_MODEL, batch=32, rounds=3), "cuda": dict(AUTHORS_MODEL, batch=512, rounds=5)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def optimizers(model):
    network = [p for name, p in model.named_parameters() if not name.startswith("mask.")]
    return (torch.optim.SGD(network, lr=1e-3, momentum=0.9, weight_decay=5e-4),
            torch.optim.SGD([model.mask.logits], lr=1e-3, momentum=0.9, weight_decay=5e-4))


class BarlowTwinsStep:
    """The unit of cost: both views forward, the Barlow Twins loss, backward, one SGD step."""

    def __init__(self, model, net_optimizer):
        self.model, self.optimizer = model, net_optimizer

    def step(self, x0, x1):
        loss = authors_barlow_twins_loss(self.model(x0)[0], self.model(x1)[0])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


STEPS = {
    "barlow_twins": lambda model: BarlowTwinsStep(model, optimizers(model)[0]),
    "authors_second_order": lambda model: AuthorsStyleMetaMaskStep(model, *optimizers(model)),
    "faithful": lambda model: MetaMaskStep(model, *optimizers(model)),
    "exact": lambda model: MetaMaskStep(model, *optimizers(model), second_order="exact"),
    "meta_interval_5": lambda model: MetaMaskStep(model, *optimizers(model), meta_interval=5),
}
CALLS_PER_ROUND = {"meta_interval_5": 5}  # a whole cycle of the schedule per round


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(STEPS))
def test_training_step(benchmark, impl, device):
    s = SETTINGS[device]
    benchmark.group = f"training step {device} N={s['batch']}"
    torch.manual_seed(0)
    model = MetaMaskModel(s["backbone"](), s["feature_dim"], bt_dims=s["bt_dims"], cl_dims=s["cl_dims"]).to(device)
    step = STEPS[impl](copy.deepcopy(model))
    x0 = torch.randn(s["batch"], *s["image"], device=device)
    x1 = torch.randn(s["batch"], *s["image"], device=device)

    def one_step():
        step.step(x0, x1)
        if device == "cuda":
            torch.cuda.synchronize()

    iterations = CALLS_PER_ROUND.get(impl, 1)
    benchmark.extra_info["batch"] = s["batch"]
    benchmark.pedantic(one_step, rounds=s["rounds"], iterations=iterations, warmup_rounds=1)
