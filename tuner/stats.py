"""The interval maths, in one place: every 95% interval the tuner prints or decides on.

Rates and latencies are positive and their noise multiplies, so intervals are Student t
intervals on the log scale: the centre is the geometric mean and the bounds,
``exp(mean(log x) +- t * sd(log x) / sqrt(n))``, stay above 0 however noisy a small sample is
(a t-interval on the raw values once printed "-35.02 .. 76.85 tok/s"; clamping it at 0 only
hid that). Two independent samples are compared by the ratio of their geometric means, with a
Welch interval on the difference of their mean logs (:func:`log_ratio_ci95`).

Light on purpose (``tune --help`` and ``tune show`` import it): scipy loads only inside
:func:`t975`.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def t975(df: float) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom (Welch's may be fractional)."""
    # scipy.special's inverse t CDF is scipy.stats' t.ppf at a third of the import time (~0.3 s
    # against ~1 s), imported here because only the intervals need it.
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.975))


def t_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its 95% Student t interval; one value is
    its own interval. Raises ValueError when there is no value."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, m, m
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def _rates(values: Sequence[float]) -> None:
    if not values or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"a log-scale interval needs positive values (got {list(values)})")


def log_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """The geometric mean of positive ``values`` and its 95% interval (t on the log scale).

    Raises ValueError when there is no value or one is not positive (not a rate).
    """
    _rates(values)
    centre, low, high = t_ci95([math.log(v) for v in values])
    return math.exp(centre), math.exp(low), math.exp(high)


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float, float]:
    """A rate's centre, spread and 95% interval: the geometric mean, the sd of the values and
    :func:`log_ci95`'s interval, which lies within (0, inf) by construction."""
    g, lo, hi = log_ci95(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return g, sd, lo, hi


def welch_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) with its 95% Welch t interval (on log values: the log of a ratio).

    Welch, not a pooled t, because the two sides are independent samples of different sizes and
    spreads: ``d +- t(0.975, df) * sqrt(s1^2/n1 + s2^2/n2)`` with the Welch-Satterthwaite ``df``.
    A side with one value adds no variance; with no spread on either side the interval is the
    point. Raises ValueError when a side is empty.
    """
    diff = statistics.fmean(a) - statistics.fmean(b)
    va = statistics.variance(a) / len(a) if len(a) > 1 else 0.0
    vb = statistics.variance(b) / len(b) if len(b) > 1 else 0.0
    se2 = va + vb
    denom = (va ** 2 / (len(a) - 1) if len(a) > 1 else 0.0) + (vb ** 2 / (len(b) - 1) if len(b) > 1 else 0.0)
    if se2 <= 0 or denom <= 0:
        # No spread on either side (a deterministic server): the interval is the point.
        return diff, diff, diff
    half = t975(se2 ** 2 / denom) * math.sqrt(se2)
    return diff, diff - half, diff + half


def log_ratio_ci95(now: Sequence[float], stored: Sequence[float]) -> tuple[float, float, float]:
    """The ratio of geometric means now / stored and its 95% interval (Welch, log scale).

    A side with one value adds no spread. Raises ValueError when a side is empty or not a rate.
    """
    for side in (now, stored):
        _rates(side)
    d, low, high = welch_ci95([math.log(v) for v in now], [math.log(v) for v in stored])
    return math.exp(d), math.exp(low), math.exp(high)


def overlaps(a: Sequence[float | None], b: Sequence[float | None]) -> bool:
    """Whether two intervals (low, high) share a point; a missing bound counts as overlapping
    (no interval is shown, so nothing is claimed apart)."""
    a_lo, a_hi, b_lo, b_hi = a[0], a[1], b[0], b[1]
    if a_lo is None or a_hi is None or b_lo is None or b_hi is None:
        return True
    return a_lo <= b_hi and b_lo <= a_hi
