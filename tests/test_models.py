"""kdwrap.models: CIFAR ResNet and the OSAKD paper's small CNN."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from kdwrap import models
from kdwrap.models import cifar_resnet, cifar_resnet32, small_cnn


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "depth, expected",
    # He et al. report 0.27M / 0.46M / 0.66M / 0.85M / 1.7M with zero-padding shortcuts; the 1x1 projections
    # add 2,560 weights + 192 BN parameters.
    [(20, 272_474), (32, 466_906), (44, 661_338), (56, 855_770), (110, 1_730_714)],
)
def test_cifar_resnet_param_counts(depth: int, expected: int) -> None:
    m = cifar_resnet(depth)
    assert n_params(m) == expected
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == (depth - 2) // 6


def test_cifar_resnet32_matches_paper_size() -> None:
    assert abs(n_params(cifar_resnet32()) / 1e6 - 0.46) < 0.01


def test_cifar_resnet_structure_and_shapes() -> None:
    m = cifar_resnet32(num_classes=100)
    for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"):
        assert hasattr(m, name)
    assert [n for n, _ in m.named_children()] == [
        "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"
    ]
    assert m.layer1[0].downsample is None
    assert isinstance(m.layer2[0].downsample, nn.Sequential)  # 1x1 conv + BN projection
    assert isinstance(m.layer2[0].downsample[0], nn.Conv2d) and m.layer2[0].downsample[0].kernel_size == (1, 1)
    assert m.default_cfg["input_size"] == (3, 32, 32) and m.default_cfg["num_classes"] == 100
    assert m.pretrained_cfg is m.default_cfg
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 100)
    assert m.forward_features(x).shape == (2, 64, 8, 8)
    m.eval()
    assert m(torch.randn(1, 3, 40, 40)).shape == (1, 100)  # global pooling: any size


def test_cifar_resnet_kaiming_init() -> None:
    torch.manual_seed(0)
    conv = cifar_resnet(20).layer3[1].conv1  # 64 -> 64, 3x3: fan_out 576
    assert abs(conv.weight.std().item() - (2 / 576) ** 0.5) < 0.005
    bn = cifar_resnet(20).layer3[1].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_cifar_resnet_in_chans() -> None:
    m = cifar_resnet(20, num_classes=7, in_chans=1)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert m.default_cfg["input_size"] == (1, 32, 32)


@pytest.mark.parametrize("depth", [0, 8.0, 21, 33, 100, -4])
def test_cifar_resnet_invalid_depth(depth) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)


@pytest.mark.parametrize("size", [8, 28, 32])
def test_small_cnn_input_sizes(size: int) -> None:
    m = small_cnn(in_chans=1, num_classes=10)
    assert m(torch.randn(3, 1, size, size)).shape == (3, 10)
    m3 = small_cnn(in_chans=3, num_classes=5)
    assert m3(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_small_cnn_structure() -> None:
    m = small_cnn()
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    fcs = [c for c in m.modules() if isinstance(c, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert [f.out_features for f in fcs] == [128, 10]
    assert m.default_cfg["input_size"] == (1, 28, 28) and m.default_cfg["num_classes"] == 10
    assert 100_000 < n_params(m) < 200_000


def test_lenet5_is_the_osakd_papers_cifar_network() -> None:
    m = models.lenet5()
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    fcs = [c for c in m.modules() if isinstance(c, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [(f.in_features, f.out_features) for f in fcs] == [(400, 120), (120, 84), (84, 10)]
    assert n_params(m) == 62_006  # LeNet-5's count for 3-channel 32x32 inputs and 10 classes
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.lenet5(in_chans=1, num_classes=4)(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_timm_registry() -> None:
    assert models.TIMM_REGISTERED
    for name in models.TIMM_MODELS:
        assert timm.is_model(name), name
    m = timm.create_model("cifar_resnet32", pretrained=False, num_classes=100)
    assert isinstance(m, models.CifarResNet) and m.fc.out_features == 100 and m.depth == 32
    m = timm.create_model("small_cnn", pretrained=False, num_classes=3, in_chans=3)
    assert isinstance(m, models.SmallCNN) and m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    m = timm.create_model("lenet5", pretrained=False, num_classes=7)
    assert isinstance(m, models.LeNet5) and m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="pretrained=False"):
        timm.create_model("cifar_resnet20", pretrained=True)


def test_timm_registration_is_idempotent() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered twice
        assert models._register_with_timm()
