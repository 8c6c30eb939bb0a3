"""kdwrap.methods.losses: the shared loss terms against hand-written formulas on random tensors (the softened KL
with its T^2 factor, cross-entropy of several rows at once, ONE's sigmoid ramp-up), where their gradients go, the
checks of their options, and RampedLoss's ramp clock under gradient accumulation."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdwrap.base import KDModel
from kdwrap.methods.losses import (
    RampedLoss, check_fraction, check_ramp_options, check_temperature, cross_entropy_rows, ramp_weight, softened_kl,
)


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton's term for two B x C tensors: T^2 * KL(p_T(teacher) || p_T(student)), summed over classes, averaged
    over the batch, written with softmax and log directly."""
    p = torch.softmax(teacher / T, dim=1)
    q = torch.softmax(student / T, dim=1)
    per_sample = (p * (torch.log(p) - torch.log(q))).sum(dim=1)
    return T * T * per_sample.mean()


class Toy(KDModel):
    method = "toy"


@pytest.mark.parametrize("T", [1.0, 3.0, 4.0])
def test_softened_kl_is_t_squared_times_the_kl_of_softened_targets(T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    got = softened_kl(s, t, T)
    assert got.shape == ()
    assert torch.allclose(got, kl_by_hand(s, t, T))
    # torch's own KL divergence, "batchmean", agrees too
    ref = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
    assert torch.allclose(got, T * T * ref)


def test_softened_kl_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(4, 7)
    assert softened_kl(z, z.clone(), 3.0).abs() < 1e-6
    assert softened_kl(z, z + 5.0, 3.0).abs() < 1e-6  # softmax ignores a shift of all classes
    assert softened_kl(torch.randn(4, 7), z, 3.0) > 0


def test_softened_kl_broadcasts_over_leading_axes():
    g = torch.Generator().manual_seed(2)
    students = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)  # 3 branches x B x C
    teacher = torch.randn(4, 6, generator=g, dtype=torch.float64)
    got = softened_kl(students, teacher, 2.0)
    assert got.shape == (3,)
    for i in range(3):
        assert torch.allclose(got[i], kl_by_hand(students[i], teacher, 2.0))


def test_softened_kl_gradient_reaches_the_student_only_when_the_teacher_is_detached():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    softened_kl(student, teacher.detach(), 3.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # the gradient by hand: d/dz_s of T^2 KL = T * (q - p) / B
    p, q = torch.softmax(teacher.detach() / 3.0, 1), torch.softmax(student.detach() / 3.0, 1)
    assert torch.allclose(student.grad, 3.0 * (q - p) / 4, atol=1e-6)
    # not detached: the teacher is used as given, and learns too
    softened_kl(student, teacher, 3.0).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


def test_softened_kl_is_finite_where_a_teacher_probability_underflows():
    student = torch.zeros(2, 3)
    teacher = torch.tensor([[0.0, 0.0, -1e4], [50.0, 0.0, -1e4]])  # p_T underflows to exactly 0 for the last class
    got = softened_kl(student, teacher, 1.0)
    assert torch.isfinite(got)
    p = torch.softmax(teacher, 1)
    kept = p > 0  # 0 * log 0 counts as 0
    by_hand = (p[kept] * (torch.log(p[kept]) - torch.log(torch.full_like(p[kept], 1 / 3)))).sum() / 2
    assert torch.allclose(got, by_hand, atol=1e-6)


def test_softened_kl_unscaled_and_as_a_cross_entropy():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    T = 4.0
    assert torch.allclose(softened_kl(s, t, T, scaled=False), kl_by_hand(s, t, T) / (T * T))
    p, q = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    soft_ce = -(p * torch.log(q)).sum(1).mean()
    assert torch.allclose(softened_kl(s, t, T, cross_entropy=True), T * T * soft_ce)
    entropy = -(p * torch.log(p)).sum(1).mean()
    assert torch.allclose(softened_kl(s, t, T, cross_entropy=True) - softened_kl(s, t, T), T * T * entropy)


def test_cross_entropy_rows_with_class_labels_and_soft_targets():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 5, 4, generator=g)  # 3 rows of B=5 x C=4 logits
    y = torch.randint(0, 4, (5,), generator=g)
    got = cross_entropy_rows(z.log_softmax(-1), y)
    assert got.shape == (3,)
    assert torch.allclose(got, torch.stack([F.cross_entropy(z[i], y) for i in range(3)]))
    soft = torch.softmax(torch.randn(5, 4, generator=g), 1)
    got = cross_entropy_rows(z.log_softmax(-1), soft)
    assert torch.allclose(got, torch.stack([F.cross_entropy(z[i], soft) for i in range(3)]))


