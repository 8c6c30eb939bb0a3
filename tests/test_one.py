"""ONE: the maths against a hand-written reference of METHODS.md, gradients, capture protocol, export, errors."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import kdwrap
import kdwrap.models  # noqa: F401  (cifar_resnet20)
from kdwrap.methods.one import ONEEnsemble, ramp_weight
from kdwrap import SplitError, TraceError

from conftest import FunctionalLeNet, TinyNet


def reference_one_loss(logits, gate, y, T, w):
    """METHODS.md, written out the obvious way."""
    z_e = sum(gate[:, i : i + 1] * z for i, z in enumerate(logits))
    loss = sum(F.cross_entropy(z, y) for z in logits) + F.cross_entropy(z_e, y)
    p_t = F.softmax(z_e.detach() / T, dim=1)
    for z in logits:
        log_p = F.log_softmax(z / T, dim=1)
        kl = (p_t * (p_t.log() - log_p)).sum(dim=1).mean()
        loss = loss + w * T * T * kl
    return loss


def _perturb(model):
    """Make branches differ (copies start identical, which zeroes the gate's gradient at step 0)."""
    with torch.no_grad():
        for b in model.branches[1:]:
            for p in b.parameters():
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("T,rampup,step,soft", [(3.0, 0, 0, False), (2.0, 10, 3, False), (4.0, 5, 50, False),
                                                 (3.0, 0, 0, True)])
def test_loss_matches_reference(tiny_net, T, rampup, step, soft):
    model, loss_fn = kdwrap.one(tiny_net, branches=3, temperature=T, rampup_steps=rampup)
    _perturb(model)
    loss_fn.step = step
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    if soft:  # mixup-style probabilities
        y = 0.7 * F.one_hot(y, 5).float() + 0.3 * F.one_hot(y.roll(1), 5).float()
    torch.manual_seed(1)
    loss = loss_fn(model(x), y)
    torch.manual_seed(1)
    logits, gate = model.forward_all(x)
    expected = reference_one_loss(logits, gate, y, T, ramp_weight(step, rampup))
    assert torch.allclose(loss, expected, atol=1e-6, rtol=1e-6)
    assert loss_fn.step == step + 1
    assert set(loss_fn.parts) >= {"loss", "ce", "ce_ensemble", "kl", "ramp_weight"}
    assert loss_fn.parts["ce"].shape == (3,)


def _dispatched_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view  # views launch no kernel
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_loss_op_count_does_not_grow_with_the_branches():
    """A small model's GPU step is bound by kernel launches: the loss handles all branches in each op."""
    counts = []
    for m in (2, 4):
        model, loss_fn = kdwrap.one(TinyNet(), branches=m)
        x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
        out = model(x)
        logits, gate = model._capture
        counts.append(_dispatched_ops(
            lambda: torch.autograd.grad(loss_fn(out, y), [out, *logits, gate], allow_unused=True)))
    assert counts[0] == counts[1], counts


def test_ramp_weight_is_the_sigmoid_rampup():
    assert ramp_weight(0, 0) == 1.0
    assert ramp_weight(0, 80) == pytest.approx(math.exp(-5))
    assert ramp_weight(40, 80) == pytest.approx(math.exp(-5 * 0.25))
    assert ramp_weight(80, 80) == ramp_weight(500, 80) == 1.0


def test_gradients_reach_trunk_every_branch_and_gate(tiny_net):
    model, loss_fn = kdwrap.one(tiny_net, branches=3)
    _perturb(model)
    loss_fn(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,))).backward()
    for name, module in [("trunk", model.trunk), ("gate", model.gate)] + [
        (f"branch {i}", b) for i, b in enumerate(model.branches)
    ]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_kl_term_sends_no_gradient_into_the_teacher(tiny_net):
    """Removing the CE terms leaves only the KL term: it must not move the gate (the teacher is detached)."""
    model, loss_fn = kdwrap.one(tiny_net, branches=3)
    _perturb(model)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    torch.manual_seed(1)
    loss = loss_fn(model(x), y)
    torch.manual_seed(1)
    logits, gate = model.forward_all(x)
    z_e = sum(gate[:, i : i + 1] * z for i, z in enumerate(logits))
    ce_only = sum(F.cross_entropy(z, y) for z in logits) + F.cross_entropy(z_e, y)
    kl_only = loss - ce_only
    assert kl_only.item() > 0
    grads = torch.autograd.grad(kl_only, list(model.gate.parameters()), allow_unused=True, retain_graph=True)
    assert all(g is None or torch.count_nonzero(g.abs() > 1e-7) == 0 for g in grads)
    branch_grads = torch.autograd.grad(kl_only, list(model.branches[1].parameters()))
    assert sum(g.abs().sum() for g in branch_grads) > 0


