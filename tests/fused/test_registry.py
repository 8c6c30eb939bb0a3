"""The fusion-rule registries: a rule for one's own module gives fused execution; lookups follow the rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import kdwrap
from kdwrap.fused import FusionError, fuse_branches, register_module_rule
from kdwrap.fused.modules import MODULE_RULES, find_module_rule
from kdwrap.fused.ops import OP_RULES, op_name
from fused_reference import assert_fused_equals_sequential, perturb_branches


class ScaledSwish(nn.Module):
    """A user's own activation, kept whole by the tracer (a leaf module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.5 * x)


class HalfPool(nn.Module):
    """A user's own pooling, a leaf module too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2)


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), ScaledSwish())
        self.tail = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), ScaledSwish(), HalfPool(),
                                  nn.Conv2d(16, 16, 3, padding=1), ScaledSwish())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tail(self.stem(x)).mean((2, 3)))


@pytest.fixture
def user_rules():
    """Registers nothing itself; removes what a test registered."""
    find_module_rule(nn.Identity())  # kdwrap's own rules are registered at the first lookup
    before = dict(MODULE_RULES)
    yield
    MODULE_RULES.clear()
    MODULE_RULES.update(before)


def _user_model() -> nn.Module:
    model, _ = kdwrap.one(UserNet(), branches=3, split="tail", leaf_modules=(ScaledSwish, HalfPool))
    perturb_branches(model)
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_registered_rules_fuse_a_users_own_modules(user_rules, training: bool) -> None:
    model = _user_model()
    with pytest.raises(FusionError, match=r"ScaledSwish has no fusion rule.*register_module_rule"):
        fuse_branches(model.branches, training)
    register_module_rule(ScaledSwish, "elementwise")
    with pytest.raises(FusionError, match="HalfPool has no fusion rule"):
        fuse_branches(model.branches, training)
    register_module_rule(HalfPool, "per_channel")
    assert_fused_equals_sequential(model, torch.randn(4, 3, 16, 16), training)


def test_execution_fused_uses_the_registered_rule(user_rules) -> None:
    register_module_rule(ScaledSwish, "elementwise")
    register_module_rule(HalfPool, "per_channel")
    model, loss_fn = kdwrap.one(UserNet(), branches=3, split="tail", leaf_modules=(ScaledSwish, HalfPool),
                                execution="fused")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    loss_fn(model(x), y).backward()
    assert "fused" in kdwrap.summary(model)
    assert all(p.grad is not None for p in model.branches[2].parameters())


def test_lookup_follows_the_class_hierarchy_while_forward_is_kept(user_rules) -> None:
    class QuietReLU(nn.ReLU):  # keeps ReLU's forward: ReLU's rule
        def extra_repr(self) -> str:
            return ""

    class DoubledReLU(nn.ReLU):  # computes something else: no rule
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    assert find_module_rule(QuietReLU()) is find_module_rule(nn.ReLU())
    assert find_module_rule(DoubledReLU()) is None
    assert find_module_rule(nn.BatchNorm2d(4)).per_branch_params
    register_module_rule(DoubledReLU, "elementwise")
    assert find_module_rule(DoubledReLU()) is not None


def test_registration_errors_name_the_problem(user_rules) -> None:
    with pytest.raises(ValueError, match="already has a fusion rule; pass replace=True"):
        register_module_rule(nn.ReLU, "elementwise")
    register_module_rule(nn.ReLU, "elementwise", replace=True)
    with pytest.raises(ValueError, match="unknown rule kind 'pointwise'; valid kinds: elementwise, per_channel"):
        register_module_rule(ScaledSwish, "pointwise")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_module_rule(int, "elementwise")


def test_function_and_method_forms_of_an_op_share_one_rule() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        a = torch.flatten(x, 1) + x.flatten(1)
        return torch.relu(a) * a.relu() + F.relu(a)

    nodes = {n.name: n for n in fx.symbolic_trace(f).graph.nodes}
    assert op_name(nodes["flatten"]) == op_name(nodes["flatten_1"]) == "flatten"
    assert op_name(nodes["relu"]) == op_name(nodes["relu_1"]) == op_name(nodes["relu_2"]) == "relu"
    assert OP_RULES["relu"] is OP_RULES["add"]  # elementwise ops share one rule
    assert op_name(nodes["x"]) is None
