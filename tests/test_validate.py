from __future__ import annotations

import math

import pytest

from tuner.roofline import Roofline, cpu_bandwidth_gbs
from tuner.validate import mean_ci95, t975


def test_mean_ci95_hand_computed() -> None:
    m, sd, lo, hi = mean_ci95([10.0, 12.0, 14.0])
    assert m == 12.0 and sd == 2.0
    half = t975(2) * 2.0 / math.sqrt(3)
    assert lo == pytest.approx(12.0 - half) and hi == pytest.approx(12.0 + half)
    assert lo == pytest.approx(12.0 - 4.303 * 2.0 / math.sqrt(3), abs=1e-3)


def test_t975_matches_the_printed_table() -> None:
    # Two-sided 95% quantiles as printed in t tables (3 decimals); large df approach 1.96.
    for df, printed in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (100, 1.984)):
        assert t975(df) == pytest.approx(printed, abs=5e-4)
    assert t975(10_000) == pytest.approx(1.96, abs=1e-3)


def test_roofline_share() -> None:
    r = Roofline("CPU", 20.0, "test", 250_000_000, 80.0, 40.0)
    assert r.share == 0.5 and "50%" in r.describe()


def test_cpu_bandwidth_is_plausible() -> None:
    assert 0.5 < cpu_bandwidth_gbs(size_mib=32, repeats=2) < 2000
