"""kdwrap.base: the contract every method shares, through the smallest concrete ones (``kdwrap.one`` on TinyNet, a toy
KDModel): one capture per forward taken once by the loss, the wrapper following the network's train/eval mode, the
eval-mode loss (plain cross-entropy, warning once when it could be trained), ``parts``, the step count in the loss's
state, ``check_finite``; and the helpers: label and logits checks, ``select_logits``, ``KeepReachable``, ``unwrap``,
``route_options``, ``count_parameters``."""
import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from conftest import TinyNet
from kdwrap.base import (
    EVAL_CAPTURE, KDLoss, KDModel, KeepReachable, check_logits, check_output_option, check_target, count_parameters,
    route_options, select_logits, unwrap,
)
from kdwrap.errors import OptionError


class Toy(KDModel):
    method = "toy"


def one(net: nn.Module, **options):
    """``kdwrap.one`` with the branches run one after the other (no fusion check: the CPU runs them so anyway)."""
    return kdwrap.one(net, execution="sequential", **options)


def batch(b: int = 4):
    return torch.randn(b, 3, 16, 16), torch.randint(0, 5, (b,))


def test_a_capture_is_taken_exactly_once():
    model = Toy()
    assert model.pending_capture is None
    model.put_capture(("what", "the loss needs"))
    assert model.pending_capture == ("what", "the loss needs")  # looking does not take it
    assert model.take_capture() == ("what", "the loss needs")
    assert model.pending_capture is None
    with pytest.raises(RuntimeError, match="kdwrap toy: loss_fn was called without a preceding forward"):
        model.take_capture()


def test_the_loss_takes_the_forwards_capture_once():
    model, loss_fn = one(TinyNet())
    x, y = batch()
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        loss_fn(torch.randn(4, 5), y)
    out = model(x)
    assert model.pending_capture is not None
    loss_fn(out, y)
    assert model.pending_capture is None
    with pytest.raises(RuntimeError, match="twice for one forward"):
        loss_fn(out, y)
    model.eval()
    model(x)
    assert model.pending_capture is EVAL_CAPTURE  # eval mode: the loss will be plain cross-entropy


