"""kdwrap.graph.stages: the rule that reads a model's stages, and what is read off them (the default split of ONE and
OKDDip, BYOT's exits). The stages found on known networks (TinyNet, torchvision's resnet18, a functional LeNet, stacks
of identical blocks) are checked against the downsampling points of each architecture, found here by hand (forward
hooks that watch where the feature map shrinks) or read off the architecture's definition."""
import pytest
import torch
import torchvision
from torch import nn

from conftest import FunctionalLeNet, TinyNet
from kdwrap.errors import SplitError
from kdwrap.graph.stages import auto_split, downsamples, given_split, graph_stage_starts, is_stage, stage_starts
from kdwrap.graph.tracing import trace


def shrinking_children(net: nn.Module, x: torch.Tensor) -> list[str]:
    """Reference: the direct children of ``net`` whose output map has fewer positions than their input map, in
    call order (forward hooks on an eval-mode forward)."""
    order: list[str] = []
    hooks = []
    for name, child in net.named_children():
        def hook(module, args, out, name=name):
            if args and args[0].dim() == 4 and out.dim() == 4 and out.shape[2:].numel() < args[0].shape[2:].numel():
                order.append(name)
        hooks.append(child.register_forward_hook(hook))
    net.eval()
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return order


def with_children(net: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` that are modules holding layers (not a bare convolution or pooling)."""
    return [n for n in names if len(list(net.get_submodule(n).children())) > 0]


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class TokenNet(nn.Module):
    """A ViT-like net: one downsampling (the patch embedding), then ``n`` identical blocks on tokens."""

    def __init__(self, n: int, dim: int = 8, mixed: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        blocks = [Block(dim) for _ in range(n)]
        if mixed:
            blocks[-1] = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.patch_embed(x).flatten(2).transpose(1, 2)).mean(1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class PatchMerging(nn.Module):
    """Swin-style: halves the resolution by regrouping, without a stride."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = nn.Linear(4, 2)


@pytest.mark.parametrize("module, expected", [
    (nn.Conv2d(3, 3, 3, stride=2), True),
    (nn.Conv2d(3, 3, 3, stride=(1, 2)), True),  # a stride > 1 on any axis
    (nn.Conv2d(3, 3, 3), False),
    (nn.MaxPool2d(2), True),  # the stride defaults to the kernel size
    (nn.AvgPool2d(3, stride=1, padding=1), False),
    (nn.AdaptiveAvgPool2d(1), False),  # no stride attribute: a global pooling is not a stage boundary
    (nn.Sequential(nn.ReLU(), nn.Sequential(nn.Conv2d(3, 3, 1, stride=2))), True),  # found deep inside
    (nn.Sequential(nn.Linear(3, 3), nn.ReLU()), False),
    (PatchMerging(), True),
])
def test_downsamples_reads_a_stride_above_one_or_a_patch_merging(module, expected):
    assert downsamples(module) is expected


@pytest.mark.parametrize("module, expected", [
    (nn.Conv2d(3, 3, 3), False),  # parameters, no children
    (nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), False),  # children, no parameters
    (nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()), True),
])
def test_is_stage_needs_children_and_parameters(module, expected):
    assert is_stage(module) is expected


def test_tinynet_stages_are_its_two_strided_stages():
    net = TinyNet()
    # By hand: stem keeps 16x16 (stride 1); stage1 and stage2 halve it; pool is global (no stride).
    assert shrinking_children(net, torch.randn(1, 3, 16, 16)) == ["stage1", "stage2", "pool"]
    traced = trace(net, training=False)
    assert stage_starts(net, traced) == ["stage1", "stage2"]
    assert stage_starts(net, traced, exits=1) == ["stage2"]
    assert auto_split(net, traced) == "stage2"  # the start of the last stage
    choice = auto_split(net, traced, explain=True)
    assert choice.split == "stage2" and choice.automatic
    assert "last resolution stage" in choice.rule
    # The cuts considered: the stages, then the children of the chosen one.
    assert choice.considered == ["stage1", "stage2", "stage2.0", "stage2.1", "stage2.2"]


def test_resnet18_stages_start_at_layer2_to_layer4():
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    shrinking = shrinking_children(net, torch.randn(1, 3, 32, 32))
    # conv1 (stride 2), maxpool (stride 2), layer2..layer4 (first block stride 2); layer1 keeps the resolution.
    assert shrinking[:5] == ["conv1", "maxpool", "layer2", "layer3", "layer4"]
    expected = with_children(net, shrinking[:5])  # bare conv1 / maxpool are not stages
    assert expected == ["layer2", "layer3", "layer4"]
    traced = trace(net, training=False)
    assert stage_starts(net, traced) == expected
    assert stage_starts(net, traced, exits=2) == ["layer3", "layer4"]
    choice = auto_split(net, traced, explain=True)
    assert choice.split == "layer4"
    assert choice.considered == ["layer2", "layer3", "layer4", "layer4.0", "layer4.1"]


def test_functional_lenet_stages_are_read_from_the_graph():
    """LeNet downsamples with F.max_pool2d after each convolution (32 -> 28 -> 14 -> 10 -> 5): each conv starts a
    resolution stage, and only a trial forward at a size the fully connected layers accept can see it."""
    net = FunctionalLeNet()
    traced = trace(net, training=False)
    assert graph_stage_starts(net, traced, (3, 32, 32)) == ["conv1", "conv2"]
    assert stage_starts(net, traced, input_size=(3, 32, 32)) == ["conv2"]  # the stages after the first
    choice = auto_split(net, traced, (3, 32, 32), explain=True)
    assert choice.split == "conv2"
    assert choice.rule == "the start of the last resolution stage read from the graph"
    assert {"conv1", "conv2", "fc1", "fc2", "fc3"} <= set(choice.considered)
    assert net.training  # the trial forward gave the model its mode back


def test_functional_lenet_without_an_input_size_asks_for_one():
    net = FunctionalLeNet()
    traced = trace(net, training=False)
    # The default 224 x 224 trial input does not fit fc1 (16 * 5 * 5 inputs): no shapes, no stages.
    assert graph_stage_starts(net, traced) == []
    with pytest.raises(SplitError, match=r"input_size=\(C, H, W\)"):
        auto_split(net, traced)


@pytest.mark.parametrize("n, split, exits", [
    # split: block n - n // 4; exits: blocks n * q // 4 for q = 1, 2, 3 (the same when 4 divides n)
    (4, "blocks.3", ["blocks.1", "blocks.2", "blocks.3"]),
    (8, "blocks.6", ["blocks.2", "blocks.4", "blocks.6"]),
    (10, "blocks.8", ["blocks.2", "blocks.5", "blocks.7"]),
    (12, "blocks.9", ["blocks.3", "blocks.6", "blocks.9"]),
])
def test_a_stack_of_identical_blocks_is_cut_in_quarters(n, split, exits):
    net = TokenNet(n)
    traced = trace(net, training=False)
    choice = auto_split(net, traced, explain=True)
    assert choice.split == split
    assert f"'blocks' ({n} blocks)" in choice.rule
    assert choice.considered == [f"blocks.{i}" for i in range(n)]
    assert stage_starts(net, traced) == exits


@pytest.mark.parametrize("net", [TokenNet(3), TokenNet(4, mixed=True)], ids=["three-blocks", "mixed-classes"])
def test_no_stack_of_four_identical_blocks_no_stages(net):
    traced = trace(net, training=False)
    with pytest.raises(SplitError, match="could not choose a split"):
        auto_split(net, traced)
    with pytest.raises(SplitError, match="could not find the stages"):
        stage_starts(net, traced)


def test_a_model_without_maps_has_no_stages_and_the_error_names_its_modules():
    net = MLP()
    traced = trace(net, training=False)
    assert graph_stage_starts(net, traced) == []
    with pytest.raises(SplitError, match="one of: fc1, fc2"):
        auto_split(net, traced)
    with pytest.raises(SplitError, match=r"stages=\[\.\.\.\]"):
        stage_starts(net, traced)


def test_a_given_split_considers_its_siblings_in_execution_order():
    net = TinyNet()
    choice = given_split(net, trace(net, training=False), "stage1")
    assert (choice.split, choice.automatic) == ("stage1", False)
    assert choice.rule == "given by the user (split='stage1')"
    assert choice.considered == ["stem", "stage1", "stage2", "pool", "fc"]
