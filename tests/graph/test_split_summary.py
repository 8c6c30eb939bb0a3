"""kdwrap.graph.split_summary: the cuts ``summary()`` lists near a ONE wrapper's split (valid ones only, nearest
first, the chosen one first), each tail's share of the forward FLOPs against a hand count of the network's
convolutions and linears (2 FLOPs per multiply-add), the input those FLOPs are measured at (given, else the wrapper's,
else the first batch, else the declared size, else "not measured yet"), and the summary lines that name the split and
the parameter counts (checked against ``sum(p.numel())``)."""
import pytest
import torch

import kdwrap
from conftest import FunctionalLeNet, TinyNet
from kdwrap.graph.split_summary import candidates, not_measured_line


def one(net, **options):
    """``kdwrap.one`` with the branches run one after the other (no fusion check: the CPU runs them so anyway)."""
    return kdwrap.one(net, execution="sequential", **options)


def tinynet_flops(h: int) -> dict[str, int]:
    """TinyNet's FLOPs per layer at an h x h input, by hand: 3x3 convs at h, h/2, h/4; fc 32 -> 5."""
    return {
        "stem": 2 * 8 * h * h * 3 * 9,
        "stage1": 2 * 16 * (h // 2) ** 2 * 8 * 9,
        "stage2": 2 * 32 * (h // 4) ** 2 * 16 * 9,
        "fc": 2 * 32 * 5,
    }


def tinynet_shares(h: int) -> dict[str, float]:
    """Each cut's tail share of the forward FLOPs: from its first layer to the end."""
    f = tinynet_flops(h)
    total = sum(f.values())
    return {"stage1": (f["stage1"] + f["stage2"] + f["fc"]) / total, "stage2": (f["stage2"] + f["fc"]) / total,
            "stage2.1": f["fc"] / total, "stage2.2": f["fc"] / total, "pool": f["fc"] / total, "fc": f["fc"] / total}


class DeclaredNet(TinyNet):
    default_cfg = {"input_size": (3, 16, 16)}


def shares_of(found) -> dict[str, float | None]:
    return {c.name: c.tail_share for c in found}


def test_candidates_of_the_automatic_split_with_their_tail_shares():
    model, _ = one(TinyNet())
    found = candidates(model, input_size=(3, 16, 16))
    # stage2.0 starts where stage2 does (one cut, listed once); stage1 is before, stage2.1 and .2 after.
    assert [c.name for c in found] == ["stage2", "stage1", "stage2.1", "stage2.2"]
    assert [c.chosen for c in found] == [True, False, False, False]
    expected = tinynet_shares(16)
    for c in found:
        assert c.tail_share == pytest.approx(expected[c.name], rel=1e-12)
    assert expected["stage2"] == pytest.approx(147_776 / 405_824)


def test_the_input_size_of_the_flops():
    # the wrapper's input_size, before the first batch and after it
    model, _ = one(DeclaredNet(), input_size=(3, 8, 8))
    assert shares_of(candidates(model))["stage2"] == pytest.approx(tinynet_shares(8)["stage2"])
    model.train()
    model(torch.randn(2, 3, 12, 12))
    assert shares_of(candidates(model))["stage2"] == pytest.approx(tinynet_shares(8)["stage2"])
    # a given size wins over everything
    assert shares_of(candidates(model, input_size=(3, 32, 32)))["stage2"] == pytest.approx(tinynet_shares(32)["stage2"])
    # no wrapper input_size: the declared size, then the first batch seen
    model, _ = one(DeclaredNet())
    assert shares_of(candidates(model))["stage2"] == pytest.approx(tinynet_shares(16)["stage2"])
    model.train()
    model(torch.randn(2, 3, 12, 12))
    assert shares_of(candidates(model))["stage2"] == pytest.approx(tinynet_shares(12)["stage2"])
    assert tinynet_shares(12)["stage2"] != pytest.approx(tinynet_shares(16)["stage2"])  # the check can tell them apart


def test_no_size_known_no_shares_and_the_summary_says_so():
    model, _ = one(TinyNet())
    found = candidates(model)
    assert [c.name for c in found] == ["stage2", "stage1", "stage2.1", "stage2.2"]
    assert all(c.tail_share is None for c in found)
    text = kdwrap.summary(model)
    assert ("  candidates: stage2 (chosen) | stage1 | stage2.1 | stage2.2 (tail shares of forward FLOPs not measured "
            "yet: pass input_size=(C, H, W) or run one batch first)") in text.splitlines()
    assert not_measured_line("FLOPs") in text.splitlines()
    assert not_measured_line("FLOPs") == "  FLOPs: not measured yet: pass input_size=(C, H, W) or run one batch first"


def test_the_summary_names_the_split_its_candidates_and_the_parameter_counts():
    net = TinyNet()
    by_hand = {
        "trunk": sum(p.numel() for m in (net.stem, net.stage1) for p in m.parameters()),
        "branch": sum(p.numel() for m in (net.stage2, net.fc) for p in m.parameters()),
        "deployed": sum(p.numel() for p in net.parameters()),
    }
    model, _ = one(net, input_size=(3, 16, 16))
    gate = sum(p.numel() for p in model.gate.parameters())
    assert gate == (16 * 3 + 3) + 2 * 3  # Linear(16 channels -> 3 branches) and BatchNorm1d(3)
    lines = kdwrap.summary(model).splitlines()
    assert lines[0].startswith("kdwrap ONE: TinyNet split at 'stage2', 3 branches")
    assert (f"  parameters: trunk {by_hand['trunk']:,} | one branch {by_hand['branch']:,} | gate {gate:,} | "
            f"wrapper {by_hand['trunk'] + 3 * by_hand['branch'] + gate:,} | deployed {by_hand['deployed']:,}") in lines
    assert ("  split: 'stage2', chosen as the start of the last resolution stage (the last of the downsampling "
            "children of the model); pass split=... to change it") in lines
    s = tinynet_shares(16)
    assert (f"  candidates (tail share of forward FLOPs at input (3, 16, 16)): stage2 {s['stage2']:.1%} (chosen) | "
            f"stage1 {s['stage1']:.1%} | stage2.1 {s['stage2.1']:.1%} | stage2.2 {s['stage2.2']:.1%}") in lines


def test_a_given_split_lists_its_siblings():
    model, _ = one(TinyNet(), split="stage1")
    found = candidates(model, input_size=(3, 16, 16))
    # stem has no trunk before it: no cut; the later siblings are, nearest first
    assert [c.name for c in found] == ["stage1", "stage2", "pool", "fc"]
    s = tinynet_shares(16)
    assert [c.tail_share for c in found] == pytest.approx([s[c.name] for c in found])
    assert "  split: 'stage1', given by the user (split='stage1')" in kdwrap.summary(model).splitlines()


def test_a_functional_lenet_split_read_from_the_graph():
    model, _ = one(FunctionalLeNet(), input_size=(3, 32, 32))
    # conv1 5x5 -> 28x28, conv2 5x5 -> 10x10 (after 2x2 pooling), fc 400 -> 120 -> 84 -> 5
    flops = {"conv1": 2 * 6 * 28 * 28 * 3 * 25, "conv2": 2 * 16 * 10 * 10 * 6 * 25, "fc1": 2 * 400 * 120,
             "fc2": 2 * 120 * 84, "fc3": 2 * 84 * 5}
    names = list(flops)
    total = sum(flops.values())
    found = candidates(model)
    assert found[0].name == "conv2" and found[0].chosen
    for c in found:
        tail = sum(flops[n] for n in names[names.index(c.name):])
        assert c.tail_share == pytest.approx(tail / total)
    assert "conv1" not in [c.name for c in found]  # no trunk before the first module
