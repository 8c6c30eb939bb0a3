"""Fused execution of ONE's branches (kdwrap.fused): equivalence with sequential execution, fallbacks, compile."""
from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from kdwrap.fused import FusedBranches, FusionError, fuse_branches
from kdwrap.models import cifar_resnet20, cifar_resnet32, cifar_resnet56

from conftest import TinyNet
from fused_reference import ResLike, assert_fused_equals_sequential, branch_state, perturb_branches

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from op_count import OpCounter  # noqa: E402  (the benchmark's counter: the test counts what it reports)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class FunctionalHead(nn.Module):
    """Traced into get_attr + F.linear (as timm's MobileNetV3 classifier is)."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, cin) * 0.1)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.mean((2, 3)), self.weight, self.bias)


class SEGroupBlock(nn.Module):
    """Grouped conv on the trunk output, depthwise conv, squeeze-excitation, GroupNorm, PReLU, timm BatchNormAct2d,
    BN with momentum=None and without running stats, a layer-scale parameter and a projection shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        from timm.layers import BatchNormAct2d

        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=None)
        self.act1 = nn.Hardswish()
        self.dw = nn.Conv2d(cout, cout, 3, padding=1, groups=cout)
        self.gn = nn.GroupNorm(4, cout)
        self.act2 = nn.PReLU(cout)
        self.se_reduce = nn.Conv2d(cout, 8, 1)
        self.se_expand = nn.Conv2d(8, cout, 1)
        self.pw = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, track_running_stats=False)
        self.bn3 = BatchNormAct2d(cout, act_layer=nn.SiLU)
        self.act3 = nn.PReLU()
        self.gamma = nn.Parameter(torch.full((cout, 1, 1), 0.5))
        self.down = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.gn(self.dw(y)))
        s = y.mean((2, 3), keepdim=True)
        y = y * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(s))))
        y = self.act3(self.bn3(self.bn2(self.pw(y))))
        return self.down(x) + self.gamma * y


class SEGroupNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = SEGroupBlock(16, 32)
        self.head = FunctionalHead(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class DenseLike(nn.Module):
    """DenseNet-style channel concatenation in the tail."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.dense = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.dense(x)], 1)
        return self.fc(x.mean((2, 3)))


class ConvNeXtLike(nn.Module):
    """A ConvNeXt-style block: depthwise conv, then LayerNorm over the channels-last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.block = nn.ModuleDict({"dw": nn.Conv2d(8, 8, 7, padding=3, groups=8), "norm": nn.LayerNorm(8)})
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.block["dw"](x).permute(0, 2, 3, 1)
        y = self.block["norm"](y).permute(0, 3, 1, 2)
        return self.fc((x + y).mean((2, 3)))


class DropPathNet(nn.Module):
    """A tail returning a map: 1x1 conv, drop-path (timm, traced into primitive ops) or torchvision's stochastic
    depth, ReLU."""

    def __init__(self, kind: str, p: float) -> None:
        from timm.layers import DropPath
        from torchvision.ops import StochasticDepth

        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 1)
        self.drop = DropPath(p) if kind == "timm" else StochasticDepth(p, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(self.stem(x))).relu()


