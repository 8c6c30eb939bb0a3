"""ONE: the maths against a hand-written reference of METHODS.md, gradients, capture protocol, export, errors."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import kdwrap
import kdwrap.models  # noqa: F401  (cifar_resnet20)
from kdwrap.methods.losses import ramp_weight
from kdwrap.methods.one import ONEEnsemble

from conftest import TinyNet


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
        logits, gate = model.pending_capture
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


# --- invalid options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branches", [1, 0, -2, 2.5])
def test_branches_below_two_is_an_error(tiny_net, branches):
    with pytest.raises(ValueError, match="branches >= 2"):
        kdwrap.one(tiny_net, branches=branches)


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

