"""kdwrap.graph.cost: forward FLOPs against the hand formula of torch's FLOP counter, which counts a multiply-add as
2 FLOPs (FLOPs = 2 x MACs; biases, normalisation, activations and pooling count 0), and the output returned with them.
(Parameter counts are :func:`kdwrap.base.count_parameters`, tested in tests/test_base.py.)"""
import pytest
import torch
from torch import nn

from conftest import TinyNet
from kdwrap.graph.cost import forward_flops


def conv_flops(batch: int, c_in: int, c_out: int, k: int, h_out: int, w_out: int, groups: int = 1) -> int:
    """2 x MACs: every output value is a dot product of length c_in / groups * k * k."""
    return 2 * batch * c_out * h_out * w_out * (c_in // groups) * k * k


def linear_flops(batch: int, d_in: int, d_out: int) -> int:
    return 2 * batch * d_in * d_out


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_linear_flops():
    flops, out = forward_flops(nn.Linear(6, 4), torch.randn(3, 6))
    assert flops == linear_flops(3, 6, 4) == 144
    assert out.shape == (3, 4)


@pytest.mark.parametrize("conv, x, h_out", [
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 8, 8), 4),
    (nn.Conv2d(3, 5, 3), torch.randn(1, 3, 8, 8), 6),
    (nn.Conv2d(3, 5, 1, bias=False), torch.randn(1, 3, 7, 7), 7),
])
def test_conv_flops(conv, x, h_out):
    flops, out = forward_flops(conv, x)
    assert out.shape[2:] == (h_out, h_out)
    assert flops == conv_flops(x.shape[0], conv.in_channels, conv.out_channels, conv.kernel_size[0], h_out, h_out)


def test_grouped_conv_flops():
    conv = nn.Conv2d(4, 8, 3, groups=2)
    flops, _ = forward_flops(conv, torch.randn(1, 4, 6, 6))
    assert flops == conv_flops(1, 4, 8, 3, 4, 4, groups=2)
    assert flops == forward_flops(nn.Conv2d(4, 8, 3), torch.randn(1, 4, 6, 6))[0] // 2


def test_a_small_net_costs_its_conv_and_its_linear():
    net = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    flops, out = forward_flops(net, x)
    assert flops == conv_flops(2, 3, 4, 3, 4, 4) + linear_flops(2, 64, 6)  # BN and ReLU: 0
    assert torch.equal(out, net(x))
    assert not out.requires_grad  # measured without autograd


def test_tinynet_flops_scale_with_the_batch_and_the_map():
    net = TinyNet().eval()
    one, _ = forward_flops(net, torch.randn(1, 3, 16, 16))
    by_hand = (conv_flops(1, 3, 8, 3, 16, 16) + conv_flops(1, 8, 16, 3, 8, 8) + conv_flops(1, 16, 32, 3, 4, 4)
               + linear_flops(1, 32, 5))
    assert one == by_hand == 405_824
    assert forward_flops(net, torch.randn(4, 3, 16, 16))[0] == 4 * by_hand


def test_matmul_flops():
    module = nn.Module()
    module.forward = lambda a, b: a @ b
    flops, out = forward_flops(module, torch.randn(2, 3, 5), torch.randn(2, 5, 7))
    assert flops == 2 * 2 * 3 * 5 * 7
    assert out.shape == (2, 3, 7)
