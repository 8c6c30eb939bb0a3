"""Every method alike: bad input gets a clear error or a documented behaviour; soft targets, NaN checks, fp16 AMP;
the same train/eval rule."""
import warnings

import pytest
import torch
from torch import nn

import kdwrap
from conftest import TinyNet

# method -> its options, built afresh for each wrapper (KD's teacher is a model of its own)
METHODS = {
    "one": lambda: dict(branches=3),
    "osakd": lambda: dict(k=2, bank_size=16),
    "kd": lambda: dict(teacher=TinyNet()),
    "dml": lambda: dict(peers=2),
    "okddip": lambda: dict(branches=3),
    "byot": lambda: dict(),
    # Two runs are compared here: random views would make them differ (test_pcl.py tests the views).
    "pcl": lambda: dict(branches=3, augment=None),
}


def _wrap(method, net=None, **kwargs):
    # A method registered later and missing from METHODS is tried with its defaults.
    options = METHODS.get(method, dict)()
    return kdwrap.wrap(net if net is not None else TinyNet(), method=method, **{**options, **kwargs})


def _x(b=4):
    return torch.randn(b, 3, 16, 16)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "labels, exc, match",
    [
        (torch.tensor([0, 1, 2, 5]), ValueError, r"lie in \[0, 5\).*got values in \[0, 5\]"),
        (torch.tensor([0, -1, 2, 3]), ValueError, r"lie in \[0, 5\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, r"float dtype.*y.long\(\)"),
        (torch.tensor([[0], [1], [2], [3]]), ValueError, r"shape \(4,\).*view\(-1\)"),
        (torch.tensor([0, 1]), ValueError, r"shape \(4,\)"),
        (torch.tensor([True, False, True, True]), TypeError, "int class indices"),
        ([0, 1, 2, 3], TypeError, "torch.Tensor"),
    ],
)
def test_wrong_labels_are_clear_errors_and_leave_the_forward_usable(method, labels, exc, match):
    model, loss_fn = _wrap(method)
    out = model(_x())
    with pytest.raises(exc, match=match):
        loss_fn(out, labels)
    loss_fn(out, torch.tensor([0, 1, 2, 4], dtype=torch.int32))  # the capture survived; any int dtype is fine


@pytest.mark.parametrize("method", METHODS)
def test_soft_targets_train_the_ce_terms_as_probabilities(method):
    """mixup/cutmix targets: CE takes them as probabilities; one-hot soft targets equal int labels exactly."""
    torch.manual_seed(0)
    model, loss_fn = _wrap(method)
    x, y = _x(), torch.tensor([0, 3, 1, 4])
    hard = loss_fn(model(x), y)
    torch.manual_seed(0)
    model2, loss_fn2 = _wrap(method)
    soft = loss_fn2(model2(x), nn.functional.one_hot(y, 5).float())
    torch.testing.assert_close(soft, hard)
    mixed = 0.7 * nn.functional.one_hot(y, 5).float() + 0.3 * nn.functional.one_hot(y.flip(0), 5).float()
    loss = loss_fn2(model2(x), mixed)
    assert torch.isfinite(loss) and not torch.allclose(loss, hard)
    loss.backward()


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_logits_stop_with_the_step_number(method):
    model, loss_fn = _wrap(method, check_finite=True)
    y = torch.tensor([0, 1, 2, 3])
    loss_fn(model(_x()), y)
    x = _x()
    x[1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf at training step 1 "):
        loss_fn(model(x), y)
    quiet, quiet_loss = _wrap(method)  # default: no host sync, the NaN reaches the loss
    assert torch.isnan(quiet_loss(quiet(x), y))


@pytest.mark.parametrize("method", METHODS)
def test_eval_forward_then_loss_is_plain_cross_entropy(method):
    model, loss_fn = _wrap(method)
    model.eval()
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(loss_fn(out, y), nn.functional.cross_entropy(out, y))
    assert loss_fn.step == 0 and list(loss_fn.parts)[0] == "loss"
    with pytest.raises(RuntimeError, match="twice for one forward"):  # one loss per forward, in eval mode too
        loss_fn(out, y)


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", kdwrap.METHODS)
def test_a_wrapper_starts_in_its_networks_mode_throughout(method, mode):
    net = TinyNet().train(mode)
    model, _ = _wrap(method, net)
    assert model.training is mode and {m.training for m in model.modules()} == {mode}
    model.train(not mode)
    assert {m.training for m in model.modules()} == {not mode}
    if method == "kd":
        assert not model.teacher.training  # the frozen teacher stays in eval mode either way


@pytest.mark.parametrize("method", kdwrap.METHODS)
def test_training_a_wrapper_left_in_eval_mode_warns_once_and_model_train_fixes_it(method):
    model, loss_fn = _wrap(method, TinyNet().eval())  # e.g. a network just loaded from a checkpoint
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    with pytest.warns(UserWarning, match=rf"kdwrap {method}: the model is in eval mode.*Call model\.train\(\)"):
        loss_fn(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(model(x), y).backward()  # once per wrapper
        other, other_loss = _wrap(method, TinyNet().eval())
        with torch.no_grad():  # validation: no warning
            other_loss(other(x), y)
        model.train()
        loss = loss_fn(model(x), y)
    assert loss_fn.step == 1 and not torch.equal(loss, nn.functional.cross_entropy(model.eval()(x), y))


@pytest.mark.parametrize("method", kdwrap.METHODS)
def test_parts_name_the_total_loss(method):
    model, loss_fn = _wrap(method)
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    loss = loss_fn(model(x), y)
    assert torch.equal(loss_fn.parts["loss"], loss.detach()) and "total" not in loss_fn.parts
    model.eval()
    with torch.no_grad():
        loss = loss_fn(model(x), y)
    assert torch.equal(loss_fn.parts["loss"], loss)


@pytest.mark.parametrize("method", METHODS)
def test_wrapping_a_ddp_or_compiled_model_says_to_wrap_the_bare_model(method):
    compiled = torch.compile(TinyNet())
    with pytest.raises(ValueError, match="wrap the bare model"):
        _wrap(method, compiled)


@pytest.mark.parametrize("method", METHODS)
def test_fp16_autocast_with_grad_scaler(method):
    """fp16 forward, float32 loss, GradScaler scaling and unscaling: no dtype error, the step changes weights."""
    model, loss_fn = _wrap(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(_x())
        loss = loss_fn(out, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float16 and loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**8  # no inf/nan gradients were found
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
