"""OKDDip: the loss and its gradients against a hand-written reference of the method (loops over peers and samples,
features read by hooks on exported copies), the leader, export, checkpoints, models of the ONE list, errors."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from conftest import TinyNet
from kdwrap import OptionError, SplitError
from kdwrap.methods.okddip import OKDDipLoss, OKDDipModel
from loop_utils import assert_resume_in_process_is_exact

BATCH = 6


def _batch(step):
    g = torch.Generator().manual_seed(5000 + step)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _kl(student, teacher, T):
    """KL_T(s <- t): T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean; the teacher keeps its gradient."""
    return T * T * F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1), reduction="batchmean")


def reference(model, x, y, T=3.0, weight=1.0):
    """The method written out: every branch as its own copy of the user's network (trunk + branch i, exported), the
    classifier input read by a hook, the attention computed sample by sample. Returns (loss, nets, W_q, W_k)."""
    nets, feats = [], []
    for i in range(model.num_branches):
        net = kdwrap.export(model, branch=i)
        net.fc.register_forward_pre_hook(lambda m, args: feats.append(args[0]))
        nets.append(net)
    zs = [net(x) for net in nets]
    wq = model.attention.query.weight.detach().clone().requires_grad_()
    wk = model.attention.key.weight.detach().clone().requires_grad_()
    peers = len(zs) - 1
    targets = []
    for i in range(peers):
        rows = []
        for b in range(x.shape[0]):
            scores = torch.stack([(wq @ feats[i][b]) @ (wk @ feats[j][b]) for j in range(peers)])
            a = scores.softmax(0)
            rows.append(sum(a[j] * zs[j][b] for j in range(peers)))
        targets.append(torch.stack(rows))
    ce = sum(F.cross_entropy(z, y) for z in zs)  # the peers' and the leader's
    kl = sum(_kl(zs[i], targets[i], T) for i in range(peers)) + _kl(zs[-1], sum(zs[:-1]) / peers, T)
    return ce + weight * kl, nets, wq, wk


def _tail_grads(model, nets):
    """(wrapper gradient, reference gradient) per parameter: each branch's from its copy, the trunk's summed over
    the copies (each copy ran the trunk once)."""
    pairs = []
    for i, branch in enumerate(model.branches):
        ref = dict(nets[i].named_parameters())
        pairs += [(p.grad, ref[k].grad, f"branch {i} {k}") for k, p in branch.named_parameters()]
    for k, p in model.trunk.named_parameters():
        pairs.append((p.grad, sum(dict(n.named_parameters())[k].grad for n in nets), f"trunk {k}"))
    return pairs


@pytest.mark.parametrize("execution", ["sequential", "fused"])
@pytest.mark.parametrize("branches", [3, 4])
def test_loss_and_gradients_match_the_reference(branches, execution):
    """Also with the branches fused into one graph that returns every branch's classifier input with its logits."""
    model, loss_fn = kdwrap.okddip(TinyNet(), branches=branches, execution=execution)
    assert bool(model.branch_execution.fused) == (execution == "fused") and model.execution_plan(BATCH, "cpu") == execution
    for step in range(2):
        x, y = _batch(step)
        ref_loss, nets, wq, wk = reference(copy.deepcopy(model), x, y)
        model.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        assert abs(loss.item() - ref_loss.item()) < 1e-6
        ref_loss.backward()
        for got, want, name in _tail_grads(model, nets):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(model.attention.query.weight.grad, wq.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.attention.key.weight.grad, wk.grad, atol=1e-6, rtol=1e-5)
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert loss_fn.step == 2 and loss_fn.parts["kl"].shape == (branches,) and loss_fn.parts["ce"].shape == (branches,)


def test_the_attention_learns_only_through_the_targets_and_every_part_gets_a_gradient():
    model, loss_fn = kdwrap.okddip(TinyNet(), branches=4)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    weights = loss_fn.parts["attention"]
    # The labels' terms do not reach the attention: its only path to the loss is the peers' targets.
    model(x)
    logits, targets, _ = model.take_capture()
    ce = sum(F.cross_entropy(z, y) for z in logits)
    params = [model.attention.query.weight, model.attention.key.weight]
    assert torch.autograd.grad(ce, params, allow_unused=True) == (None, None)
    assert all(g is not None for g in torch.autograd.grad(targets.sum(), params))
    assert weights.shape == (3, 3) and torch.allclose(weights.sum(-1), torch.ones(3))


def test_ramp_up_weights_the_distillation_as_one_does():
    model, loss_fn = kdwrap.okddip(TinyNet(), rampup_steps=4)
    x, y = _batch(0)
    for step in range(5):
        loss = loss_fn(model(x), y)
        want = torch.tensor(kdwrap.methods.losses.ramp_weight(step, 4))
        torch.testing.assert_close(loss_fn.parts["ramp_weight"], want)
        torch.testing.assert_close(loss, loss_fn.parts["ce"].sum() + want * loss_fn.parts["kl"].sum())