class ReuseNet(nn.Module):
    """A tail that calls one conv (with bias) and one BN (momentum=None) twice, then a torchvision
    FrozenBatchNorm2d and a head: modules called twice are not packed, the others are."""

    def __init__(self) -> None:
        from torchvision.ops import FrozenBatchNorm2d

        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pre = nn.Conv2d(8, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, momentum=None)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.frozen = FrozenBatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(self.stem(x))
        x = self.bn(self.conv(x)).relu()
        x = self.bn(self.conv(x)).relu()
        x = self.frozen(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _wrap(net: nn.Module, split: str | None = None, branches: int = 3, perturb: bool = True) -> nn.Module:
    model, _ = kdwrap.one(net, branches=branches, split=split)
    if perturb:
        perturb_branches(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("split", ["layer1", "layer1.1"])
def test_reslike_identity_and_option_a_shortcuts(training: bool, split: str) -> None:
    # split="layer1": the first block adds the shared trunk output (identity shortcut); "layer1.1": an option-A
    # shortcut pads the shared trunk output. layer2.0 pads a fused value; the head runs Linear-BN1d-ReLU-Linear.
    model = _wrap(ResLike(), split)
    assert_fused_equals_sequential(model, torch.randn(4, 3, 16, 16), training)


CONV_MODES = ["grouped", "split"]  # ("auto" is "split" on CPU)


@pytest.mark.parametrize("conv_mode", CONV_MODES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cifar_resnet32_layer3(training: bool, conv_mode: str) -> None:
    model = _wrap(cifar_resnet32(num_classes=10), "layer3")  # 1x1-conv downsample shortcut, then identities
    assert_fused_equals_sequential(model, torch.randn(4, 3, 32, 32), training, conv_mode=conv_mode)


@pytest.mark.parametrize("training,conv_mode", [(True, "grouped"), (True, "split"), (False, "grouped")])
def test_timm_resnet18(training: bool, conv_mode: str) -> None:
    model = _wrap(timm.create_model("resnet18", num_classes=7))
    assert_fused_equals_sequential(model, torch.randn(2, 3, 64, 64), training, conv_mode=conv_mode)


@pytest.mark.parametrize("conv_mode", CONV_MODES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grouped_se_groupnorm_prelu_layerscale(training: bool, conv_mode: str) -> None:
    model = _wrap(SEGroupNet(), "body")
    assert_fused_equals_sequential(model, torch.randn(4, 3, 16, 16), training, conv_mode=conv_mode)


@pytest.mark.parametrize("training,conv_mode", [(True, "grouped"), (True, "split"), (False, "grouped")])
def test_timm_regnety_002(training: bool, conv_mode: str) -> None:
    model = _wrap(timm.create_model("regnety_002", num_classes=7))  # grouped convs and squeeze-excitation
    assert_fused_equals_sequential(model, torch.randn(2, 3, 64, 64), training, conv_mode=conv_mode)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_timm_mobile_nets_last_stage(name: str) -> None:
    # timm BatchNormAct2d (leaf module: BN + act), depthwise convs, SE with (hard) sigmoid gates, conv head on the
    # pooled map, and (MobileNetV3) a classifier traced into get_attr + F.linear.
    model = _wrap(timm.create_model(name, num_classes=7))
    assert_fused_equals_sequential(model, torch.randn(4, 3, 64, 64), True)


@pytest.mark.parametrize("conv_mode", CONV_MODES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_modules_called_twice_and_frozen_batch_norm(training: bool, conv_mode: str) -> None:
    model = _wrap(ReuseNet(), "pre")
    with torch.no_grad():  # FrozenBatchNorm2d holds buffers only: make them differ per branch
        for b in model.branches:
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(b.frozen, k).uniform_(0.5, 1.5)
    assert "pack_parameters" in fuse_branches(model.branches, training, conv_mode).code
    for _ in range(2):  # the second step starts from the statistics the first one wrote
        model.zero_grad(set_to_none=True)
        assert_fused_equals_sequential(model, torch.randn(4, 3, 8, 8), training, conv_mode=conv_mode)


def test_timm_frozen_batch_norm_act() -> None:
    # timm's FrozenBatchNormAct2d is a leaf module: its buffers go through the parameter pack too.
    from timm.utils.model import freeze_batch_norm_2d

    model = _wrap(freeze_batch_norm_2d(timm.create_model("mobilenetv3_small_050", num_classes=7)))
    with torch.no_grad():
        for b in model.branches:
            for mod in b.modules():
                if type(mod).__name__ == "FrozenBatchNormAct2d":
                    mod.running_mean.normal_(0, 0.2)
                    mod.running_var.uniform_(0.5, 2.0)
    assert "fused_frozen_batch_norm" in fuse_branches(model.branches, True, "grouped").code
    assert_fused_equals_sequential(model, torch.randn(2, 3, 64, 64), True, conv_mode="grouped")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parameter_concatenations_do_not_grow_with_depth(training: bool) -> None:
    # On a GPU the fused step is bound by kernel launches: the branches' parameters are concatenated in one cat per
    # group of same-shaped tensors, not one per parameter, so a deeper tail adds no cat.
    cats = []
    for net in (cifar_resnet20(num_classes=10), cifar_resnet56(num_classes=10)):
        model = _wrap(net, "layer3")
        model.train(training)
        f = model.trunk(torch.randn(2, 3, 32, 32)).detach().requires_grad_()
        fused = fuse_branches(model.branches, training, "grouped")
        with OpCounter() as counter:
            torch.stack(fused(f)).sum().backward()
        cats.append(counter.counts["cat"])
    assert cats[0] == cats[1], f"cats in the fused step: {cats[0]} for ResNet-20, {cats[1]} for ResNet-56"
    # 6 groups (3 conv-weight shapes, classifier weight, 1-D parameters, BN statistics): 6 cats forward; backward,
    # one per group of several parameters (the 3x3 conv weights, the 1-D parameters)
    assert cats[0] <= 8, cats


def test_two_branches_and_shared_tail_input_kept_intact() -> None:
    model = _wrap(TinyNet(), branches=2)
    x = torch.randn(4, 3, 16, 16)
    assert_fused_equals_sequential(model, x, True)
    model.train()
    f = model.trunk(x)
    before = f.detach().clone()
    fuse_branches(model.branches, True)(f)
    assert torch.equal(f.detach(), before)


# ---------------------------------------------------------------------------------------------------------------
# Stochastic ops
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
def test_drop_path_draws_one_mask_per_sample_and_branch(kind: str) -> None:
    model, _ = kdwrap.one(DropPathNet(kind, 0.5), branches=3, split="conv")  # identical branches
    model.train()
    x = torch.rand(64, 3, 2, 2) + 1
    with torch.no_grad():
        model.trunk.stem.weight.abs_()  # a positive trunk output: zeros below come from the drop only
        model.trunk.stem.bias.fill_(0.1)
        for b in model.branches:
            b.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            b.conv.bias.zero_()
        f = model.trunk(x)
        outs = torch.stack(fuse_branches(model.branches, True)(f), 1)  # (B, m, C, H, W)
    dropped = (outs == 0).flatten(2)
    assert (dropped.all(-1) | ~dropped.any(-1)).all(), "a sample's drop-path must drop its whole residual"
    kept = ~dropped.all(-1)  # (B, m)
    torch.testing.assert_close(outs[kept], (f.relu().unsqueeze(1).expand_as(outs) * 2)[kept])
    assert 0.25 < kept.float().mean() < 0.75
    assert (kept[:, 0] != kept[:, 1]).any() and (kept[:, 1] != kept[:, 2]).any(), "masks must differ per branch"


def test_dropout_draws_independently_per_branch_and_is_exact_in_eval() -> None:
    model = _wrap(ResLike(drop=0.5), "layer2", perturb=False)  # identical branches
    model.train()
    f = model.trunk(torch.randn(8, 3, 16, 16))
    outs = fuse_branches(model.branches, True)(f)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert_fused_equals_sequential(model, torch.randn(8, 3, 16, 16), training=False)


def test_dropout_on_the_shared_input_is_drawn_per_branch() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(6, 6)
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.drop(self.stem(x)))

    model, _ = kdwrap.one(Net(), branches=3, split="drop", input_size=(6,))
    model.train()
    f = model.trunk(torch.randn(16, 6))
    outs = fuse_branches(model.branches, True)(f)
    assert not torch.allclose(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------------------------
# Fallbacks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_densenet_like_concat_raises_fusion_error(training: bool) -> None:
    model = _wrap(DenseLike(), "dense")
    with pytest.raises(FusionError, match=r"node 'cat.*torch.*cat.*concatenation .*DenseNet"):
        fuse_branches(model.branches, training)


@pytest.mark.parametrize("training", [True, False])
def test_convnext_like_layernorm_raises_fusion_error(training: bool) -> None:
    model = _wrap(ConvNeXtLike(), "block.dw")
    with pytest.raises(FusionError, match=r"node 'permute.*\.permute\(\).*block\.dw.*channels-last"):
        fuse_branches(model.branches, training)


def test_layernorm_module_raises_fusion_error() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(6, 8)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.stem(x)))

    model, _ = kdwrap.one(Net(), branches=2, split="norm", input_size=(6,))
    with pytest.raises(FusionError, match=r"node 'norm' \(module 'norm'\): LayerNorm has no fusion rule"):
        fuse_branches(model.branches, True)


def test_timm_convnext_raises_fusion_error_naming_layer_norm() -> None:
    model = _wrap(timm.create_model("convnext_atto", num_classes=5), perturb=False)
    with pytest.raises(FusionError, match=r"layer_norm"):
        fuse_branches(model.branches, True)


def test_hooks_and_inplace_on_shared_raise_fusion_error() -> None:
    model = _wrap(TinyNet())
    handle = model.branches[1].get_submodule("stage2.0").register_forward_hook(lambda *a: None)
    with pytest.raises(FusionError, match=r"'stage2.0' of branch 1 has hooks"):
        fuse_branches(model.branches, True)
    handle.remove()
    fuse_branches(model.branches, True)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.act = nn.ReLU(inplace=True)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.act(self.stem(x))).mean((2, 3))

    model, _ = kdwrap.one(Net(), branches=2, split="act")
    with pytest.raises(FusionError, match=r"in-place ReLU on a value shared by every branch"):
        fuse_branches(model.branches, True)


def test_not_a_graph_module_raises_fusion_error() -> None:
    with pytest.raises(FusionError, match="fx GraphModules"):
        fuse_branches([nn.Linear(2, 2), nn.Linear(2, 2)], True)
    with pytest.raises(ValueError, match="conv_mode"):
        fuse_branches(_wrap(TinyNet()).branches, True, "fast")


# ---------------------------------------------------------------------------------------------------------------
# Precision, memory format, compile
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_mode", CONV_MODES)
def test_autocast_bf16(conv_mode: str) -> None:
    model = _wrap(SEGroupNet(), "body")
    model.train()
    f = model.trunk(torch.randn(4, 3, 16, 16)).detach()
    ref = copy.deepcopy(model.branches)
    fused = fuse_branches(model.branches, True, conv_mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = fused(f)
        refs = [b(f) for b in ref]
    assert len(outs) == len(refs) == len(model.branches) == 3
    for o, r in zip(outs, refs, strict=True):
        assert o.dtype == r.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), r.float(), rtol=0.05, atol=0.05 * r.abs().max().item())
    sum(o.float().square().sum() for o in outs).backward()
    sum(r.float().square().sum() for r in refs).backward()
    for (name, p), q in zip(ref.named_parameters(), model.branches.parameters(), strict=True):
        scale = p.grad.abs().max().item() + 1e-6
        torch.testing.assert_close(q.grad, p.grad, rtol=0.1, atol=0.1 * scale, msg=lambda m: f"{name}: {m}")
    for k, v in branch_state(ref).items():
        torch.testing.assert_close(branch_state(model.branches)[k], v, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("conv_mode", CONV_MODES)
def test_channels_last(conv_mode: str) -> None:
    model = _wrap(cifar_resnet32(), "layer3")
    model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert_fused_equals_sequential(model, x, True, conv_mode=conv_mode)


@pytest.mark.parametrize("which,conv_mode", [("reslike", "auto"), ("segroup", "grouped")])
def test_compile_fullgraph_without_graph_breaks(which: str, conv_mode: str) -> None:
    model = _wrap(ResLike(), "layer1") if which == "reslike" else _wrap(SEGroupNet(), "body")
    model.train()
    f = model.trunk(torch.randn(4, 3, 16, 16)).detach()
    fused = fuse_branches(model.branches, True, conv_mode)

    def run(f: torch.Tensor) -> list[torch.Tensor]:
        return fused(f)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(run)(f)  # (runs the graph: BN buffers move once)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    ref = copy.deepcopy(model.branches).train()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    outs = compiled(f)
    refs = [b(f) for b in ref]
    assert len(outs) == len(refs) == len(model.branches) == 3
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    sum(o.square().sum() for o in outs).backward()
    sum(r.square().sum() for r in refs).backward()
    for p, q in zip(ref.parameters(), model.branches.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item() + 1e-7)
    for k, v in branch_state(ref).items():  # BN buffers copied back inside the compiled graph
        torch.testing.assert_close(branch_state(model.branches)[k], v, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_inductor() -> None:
    model = _wrap(TinyNet())
    model.train()
    f = model.trunk(torch.randn(4, 3, 16, 16)).detach()
    ref = copy.deepcopy(model.branches)
    compiled = torch.compile(fuse_branches(model.branches, True), fullgraph=True)
    outs = compiled(f)
    refs = [b(f) for b in ref]
    assert len(outs) == len(refs) == len(model.branches) == 3
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    for k, v in branch_state(ref).items():
        torch.testing.assert_close(branch_state(model.branches)[k], v, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Lifecycle: parameters read at call time, copies, shape check
# ---------------------------------------------------------------------------------------------------------------


def test_reads_parameters_at_call_time() -> None:
    model = _wrap(TinyNet())
    fused_train = fuse_branches(model.branches, True)
    fused_eval = fuse_branches(model.branches, False)
    # load_state_dict(assign=True) replaces the Parameter objects; .double() replaces their data.
    other = _wrap(TinyNet())
    model.load_state_dict(other.state_dict(), assign=True)
    model.double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for fused, training in ((fused_train, True), (fused_eval, False)):
        model.train(training)
        f = model.trunk(x)
        ref = copy.deepcopy(model.branches).train(training)
        outs, refs = fused(f), [b(f) for b in ref]
        assert len(outs) == len(refs) == 3
        for o, r in zip(outs, refs, strict=True):
            assert o.dtype == torch.float64
            torch.testing.assert_close(o, r)
    # SyncBatchNorm conversion swaps the BN modules: the same fused graph picks them up (single process: no sync).
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model.float())
    assert isinstance(model.branches[1].get_submodule("stage2.1"), nn.SyncBatchNorm)
    assert_fused_equals_sequential(model, x.float(), True)


def test_deepcopy_and_pickle_rebind_to_the_copied_branches() -> None:
    model = _wrap(TinyNet())
    model.train()
    fused = fuse_branches(model.branches, True)
    holder = {"branches": model.branches, "fused": fused}
    clone = copy.deepcopy(holder)
    assert isinstance(clone["fused"], FusedBranches)
    assert len(clone["fused"].branches) == 3
    assert all(a is b for a, b in zip(clone["fused"].branches, clone["branches"], strict=True))
    restored = pickle.loads(pickle.dumps(holder))
    assert len(restored["fused"].branches) == 3
    assert all(a is b for a, b in zip(restored["fused"].branches, restored["branches"], strict=True))
    f = model.trunk(torch.randn(4, 3, 16, 16)).detach()
    outs, refs = restored["fused"](f), [b(f) for b in copy.deepcopy(model.branches).train()]
    assert len(outs) == len(refs) == 3
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r)


def test_check_runs_on_fake_tensors_without_touching_state() -> None:
    model = _wrap(ResLike(), "layer1")
    model.train()
    fused = fuse_branches(model.branches, True)
    f = model.trunk(torch.randn(4, 3, 16, 16)).detach()
    before = branch_state(model.branches)
    fused.check(f)
    after = branch_state(model.branches)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "FusedBranches(branches=3, mode=train, conv_mode='auto')" == repr(fused)
    assert "def forward" in fused.code


def test_shape_dependent_rule_raises_fusion_error_at_check() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.conv = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(self.stem(x))
            return self.fc(y.reshape(-1, 8))  # mixes the batch axis with the others

    model, _ = kdwrap.one(Net(), branches=2, split="conv", input_size=(3, 2, 2))
    fused = fuse_branches(model.branches, True)
    f = model.trunk(torch.randn(4, 3, 2, 2))
    with pytest.raises(FusionError, match="does not keep the batch axis"):
        fused.check(f)
