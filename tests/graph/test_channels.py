"""kdwrap.graph.channels: the channel count (and its axis) of the values crossing a cut, read off the module that
makes them or from a trial forward of the trunk; which of several crossing values the gate pools; the trunk's trial
forward and its error. Each count is checked against the shape of the value at the cut, computed by hand."""
import pytest
import torch
from torch import nn

from conftest import TinyNet
from kdwrap.errors import SplitError
from kdwrap.graph.channels import main_value, producer_channels, run_trunk
from kdwrap.graph.inputs import example_input
from kdwrap.graph.outputs import stage_input
from kdwrap.graph.split import split_model
from kdwrap.graph.tracing import trace


def input_shape_of(net: nn.Module, name: str, x: torch.Tensor) -> tuple[int, ...]:
    """Reference: the shape of the value entering module ``name`` (a forward pre-hook)."""
    seen = []
    handle = net.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    net.eval()
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0]


class Residual(nn.Module):
    """The value entering ``c`` is ``relu(a(x) + b(a(x)))``: its count is read through the add."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.c, self.fc = nn.Conv2d(6, 7, 1), nn.Linear(7, 2)

    def forward(self, x):
        h = self.a(x)
        return self.fc(self.c(torch.relu(h + self.b(h))).mean((2, 3)))


class Flattened(nn.Module):
    """A conv, then flatten: the conv's 4 channels no longer hold at fc1 (4 * 14 * 14 = 784 features at 16x16)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 4, 3), nn.Linear(4 * 14 * 14, 10), nn.Linear(10, 2)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv(x).flatten(1)))


class ChannelsLast(nn.Module):
    """The trunk returns an NHWC map (B x 8 x 8 x 6): 6 channels, on the last axis."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.LayerNorm(6), nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.norm(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


class Tokens(nn.Module):
    """Patches to tokens (B x 4 x 8), then a linear block: the features are on the last axis."""

    def __init__(self):
        super().__init__()
        self.patch_embed, self.block, self.head = nn.Conv2d(3, 8, 4, stride=4), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.block(self.patch_embed(x).flatten(2).transpose(1, 2)).mean(1))


class TwoValues(nn.Module):
    """Two values cross the cut at ``body``: a small side vector (B x 4, computed first) and the map (B x 8 x 8 x 8)."""

    def __init__(self):
        super().__init__()
        self.side, self.stem = nn.Linear(3, 4), nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.body, self.fc = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x):
        s = self.side(x.mean((2, 3)))
        h = self.stem(x)
        return self.fc(self.body(h).mean((2, 3)) + s)


@pytest.mark.parametrize("cut", ["stage1", "stage2", "pool"])
def test_producer_channels_of_tinynet_equal_the_map_entering_the_cut(cut):
    net = TinyNet()
    traced = trace(net, training=False)
    shape = input_shape_of(net, cut, torch.randn(1, 3, 16, 16))
    assert producer_channels(net, stage_input(traced, cut)) == (shape[1], 1, True)
    assert shape[1] == {"stage1": 8, "stage2": 16, "pool": 32}[cut]  # TinyNet's widths, as written


def test_producer_channels_reach_through_a_residual_add():
    net = Residual()
    found = producer_channels(net, stage_input(trace(net, training=False), "c"))
    assert found == (6, 1, True)
    assert input_shape_of(net, "c", torch.randn(1, 3, 8, 8))[1] == 6


def test_a_count_read_through_a_reshape_is_unreliable_and_the_trial_forward_decides():
    net = Flattened()
    found = producer_channels(net, stage_input(trace(net, training=False), "fc1"))
    assert found == (4, 1, False)  # the conv's count, marked as not holding at the cut
    cut = split_model(net, "fc1", input_size=(3, 16, 16))
    assert (cut.channels, cut.channels_dim) == (4 * 14 * 14, -1)
    assert input_shape_of(net, "fc1", torch.randn(1, 3, 16, 16)) == (1, 784)


@pytest.mark.parametrize("make, split, input_size, expected", [
    (TinyNet, "stage2", (3, 16, 16), (16, 1)),
    (ChannelsLast, "norm", (3, 8, 8), (6, -1)),
    (Tokens, "block", (3, 8, 8), (8, -1)),
])
def test_split_model_reads_the_count_and_its_axis(make, split, input_size, expected):
    net = make()
    cut = split_model(net, split, input_size=input_size)
    assert (cut.channels, cut.channels_dim) == expected
    shape = input_shape_of(net, split, torch.randn(1, *input_size))
    assert shape[expected[1]] == expected[0]


def test_the_gate_pools_the_largest_per_sample_value_crossing_the_cut():
    cut = split_model(TwoValues(), "body", input_size=(3, 16, 16))
    assert len(cut.crossing) == 2
    assert cut.main_value == 1  # the 8-channel map, not the 4-wide side vector that crosses first
    assert (cut.channels, cut.channels_dim) == (8, 1)


def test_main_value_prefers_one_row_per_sample_then_size():
    # batch 2: the (8, 100) tensor folds samples, so the larger per-sample one (index 1) wins; ints are skipped
    assert main_value([torch.zeros(2, 3), torch.zeros(2, 4, 5), torch.zeros(8, 100), 3]) == 1
    assert main_value([torch.zeros(3, 3), torch.zeros(5, 4)]) == 1  # no per-sample tensor: the largest
    assert main_value([torch.zeros(4, 6), torch.zeros(4, 6)], batch=4) == 0  # a tie: the first
    with pytest.raises(SplitError, match="no tensor with a batch axis"):
        main_value([1, torch.zeros(3)])


def test_run_trunk_runs_the_trunk_in_eval_mode_on_the_example_input():
    net = TinyNet()
    cut = split_model(net, "stage2", input_size=(3, 16, 16))
    assert cut.trunk.training
    out = run_trunk(net, cut.trunk, (3, 16, 16), "a test")
    x = example_input(net, (3, 16, 16), batch=2)
    net.eval()
    with torch.no_grad():
        expected = net.stage1(net.stem(x))  # eval mode: BatchNorm uses its running statistics
    assert out.shape == (2, 16, 8, 8)
    assert torch.allclose(out, expected)
    assert cut.trunk.training  # its mode is given back


def test_run_trunk_asks_for_an_input_size_when_the_trial_forward_fails():
    net = TinyNet()
    cut = split_model(net, "stage2", input_size=(3, 16, 16))
    with pytest.raises(SplitError, match=r"the channels.*\(2, 1, 16, 16\) input.*pass input_size=\(C, H, W\)"):
        run_trunk(net, cut.trunk, (1, 16, 16), "the channels")  # TinyNet takes 3 input channels
    assert cut.trunk.training
