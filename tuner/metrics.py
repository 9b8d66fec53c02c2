"""Per-request samples and the statistics of a series of them."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence


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
    #: Tokens drafted (speculative decoding) and how many of them the model accepted; None where
    #: the request did not draft or the engine does not report it (Ollama's API does not).
    draft_tokens: int | None = None
    draft_accepted: int | None = None

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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestSample:
        """A sample from its stored dict (the derived rates are recomputed, not read)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("draft_tokens", "draft_accepted"):
            if d[k] is None:
                del d[k]
        d.update(
            decode_tps=round(self.decode_tps, 4),
            prefill_tps=round(self.prefill_tps, 4),
            e2e_tps=round(self.e2e_tps, 4),
        )
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]; nan when empty."""
    if not len(values):
        return math.nan
    import numpy as np  # here, not at module level: `tune --help` does not need numpy

    return float(np.percentile(values, q, method="linear"))


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