def test_ramp_weight_is_the_sigmoid_ramp():
    R = 80
    for t in (0, 1, 20, 40, 79):
        assert ramp_weight(t, R) == pytest.approx(math.exp(-5 * (1 - t / R) ** 2))
    assert ramp_weight(0, R) == pytest.approx(math.exp(-5))
    assert ramp_weight(R, R) == 1.0 and ramp_weight(10 * R, R) == 1.0  # full weight from R on
    assert ramp_weight(0, 0) == 1.0  # no ramp
    weights = [ramp_weight(t, R) for t in range(R + 1)]
    assert weights == sorted(weights)  # it only rises


def test_ramped_loss_counts_optimizer_steps_under_accumulation():
    loss = RampedLoss(Toy(), temperature=2, rampup_steps=10, accumulation_steps=4)
    assert loss.temperature == 2.0 and isinstance(loss.temperature, float)
    assert loss.ramp() == pytest.approx(math.exp(-5))
    loss.step = 7  # 7 loss calls = optimizer step 1
    assert loss.ramp() == pytest.approx(math.exp(-5 * (1 - 1 / 10) ** 2))
    loss.step = 40
    assert loss.ramp() == 1.0
    assert RampedLoss(Toy()).ramp() == 1.0  # rampup_steps=0 by default
    state = loss.state_dict()
    restored = RampedLoss(Toy(), temperature=2, rampup_steps=10, accumulation_steps=4)
    restored.load_state_dict(state)
    assert restored.step == 40 and restored.ramp() == 1.0


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
    (True, TypeError), ("3", TypeError), (None, TypeError),
])
def test_check_temperature_refuses(value, error):
    with pytest.raises(error, match="kdwrap toy: temperature"):
        check_temperature("toy", value)


def test_check_temperature_and_fraction_accept():
    assert check_temperature("toy", 3) == 3.0 and isinstance(check_temperature("toy", 3), float)
    assert check_temperature("toy", 0.5) == 0.5
    assert check_fraction("toy", "alpha", 0, "w") == 0.0
    assert check_fraction("toy", "alpha", 1, "w") == 1.0
    assert check_fraction("toy", "alpha", 0.25, "w") == 0.25


@pytest.mark.parametrize("value, error", [(1.5, ValueError), (-0.1, ValueError), (True, TypeError), ("a", TypeError)])
def test_check_fraction_refuses_and_says_what_it_weighs(value, error):
    with pytest.raises(error, match="alpha"):
        check_fraction("toy", "alpha", value, "the weight of cross-entropy")
    if error is ValueError:
        with pytest.raises(ValueError, match="the weight of cross-entropy"):
            check_fraction("toy", "alpha", value, "the weight of cross-entropy")


def test_check_ramp_options():
    assert check_ramp_options("toy", 0, 1) == (0, 1)
    assert check_ramp_options("toy", 100, 8) == (100, 8)
    for rampup, accumulation, name in [(-1, 1, "rampup_steps"), (1.5, 1, "rampup_steps"), (True, 1, "rampup_steps"),
                                       (0, 0, "accumulation_steps"), (0, 2.0, "accumulation_steps"),
                                       (0, False, "accumulation_steps")]:
        with pytest.raises(ValueError, match=name):
            check_ramp_options("toy", rampup, accumulation)
    with pytest.raises(ValueError, match="temperature"):
        RampedLoss(Toy(), temperature=0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        RampedLoss(Toy(), accumulation_steps=0)
