"""Backbones sized for small images.

The authors train a CIFAR ResNet-18 (512-d features): :func:`cifar_resnet` builds it, and the ResNet-50
(2048-d). On the 16×16 digits of the default run that network is a poor fit for a minutes-long CPU budget
(SPEC §5); :class:`DigitsConvNet` is the small plain convolutional network measured there instead.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchvision
from torch import nn

__all__ = ["DigitsConvNet", "cifar_resnet"]

_RESNETS = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}


def cifar_resnet(depth: int = 18, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-``depth`` (18, 34 or 50) in its CIFAR form: a 3×3 stride-1 stem without the
    max-pool, so that a 32×32 image keeps its resolution into the first stage, and no classifier.

    ``forward(x)`` maps ``[N, in_channels, H, W]`` to ``[N, feature_dim]``; ``feature_dim`` (an attribute) is
    what the last stage produces, 512 for ResNet-18/34 and 2048 for ResNet-50. Randomly initialised.
    """
    if isinstance(depth, bool) or depth not in _RESNETS:
        raise ValueError(f"depth must be one of {sorted(_RESNETS)}, got {depth!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    net = _RESNETS[depth]()
    net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class DigitsConvNet(nn.Module):
    """``conv3×3-BN-ReLU`` layers, global average pooling, ``widths[-1]``-d features.

    Defaults (SPEC §5): widths 16, 16, 32, 32, 64, 64 with stride 2 at the third and fifth layer
    (``downsample_layers`` counts from 0), so a 16×16 input is seen at 16, 8 and 4 pixels; about 72k weights.
    ``forward(x)`` maps ``[N, in_channels, H, W]`` to ``[N, feature_dim]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 16, 32, 32, 64, 64),
        downsample_layers: Sequence[int] = (2, 4),
    ):
        super().__init__()
        widths = tuple(widths)
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive integers, got {widths!r}")
        downsample_layers = frozenset(downsample_layers)
        if not downsample_layers <= set(range(len(widths))):
            raise ValueError(
                f"downsample_layers must be layer indices in [0, {len(widths)}), got {sorted(downsample_layers)!r}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            stride = 2 if index in downsample_layers else 1
            # No conv bias: the BatchNorm right after it has its own shift.
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.layers = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(dim=(2, 3))
