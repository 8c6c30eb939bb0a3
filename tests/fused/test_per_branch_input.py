"""fuse_branches with per-branch inputs (each branch on its own input, given concatenated along axis 1) and tails
that return a tuple (the logits and the classifier's input): the same values and gradients as calling each branch
on its own input."""
import copy

import pytest
import torch

import kdwrap
from kdwrap import FusionError
from kdwrap.fused import fuse_branches
from kdwrap.graph import with_classifier_input
from fused_reference import ResLike, perturb_branches


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_features", [False, True])
def test_each_branch_on_its_own_input_equals_the_branches_called_one_by_one(training, with_features):
    model, _ = kdwrap.one(ResLike(), branches=3, execution="sequential")
    perturb_branches(model)
    branches = torch.nn.ModuleList(
        with_classifier_input(b, "head.4") if with_features else b for b in model.branches).train(training)
    ref = copy.deepcopy(branches).train(training)
    fused = fuse_branches(branches, training, per_branch_input=True)
    with torch.no_grad():
        fs = [model.trunk(torch.randn(4, 3, 16, 16)) for _ in range(3)]
    mine = [f.clone().requires_grad_() for f in fs]
    theirs = [f.clone().requires_grad_() for f in fs]
    outs = fused(fused.inputs(mine))
    refs = [b(f) for b, f in zip(ref, theirs)]
    flat = [t for o in outs for t in (o if with_features else (o,))]
    flat_ref = [t for r in refs for t in (r if with_features else (r,))]
    assert len(outs) == len(refs) == 3 and len(flat) == len(flat_ref) == 3 * (1 + with_features)
    assert all(isinstance(o, tuple) == with_features for o in outs)
    for o, r in zip(flat, flat_ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
    grads = [torch.randn_like(r) for r in flat_ref]
    torch.autograd.backward(flat, grads)
    torch.autograd.backward(flat_ref, grads)
    for a, b in zip(mine, theirs, strict=True):  # each input's gradient comes from its own branch alone
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    named = dict(branches.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(named[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(branches.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    fused.check(fused.inputs(fs))


def test_the_inputs_must_be_one_tensor_per_branch():
    model, _ = kdwrap.one(ResLike(), branches=3, execution="sequential")
    fused = fuse_branches(model.branches, True, per_branch_input=True)
    f = torch.randn(2, 16, 8, 8)
    with pytest.raises(ValueError, match="3 branches need 3 inputs, got 2"):
        fused.inputs([f, f])
    with pytest.raises(FusionError, match="at least 2 axes"):
        fused.inputs([f, f, torch.randn(2)])