def test_bad_labels_or_logits_fail_before_the_capture_is_taken():
    model, loss_fn = one(TinyNet())
    x, y = batch()
    out = model(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        loss_fn(out, torch.full((4,), 7))
    with pytest.raises(ValueError, match=r"shape \(4, 5, 1\)"):
        loss_fn(out.unsqueeze(-1), y)
    assert torch.isfinite(loss_fn(out, y))  # the retry finds the capture still there


@pytest.mark.parametrize("training", [True, False])
def test_the_wrapper_starts_in_the_networks_mode(training):
    model, _ = one(TinyNet().train(training))
    assert all(m.training is training for m in model.modules())
    model.train(not training)
    assert all(m.training is (not training) for m in model.modules())


def test_the_eval_loss_is_plain_cross_entropy_and_warns_once_if_it_could_train():
    model, loss_fn = one(TinyNet().eval())
    x, y = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(x)
        loss = loss_fn(out, y)
        loss_fn(model(x), y)
    assert torch.allclose(loss, F.cross_entropy(out, y))
    assert set(loss_fn.parts) == {"loss"} and torch.equal(loss_fn.parts["loss"], loss.detach())
    assert loss_fn.step == 0  # eval-mode calls are not training steps
    ours = [w for w in caught if "kdwrap one: the model is in eval mode" in str(w.message)]
    assert len(ours) == 1  # once per wrapper
    assert ours[0].filename == __file__  # pointing at the loss_fn(...) line


def test_the_eval_loss_under_no_grad_does_not_warn():
    model, loss_fn = one(TinyNet().eval())
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            loss_fn(model(x), y)


def test_parts_are_detached_and_the_step_counts_training_calls():
    model, loss_fn = one(TinyNet())
    for _ in range(3):
        x, y = batch()
        loss = loss_fn(model(x), y)
    assert loss_fn.step == 3
    assert torch.equal(loss_fn.parts["loss"], loss.detach())
    assert all(not v.requires_grad for v in loss_fn.parts.values())
    assert loss_fn.model is model
    state = loss_fn.state_dict()
    assert not any(k.startswith(("trunk", "branches", "gate")) for k in state)  # no copy of the model's weights
    other_model, other_loss = one(TinyNet())
    other_loss.load_state_dict(state)
    assert other_loss.step == 3  # a resumed run continues the schedule


def test_check_finite_stops_at_nan_logits_with_the_step():
    model, loss_fn = one(TinyNet(), check_finite=True)
    x, y = batch()
    loss_fn(model(x), y)
    with torch.no_grad():
        model.branches[0].get_submodule("fc").weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at training step 1"):
        loss_fn(model(x), y)
    unchecked, unchecked_loss = one(TinyNet())
    with torch.no_grad():
        unchecked.branches[0].get_submodule("fc").weight.fill_(float("nan"))
    assert torch.isnan(unchecked_loss(unchecked(x), y))  # off by default


def test_keep_reachable_returns_a_copy_and_links_the_others_with_no_gradient():
    out = torch.randn(3, 4, requires_grad=True)
    other = torch.randn(2, requires_grad=True)
    kept = KeepReachable.apply(out, other)
    assert torch.equal(kept, out) and kept.data_ptr() != out.data_ptr()
    inputs = {id(fn[0].variable) for fn in kept.grad_fn.next_functions if fn[0] is not None and
              hasattr(fn[0], "variable")}
    assert {id(out), id(other)} <= inputs  # both hang off the output in the autograd graph
    (kept * 2).sum().backward()
    assert torch.equal(out.grad, torch.full((3, 4), 2.0))
    assert other.grad is None


def test_check_target():
    ce, hard = check_target(torch.tensor([0, 4, 2], dtype=torch.int32), 3, 5, "toy")
    assert ce.dtype == torch.long and torch.equal(hard, torch.tensor([0, 4, 2]))
    soft = torch.softmax(torch.randn(3, 5), 1)
    ce, hard = check_target(soft, 3, 5, "toy")
    assert torch.equal(ce, soft) and torch.equal(hard, soft.argmax(1))
    with pytest.raises(TypeError, match=r"float dtype .* shape \(3,\)"):
        check_target(torch.zeros(3), 3, 5, "toy")
    with pytest.raises(TypeError, match="int class indices"):
        check_target(torch.zeros(3, dtype=torch.bool), 3, 5, "toy")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_target([0, 1, 2], 3, 5, "toy")
    with pytest.raises(ValueError, match=r"y\.view\(-1\)"):
        check_target(torch.zeros(3, 1, dtype=torch.long), 3, 5, "toy")
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        check_target(torch.tensor([-1, 0, 2]), 3, 5, "toy")


def test_check_logits():
    z = torch.randn(2, 5)
    assert check_logits(z, "toy") is z
    assert check_logits(torch.randn(2, 5, 3), "toy", dims=None).shape == (2, 5, 3)
    with pytest.raises(TypeError, match=r"kdwrap toy: the tail returned a tuple, not logits of shape \(B, C\); name"):
        check_logits((z,), "toy")
    with pytest.raises(ValueError, match=r"loss_fn got a tensor of shape \(5,\)"):
        check_logits(torch.randn(5), "toy", "loss_fn got", error=ValueError)


def test_check_output_option():
    assert check_output_option("toy", None) is None
    assert check_output_option("toy", 1) == 1 and check_output_option("toy", "logits") == "logits"
    for bad in (True, 1.0, ["logits"]):
        with pytest.raises(TypeError, match="output must be an int index or a str key"):
            check_output_option("toy", bad)


def test_select_logits():
    z = torch.randn(2, 5)
    Out = collections.namedtuple("Out", "feats logits")
    assert select_logits(z, None, "toy") is z
    assert select_logits((torch.randn(2, 3), z), 1, "toy") is z
    assert select_logits({"logits": z}, "logits", "toy") is z
    assert select_logits(Out(torch.randn(2, 3), z), "logits", "toy") is z  # a field by name
    with pytest.raises(TypeError, match=r"a dict with keys \['logits'\].*kdwrap\.toy\(\.\.\., output='logits'\)"):
        select_logits({"logits": z}, None, "toy")
    with pytest.raises(TypeError, match=r"returned tuple.*output=0"):
        select_logits((z,), None, "toy")
    with pytest.raises(TypeError, match="output=3 does not name an element of the tuple"):
        select_logits((z,), 3, "toy")
    with pytest.raises(TypeError, match="names a str"):
        select_logits({"logits": "no"}, "logits", "toy")


def test_unwrap():
    model, _ = one(TinyNet())

    class Compiled(nn.Module):  # what torch.compile returns: the module under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(Compiled(model)) is model
    assert unwrap(nn.DataParallel(Compiled(model))) is model


def test_route_options_splits_by_keyword_and_names_unknown_ones():
    def model_options(net, *, branches=3, split=None):
        pass

    def loss_options(model, *, temperature=3.0):
        pass

    assert route_options("toy", {"branches": 2, "temperature": 4.0}, model_options, loss_options) == [
        {"branches": 2}, {"temperature": 4.0}]
    assert route_options("toy", {}, model_options, loss_options) == [{}, {}]
    with pytest.raises(OptionError, match=r"unknown option 'temprature' \(did you mean 'temperature'\?\); valid "
                                          r"options: branches, split, temperature"):
        route_options("toy", {"temprature": 4.0}, model_options, loss_options)
    with pytest.raises(OptionError, match="unknown options 'a', 'b'"):
        route_options("toy", {"a": 1, "b": 2}, model_options, loss_options)


def test_count_parameters_counts_each_tensor_once():
    net = TinyNet()
    # by hand: three 3x3 convs with biases and BatchNorms (weight, bias), and fc 32 -> 5
    by_hand = (3 * 8 * 9 + 8 + 2 * 8) + (8 * 16 * 9 + 16 + 2 * 16) + (16 * 32 * 9 + 32 + 2 * 32) + (32 * 5 + 5)
    assert count_parameters([net]) == by_hand == sum(p.numel() for p in net.parameters())
    assert count_parameters([net, net.fc]) == by_hand  # fc is inside net: counted once
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # tied weights
    assert count_parameters([a, b]) == 16 + 4 + 4
    assert count_parameters([]) == 0


def test_the_user_network_and_the_loss_base():
    net = TinyNet()
    model, loss_fn = one(net)
    assert model.user_network is net
    assert isinstance(model, KDModel) and isinstance(loss_fn, KDLoss)
    osakd_net = TinyNet()
    osakd_model, osakd_loss = kdwrap.osakd(osakd_net)
    assert osakd_model.user_network is osakd_net
    assert isinstance(osakd_model, KDModel) and isinstance(osakd_loss, KDLoss)