def test_forward_returns_plain_tensor_of_kept_branch(tiny_net):
    model, _ = kdwrap.one(tiny_net, branches=2, branch=1)
    x = torch.randn(3, 3, 16, 16)
    out = model(x)
    assert type(out) is torch.Tensor and out.shape == (3, 5)
    model.eval()
    with torch.no_grad():
        logits, _ = model.forward_all(x)
        assert torch.equal(model(x), logits[1])


def test_loss_without_forward_or_twice_is_an_error(tiny_net):
    model, loss_fn = kdwrap.one(tiny_net)
    y = torch.randint(0, 5, (2,))
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        loss_fn(torch.randn(2, 5), y)
    out = model(torch.randn(2, 3, 16, 16))
    loss_fn(out, y)
    with pytest.raises(RuntimeError, match="twice"):
        loss_fn(out, y)


def test_eval_forward_then_loss_is_plain_cross_entropy(tiny_net):
    model, loss_fn = kdwrap.one(tiny_net)
    model.eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    with torch.no_grad():  # validation
        out = model(x)
        assert torch.allclose(loss_fn(out, y), F.cross_entropy(out, y))
    assert loss_fn.step == 0


def test_batch_of_one_in_training_is_a_clear_error(tiny_net):
    model, _ = kdwrap.one(tiny_net)
    with pytest.raises(ValueError, match="at least 2 samples"):
        model(torch.randn(1, 3, 16, 16))


def test_parameters_hold_each_tensor_once(tiny_net):
    n_plain = sum(p.numel() for p in tiny_net.parameters())
    model, _ = kdwrap.one(tiny_net, branches=3)
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    branch = sum(p.numel() for p in model.branches[0].parameters())
    gate = sum(p.numel() for p in model.gate.parameters())
    assert trunk + branch == n_plain
    assert sum(p.numel() for p in params) == trunk + 3 * branch + gate
    # branch 0 is the original tail: same tensors as the user's model
    assert model.branches[0].get_submodule("stage2.0").weight is tiny_net.stage2[0].weight


def test_branches_start_from_their_own_initialisation_by_default(tiny_net):
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    model, _ = kdwrap.one(tiny_net, branches=3)
    w = [b.get_submodule("stage2.0").weight for b in model.branches]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    # branch 0 and the trunk keep the user's weights
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in before.items())


def test_copied_branches_option_starts_them_equal(tiny_net):
    model, _ = kdwrap.one(tiny_net, branches=3, reinit_branches=False)
    w = [b.get_submodule("stage2.0").weight for b in model.branches]
    assert torch.equal(w[0], w[1]) and torch.equal(w[0], w[2]) and w[0] is not w[1]


def test_reinitialised_branches_follow_the_models_own_initialiser():
    # CifarResNet initialises its convs with He fan-out normal (std sqrt(2 / (9 * 64)) for layer3's 64-channel
    # convs); each module's reset_parameters() alone would give kaiming-uniform with a = sqrt(5) (std 0.024).
    net = kdwrap.models.cifar_resnet20()
    model, _ = kdwrap.one(net, branches=3)
    for b in model.branches[1:]:
        std = float(b.get_submodule("layer3.1.conv2").weight.detach().std())
        assert std == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)
        assert torch.equal(b.get_submodule("layer3.1.bn2").weight, torch.ones(64))


