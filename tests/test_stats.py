"""The t quantile behind every interval: the textbook values, without importing scipy.stats."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tuner.stats import t975


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423),
                                         (120, 1.9799)])
def test_t975_is_the_textbook_quantile(df: int, expected: float) -> None:
    assert t975(df) == pytest.approx(expected, abs=1e-4)


def test_the_quantile_does_not_import_scipy_stats() -> None:
    # scipy.stats costs about a second of every `tune report` that prints an interval.
    code = "import sys; from tuner.stats import t975; t975(3.5); print('scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
