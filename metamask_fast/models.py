"""The dimensional mask and the two-headed MetaMask model (SPEC §1).

``h = backbone(x).flatten(1) * M`` with ``M = sigmoid(m)``; the Barlow Twins head and the contrastive head
both read the masked features ``h``, and so does the kNN monitor (:meth:`MetaMaskModel.features`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from metamask_fast._checks import check_number
from metamask_fast.backbones import DigitsConvNet, cifar_resnet
from metamask_fast.config import TrainConfig

__all__ = ["DimensionalMask", "MetaMaskModel", "projection_head", "build_model"]


class DimensionalMask(nn.Module):
    """A learnable weight per feature dimension.

    ``forward()`` returns ``sigmoid(logits)`` (``sigmoid=True``, the authors' default, so ``init=0`` starts
    every dimension at 0.5) or the raw ``logits`` (``sigmoid=False``). The parameter is ``.logits``, shape
    ``[dim]``, filled with ``init``.
    """

    def __init__(self, dim: int, init: float = 0.0, sigmoid: bool = True):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        init = check_number("init", init)
        if not isinstance(sigmoid, bool):
            raise TypeError(f"sigmoid must be a bool, got {type(sigmoid).__name__}")
        self.sigmoid = sigmoid
        self.logits = nn.Parameter(torch.full((dim,), init))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits) if self.sigmoid else self.logits

    def extra_repr(self) -> str:
        return f"dim={self.logits.numel()}, sigmoid={self.sigmoid}"


def projection_head(in_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """``Linear-BN-ReLU`` blocks for every width in ``dims`` but the last, which is ``Linear-BN``.

    The shape of the authors' projectors (lightly's SimSiam projection MLP): 512→2048→2048→2048 for Barlow
    Twins and 512→2048→256 for the contrastive head.
    """
    if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be a positive integer, got {in_dim!r}")
    dims = tuple(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"head dims must be a non-empty sequence of positive integers, got {dims!r}")
    layers: list[nn.Module] = []
    widths = (in_dim,) + dims
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)]
        if i < len(dims) - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MetaMaskModel(nn.Module):
    """Backbone, dimensional mask and the two projection heads of MetaMask.

    ``forward(x) -> (z_bt, z_cl)`` with ``h = backbone(x).flatten(1) * mask()``, ``z_bt = bt_head(h)`` and
    ``z_cl = cl_head(h)``. Call it once per view: BatchNorm statistics are per view, as in the authors' code.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        bt_dims: Sequence[int] = (2048, 2048, 2048),
        cl_dims: Sequence[int] = (2048, 256),
        mask_init: float = 0.0,
        sigmoid: bool = True,
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
        check_number("mask_init", mask_init)
        if not isinstance(sigmoid, bool):
            raise TypeError(f"sigmoid must be a bool, got {type(sigmoid).__name__}")
        self.backbone = backbone
        self.mask = DimensionalMask(feature_dim, init=mask_init, sigmoid=sigmoid)
        self.bt_head = projection_head(feature_dim, bt_dims)
        self.cl_head = projection_head(feature_dim, cl_dims)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Masked backbone features ``backbone(x).flatten(1) * mask()``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.device != self.mask.logits.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.mask.logits.device}")
        h = self.backbone(x).flatten(1)
        dim = self.mask.logits.numel()
        if h.shape[1] != dim:
            raise ValueError(
                f"x: the backbone produced {h.shape[1]} features per sample but feature_dim is {dim}"
            )
        return h * self.mask()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.bt_head(h), self.cl_head(h)


def build_model(config: TrainConfig) -> MetaMaskModel:
    """The network of ``config`` (resolved): backbone, heads, and the mask (trained for metamask, fixed at 1
    for the baselines)."""
    in_channels = 1 if config.dataset == "digits" else 3
    if config.backbone == "digits_convnet":
        backbone = DigitsConvNet(in_channels=in_channels)
    else:
        backbone = cifar_resnet(int(config.backbone.removeprefix("resnet")), in_channels=in_channels)
    feature_dim = backbone.feature_dim
    if config.method == "metamask":
        # The authors' mask: sigmoid of logits that start at 0, so every dimension starts at 0.5.
        return MetaMaskModel(backbone, feature_dim, config.bt_dims, config.cl_dims, mask_init=0.0, sigmoid=True)
    model = MetaMaskModel(backbone, feature_dim, config.bt_dims, config.cl_dims, mask_init=1.0, sigmoid=False)
    model.mask.logits.requires_grad_(False)
    return model
