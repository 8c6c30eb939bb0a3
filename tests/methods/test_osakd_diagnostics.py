"""OSAKD's soft-label diagnostics in ``loss_fn.parts``: how far the soft labels are from the hard ones, checked
against a brute-force count of each sample's neighbours."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap


def _brute_force_soft_labels(p: torch.Tensor, y: torch.Tensor, k: int, classes: int) -> torch.Tensor:
    """Each sample's k nearest other samples of the batch (Euclidean, in probability space), counted by class."""
    soft = torch.zeros(len(y), classes)
    for i in range(len(y)):
        d = [((p[i] - p[j]) ** 2).sum().item() if j != i else float("inf") for j in range(len(y))]
        for j in sorted(range(len(y)), key=d.__getitem__)[:k]:
            soft[i, y[j]] += 1.0 / k
    return soft


def test_true_class_mass_and_one_hot_share_equal_a_brute_force_count() -> None:
    torch.manual_seed(0)
    classes, k = 4, 3
    net = nn.Linear(6, classes)
    model, loss_fn = kdwrap.osakd(net, k=k, bank_size=0)
    # Two tight clusters per label half the time, so that some soft labels are one-hot and some are not.
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3])
    x = torch.randn(16, 6) * 0.3 + torch.nn.functional.one_hot(y % 2, 6).float() * 3
    loss_fn(model(x), y)
    with torch.no_grad():
        soft = _brute_force_soft_labels(net(x).softmax(1), y, k, classes)
    torch.testing.assert_close(loss_fn.soft_labels, soft)
    parts = loss_fn.parts
    true_mass = soft[torch.arange(16), y].mean()
    one_hot = (soft.max(1).values > 1 - 1e-6).float().mean()
    assert 0 < one_hot < 1 and 0 < true_mass < 1  # the batch has both kinds: the check below can fail
    torch.testing.assert_close(parts["soft_true_mass"], true_mass)
    torch.testing.assert_close(parts["soft_one_hot"], one_hot)
    assert parts["soft_true_mass"].dim() == 0 and not parts["soft_true_mass"].requires_grad


def test_eval_mode_reports_no_soft_label_diagnostics() -> None:
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 4), k=2, bank_size=0)
    loss_fn(model(torch.randn(5, 6)), torch.randint(0, 4, (5,)))
    assert "soft_true_mass" in loss_fn.parts
    model.eval()
    with torch.no_grad():  # validation: the training step's diagnostics do not linger
        loss_fn(model(torch.randn(5, 6)), torch.randint(0, 4, (5,)))
    assert "soft_true_mass" not in loss_fn.parts and "soft_one_hot" not in loss_fn.parts


@pytest.mark.parametrize("distill", ["mse", "kl"])
@pytest.mark.parametrize("alpha", [0.9, 0.1])
def test_the_distillation_gradient_ratio_equals_autograd_on_the_logits(distill, alpha) -> None:
    torch.manual_seed(1)
    net = nn.Linear(6, 4)
    model, loss_fn = kdwrap.osakd(net, k=3, bank_size=0, alpha=alpha, distill=distill)
    x, y = torch.randn(12, 6), torch.randint(0, 4, (12,))
    loss_fn(model(x), y)
    s = loss_fn.soft_labels
    z = net(x).detach().requires_grad_(True)
    ce = F.cross_entropy(z, y)
    d = F.mse_loss(z.softmax(1), s, reduction="sum") / 12 if distill == "mse" else \
        F.kl_div(F.log_softmax(z, 1), s, reduction="batchmean")
    (g_ce,) = torch.autograd.grad(alpha * ce, z)
    (g_d,) = torch.autograd.grad((1 - alpha) * d, z)
    torch.testing.assert_close(loss_fn.parts["distill_grad_ratio"], g_d.norm() / g_ce.norm())
