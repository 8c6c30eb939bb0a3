"""Comparing training methods over seeds: mean ± standard deviation, the paired difference to a baseline with its
95 % interval, and whether that difference is beyond noise.

Runs with the same seed share their initial weights and data order, so the difference to the baseline is taken
seed by seed (a paired comparison): ``d_s = method_s - baseline_s``, interval ``mean(d) ± t(0.975, n-1) * sd(d) /
sqrt(n)``. A difference is *beyond noise* when that interval excludes zero, *within noise* otherwise; with one seed
there is no interval and nothing can be called beyond noise.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["Spread", "Difference", "spread", "paired_difference", "t_975", "verdict", "plot_curves"]

def _central_mass(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with integer ``df`` degrees of freedom, in closed form (Abramowitz & Stegun
    26.7.3-4: a finite series in ``cos(theta)``, ``theta = atan(t / sqrt(df))``), exact to float rounding."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 3 terms after 1
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return s * total


def t_975(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (``t(0.975, df)``), found by
    bisection on the closed-form distribution to 1e-12: 12.7062 for 1, 2.7764 for 4, 1.9840 for 100."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}")
    if df > 1000:  # the series grows with df; Cornish-Fisher's expansion is exact to 1e-12 here
        z, v = 1.959963984540054, float(df)
        return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
                + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))
    low, high = 0.0, 1e3
    while high - low > 1e-12:
        mid = (low + high) / 2
        low, high = (mid, high) if _central_mass(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (``n - 1``) of one method's values over seeds."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"


@dataclass(frozen=True)
class Difference:
    """Paired difference ``method - baseline`` over seeds: mean, 95 % interval (``None`` with one seed)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def beyond_noise(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)  # type: ignore[operator]

    @property
    def verdict(self) -> str:
        return verdict(self)

    def __str__(self) -> str:
        if self.low is None:
            return f"{self.mean:+.2f} (1 seed: no interval)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of ``values``."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Spread(mean, std, n)


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> Difference:
    """``values - baseline`` seed by seed (same order), with the t-interval of its mean."""
    if len(values) != len(baseline) or not values:
        raise ValueError(f"paired comparison needs one value per seed on both sides, got {len(values)} and "
                         f"{len(baseline)}")
    d = spread([a - b for a, b in zip(values, baseline)])
    if d.n < 2:
        return Difference(d.mean, None, None, d.n)
    half = t_975(d.n - 1) * d.std / math.sqrt(d.n)
    return Difference(d.mean, d.mean - half, d.mean + half, d.n)


def verdict(diff: Difference) -> str:
    """``"gain beyond noise"``, ``"loss beyond noise"``, ``"within noise"``, or ``"no verdict (1 seed)"``: one seed
    gives no interval, so noise cannot be told from a difference."""
    if diff.low is None:
        return "no verdict (1 seed)"
    if not diff.beyond_noise:
        return "within noise"
    return "gain beyond noise" if diff.mean > 0 else "loss beyond noise"


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: str | Path, title: str,
                ylabel: str = "test accuracy (%)") -> bool:
    """Save a PNG of per-epoch curves: for each label, the mean over seeds and a min-max band (seeds cut to the
    shortest curve). Returns False, writing nothing, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, per_seed in curves.items():
        n = min(len(c) for c in per_seed)
        cols = list(zip(*(c[:n] for c in per_seed)))
        epochs = range(1, n + 1)
        ax.plot(epochs, [sum(c) / len(c) for c in cols], label=label, marker="o" if n < 5 else None)
        ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2)
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.set_title("\n".join(textwrap.fill(line, 110) for line in title.splitlines()), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