def test_forward_returns_the_leader_and_eval_runs_only_it():
    model, loss_fn = kdwrap.okddip(TinyNet(), branches=3)
    assert model.leader == 2
    calls = []
    for i, b in enumerate(model.branches):
        b.register_forward_hook(lambda *a, i=i: calls.append(i))
    x, y = _batch(0)
    z = model(x)
    assert calls == [0, 1, 2]
    loss_fn(z, y)
    model.eval()
    calls.clear()
    with torch.no_grad():  # validation
        z = model(x)
    assert calls == [2]
    torch.testing.assert_close(loss_fn(z, y), F.cross_entropy(z, y))


@pytest.mark.parametrize("branch", [None, 0])
def test_export_is_the_users_class_with_its_keys_and_equals_the_wrapper(branch):
    net = TinyNet()
    keys = list(net.state_dict())
    model, loss_fn = kdwrap.okddip(net)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    deployed = kdwrap.export(model) if branch is None else kdwrap.export(model, branch=branch)
    assert type(deployed) is TinyNet and list(deployed.state_dict()) == keys and not deployed.training
    with torch.no_grad():
        if branch is None:
            torch.testing.assert_close(deployed(x), model(x))
        else:
            torch.testing.assert_close(deployed(x), model.branches[0](model.trunk(x))[0])
    with pytest.raises(ValueError, match=r"branch must be an int in \[0, 4\)"):
        kdwrap.export(model, branch=4)


def test_state_dict_round_trip_and_resume_into_a_fresh_wrapper(tmp_path):
    build = lambda: kdwrap.okddip(TinyNet(), branches=3, rampup_steps=3)  # noqa: E731
    assert_resume_in_process_is_exact(tmp_path, build, _batch, save_at=2, steps=4)
    model, _ = build()
    other, _ = kdwrap.okddip(TinyNet(), branches=4)
    with pytest.raises(ValueError, match="kdwrap.okddip\\(net, branches=4"):
        model.load_state_dict(other.state_dict())


@pytest.mark.parametrize("name, kwargs, size", [
    ("resnet18", {}, 32),
    ("convnext_atto", {}, 32),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4), 32),
])
def test_one_training_step_on_models_of_the_one_list(name, kwargs, size):
    net = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    model, loss_fn = kdwrap.okddip(net, branches=3)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 5, (4,))
    loss = loss_fn(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and model.attention.query.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_wrap_by_name_and_summary():
    model, loss_fn = kdwrap.wrap(TinyNet(), method="okddip", branches=3, temperature=2)
    assert isinstance(model, OKDDipModel) and isinstance(loss_fn, OKDDipLoss) and loss_fn.temperature == 2
    text = kdwrap.summary(model)
    assert "2 peers + the group leader (branch 2" in text and "input of 'fc' (32 -> 4)" in text


class NoLinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 5, 3, stride=2), nn.ReLU())

    def forward(self, x):
        return self.stage2(self.stage1(x)).mean((2, 3))


@pytest.mark.parametrize("build, exc, match", [
    (lambda: kdwrap.okddip(TinyNet(), branches=2), ValueError, "branches >= 3"),
    (lambda: kdwrap.okddip(TinyNet(), reduction=0), ValueError, "reduction must be an int >= 1"),
    (lambda: kdwrap.okddip(TinyNet(), temperature=-1), ValueError, "temperature=-1 is invalid"),
    (lambda: kdwrap.okddip(TinyNet(), rampup_steps=-1), ValueError, "rampup_steps must be an int >= 0"),
    (lambda: kdwrap.okddip(TinyNet(), classifier="stage2.0"), SplitError, "no in_features"),
    (lambda: kdwrap.okddip(NoLinearHead(), split="stage2"), SplitError, "classifier=<module name>"),
    (lambda: kdwrap.okddip(TinyNet(), tempreature=2), OptionError, "did you mean 'temperature'"),
])
def test_bad_input_is_a_clear_error(build, exc, match):
    with pytest.raises(exc, match=match):
        build()



def test_auto_times_both_executions_where_it_measures(monkeypatch):
    """With the CPU among the devices auto measures on, the timing runs the fused graph that returns the classifier
    inputs too, and the step trains as sequential execution does."""
    from kdwrap.fused import planner

    monkeypatch.setattr(planner, "MEASURE_DEVICES", ("cpu",))
    models, losses = {}, {}
    for execution in ("auto", "sequential"):
        torch.manual_seed(0)
        models[execution], loss_fn = kdwrap.okddip(TinyNet(), branches=3, execution=execution)
        x, y = _batch(0)
        losses[execution] = loss_fn(models[execution](x), y)
    (signature, ms), = models["auto"].execution_timings.items()
    assert signature == f"cpu {BATCH}x16x8x8 float32" and set(ms) == {"sequential", "fused"}
    assert models["sequential"].execution_timings == {}
    torch.testing.assert_close(losses["auto"], losses["sequential"], rtol=1e-5, atol=1e-6)
