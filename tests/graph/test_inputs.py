"""kdwrap.graph.inputs: the input size a model declares (image-size attributes, timm's ``pretrained_cfg`` /
``default_cfg``, the input channels it states), the random example input built from it (shape, dtype, device, a
private generator), the guesses where nothing is declared, and the eval/no-grad mode of a trial forward."""
import pytest
import timm
import torch
from torch import nn

from conftest import TinyNet
from kdwrap.graph.inputs import declared_input_size, example_input, trial_mode


class CfgNet(TinyNet):
    default_cfg = {"input_size": (3, 40, 48)}


class ImgSizeNet(TinyNet):
    img_size = 32


class PatchEmbedNet(TinyNet):
    """The image size stated on a patch embedding (timm ViTs), as an (H, W) pair."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Identity()
        self.patch_embed.img_size = (24, 40)


class Config:
    image_size = 20
    num_channels = 1


class HFLike(TinyNet):
    """A Hugging Face model: image size and channels in its config."""

    def __init__(self):
        super().__init__(in_chans=1)
        self.config = Config()


def test_timm_models_declare_their_input_size():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert resnet.pretrained_cfg["input_size"] == (3, 224, 224)
    assert declared_input_size(resnet) == (3, 224, 224)
    # img_size wins over pretrained_cfg, which keeps 224 for a ViT built at 64
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=1)
    assert vit.pretrained_cfg["input_size"] == (3, 224, 224)
    assert declared_input_size(vit) == (3, 64, 64)
    one_channel = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    assert declared_input_size(one_channel) == (1, 224, 224)  # timm's in_chans


@pytest.mark.parametrize("make, expected", [
    (CfgNet, (3, 40, 48)),
    (ImgSizeNet, (3, 32, 32)),
    (PatchEmbedNet, (3, 24, 40)),
    (HFLike, (1, 20, 20)),
    (TinyNet, None),  # nothing declared
])
def test_declared_input_size(make, expected):
    assert declared_input_size(make()) == expected


@pytest.mark.parametrize("make, batch, expected", [
    (CfgNet, 2, (2, 3, 40, 48)),  # the declared size
    (TinyNet, 1, (1, 3, 224, 224)),  # nothing declared: the first convolution's channels at 224 x 224
    (lambda: TinyNet(in_chans=1), 3, (3, 1, 224, 224)),
    (lambda: nn.Sequential(nn.Linear(7, 3)), 4, (4, 7)),  # an MLP: its first layer's in_features
    (nn.ReLU, 1, (1, 3, 224, 224)),  # no parameters at all: 3 channels
])
def test_example_input_shape_without_an_input_size(make, batch, expected):
    x = example_input(make(), batch=batch)
    assert tuple(x.shape) == expected
    assert x.dtype == torch.float32


def test_example_input_takes_a_given_size_and_the_models_dtype():
    net = CfgNet()
    assert tuple(example_input(net, (3, 8, 12), batch=5).shape) == (5, 3, 8, 12)  # the given size wins
    assert example_input(TinyNet().double(), (3, 4, 4)).dtype == torch.float64
    assert example_input(TinyNet().to(torch.bfloat16), (3, 4, 4)).dtype == torch.bfloat16
    assert example_input(TinyNet(), (3, 4, 4)).device == torch.device("cpu")


def test_example_input_is_random_normal_from_its_own_generator():
    net = TinyNet()
    before = torch.random.get_rng_state()
    x = example_input(net, (3, 16, 16), batch=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # the user's generator did not move
    expected = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, expected)  # a fixed seed: every trial forward sees the same input
    assert torch.equal(example_input(net, (3, 16, 16), batch=2), x)


def test_trial_mode_is_eval_and_no_grad_and_restores_each_modules_mode():
    net = TinyNet()
    net.stem[1].eval()  # a user's frozen BatchNorm in a training model
    before = {name: m.training for name, m in net.named_modules()}
    with trial_mode(net):
        assert not any(m.training for m in net.modules())
        assert not torch.is_grad_enabled()
        assert not net(torch.randn(2, 3, 8, 8)).requires_grad
    assert torch.is_grad_enabled()
    assert {name: m.training for name, m in net.named_modules()} == before
    assert not net.stem[1].training and net.training


def test_trial_mode_restores_the_modes_after_an_error():
    net = TinyNet()
    with pytest.raises(RuntimeError):
        with trial_mode(net):
            net(torch.randn(2, 1, 8, 8))  # wrong channel count
    assert all(m.training for m in net.modules())
    assert torch.is_grad_enabled()
