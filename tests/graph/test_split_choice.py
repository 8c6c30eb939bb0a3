"""Why ONE split a model where it did: the rule's sentence, the candidate cuts near the split with their tails' share
of the forward FLOPs (checked against the FLOPs of each cut's own trunk and tail), and the input those FLOPs are
measured at (given, else the first batch seen, else the model's declared size, never a guess)."""
import re

import pytest
import torch
import torchvision
from torch import nn

import kdwrap
from conftest import FunctionalLeNet, TinyNet
from kdwrap.graph import auto_split, candidates, forward_flops, split_model


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyViT(nn.Module):
    """Patches, a stack of 8 identical blocks, a head: it downsamples once, so the block rule chooses."""

    def __init__(self, dim: int = 16, num_classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(8)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


def _resnet18():
    return torchvision.models.resnet18(num_classes=5)


@pytest.mark.parametrize("make, input_size, split, rule", [
    (_resnet18, None, "layer4",
     "the start of the last resolution stage (the last of the downsampling children of the model)"),
    (TinyViT, None, "blocks.6", "block n - n // 4 of the longest stack of identical blocks 'blocks' (8 blocks)"),
    (FunctionalLeNet, (3, 32, 32), "conv2", "the start of the last resolution stage read from the graph"),
])
def test_the_rule_that_chose_the_split_is_named(make, input_size, split, rule):
    net = make()
    choice = auto_split(net, input_size=input_size, explain=True)
    assert (choice.split, choice.rule, choice.automatic) == (split, rule, True)
    assert auto_split(net, input_size=input_size) == split  # without explain: the name, as before
    model, _ = kdwrap.one(net, input_size=input_size)
    assert model.split_choice == choice
    assert f"  split: '{split}', chosen as {rule}; pass split=... to change it" in kdwrap.summary(model)


def test_a_split_the_user_gave_is_named_as_such():
    model, _ = kdwrap.one(TinyNet(), split="stage1", input_size=(3, 16, 16))
    assert (model.split_choice.rule, model.split_choice.automatic) == ("given by the user (split='stage1')", False)
    text = kdwrap.summary(model)
    assert "  split: 'stage1', given by the user (split='stage1')\n" in text and "pass split=" not in text
    # The candidates are its siblings, nearest first.
    assert [c.name for c in candidates(model)] == ["stage1", "stage2", "pool", "fc"]


@pytest.mark.parametrize("make, input_size", [
    (_resnet18, (3, 32, 32)), (TinyViT, (3, 16, 16)), (FunctionalLeNet, (3, 32, 32)),
])
def test_tail_shares_equal_each_cut_measured_on_its_own(make, input_size):
    """Each candidate's share (one node-by-node run of the graph) against FLOPs counted directly: the tail cut at
    that candidate, on the trunk's output, over the whole model, on the same input."""
    net = make().eval()
    model, _ = kdwrap.one(net, input_size=input_size)
    found = candidates(model)
    assert len(found) >= 2 and found[0].chosen and sum(c.chosen for c in found) == 1
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    whole, _ = forward_flops(net.eval(), x)
    for c in found:
        cut = split_model(net, c.name, input_size=input_size)
        f = cut.trunk.eval()(x)
        tail, _ = forward_flops(cut.tail.eval(), *(f if len(cut.crossing) > 1 else (f,)))
        assert c.tail_share == pytest.approx(tail / whole, rel=1e-6), c.name


def test_the_candidates_list_the_chosen_split_first_and_its_neighbours():
    model, _ = kdwrap.one(_resnet18(), input_size=(3, 32, 32))
    line = next(s for s in kdwrap.summary(model).splitlines() if "candidates" in s)
    assert re.fullmatch(
        r"  candidates \(tail share of forward FLOPs at input \(3, 32, 32\)\): layer4 [\d.]+% \(chosen\) \| "
        r"layer3 [\d.]+% \| layer4\.1 [\d.]+% \| layer2 [\d.]+%", line), line
    vit, _ = kdwrap.one(TinyViT(), input_size=(3, 16, 16))
    names = [c.name for c in candidates(vit)]
    assert names == ["blocks.6", "blocks.5", "blocks.7", "blocks.4", "blocks.3"]
    shares = [c.tail_share for c in sorted(candidates(vit), key=lambda c: c.name)]
    assert shares == sorted(shares, reverse=True)  # a later cut keeps less in the tail


def test_flops_are_measured_at_the_first_batch_when_no_size_was_given():
    model, loss_fn = kdwrap.one(TinyNet())  # TinyNet declares no input size
    keys = set(model.state_dict())
    text = kdwrap.summary(model)
    assert "FLOPs: not measured yet: pass input_size=(C, H, W) or run one batch first" in text
    assert "tail shares of forward FLOPs not measured yet" in text and "stage2 (chosen)" in text
    loss_fn(model(torch.randn(4, 3, 40, 40)), torch.randint(0, 5, (4,))).backward()
    assert model.first_input_size == (3, 40, 40)
    model(torch.randn(4, 3, 24, 24))  # the first batch's size stays
    text = kdwrap.summary(model)
    assert "candidates (tail share of forward FLOPs at input (3, 40, 40)): stage2" in text
    assert "forward FLOPs at input (3, 40, 40)" in text
    assert set(model.state_dict()) == keys  # a plain attribute, not a buffer
    assert "forward FLOPs at input (3, 8, 8)" in kdwrap.summary(model, input_size=(3, 8, 8))  # given wins


def test_a_declared_size_is_used_before_any_batch():
    net = TinyViT()
    net.pretrained_cfg = {"input_size": (3, 24, 24)}  # as timm states it
    model, _ = kdwrap.one(net)
    assert "forward FLOPs at input (3, 24, 24)" in kdwrap.summary(model)


def test_okddip_summary_names_the_rule_and_the_candidates():
    model, _ = kdwrap.okddip(TinyNet(), input_size=(3, 16, 16))
    text = kdwrap.summary(model)
    assert "  split: 'stage2', chosen as the start of the last resolution stage" in text
    assert re.search(r"candidates \(tail share of forward FLOPs at input \(3, 16, 16\)\): stage2 [\d.]+% \(chosen\)",
                     text)


class SharedPositionConv(nn.Module):
    """A position-encoding convolution used in two stages (timm CoaT's shared ``cpe``): a tail holding its second
    use would untie it from the trunk's first."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stage1 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.stage2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.stage3 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pos(x)
        x = self.stage2(self.stage1(x))
        x = x + self.pos(x)
        return self.head(self.stage3(x).mean((2, 3)))


def test_an_automatic_split_moves_past_weights_the_trunk_shares_and_a_given_one_names_them():
    model, loss_fn = kdwrap.one(SharedPositionConv(), branches=2, input_size=(3, 16, 16))
    assert model.split == "stage3"  # the stage rule's 'stage2' would hold pos's second use
    assert "after the last use of weights the trunk shares (pos)" in model.summary()
    x = torch.randn(4, 3, 16, 16)
    loss_fn(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert model.trunk.pos.weight.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))
    with pytest.raises(kdwrap.SplitError, match=r"split='stage2': parameters are used both before and after"):
        kdwrap.one(SharedPositionConv(), branches=2, split="stage2")
