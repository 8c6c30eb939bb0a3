"""BYOT: the loss and its gradients against a hand-written reference of the method (stage ends read by hooks on the
user's own network), what must not learn from what, the stages found, the heads per layout, export, errors."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from conftest import FunctionalLeNet, TinyNet
from kdwrap import OptionError, SplitError
from kdwrap.methods.byot import BYOTLoss, BYOTModel, ConvExitHead, TokenExitHead
from kdwrap.models import cifar_resnet, lenet5
from loop_utils import assert_resume_in_process_is_exact

BATCH = 6


def _batch(step):
    g = torch.Generator().manual_seed(6000 + step)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def reference(model, x, y, alpha=0.1, T=3.0, lam=1e-6):
    """The method written out on the exported network: forward hooks read the ends of `stem` and `stage1` (the
    inputs of the exits' stages) and the input of `fc`; a copy of the heads gives each exit's logits and feature."""
    net = kdwrap.export(model)
    heads = copy.deepcopy(model.heads)
    ends, deep = [], []
    net.stem.register_forward_hook(lambda m, a, out: ends.append(out))
    net.stage1.register_forward_hook(lambda m, a, out: ends.append(out))
    net.fc.register_forward_pre_hook(lambda m, a: deep.append(a[0]))
    z_n = net(x)
    loss = (1 - alpha) * F.cross_entropy(z_n, y)
    teacher = F.softmax(z_n.detach() / T, 1)
    for head, end in zip(heads, ends):
        f_i = head.features(end).mean((2, 3))
        z_i = head.fc(f_i)
        loss = loss + (1 - alpha) * F.cross_entropy(z_i, y)
        loss = loss + alpha * T * T * (-(teacher * F.log_softmax(z_i / T, 1)).sum(1).mean())
        f_n = deep[0].detach()
        mask = ((f_i > 0) | (f_n > 0)).float()
        loss = loss + lam * (mask * (f_i - f_n) ** 2).sum()
    return loss, net, heads


def test_the_stages_of_tiny_net_are_its_two_downsampling_stages():
    model, _ = kdwrap.byot(TinyNet())
    assert model.stages == ["stage1", "stage2"] and model.classifier == "fc" and model.num_exits == 3
    assert all(isinstance(h, ConvExitHead) for h in model.heads)
    # The k x k conv brings each stage end to the deepest stage's 4 x 4 (16 x 16 input: stem 16, stage1 8).
    assert [h.features[3].stride for h in model.heads] == [(4, 4), (2, 2)]


@pytest.mark.parametrize("alpha, lam", [(0.1, 1e-6), (0.5, 1e-2)])
def test_loss_and_gradients_match_the_reference(alpha, lam):
    model, loss_fn = kdwrap.byot(TinyNet(), alpha=alpha, feature_weight=lam, input_size=(3, 16, 16))
    for step in range(2):
        x, y = _batch(step)
        ref_loss, net, heads = reference(copy.deepcopy(model), x, y, alpha=alpha, lam=lam)
        model.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        # float32 sums of a loss of 7 to 17 (the KD term holds T^2 times the target's entropy): 1e-6 relative
        assert abs(loss.item() - ref_loss.item()) < 1e-6 * max(1.0, abs(ref_loss.item()))
        ref_loss.backward()
        mine = dict(model.body.named_parameters())
        for k, p in net.named_parameters():
            torch.testing.assert_close(mine[k].grad, p.grad, atol=1e-6, rtol=1e-5, msg=k)
        for p, q in zip(model.heads.parameters(), heads.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert set(loss_fn.parts) == {"loss", "ce", "kd", "feature"} and loss_fn.parts["ce"].shape == (3,)


def test_the_deepest_classifier_learns_from_the_labels_only():
    """Its logits and feature are detached targets of the exits: its head's gradient is (1 - alpha) dCE/dW."""
    model, loss_fn = kdwrap.byot(TinyNet(), alpha=0.3, feature_weight=1.0)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    got = model.body.fc.weight.grad.clone()
    model.zero_grad()
    (0.7 * F.cross_entropy(model(x), y)).backward()
    model.take_capture()
    torch.testing.assert_close(got, model.body.fc.weight.grad, atol=1e-7, rtol=1e-5)
    assert all(p.grad is None for p in model.heads.parameters())


def test_eval_runs_no_exit_and_export_is_the_users_network():
    net = TinyNet()
    keys = list(net.state_dict())
    model, loss_fn = kdwrap.byot(net)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    calls = []
    for h in model.heads:
        h.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():  # validation
        z = model(x)
    assert calls == []
    torch.testing.assert_close(loss_fn(z, y), F.cross_entropy(z, y))
    deployed = kdwrap.export(model)
    assert type(deployed) is TinyNet and list(deployed.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))
        every = kdwrap.export(model, exits=True)(x)
    assert len(every) == 3
    torch.testing.assert_close(every[-1], z)


