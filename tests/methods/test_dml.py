"""DML: the loss and its gradients against a hand-written reference of METHODS.md, peers, export, checkpoints,
errors."""
import copy
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from conftest import DictTinyNet, TinyNet, tiny_hf_vit, vit_batch
from kdwrap import OptionError
from kdwrap.methods.dml import DMLLoss, DMLModel
from loop_utils import assert_resume_in_process_is_exact

BATCH = 8


def _batch(step):
    g = torch.Generator().manual_seed(4000 + step)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def reference_loss(zs, y, temperature, detach=True):
    """METHODS.md, written out with loops: sum_k CE(z_k, y) + 1/(K-1) sum_{l != k} T^2 KL(p_T(sg(z_l)) || p_T(z_k))."""
    T, K = temperature, len(zs)
    total = 0.0
    for k in range(K):
        mutual = 0.0
        for j in range(K):
            if j != k:
                target = F.softmax((zs[j].detach() if detach else zs[j]) / T, dim=1)
                mutual = mutual + T**2 * F.kl_div(F.log_softmax(zs[k] / T, dim=1), target, reduction="batchmean")
        total = total + F.cross_entropy(zs[k], y) + mutual / (K - 1)
    return total


def _grads(modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


# ------------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("peers, temperature", [(2, 1.0), (3, 2.0)])
def test_loss_and_gradients_match_reference_over_steps(peers, temperature):
    model, loss_fn = kdwrap.dml(TinyNet(), peers=peers, temperature=temperature)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = _batch(step)
        ref_peers = copy.deepcopy(model.peers)  # the same peers, outside the wrapper
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        zs = [p(x).double() for p in ref_peers]
        ref = reference_loss(zs, y, temperature)
        assert abs(loss.item() - ref.item()) < 1e-6, step
        ref.backward()
        for got, want in zip(_grads(model.peers), _grads(ref_peers), strict=True):
            torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
        assert set(loss_fn.parts) == {"loss", "ce", "kl"} and loss_fn.parts["kl"].shape == (peers,)
        opt.step()
    assert loss_fn.step == 3


def test_the_mutual_target_carries_no_gradient_to_the_other_peer():
    """Against the reference without sg(.): each peer would also be pulled towards the other by its KL term."""
    model, loss_fn = kdwrap.dml(TinyNet(), peers=2)
    x, y = _batch(0)
    ref_peers = copy.deepcopy(model.peers)
    loss_fn(model(x), y).backward()
    reference_loss([p(x).double() for p in ref_peers], y, 1.0, detach=False).backward()
    got, undetached = _grads(model.peers), _grads(ref_peers)
    assert any(not torch.allclose(a, b.float(), atol=1e-6) for a, b in zip(got, undetached))
    # Peer 1's gradient is that of its own terms alone: CE(z_1, y) + KL(p(sg(z_0)) || p(z_1)).
    model.zero_grad()
    z0, z1 = (p(x) for p in model.peers)
    (F.cross_entropy(z1, y) + F.kl_div(F.log_softmax(z1, 1), F.softmax(z0.detach(), 1), reduction="batchmean")
     ).backward()
    assert all(p.grad is None for p in model.peers[0].parameters())
    for a, b in zip(got[len(list(model.peers[0].parameters())):], _grads([model.peers[1]]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_every_peer_learns_and_is_in_parameters():
    model, loss_fn = kdwrap.dml(TinyNet(), peers=3)
    assert {id(p) for p in model.parameters()} == {id(p) for peer in model.peers for p in peer.parameters()}
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ peers
def test_peers_start_independently_initialised_unless_asked_to_copy():
    net = TinyNet()
    original = copy.deepcopy(net.state_dict())
    model, _ = kdwrap.dml(net, peers=3)
    assert model.peers[0] is net and all(torch.equal(v, net.state_dict()[k]) for k, v in original.items())
    states = [p.state_dict() for p in model.peers]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(states[i]["fc.weight"], states[j]["fc.weight"]), (i, j)
    copied, _ = kdwrap.dml(TinyNet(), peers=2, reinit_peers=False)
    a, b = (p.state_dict() for p in copied.peers)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_list_of_networks_of_different_architectures_is_used_as_given():
    small = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    net = TinyNet()
    weight = small[1].weight.detach().clone()
    model, loss_fn = kdwrap.wrap([net, small], method="dml")
    assert model.num_peers == 2 and model.peers[1] is small and torch.equal(small[1].weight, weight)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    assert type(kdwrap.export(model, peer=1)) is nn.Sequential


def test_eval_forward_runs_only_the_kept_peer():
    model, loss_fn = kdwrap.dml(TinyNet(), peers=3, peer=2)
    calls = []
    for i, p in enumerate(model.peers):
        p.register_forward_hook(lambda *a, i=i: calls.append(i))
    x, y = _batch(0)
    model.eval()
    with torch.no_grad():  # validation
        z = model(x)
    assert calls == [2]
    torch.testing.assert_close(loss_fn(z, y), F.cross_entropy(z, y))
    model.train()
    calls.clear()
    z = model(x)
    assert calls == [0, 1, 2]
    torch.testing.assert_close(z, model.peers[2](x))
    loss_fn(z, y)


def test_forward_has_no_graph_break():
    model, _ = kdwrap.dml(TinyNet())
    explained = torch._dynamo.explain(model)(_batch(0)[0])
    assert explained.graph_break_count == 0, explained.break_reasons


# ------------------------------------------------------------------------------------------------- export and state
@pytest.mark.parametrize("peer", [None, 1])
def test_export_is_a_peer_with_its_keys_and_equals_it_in_eval(peer):
    net = TinyNet()
    keys = list(net.state_dict())
    model, loss_fn = kdwrap.dml(net, peers=2)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    deployed = kdwrap.export(model) if peer is None else kdwrap.export(model, peer=peer)
    assert type(deployed) is TinyNet and list(deployed.state_dict()) == keys
    assert all(p.grad is None for p in deployed.parameters())
    model.eval(), deployed.eval()
    with torch.no_grad():
        if peer is None:
            torch.testing.assert_close(deployed(x), model(x))  # what model(x) returns is what export keeps
        torch.testing.assert_close(deployed(x), model.peers[peer or 0](x))
    with pytest.raises(ValueError, match=r"peer must be an int in \[0, 2\)"):
        kdwrap.export(model, peer=2)


def test_state_dict_round_trip_and_resume_into_a_fresh_wrapper(tmp_path):
    model, _ = kdwrap.dml(TinyNet(), peers=2)
    assert all(k.startswith(("peers.0.", "peers.1.")) for k in model.state_dict())
    assert_resume_in_process_is_exact(tmp_path, lambda: kdwrap.dml(TinyNet(), peers=2), _batch, save_at=2, steps=4)


def test_wrap_by_name_and_summary():
    model, loss_fn = kdwrap.wrap(TinyNet(), method="dml", peers=3, temperature=2)
    assert isinstance(model, DMLModel) and isinstance(loss_fn, DMLLoss)
    assert loss_fn.config() == {"temperature": 2.0}
    text = kdwrap.summary(model)
    assert "3 peers (forward returns peer 0)" in text and "T = 2" in text and "measured step times: docs/methods.md" in text


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("build, exc, match", [
    (lambda: kdwrap.dml(TinyNet(), peers=1), ValueError, "at least 2 peers"),
    (lambda: kdwrap.dml(TinyNet(), peers=0), ValueError, "at least 2 peers"),
    (lambda: kdwrap.dml(TinyNet(), peers=True), TypeError, "peers must be an int"),
    (lambda: kdwrap.dml([TinyNet()]), ValueError, "peers=1, but mutual learning needs at least 2 peers"),
    (lambda: kdwrap.dml([TinyNet(), TinyNet()], peers=3), ValueError, "peers=3 but 2 networks were given"),
    (lambda: (lambda n: kdwrap.dml([n, n]))(TinyNet()), ValueError, "the same network appears twice"),
    (lambda: kdwrap.dml([TinyNet(), "resnet"]), TypeError, "torch.nn.Module"),
    (lambda: kdwrap.dml(TinyNet(), peer=2), ValueError, r"peer must be an int in \[0, 2\)"),
    (lambda: kdwrap.dml(TinyNet(), temperature=0), ValueError, "temperature=0 is invalid"),
    (lambda: kdwrap.dml(TinyNet(), tempreature=2), OptionError, "did you mean 'temperature'"),
    (lambda: kdwrap.dml(TinyNet(), alpha=0.5), OptionError,
     "valid options: peers, reinit_peers, peer, output, temperature"),
    (lambda: kdwrap.dml(TinyNet(), output=1.5), TypeError, "output must be an int index or a str key"),
])
def test_bad_input_is_a_clear_error(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_peers_of_different_classes_are_an_error_naming_each():
    model, _ = kdwrap.dml([TinyNet(num_classes=5), TinyNet(num_classes=7)])
    with pytest.raises(ValueError, match="peer 0: 5, peer 1: 7"):
        model(_batch(0)[0])


# ------------------------------------------------------------------------------------------------ container outputs
def test_hf_classifier_with_output_logits_matches_the_reference_and_exports_as_is():
    model, loss_fn = kdwrap.wrap(tiny_hf_vit(), method="dml", peers=2, output="logits")
    x, y = vit_batch()
    ref_peers = copy.deepcopy(model.peers)
    z = model(x)
    assert type(z) is torch.Tensor and z.shape == (4, 10)
    loss = loss_fn(z, y)
    loss.backward()
    ref = reference_loss([p(x).logits.double() for p in ref_peers], y, 1.0)
    assert abs(loss.item() - ref.item()) < 1e-6
    ref.backward()
    assert all(p.grad is not None for p in model.parameters())  # every peer learns
    for got, want in zip(_grads(model.peers), _grads(ref_peers), strict=True):
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)

    model.eval()
    deployed = kdwrap.export(model)
    assert type(deployed) is type(model.peers[0])
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, model(x))


_Outputs = namedtuple("_Outputs", ["logits", "aux_logits"])


class _AuxInTraining(TinyNet):
    """torchvision GoogLeNet's contract: a namedtuple with auxiliary logits in training, the logits in eval."""

    def forward(self, x):
        z = super().forward(x)
        return _Outputs(z, z.detach() * 0) if self.training else z


@pytest.mark.parametrize("output", ["logits", 0])
def test_a_namedtuple_output_is_named_by_field_or_index(output):
    model, loss_fn = kdwrap.dml(_AuxInTraining(), output=output)
    x, y = _batch(0)
    z = model(x)
    torch.testing.assert_close(z, model.peers[0](x).logits)
    loss_fn(z, y).backward()
    model.eval()
    torch.testing.assert_close(model(x), model.peers[0](x))


def test_a_container_output_without_output_is_an_error_naming_the_option():
    model, _ = kdwrap.dml(DictTinyNet())
    x = _batch(0)[0]
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(TypeError, match=r"peer 0 returned a dict with keys \['logits'\].*output='logits'"):
            model(x)
    model, _ = kdwrap.dml(DictTinyNet(), output="scores")
    with pytest.raises(TypeError, match="output='scores' does not name an element of the dict that peer 0"):
        model(x)
