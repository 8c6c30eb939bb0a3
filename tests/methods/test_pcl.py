"""PCL: the loss against a hand-written reference of the same maths, the temporal means bit for bit, the peers' views,
export, checkpoints, errors, AMP and torch.compile (DDP: test_family_setups.py)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from conftest import ConvHeadNet, TinyNet
from kdwrap import OptionError, SplitError
from kdwrap.methods.pcl import PCLLoss, PCLModel
from kdwrap.augment import random_crop_flip
from loop_utils import assert_compiles_without_graph_break, assert_resume_in_process_is_exact


def _batch(step, b=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g)


def _sgd_step(model, loss_fn, opt, step):
    x, y = _batch(step)
    loss = loss_fn(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def _features(net, x):
    return net.pool(net.stage2(net.stage1(net.stem(x)))).flatten(1)


def _kl(student, teacher, T):
    return F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1), reduction="batchmean") * T * T


def _hand_mean(mean, live, t, decay):
    """The mean-teacher update, written out: a = min(decay, 1 - 1/(t+1)); mean <- a mean + (1 - a) live."""
    a = torch.clamp(1 - 1 / (torch.tensor(t, dtype=torch.float32) + 1), max=decay)
    return {k: mean[k] * a + live[k] * (1 - a) for k in mean}


def _params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


@pytest.mark.parametrize("branches", [2, 3])
def test_loss_and_gradients_match_the_reference(branches):
    """Three SGD steps, then the wrapper's loss and gradients against TinyNets holding each live peer and each
    hand-averaged mean teacher, the ensemble classifier written as F.linear over their features."""
    T, decay = 3.0, 0.5
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=branches, augment=None, mean_decay=decay, temperature=T,
                                rampup_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    means = [None] * branches
    for step in range(4):
        lives = [model.export(branch=i, mean=False) for i in range(branches)]
        means = [_params(n) if m is None else _hand_mean(m, _params(n), step, decay) for m, n in zip(means, lives)]
        if step < 3:
            _sgd_step(model, loss_fn, opt, step)
    x, y = _batch(3)
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()

    teachers = [copy.deepcopy(n) for n in lives]
    for t, mean in zip(teachers, means):
        t.load_state_dict(mean, strict=False)
    z = [n(x) for n in lives]
    W = model.ensemble.weight.detach().clone().requires_grad_()
    z_e = F.linear(torch.cat([_features(n, x) for n in lives], 1), W, model.ensemble.bias.detach())
    with torch.no_grad():
        z_mean = [t(x) for t in teachers]
    ramp = torch.exp(torch.tensor(-5.0 * (1 - 3 / 10) ** 2)).item()
    ref = sum(F.cross_entropy(zi, y) for zi in z) + F.cross_entropy(z_e, y)
    for i, zi in enumerate(z):
        others = [z_mean[j] for j in range(branches) if j != i]
        ref = ref + ramp * (_kl(zi, z_e.detach(), T) + sum(_kl(zi, t, T) for t in others) / len(others))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(model.ensemble.weight.grad, W.grad)
    for i, net in enumerate(lives):
        torch.testing.assert_close(model.branches[i].fc.weight.grad, net.fc.weight.grad)
        torch.testing.assert_close(model.branches[i].get_submodule("stage2.0").weight.grad, net.stage2[0].weight.grad)
    trunk_grad = sum(n.stem[0].weight.grad for n in lives)  # the trunk is shared: the peers' gradients add up
    torch.testing.assert_close(model.trunk.get_submodule("stem.0").weight.grad, trunk_grad)
    assert set(loss_fn.parts) == {"loss", "ce", "ce_ensemble", "kl_ensemble", "kl_mean", "ramp_weight"}
    assert loss_fn.parts["kl_mean"].shape == (branches,) and float(loss_fn.parts["ramp_weight"]) == pytest.approx(ramp)


def test_gradients_reach_what_learns_and_the_temporal_means_hold_no_parameters():
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _sgd_step(model, loss_fn, opt, 0)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("mean_trunk", "mean_branches")) for n in names)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()), [
        n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    means = [t for t in [*model.mean_trunk.buffers(), *model.mean_branches.buffers()] if t.is_floating_point()]
    assert means and not any(t.requires_grad or t.grad is not None for t in means)
    assert {"mean_trunk.stem.0.weight", "mean_branches.2.fc.weight", "mean_updates"} <= set(model.state_dict())


def test_temporal_means_follow_the_mean_teacher_rule_bit_for_bit():
    decay = 0.6
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=2, augment=None, mean_decay=decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    trunk = branch = None
    for step in range(5):
        live_trunk = {k: v.detach().clone() for k, v in model.trunk.named_parameters()}
        live_branch = {k: v.detach().clone() for k, v in model.branches[1].named_parameters()}
        trunk = live_trunk if trunk is None else _hand_mean(trunk, live_trunk, step, decay)
        branch = live_branch if branch is None else _hand_mean(branch, live_branch, step, decay)
        _sgd_step(model, loss_fn, opt, step)
        for k, v in trunk.items():
            assert torch.equal(model.mean_trunk.get_buffer(k), v), (step, k)
        for k, v in branch.items():
            assert torch.equal(model.mean_branches[1].get_buffer(k), v), (step, k)
    assert int(model.mean_updates) == 5
    mean, live = model.mean_trunk.get_buffer("stem.0.weight"), model.trunk.get_parameter("stem.0.weight")
    assert not torch.equal(mean, live)  # an average, not a copy


def test_gradient_accumulation_updates_the_means_once_per_optimizer_step():
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=2, augment=None, accumulation_steps=2)
    for step in range(4):
        loss_fn(model(_batch(step)[0]), _batch(step)[1]).backward()
        assert int(model.mean_updates) == step // 2 + 1
    assert int(model.mean_forwards) == 4 and loss_fn.accumulation_steps == 2


@pytest.mark.parametrize("branch", [None, 1])
def test_export_is_the_users_class_holding_the_temporal_mean_and_equals_the_wrapper(branch):
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=3, mean_decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        _sgd_step(model, loss_fn, opt, step)
    model.eval()
    x = _batch(9)[0]
    deployed = kdwrap.export(model) if branch is None else kdwrap.export(model, branch=branch)
    assert type(deployed) is TinyNet and list(deployed.state_dict()) == list(TinyNet().state_dict())
    assert not deployed.training
    k = 0 if branch is None else branch
    assert torch.equal(deployed.fc.weight, model.mean_branches[k].fc.weight)
    assert torch.equal(deployed.stage2[1].running_mean, model.mean_branches[k].get_buffer("stage2.1.running_mean"))
    with torch.no_grad():
        if branch is None:
            torch.testing.assert_close(deployed(x), model(x))
        live = kdwrap.export(model, branch=k, mean=False)
        torch.testing.assert_close(live(x), model.branches[k](model.trunk(x))[0])
        assert not torch.allclose(live(x), deployed(x))
    with pytest.raises(ValueError, match=r"branch must be an int in \[0, 3\)"):
        kdwrap.export(model, branch=3)


def test_checkpoint_resume_is_exact_including_the_means_and_their_clock(tmp_path):
    build = lambda: kdwrap.pcl(TinyNet(), branches=3, augment=None, mean_decay=0.7, rampup_steps=3)  # noqa: E731
    assert_resume_in_process_is_exact(tmp_path, build, _batch, save_at=2, steps=4)
    model, _ = build()
    other, _ = kdwrap.pcl(TinyNet(), branches=2)
    with pytest.raises(ValueError, match=r"kdwrap.pcl\(net, branches=2"):
        model.load_state_dict(other.state_dict())


def test_resume_with_the_rng_continues_the_same_views(tmp_path):
    """crop_flip draws from torch's RNG: saved and restored with the checkpoint, the views repeat exactly."""
    torch.manual_seed(0)
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _sgd_step(model, loss_fn, opt, 0)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "loss": loss_fn.state_dict(),
                           "rng": torch.get_rng_state()})
    expected = [_sgd_step(model, loss_fn, opt, s).item() for s in (1, 2)]
    torch.manual_seed(5)
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), loss_fn.load_state_dict(state["loss"])
    torch.set_rng_state(state["rng"])
    assert [_sgd_step(model, loss_fn, opt, s).item() for s in (1, 2)] == expected


