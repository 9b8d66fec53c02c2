from __future__ import annotations

import pytest

from tuner.metrics import RequestSample, describe, percentile


def sample(eval_ms: float, ttft: float) -> RequestSample:
    return RequestSample("chat", 0, ttft, 1000.0, 100, 50.0, 64, eval_ms, 0.1, 1100.0, "length")


def test_rates_from_server_durations() -> None:
    s = sample(eval_ms=640.0, ttft=60.0)
    assert s.decode_tps == pytest.approx(100.0)
    assert s.prefill_tps == pytest.approx(2000.0)
    assert s.e2e_tps == pytest.approx(64.0)


def test_percentile_matches_numpy_linear() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 95) == pytest.approx(8.8)
    d = describe(xs)
    assert d["mean"] == 4.0 and d["min"] == 1.0 and d["max"] == 10.0
    assert d["sd"] == pytest.approx(3.5355339, rel=1e-6)


def test_from_dict_round_trip_recomputes_rates() -> None:
    s = sample(640.0, 60.0)
    d = s.to_dict()
    d["decode_tps"] = 1.0  # a stored rate is derived, never trusted
    assert RequestSample.from_dict(d) == s
