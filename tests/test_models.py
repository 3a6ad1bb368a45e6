"""DimensionalMask and MetaMaskModel: values, gradients, the mask's place, bad input."""

import pytest
import torch
from torch import nn

from metamask_fast.models import DimensionalMask, MetaMaskModel


def test_mask_starts_at_half_and_follows_sigmoid():
    mask = DimensionalMask(7)
    assert mask.logits.shape == (7,)
    torch.testing.assert_close(mask(), torch.full((7,), 0.5))
    with torch.no_grad():
        mask.logits.copy_(torch.linspace(-3, 3, 7))
    torch.testing.assert_close(mask(), 1 / (1 + torch.exp(-torch.linspace(-3, 3, 7))))
    raw = DimensionalMask(3, init=1.0, sigmoid=False)
    torch.testing.assert_close(raw(), torch.ones(3))


def test_mask_gradcheck():
    mask = DimensionalMask(5).double()
    with torch.no_grad():
        mask.logits.normal_()
    weights = torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m: (torch.sigmoid(m) * weights).sum(), (mask.logits,))

    # The module's own forward, differentiated with respect to its parameter.
    out = mask()
    (grad,) = torch.autograd.grad((out * weights).sum(), [mask.logits])
    s = torch.sigmoid(mask.logits.detach())
    torch.testing.assert_close(grad, weights * s * (1 - s))


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(dim=0), ValueError, "dim"), (dict(dim=2.5), ValueError, "dim"),
    (dict(dim=3, init=float("nan")), ValueError, "init"), (dict(dim=3, sigmoid="yes"), TypeError, "sigmoid"),
])
def test_mask_bad_input(kwargs, error, name):
    with pytest.raises(error, match=name):
        DimensionalMask(**kwargs)


def tiny_backbone(channels=7):
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1))


def test_model_applies_mask_before_both_heads():
    torch.manual_seed(0)
    model = MetaMaskModel(tiny_backbone(), 7, bt_dims=(11, 13, 9), cl_dims=(10, 5)).eval()
    with torch.no_grad():
        model.mask.logits.normal_()
    x = torch.randn(6, 1, 5, 5)
    z_bt, z_cl = model(x)
    assert z_bt.shape == (6, 9) and z_cl.shape == (6, 5)
    h = model.backbone(x).flatten(1) * torch.sigmoid(model.mask.logits)
    torch.testing.assert_close(model.features(x), h)
    torch.testing.assert_close(z_bt, model.bt_head(h))
    torch.testing.assert_close(z_cl, model.cl_head(h))
    # Head shape: Linear-BN-ReLU blocks, the last block Linear-BN.
    kinds = [type(m).__name__ for m in model.cl_head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in model.bt_head][-2:] == ["Linear", "BatchNorm1d"]


def test_model_bad_input():
    with pytest.raises(TypeError, match="backbone"):
        MetaMaskModel("resnet", 7)
    with pytest.raises(ValueError, match="feature_dim"):
        MetaMaskModel(tiny_backbone(), 0)
    with pytest.raises(ValueError, match="dims"):
        MetaMaskModel(tiny_backbone(), 7, cl_dims=())
    with pytest.raises(ValueError, match="mask_init"):
        MetaMaskModel(tiny_backbone(), 7, mask_init=float("inf"))
    with pytest.raises(TypeError, match="sigmoid"):
        MetaMaskModel(tiny_backbone(), 7, sigmoid=None)
    model = MetaMaskModel(tiny_backbone(), 8, bt_dims=(4,), cl_dims=(4,))
    with pytest.raises(ValueError, match="feature_dim is 8"):
        model(torch.randn(3, 1, 4, 4))
    with pytest.raises(TypeError, match="x"):
        model(torch.randn(3, 1, 4, 4).numpy())
    with pytest.raises(ValueError, match="x is on meta"):
        model(torch.randn(3, 1, 4, 4, device="meta"))


@pytest.mark.parametrize("depth,feature_dim", [(18, 512), (50, 2048)])
def test_cifar_resnet_keeps_the_resolution_and_reports_its_feature_size(depth, feature_dim):
    from metamask_fast.backbones import cifar_resnet

    net = cifar_resnet(depth)
    assert net.feature_dim == feature_dim
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity) and isinstance(net.fc, torch.nn.Identity)
    seen = []
    net.layer1.register_forward_hook(lambda module, args, out: seen.append(out.shape[-1]))
    out = net.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feature_dim) and seen == [32]  # the first stage sees all 32×32 pixels
    model = MetaMaskModel(cifar_resnet(depth, in_channels=1), net.feature_dim, bt_dims=(16, 16), cl_dims=(8,))
    assert model(torch.randn(3, 1, 32, 32))[0].shape == (3, 16)


@pytest.mark.parametrize("kwargs,message", [({"depth": 101}, "depth must be one of"),
                                            ({"in_channels": 0}, "in_channels must be a positive integer")])
def test_cifar_resnet_rejects_bad_arguments(kwargs, message):
    from metamask_fast.backbones import cifar_resnet

    with pytest.raises(ValueError, match=message):
        cifar_resnet(**kwargs)
