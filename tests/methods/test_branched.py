"""kdwrap.methods.branched: the trunk/branches layout ONE and OKDDip share, through ``kdwrap.one`` / ``kdwrap.okddip``
on TinyNet. Branch 0 holds the network's own tensors; each branch's logits equal the network run by hand with the
trunk's and that branch's weights; gradients of one branch reach only the trunk and that branch; export returns the
user's class, equal to the wrapper in eval mode; and the option and checkpoint checks."""
import pytest
import torch
import torch.nn.functional as F

import kdwrap
from conftest import TinyNet
from kdwrap.methods.branched import BranchedModel


def one(net, **options):
    """``kdwrap.one`` with the branches run one after the other (no fusion check: the CPU runs them so anyway)."""
    return kdwrap.one(net, execution="sequential", **options)


def branch_logits(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every branch's logits on ``x``, through the wrapper's own pieces: trunk, then each branch."""
    f = model.trunk(x)
    return [branch(f) for branch in model.branches]


def by_hand(model, branch: int) -> TinyNet:
    """Reference: a fresh TinyNet given the trunk's and branch ``branch``'s weights (their keys are TinyNet's), in
    the wrapper's mode."""
    net = TinyNet()
    net.load_state_dict({**model.trunk.state_dict(), **model.branches[branch].state_dict()})
    return net.train(model.training)


def test_the_layout_trunk_and_branches():
    net = TinyNet()
    model, _ = one(net, branches=3)
    assert isinstance(model, BranchedModel)
    assert model.split == "stage2" and model.num_branches == 3 == len(model.branches)
    assert {name for name, _ in model.named_children()} >= {"trunk", "branches"}
    # the trunk holds stem and stage1; every branch holds stage2 and fc, keyed as the network keys them
    assert {k.split(".")[0] for k in model.trunk.state_dict()} == {"stem", "stage1"}
    for branch in model.branches:
        assert {k.split(".")[0] for k in branch.state_dict()} == {"stage2", "fc"}
    # branch 0 and the trunk are the network's own tensors; the other branches their own
    own = dict(model.branches[0].named_parameters())
    assert own["stage2.0.weight"] is net.stage2[0].weight and own["fc.weight"] is net.fc.weight
    assert dict(model.trunk.named_parameters())["stem.0.weight"] is net.stem[0].weight
    other = dict(model.branches[1].named_parameters())
    assert other["fc.weight"] is not net.fc.weight
    assert other["fc.weight"].data_ptr() != net.fc.weight.data_ptr()


@pytest.mark.parametrize("training", [True, False])
def test_each_branch_computes_the_network_with_its_own_tail(training):
    model, _ = one(TinyNet(), branches=3)
    model.train(training)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        got = branch_logits(model, x)
        for i in range(3):
            assert torch.allclose(got[i], by_hand(model, i)(x), atol=1e-6)
        assert not torch.allclose(got[0], got[1])  # re-initialised branches compute something else
        if training:
            all_logits, gate = model.forward_all(x)
            for i in range(3):
                assert torch.allclose(all_logits[i], got[i], atol=1e-6)
            assert gate.shape == (4, 3)


def test_the_forward_returns_the_kept_branch():
    model, loss_fn = one(TinyNet(), branches=3, branch=2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model(x), by_hand(model, 2).eval()(x), atol=1e-6)
        loss_fn(model(x), y)  # consume the eval capture
    model.train()
    assert torch.allclose(model(x), by_hand(model, 2)(x), atol=1e-6)
    loss_fn(model(x), y)


def test_gradients_of_one_branch_reach_the_trunk_and_that_branch_only():
    model, _ = one(TinyNet(), branches=3)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    F.cross_entropy(branch_logits(model, x)[1], y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.branches[1].parameters())
    for i in (0, 2):
        assert all(p.grad is None for p in model.branches[i].parameters())


def test_export_is_the_users_class_equal_to_the_wrapper_in_eval_mode():
    net = TinyNet()
    model, _ = one(net, branches=3)
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    exported = kdwrap.export(model)
    assert type(exported) is TinyNet and not exported.training
    assert exported.state_dict().keys() == net.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))
        other = model.export(branch=1)
        assert torch.allclose(other(x), by_hand(model, 1).eval()(x), atol=1e-6)
    model.train()
    assert kdwrap.export(model).training  # in the wrapper's mode


def test_options_are_checked():
    with pytest.raises(ValueError, match="branches >= 2"):
        one(TinyNet(), branches=1)
    with pytest.raises(ValueError, match="branches >= 2"):
        one(TinyNet(), branches=True)
    model, _ = one(TinyNet(), branches=3)
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match=r"branch must be an int in \[0, 3\)"):
            model.export(branch=bad)


def test_the_first_input_size_is_kept():
    model, loss_fn = one(TinyNet())
    assert model.first_input_size is None
    x = torch.randn(2, 3, 12, 20)
    loss_fn(model(x), torch.zeros(2, dtype=torch.long))
    model(torch.randn(2, 3, 16, 16))
    assert model.first_input_size == (3, 12, 20)  # the first batch's, not a later one's


def test_a_checkpoint_of_another_configuration_is_refused_by_name():
    model, _ = one(TinyNet(), branches=3)
    four, _ = one(TinyNet(), branches=4)
    with pytest.raises(ValueError, match=r"with \{'branches': 4, 'split': 'stage2'\}.*branches=4, split='stage2'"):
        model.load_state_dict(four.state_dict())
    elsewhere, _ = one(TinyNet(), branches=3, split="stage1")
    with pytest.raises(ValueError, match=r"'split': 'stage1'"):
        model.load_state_dict(elsewhere.state_dict())
    same, _ = one(TinyNet(), branches=3)
    model.load_state_dict(same.state_dict())  # the same configuration loads
    for a, b in zip(model.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)


def test_okddip_shares_the_layout():
    model, _ = kdwrap.okddip(TinyNet(), execution="sequential")
    assert isinstance(model, BranchedModel)
    assert model.split == "stage2" and model.num_branches == 4  # OKDDip's default: 3 peers and a leader