def test_reinitialised_branches_follow_timms_init_weights():
    # timm's ResNet.init_weights zero-initialises the last BN of each block; reset_parameters() would give ones.
    net = timm.create_model("resnet18", pretrained=False, num_classes=5)
    model, _ = kdwrap.one(net, branches=2, split="layer4", input_size=(3, 32, 32))
    fresh = model.branches[1]
    assert torch.count_nonzero(fresh.get_submodule("layer4.1.bn2").weight) == 0
    assert not torch.equal(fresh.get_submodule("layer4.1.conv1").weight, net.layer4[1].conv1.weight)


def test_state_dict_round_trip(tiny_net):
    model, loss_fn = kdwrap.one(tiny_net, branches=3)
    _perturb(model)
    loss_fn(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,)))
    fresh, fresh_loss = kdwrap.one(TinyNet(), branches=3)
    fresh.load_state_dict(model.state_dict())
    fresh_loss.load_state_dict(loss_fn.state_dict())
    assert fresh_loss.step == 1
    model.eval(), fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
        assert torch.equal(model.forward_ensemble(x), fresh.forward_ensemble(x))


@pytest.mark.parametrize("branch", [0, 2])
def test_export_is_the_original_class_with_equal_outputs(tiny_net, branch):
    keys = set(tiny_net.state_dict())
    model, loss_fn = kdwrap.one(tiny_net, branches=3)
    _perturb(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,))).backward()
        opt.step()
    model.eval()
    model.branch = branch
    exported = kdwrap.export(model)
    assert type(exported) is TinyNet and set(exported.state_dict()) == keys
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(exported.eval()(x), model(x), atol=1e-5)
    # the export is independent of the wrapper
    with torch.no_grad():
        exported.fc.weight.zero_()
    assert model.branches[branch].get_submodule("fc").weight.abs().sum() > 0


def test_export_ensemble(tiny_net):
    model, _ = kdwrap.one(tiny_net, branches=3)
    _perturb(model)
    model.eval()
    ens = kdwrap.export(model, ensemble=True)
    assert isinstance(ens, ONEEnsemble)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = ens.eval()(x)
        assert type(out) is torch.Tensor
        assert torch.allclose(out, model.forward_ensemble(x), atol=1e-6)


def test_exported_model_works_with_torch_export_and_torchscript(tiny_net):
    model, _ = kdwrap.one(tiny_net)
    model.eval()
    exported = kdwrap.export(model).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = exported(x)
        program = torch.export.export(exported, (x,))
        assert torch.allclose(program.module()(x), expected, atol=1e-5)
        scripted = torch.jit.script(exported)
        assert torch.allclose(scripted(x), expected, atol=1e-5)


def test_summary_reports_split_parameters_and_flops(tiny_net):
    model, _ = kdwrap.one(tiny_net, input_size=(3, 16, 16))
    text = kdwrap.summary(model)
    assert "split at 'stage2'" in text and "3 branches" in text
    assert "trunk" in text and "gate" in text and "tail share" in text


def test_wrap_dispatches_and_rejects_unknown_method(tiny_net):
    model, loss_fn = kdwrap.wrap(tiny_net, method="one", branches=2)
    assert model.num_branches == 2
    with pytest.raises(ValueError, match="unknown method 'fitnets'; valid methods: one, osakd, kd, dml"):
        kdwrap.wrap(TinyNet(), method="fitnets")


def test_wrapping_twice_is_an_error(tiny_net):
    model, _ = kdwrap.one(tiny_net)
    with pytest.raises(ValueError, match="already wrapped"):
        kdwrap.one(model)


# --- invalid splits and models ---------------------------------------------------------------------------------


def test_unknown_split_lists_valid_names(tiny_net):
    with pytest.raises(SplitError) as info:
        kdwrap.one(tiny_net, split="stage3")
    msg = str(info.value)
    assert "'stage3' is not a module" in msg and "stage2" in msg and "stem" in msg


@pytest.mark.parametrize("branches", [1, 0, -2, 2.5])
def test_branches_below_two_is_an_error(tiny_net, branches):
    with pytest.raises(ValueError, match="branches >= 2"):
        kdwrap.one(tiny_net, branches=branches)