def test_random_crop_flip_is_a_shift_of_the_padded_sample_maybe_mirrored():
    x = torch.randn(16, 3, 8, 8)
    out = random_crop_flip(x, padding=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for b in range(16):
        crops = [padded[b, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops), b
    assert not torch.equal(out, x)
    unpadded = random_crop_flip(x, padding=0)
    assert all(torch.equal(u, v) or torch.equal(u, v.flip(-1)) for u, v in zip(unpadded, x, strict=True))


def _eval_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def test_each_peer_sees_its_own_view_and_eval_sees_the_batch_as_given():
    calls = []

    def shift(x):
        calls.append(x.shape)
        return x + len(calls)

    x, y = _batch(0)
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=3, augment=shift, reinit_branches=False)
    _eval_bn(model)  # batch statistics over all views together would differ from one view's
    net = model.export(branch=0, mean=False).eval()
    model(x)
    logits, _, mean_logits = model.pending_capture
    assert len(calls) == 3
    with torch.no_grad():
        for i in range(3):
            torch.testing.assert_close(logits[i], net(x + i + 1))
            torch.testing.assert_close(mean_logits[i], net(x + i + 1))
    model.eval()
    model(x)
    assert len(calls) == 3  # no augmentation in eval

    views = torch.stack([x, x.flip(-1)], 1)  # B x 2 x C x H x W, stacked by the data loader
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=2, augment="views", reinit_branches=False)
    _eval_bn(model)
    net = model.export(branch=0, mean=False).eval()
    model(views)
    assert model.first_input_size == (3, 16, 16)
    logits, _, _ = model.pending_capture
    with torch.no_grad():
        torch.testing.assert_close(logits[1], net(x.flip(-1)))

    model, _ = kdwrap.pcl(TinyNet(), branches=3, augment=None, reinit_branches=False)
    _eval_bn(model)
    model(x)
    logits, _, _ = model.pending_capture
    assert torch.equal(logits[0], logits[2])  # the same batch and the same weights: the same logits


