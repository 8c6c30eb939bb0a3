"""kdwrap.demo.seed_statistics: the over-seeds statistics the demo and the accuracy benchmark report, checked against scipy."""
from __future__ import annotations

import math

import pytest

from kdwrap.demo.seed_statistics import paired_difference, plot_curves, spread, t_975, verdict


def test_t_quantile_equals_scipy_to_the_printed_digits_and_beyond() -> None:
    stats = pytest.importorskip("scipy.stats", reason="the check against scipy needs it: pip install scipy")
    for df in [*range(1, 61), 99, 100, 500, 1000, 1001, 5000, 10**6]:
        assert t_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-9), df
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_975(0)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_975(2.5)


def test_t_quantile_without_scipy_matches_the_printed_tables() -> None:
    # The usual 3-decimal table: every entry, rounded, as printed in statistics textbooks.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 20: 2.086, 30: 2.042, 120: 1.980}
    for df, printed in table.items():
        assert round(t_975(df), 3) == printed, df


def test_spread_is_mean_and_sample_std() -> None:
    s = spread([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert str(s) == "2.33 ± 1.53"
    assert spread([5.0]).std == 0.0 and str(spread([5.0])) == "5.00"
    with pytest.raises(ValueError):
        spread([])


def test_paired_interval_equals_scipy_paired_t_test() -> None:
    stats = pytest.importorskip("scipy.stats", reason="the check against scipy needs it: pip install scipy")
    a = [66.1, 65.2, 66.8, 65.9]
    b = [64.9, 64.7, 65.1, 65.3]
    d = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert d.mean == pytest.approx(sum(diffs) / 4)
    assert (d.low, d.high) == (pytest.approx(ci.low, abs=1e-3), pytest.approx(ci.high, abs=1e-3))
    assert d.beyond_noise and verdict(d) == "gain beyond noise"
    assert str(d).startswith("+1.00 [")


def test_verdicts() -> None:
    # A consistent loss is called a loss; a difference whose sign varies over seeds is noise.
    assert paired_difference([60.0, 61.0, 59.5], [61.0, 62.2, 60.4]).verdict == "loss beyond noise"
    assert paired_difference([60.0, 62.0, 59.0], [61.0, 60.0, 60.0]).verdict == "within noise"
    one = paired_difference([70.0], [60.0])
    assert one.low is None and not one.beyond_noise and one.verdict == "no verdict (1 seed)"
    assert "no interval" in str(one)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0])


def test_plot_curves_writes_a_png_of_unequal_runs(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra: pip install 'kdwrap[bench]'")
    path = tmp_path / "curves.png"
    # an unfinished seed (2 epochs of 3) is cut to the shortest curve rather than failing
    assert plot_curves({"plain": [[50.0, 60.0, 61.0], [51.0, 59.0]], "ONE": [[52.0, 62.0, 63.0]]}, path, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
