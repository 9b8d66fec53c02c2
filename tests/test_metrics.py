from __future__ import annotations

import pytest

from tuner.metrics import RequestSample, describe, percentile, summarise


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


def test_summarise_names_are_stable() -> None:
    m = summarise([sample(640.0, 60.0), sample(320.0, 80.0)])
    assert m["decode_tps_mean"] == pytest.approx(150.0)
    assert m["ttft_ms_p95"] == pytest.approx(79.0)
    assert m["n_requests"] == 2
    for key in ("decode_tps", "prefill_tps", "e2e_tps", "ttft_ms", "latency_ms", "load_ms"):
        for stat in ("mean", "sd", "p50", "p95", "min", "max"):
            assert f"{key}_{stat}" in m