def test_default_views_differ_between_peers():
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=3, reinit_branches=False)
    _eval_bn(model)
    model(_batch(0)[0])
    logits, _, _ = model.pending_capture
    assert not torch.allclose(logits[0], logits[1])


def test_bf16_autocast_trains_in_float32():
    model, loss_fn = kdwrap.pcl(TinyNet(), branches=3)
    x, y = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = loss_fn(out, y)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.ensemble.weight.grad is not None


def test_torch_compile_has_no_graph_break_and_gives_the_eager_loss():
    def make():
        torch.manual_seed(0)
        return kdwrap.pcl(TinyNet(), branches=3, augment=None)

    assert_compiles_without_graph_break(make, _batch)


def test_torch_compile_has_no_graph_break_with_random_views_and_accumulation():
    model, _ = kdwrap.pcl(TinyNet(), branches=3, accumulation_steps=2)
    explained = torch._dynamo.explain(model)(_batch(0)[0])
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {}),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4)),
])
def test_one_training_step_on_models_of_the_one_list(name, kwargs):
    net = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    model, loss_fn = kdwrap.pcl(net, branches=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    loss = loss_fn(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and model.ensemble.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_wrap_by_name_and_summary():
    model, loss_fn = kdwrap.wrap(TinyNet(), method="pcl", branches=2, temperature=2)
    assert isinstance(model, PCLModel) and isinstance(loss_fn, PCLLoss) and loss_fn.temperature == 2
    text = kdwrap.summary(model)
    assert "2 peers; deployed: the temporal mean of peer 0" in text and "'fc' (64 -> 5)" in text
    assert "the trunk on 2 views" in text


class ScaledHeadNet(TinyNet):
    """TinyNet whose last Linear is followed by a layer with weights (a BatchNorm1d): not the classifier."""

    def __init__(self, num_classes=5):
        super().__init__(num_classes)
        self.bn = nn.BatchNorm1d(num_classes)

    def forward(self, x):
        return self.bn(super().forward(x))


def test_a_conv_head_gets_the_ensemble_classifier_over_the_peers_logits_and_trains():
    model, loss_fn = kdwrap.pcl(ConvHeadNet(), branches=3, augment=None, mean_decay=0.5)
    assert model.ensemble_input == "logits" and model.classifier is None
    assert (model.ensemble.in_features, model.ensemble.out_features) == (15, 5)  # m * C -> C
    text = kdwrap.summary(model)
    assert "ensemble classifier over the peers' logits, a Linear (3 x 5 -> 5): the classifier input of ConvHeadNet " \
           "is not a flat feature vector (it calls no nn.Linear" in text
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        _sgd_step(model, loss_fn, opt, step)
    x, y = _batch(2)
    out = model(x)
    logits, ensemble, _ = model.pending_capture
    torch.testing.assert_close(ensemble, model.ensemble(torch.cat(logits, -1)))
    opt.zero_grad()
    loss_fn(out, y).backward()
    assert model.ensemble.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    deployed = kdwrap.export(model)
    assert type(deployed) is ConvHeadNet and not deployed.training
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))