def test_auto_split_of_a_model_that_downsamples_in_forward_comes_from_the_graph():
    """A hand-written LeNet (F.max_pool2d in forward): the start of its last resolution stage, read from a trial
    forward at input_size, as for kdwrap's module-built LeNet-5; without an input size that fits, a clear error."""
    model, loss_fn = kdwrap.one(FunctionalLeNet(), input_size=(3, 32, 32))
    assert model.split == "conv2"
    x = torch.randn(4, 3, 32, 32)
    loss_fn(model(x), torch.randint(0, 5, (4,))).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))
    with pytest.raises(SplitError, match=r"could not choose a split.*input_size=\(C, H, W\)"):
        kdwrap.one(FunctionalLeNet())  # guessed 224 x 224: the fc layers do not fit, no shapes to read


class MaskedNet(TinyNet):
    """Branches on an optional input, as timm Hiera does: fx sees a proxy, never None, and takes the masked path."""

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask.view(-1, 1, 1, 1)
        return super().forward(x)


def test_an_optional_input_the_forward_branches_on_is_traced_as_none():
    model, loss_fn = kdwrap.one(MaskedNet(), input_size=(3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    loss_fn(model(x), torch.randint(0, 5, (4,))).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))


def test_split_at_first_module_leaves_no_trunk(tiny_net):
    with pytest.raises(SplitError, match="no trunk"):
        kdwrap.one(tiny_net, split="stem")


def test_split_leaving_no_parameters_in_tail():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
                        nn.Identity())
    with pytest.raises(SplitError, match="no parameters"):
        kdwrap.one(net, split="5")


class Untraceable(TinyNet):
    def forward(self, x):
        x = self.stage1(self.stem(x))
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.fc(self.pool(self.stage2(x)).flatten(1))


def test_untraceable_model_names_the_problem():
    with pytest.raises(TraceError, match="torch.fx cannot trace Untraceable.*leaf_modules"):
        kdwrap.one(Untraceable())


def test_leaf_modules_option_makes_a_model_traceable():
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(TinyNet):
        def __init__(self):
            super().__init__()
            self.odd = Odd()

        def forward(self, x):
            return self.fc(self.pool(self.stage2(self.odd(self.stage1(self.stem(x))))).flatten(1))

    with pytest.raises(TraceError, match="'odd'"):
        kdwrap.one(Net())
    model, loss_fn = kdwrap.one(Net(), leaf_modules=[Odd])
    loss_fn(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()


def test_stochastic_depth_is_traced_per_mode():
    """Tracing bakes `if self.training` in: eval must not apply the train-time graph (torchvision's approach)."""
    net = torchvision.models.efficientnet_b0(num_classes=4, stochastic_depth_prob=0.5)
    model, _ = kdwrap.one(net)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.allclose(model(x), kdwrap.export(model).eval()(x), atol=1e-5)


def test_deep_copy_keeps_modes_and_outputs(tiny_net):
    """An EMA / best-model copy of an eval-mode wrapper must stay in eval mode (fx re-inits on deepcopy)."""
    model, _ = kdwrap.one(tiny_net)
    model.eval()
    twin = copy.deepcopy(model)
    assert [m.training for m in twin.modules()] == [m.training for m in model.modules()]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("execution", ["sequential", "fused"])
def test_buffers_read_in_forward_follow_load_state_dict(execution):
    """torchvision's FrozenBatchNorm2d computes with its buffers in forward: they must not be traced as constants."""
    from torchvision.ops import FrozenBatchNorm2d

    net = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=4)
    model, _ = kdwrap.one(net, branches=2, execution=execution)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.load_state_dict({k: v + 1.0 if k.endswith("running_mean") else v for k, v in model.state_dict().items()})
        after = model(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(kdwrap.export(model).eval()(x), after, atol=1e-5, rtol=1e-5)


class LateStem(TinyNet):
    """Registers a 64-channel convolution before its stem, as timm CSATv2 does; says its input channels."""

    in_chans = 3

    def __init__(self):
        super().__init__()
        proj = nn.Conv2d(64, 32, 1)  # used after the stem in a real model; registered first here
        self._modules = {"proj": proj, **self._modules}


def test_guessed_input_takes_the_models_own_channels_over_its_first_convolution():
    from kdwrap.probe import _guess_input_size

    assert _guess_input_size(LateStem()) == (3, 224, 224)
    assert _guess_input_size(TinyNet()) == (3, 224, 224)  # no word from the model: its first convolution's
