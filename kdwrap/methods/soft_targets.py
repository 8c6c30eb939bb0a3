"""Distillation towards temperature-softened targets, shared by the methods that use it (ONE, KD, DML, OKDDip, BYOT),
and the checks of its options."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["softened_kl", "check_temperature", "check_fraction", "check_ramp_options"]


def softened_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_b sum_c p_T(teacher)_c (log p_T(teacher)_c - log p_T(student)_c)`` with ``p_T = softmax(z / T)``.

    ``student`` and ``teacher`` are logits ``(..., B, C)`` that broadcast against each other; the result has their
    broadcast leading shape (a scalar for two ``B x C`` tensors). The teacher is used as given: detach it first
    where it must not learn. The ``T^2`` factor keeps the gradient's scale independent of ``T`` (Hinton et al.).
    """
    T = float(temperature)
    log_t = F.log_softmax(teacher / T, dim=-1)
    # From log-probabilities: a class whose teacher probability underflows to 0 contributes 0, never 0 * inf.
    kl = (log_t.exp() * (log_t - F.log_softmax(student / T, dim=-1))).sum(-1).mean(-1)
    return (T * T) * kl


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