def test_a_linear_classifier_keeps_the_feature_form_and_one_with_weights_after_it_falls_back():
    model, _ = kdwrap.pcl(TinyNet(), branches=3)
    assert model.ensemble_input == "features" and model.classifier == "fc"
    assert (model.ensemble.in_features, model.ensemble.out_features) == (3 * 32, 5)  # m * d -> C
    model, _ = kdwrap.pcl(ScaledHeadNet(), branches=2)
    assert model.ensemble_input == "logits" and model.ensemble.in_features == 10
    assert "its last nn.Linear 'fc' is followed by 'bn', which has weights of its own" in kdwrap.summary(model)
    model, _ = kdwrap.pcl(ScaledHeadNet(), branches=2, classifier="fc")  # named: the paper's form
    assert model.ensemble_input == "features" and model.ensemble.in_features == 64


@pytest.mark.parametrize("build, exc, match", [
    (lambda: kdwrap.pcl(TinyNet(), branches=1), ValueError, "branches >= 2"),
    (lambda: kdwrap.pcl(TinyNet(), augment="flip"), ValueError, "augment='flip' is not a view mode; valid: 'crop"),
    (lambda: kdwrap.pcl(TinyNet(), mean_decay=1.0), ValueError, r"mean_decay must be a float in \[0, 1\)"),
    (lambda: kdwrap.pcl(TinyNet(), branch=3), ValueError, r"branch must be an int in \[0, 3\)"),
    (lambda: kdwrap.pcl(TinyNet(), accumulation_steps=0), ValueError, "accumulation_steps must be an int >= 1"),
    (lambda: kdwrap.pcl(TinyNet(), temperature=0), ValueError, "temperature=0 is invalid"),
    (lambda: kdwrap.pcl(TinyNet(), classifier="stage2.0"), SplitError, "no in_features"),
    (lambda: kdwrap.pcl(TinyNet(), mean_decai=0.9), OptionError, "did you mean 'mean_decay'"),
])
def test_bad_options_are_clear_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize("augment, x, match", [
    ("views", torch.randn(4, 3, 16, 16), r"augment='views' takes training batches of shape \(B, 2, ...\)"),
    (lambda x: x[:2], torch.randn(4, 3, 16, 16), "augment returned \\(2, 3, 16, 16\\) for peer 0"),
    ("crop_flip", torch.randn(4, 3, 16, 16).long(), "augment=None"),
])
def test_bad_views_are_clear_errors(augment, x, match):
    model, _ = kdwrap.pcl(TinyNet(), branches=2, augment=augment)
    with pytest.raises(ValueError, match=match):
        model(x)


@pytest.mark.parametrize("input_size", [(3, 16, 16), None], ids=["rank-known", "rank-unknown"])
def test_a_batch_without_the_views_axis_is_a_clear_error_even_when_its_channels_equal_the_peers(input_size):
    """A (B, C, H, W) batch with C == m passes the views-axis check by shape; with the sample's rank known (from
    input_size or an earlier batch) kdwrap refuses it before the network runs, else it names the cause of the
    network's error."""
    model, _ = kdwrap.pcl(TinyNet(), branches=3, augment="views", input_size=input_size)
    if input_size is None:
        with pytest.raises(ValueError, match=r"the network failed on the peers' views.*stack the views"):
            model(torch.randn(4, 3, 16, 16))
        model(torch.randn(4, 3, 3, 16, 16))  # a correct batch: the sample's rank is now known
    with pytest.raises(ValueError, match=r"4 axes where a batch of views of 3-axis samples has 5"):
        model(torch.randn(4, 3, 16, 16))
