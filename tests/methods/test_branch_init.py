"""kdwrap.methods.branch_init: what ``reinitialise_like`` does to copies of a piece of a model (ONE's branches 1..m-1),
checked on their weights directly: fresh values of every module's ``reset_parameters`` (inside PyTorch's default
bounds), or the model's own argument-free initialiser where it has one; every copy its own draw; the model itself
untouched; and via ``kdwrap.one``, re-initialised branches against copies (``reinit_branches=False``)."""
import copy

import pytest
import torch
from torch import nn

import kdwrap
from conftest import TinyNet
from kdwrap.methods.branch_init import MODEL_INITIALISERS, reinitialise_like


def one(net, **options):
    """``kdwrap.one`` with the branches run one after the other (no fusion check: the CPU runs them so anyway)."""
    return kdwrap.one(net, execution="sequential", **options)


def fill(net: nn.Module, value: float) -> None:
    """Every parameter and BatchNorm running statistic set to ``value``: no initialisation produces that."""
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(value)
                m.running_var.fill_(value)


def default_bound(module: nn.Module) -> float:
    """PyTorch's default init of Conv/Linear weights and biases: uniform within 1 / sqrt(fan_in) (kaiming_uniform
    with a = sqrt(5) gives the same bound for the weights)."""
    fan_in = module.weight[0].numel()
    return 1 / fan_in ** 0.5


class SelfInitNet(TinyNet):
    """A model with its own initialiser (timm's ``init_weights``): every Linear weight 0.25, bias 0."""

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.constant_(m.weight, 0.25)
                nn.init.zeros_(m.bias)


class PerModuleInitNet(TinyNet):
    """timm's per-module ``_init_weights(m)`` takes an argument: it is not a whole-model initialiser."""

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.weight, 0.25)


class Holder(nn.Module):
    """A piece of TinyNet keyed as TinyNet is (``fc.weight``), like ONE's tail."""

    def __init__(self, net: TinyNet):
        super().__init__()
        self.fc = copy.deepcopy(net.fc)


def test_the_initialisers_tried_are_timms_and_kdwraps():
    assert MODEL_INITIALISERS == ("init_weights", "_init_weights")


def test_copies_get_fresh_default_values_and_the_model_is_untouched():
    net = TinyNet()
    fill(net, 5.0)
    tails = [copy.deepcopy(net) for _ in range(2)]
    reinitialise_like(net, tails)
    assert all(bool((p == 5.0).all()) for p in net.parameters())  # the model keeps its values
    for tail in tails:
        for layer in (tail.stem[0], tail.stage1[0], tail.stage2[0], tail.fc):
            bound = default_bound(layer)
            assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
            assert layer.weight.std() > bound / 4  # spread over the range, not a constant
        for bn in (tail.stem[1], tail.stage1[1], tail.stage2[1]):  # BatchNorm's reset: 1, 0, statistics 0 and 1
            assert bool((bn.weight == 1).all() and (bn.bias == 0).all())
            assert bool((bn.running_mean == 0).all() and (bn.running_var == 1).all())
    # each copy has its own draw
    assert not torch.equal(tails[0].fc.weight, tails[1].fc.weight)
    assert not torch.equal(tails[0].stage2[0].weight, tails[1].stage2[0].weight)


def test_a_model_with_its_own_initialiser_gives_its_values():
    net = SelfInitNet()
    fill(net, 5.0)
    tails = [copy.deepcopy(net), Holder(net)]  # the whole model's keys, and a piece of them
    reinitialise_like(net, tails)
    for tail in tails:
        assert bool((tail.fc.weight == 0.25).all()) and bool((tail.fc.bias == 0).all())
    assert bool((net.fc.weight == 5.0).all())
    conv = tails[0].stem[0].weight  # what init_weights leaves alone still gets reset_parameters
    assert conv.abs().max() <= default_bound(tails[0].stem[0])


def test_an_initialiser_that_takes_an_argument_is_not_called():
    net = PerModuleInitNet()
    fill(net, 5.0)
    tail = copy.deepcopy(net)
    reinitialise_like(net, [tail])
    assert not bool((tail.fc.weight == 0.25).all())  # _init_weights(m) was not used
    assert tail.fc.weight.abs().max() <= default_bound(tail.fc)


def test_a_piece_keyed_unlike_the_model_is_reset_module_by_module():
    net = TinyNet()

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 5)  # "head.weight" is no key of TinyNet

    tail = Other()
    fill(tail, 7.0)
    reinitialise_like(net, [tail])
    assert tail.head.weight.abs().max() <= default_bound(tail.head)


@pytest.mark.parametrize("reinit", [True, False])
def test_one_branches_are_reinitialised_or_copied(reinit):
    torch.manual_seed(0)
    net = TinyNet()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    model, _ = one(net, branches=3, reinit_branches=reinit)
    branch0, *others = [b.state_dict() for b in model.branches]
    for key, value in branch0.items():
        assert torch.equal(value, original[key])  # branch 0 is the net's own tail
    for other in others:
        assert other.keys() == branch0.keys()
        for key in ("stage2.0.weight", "fc.weight"):
            assert torch.equal(other[key], branch0[key]) is (not reinit)
        for key in ("stage2.1.weight", "stage2.1.running_var"):  # BatchNorm starts at 1 either way
            assert torch.equal(other[key], branch0[key])
    if reinit:
        assert not torch.equal(others[0]["fc.weight"], others[1]["fc.weight"])
    # the trunk is shared, never re-initialised
    for key, value in model.trunk.state_dict().items():
        assert torch.equal(value, original[key])
