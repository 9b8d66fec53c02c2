"""Per-request samples and their per-trial statistics. Metric names are stable."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

#: Metrics summarised per trial, each as <name>_mean, _sd, _p50, _p95, _min, _max.
SUMMARISED = (
    "decode_tps",
    "prefill_tps",
    "e2e_tps",
    "ttft_ms",
    "latency_ms",
    "load_ms",
    "prompt_tokens",
    "eval_tokens",
)
#: Objectives a study can optimise, with their direction.
OBJECTIVES = {
    "decode_tps": "maximize",
    "prefill_tps": "maximize",
    "e2e_tps": "maximize",
    "aggregate_tps": "maximize",
    "tokens_per_joule": "maximize",
    "ttft_p95": "minimize",
    "latency_p95": "minimize",
}

#: Display labels of objectives.
OBJECTIVE_LABELS = {
    "decode_tps": "decode tok/s",
    "prefill_tps": "prefill tok/s",
    "e2e_tps": "end-to-end tok/s",
    "aggregate_tps": "aggregate tok/s",
    "tokens_per_joule": "tokens per joule",
    "ttft_p95": "p95 TTFT ms",
    "latency_p95": "p95 latency ms",
}
#: (label, metric prefix) of the request metrics shown with their spread.
METRIC_ROWS = (
    ("decode tok/s", "decode_tps"),
    ("prefill tok/s", "prefill_tps"),
    ("end-to-end tok/s", "e2e_tps"),
    ("aggregate tok/s", "aggregate_tps"),
    ("TTFT ms", "ttft_ms"),
    ("latency ms", "latency_ms"),
    ("load ms", "load_ms"),
)
#: (label, attr) of the per-trial telemetry shown for a trial.
TELEMETRY_ROWS = (
    ("GPU power mean W", "gpu_power_mean_w"),
    ("GPU power max W", "gpu_power_max_w"),
    ("GPU energy J", "gpu_energy_j"),
    ("tokens per joule", "tokens_per_joule"),
    ("GPU memory peak MiB", "gpu_mem_used_peak_mib"),
    ("GPU memory increase MiB", "gpu_mem_increase_mib"),
    ("host CPU util %", "host_cpu_util_mean_pct"),
    ("host memory peak MiB", "host_mem_used_peak_mib"),
    ("server RSS peak MiB", "server_rss_peak_mib"),
)


@dataclass(frozen=True)
class RequestSample:
    """One measured request. Durations in milliseconds, rates in tokens per second.

    ``ttft_ms`` and ``latency_ms`` are measured on the client; the rest comes from the
    server's own timings (Ollama's nanosecond durations, llama.cpp's perf counters).
    """

    prompt: str
    repeat: int
    ttft_ms: float
    latency_ms: float
    prompt_tokens: int
    prompt_eval_ms: float
    eval_tokens: int
    eval_ms: float
    load_ms: float
    total_ms: float
    done_reason: str

    @property
    def decode_tps(self) -> float:
        return self.eval_tokens / self.eval_ms * 1e3 if self.eval_ms > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prompt_eval_ms * 1e3 if self.prompt_eval_ms > 0 else 0.0

    @property
    def e2e_tps(self) -> float:
        """Generated tokens over the whole client-side latency."""
        return self.eval_tokens / self.latency_ms * 1e3 if self.latency_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            decode_tps=round(self.decode_tps, 4),
            prefill_tps=round(self.prefill_tps, 4),
            e2e_tps=round(self.e2e_tps, 4),
        )
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: Iterable[float]) -> dict[str, float]:
    """mean, sd (sample), p50, p95, min, max of a series."""
    xs = [float(v) for v in values]
    if not xs:
        return {}
    return {
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "p50": percentile(xs, 50),
        "p95": percentile(xs, 95),
        "min": min(xs),
        "max": max(xs),
    }


def summarise(samples: Sequence[RequestSample]) -> dict[str, float]:
    """Flat per-trial statistics: ``decode_tps_mean``, ``ttft_ms_p95``, ..."""
    out: dict[str, float] = {}
    for name in SUMMARISED:
        for stat, v in describe(getattr(s, name) for s in samples).items():
            out[f"{name}_{stat}"] = round(v, 4)
    out["n_requests"] = len(samples)
    return out


def objective_value(metrics: dict[str, Any], objective: str) -> float | None:
    """The number an objective optimises, from a trial's flat metrics."""
    key = {
        "decode_tps": "decode_tps_mean",
        "prefill_tps": "prefill_tps_mean",
        "e2e_tps": "e2e_tps_mean",
        "aggregate_tps": "aggregate_tps_mean",
        "tokens_per_joule": "tokens_per_joule",
        "ttft_p95": "ttft_ms_p95",
        "latency_p95": "latency_ms_p95",
    }[objective]
    v = metrics.get(key)
    return None if v is None else float(v)
