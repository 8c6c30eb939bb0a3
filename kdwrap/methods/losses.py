"""The loss terms several methods share: distillation towards temperature-softened targets (ONE, KD, DML, OKDDip,
BYOT) and the checks of its options, cross-entropy of several rows of logits at once, and ONE's sigmoid ramp-up of
the distillation weight (ONE, OKDDip)."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F

from ..base import KDLoss, KDModel

__all__ = ["softened_kl", "check_temperature", "check_fraction", "check_ramp_options", "cross_entropy_rows",
           "ramp_weight", "RampedLoss"]


def softened_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, *, scaled: bool = True,
    cross_entropy: bool = False,
) -> torch.Tensor:
    """``T^2 * mean_b sum_c p_T(teacher)_c (log p_T(teacher)_c - log p_T(student)_c)`` with ``p_T = softmax(z / T)``.

    ``student`` and ``teacher`` are logits ``(..., B, C)`` that broadcast against each other; the result has their
    broadcast leading shape (a scalar for two ``B x C`` tensors). The teacher is used as given: detach it first
    where it must not learn. The ``T^2`` factor keeps the gradient's scale independent of ``T`` (Hinton et al.).

    ``scaled=False`` leaves the ``T^2`` factor out (ONE applies it with its ramp weight and logs the KL without it).
    ``cross_entropy=True`` leaves the teacher's entropy out: ``-T^2 mean_b sum_c p_T(teacher)_c log p_T(student)_c``,
    the soft cross-entropy BYOT's reference minimises and logs (the same gradients, a larger value).
    """
    T = float(temperature)
    log_t = F.log_softmax(teacher / T, dim=-1)
    log_s = F.log_softmax(student / T, dim=-1)
    # From log-probabilities: a class whose teacher probability underflows to 0 contributes 0, never 0 * inf.
    kl = (log_t.exp() * (-log_s if cross_entropy else log_t - log_s)).sum(-1).mean(-1)
    return (T * T) * kl if scaled else kl


def check_temperature(method: str, value: Any) -> float:
    """``value`` as a float if it is a finite temperature > 0, else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"kdwrap {method}: temperature must be a float > 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"kdwrap {method}: temperature={value} is invalid; it divides the logits before the softmax, so it must "
            "be a finite number > 0 (1 leaves them as they are; larger values soften the targets)"
        )
    return float(value)


def check_fraction(method: str, name: str, value: Any, meaning: str) -> float:
    """``value`` as a float if it lies in ``[0, 1]``, else a clear error saying what it weighs (``meaning``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"kdwrap {method}: {name} must be a float in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"kdwrap {method}: {name}={value} is outside [0, 1]; {meaning}")
    return float(value)


def check_ramp_options(method: str, rampup_steps: Any, accumulation_steps: Any) -> tuple[int, int]:
    """``(rampup_steps, accumulation_steps)`` of a ramped-up distillation weight (ONE, OKDDip), checked."""
    if isinstance(rampup_steps, bool) or not isinstance(rampup_steps, numbers.Integral) or rampup_steps < 0:
        raise ValueError(f"kdwrap {method}: rampup_steps must be an int >= 0 (0: no ramp-up), got {rampup_steps!r}")
    if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral)
            or accumulation_steps < 1):
        raise ValueError(f"kdwrap {method}: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
    return int(rampup_steps), int(accumulation_steps)


def cross_entropy_rows(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each of the ``n`` rows of ``logp`` (n x B x C log-probabilities) with the same targets: int
    classes (B,) or probabilities (B, C); averaged over the batch, like ``F.cross_entropy``. Returns (n,)."""
    if target.is_floating_point():
        return -(logp * target).sum(-1).mean(-1)
    return -logp.gather(-1, target.expand(logp.shape[0], -1).unsqueeze(-1)).mean((1, 2))


def ramp_weight(step: int, rampup_steps: int) -> float:
    """ONE's sigmoid ramp-up ``exp(-5 (1 - min(t, R) / R)^2)``; 1 when ``rampup_steps`` is 0."""
    if rampup_steps <= 0:
        return 1.0
    t = min(step, rampup_steps) / rampup_steps
    return math.exp(-5.0 * (1.0 - t) ** 2)


class RampedLoss(KDLoss):
    """A loss whose distillation term at temperature ``T`` is weighted by ONE's sigmoid ramp-up (ONE, OKDDip).

    Args:
        temperature: ``T`` of the distillation term.
        rampup_steps: optimizer steps of the sigmoid ramp-up of its weight (0: full weight from the start).
        accumulation_steps: loss calls per optimizer step under gradient accumulation (the ramp clock counts
            optimizer steps).
        check_finite: stop with a ``FloatingPointError`` naming the step at the first NaN/Inf in the logits (one
            host sync per step).
    """

    def __init__(
        self,
        model: KDModel,
        *,
        temperature: float = 3.0,
        rampup_steps: int = 0,
        accumulation_steps: int = 1,
        check_finite: bool = False,
    ) -> None:
        super().__init__(model, check_finite)
        self.temperature = check_temperature(model.method, temperature)
        self.rampup_steps, self.accumulation_steps = check_ramp_options(
            model.method, rampup_steps, accumulation_steps)
        # self.step (KDLoss) counts training-mode calls; the ramp clock is step // accumulation_steps

    def ramp(self) -> float:
        """The distillation weight at this step."""
        return ramp_weight(self.step // self.accumulation_steps, self.rampup_steps)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(), "temperature": self.temperature, "rampup_steps": self.rampup_steps,
            "accumulation_steps": self.accumulation_steps,
        }

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, rampup_steps={self.rampup_steps}, step={self.step}"
