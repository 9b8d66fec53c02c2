"""The one registry of objectives: what a study can optimise, how, and how it is shown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from tuner.record import AGGREGATE, DECODE_TPS, E2E_TPS, LATENCY_MS, PREFILL_TPS, TTFT_MS

if TYPE_CHECKING:
    from tuner.record import TrialRecord


@dataclass(frozen=True)
class Objective:
    """One optimisable quantity of a trial."""

    name: str
    direction: str  # "maximize" or "minimize"
    label: str
    unit: str
    #: The per-request sample field that pruning follows (None: no per-request value).
    per_request: str | None
    #: The trial's value, read from its record (None when it was not measured).
    value: Callable[[TrialRecord], float | None]
    #: Needs GPU energy telemetry (NVML) to be measured.
    needs_energy: bool = False
    #: Needs --concurrency 2 or more.
    needs_concurrency: bool = False


def _mean(metric: str) -> Callable[[TrialRecord], float | None]:
    return lambda r: r.stat(metric, "mean")


def _p95(metric: str) -> Callable[[TrialRecord], float | None]:
    return lambda r: r.stat(metric, "p95")


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    # A rate's objective is named after its metric key.
    Objective(DECODE_TPS, "maximize", "decode tok/s", "tok/s", DECODE_TPS, _mean(DECODE_TPS)),
    Objective(PREFILL_TPS, "maximize", "prefill tok/s", "tok/s", PREFILL_TPS, _mean(PREFILL_TPS)),
    Objective(E2E_TPS, "maximize", "end-to-end tok/s", "tok/s", E2E_TPS, _mean(E2E_TPS)),
    Objective(AGGREGATE, "maximize", "aggregate tok/s", "tok/s", None, _mean(AGGREGATE),
              needs_concurrency=True),
    Objective("tokens_per_joule", "maximize", "tokens per joule", "tok/J", None,
              lambda r: r.tokens_per_joule, needs_energy=True),
    Objective("ttft_p95", "minimize", "p95 TTFT ms", "ms", None, _p95(TTFT_MS)),
    Objective("latency_p95", "minimize", "p95 latency ms", "ms", None, _p95(LATENCY_MS)),
)}
#: The names the CLI offers for a single --objective (minimised ones only pair with a rate).
SINGLE = tuple(n for n, o in OBJECTIVES.items() if o.direction == "maximize")


def get(name: str) -> Objective:
    """The objective called ``name``; raises KeyError for an unknown one."""
    return OBJECTIVES[name]


def label(name: str) -> str:
    """How an objective is shown; unknown names are shown as they are."""
    o = OBJECTIVES.get(name)
    return o.label if o is not None else name