@pytest.mark.parametrize("build, size, stages, head", [
    (lambda: cifar_resnet(20), 32, ["layer2", "layer3"], ConvExitHead),
    (lambda: lenet5(), 32, ["conv2"], ConvExitHead),
    (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), 32, ["layer2", "layer3", "layer4"],
     ConvExitHead),
    (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=5), 32,
     ["stages.1", "stages.2", "stages.3"], ConvExitHead),
    (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                               depth=4), 32, ["blocks.1", "blocks.2", "blocks.3"], TokenExitHead),
    (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=32,
                               window_size=2, depths=(1, 1, 1, 1)), 32, ["layers.1", "layers.2", "layers.3"],
     TokenExitHead),
])
def test_stages_heads_training_step_and_export_on_models_of_the_one_list(build, size, stages, head):
    model, loss_fn = kdwrap.byot(build(), input_size=(3, size, size))
    assert model.stages == stages and all(type(h) is head for h in model.heads)
    x = torch.randn(4, 3, size, size)
    loss = loss_fn(model(x), torch.randint(0, 5, (4,)))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.heads.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_stages_of_a_network_that_downsamples_in_forward_come_from_the_graph():
    model, loss_fn = kdwrap.byot(FunctionalLeNet(), input_size=(3, 32, 32))
    assert model.stages == ["conv2"] and model.classifier == "fc3"
    x = torch.randn(4, 3, 32, 32)
    loss_fn(model(x), torch.randint(0, 5, (4,))).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x))


def test_named_stages_and_resume(tmp_path):
    model, _ = kdwrap.byot(TinyNet(), stages=["stage2"])
    assert model.num_exits == 2
    build = lambda: kdwrap.byot(TinyNet())  # noqa: E731
    assert_resume_in_process_is_exact(tmp_path, build, _batch, save_at=2, steps=4)


def test_wrap_by_name_and_summary():
    model, loss_fn = kdwrap.wrap(TinyNet(), method="byot", alpha=0.2)
    assert isinstance(model, BYOTModel) and isinstance(loss_fn, BYOTLoss) and loss_fn.alpha == 0.2
    text = kdwrap.summary(model)
    assert "3 exits" in text and "'stage1'" in text and "(deployed)" in text


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("build, exc, match", [
    (lambda: kdwrap.byot(Flat()), SplitError, "could not find the stages"),
    (lambda: kdwrap.byot(TinyNet(), stages=["stage9"]), SplitError, "not a module"),
    (lambda: kdwrap.byot(TinyNet(), stages="stage2"), TypeError, "list of module names"),
    (lambda: kdwrap.byot(TinyNet(), alpha=1.5), ValueError, r"alpha=1.5 is outside \[0, 1\]"),
    (lambda: kdwrap.byot(TinyNet(), feature_weight=-1), ValueError, "feature_weight must be a float >= 0"),
    (lambda: kdwrap.byot(TinyNet(), input_size=(1, 16, 16)), SplitError, "pass input_size"),
    (lambda: kdwrap.byot(TinyNet(), alpah=0.1), OptionError, "did you mean 'alpha'"),
])
def test_bad_input_is_a_clear_error(build, exc, match):
    with pytest.raises(exc, match=match):
        build()
