"""Winner re-validation: the top configs re-measured interleaved, with 95% intervals."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from tuner import results
from tuner.engines.base import Engine
from tuner.errors import LoadError, ServerError
from tuner.measure import config_key, measure_config
from tuner.metrics import objective_value
from tuner.workload import Workload

# Two-sided 95% Student t quantiles by degrees of freedom (df > 30: normal).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_ci95(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sd, and the 95% confidence interval of the mean (rates cannot go below 0)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0, m, m
    sd = statistics.stdev(values)
    half = t975(len(values) - 1) * sd / math.sqrt(len(values))
    return m, sd, max(0.0, m - half), m + half


@dataclass
class Validated:
    number: int
    values: list[float] = field(default_factory=list)
    mean: float = 0.0
    sd: float = 0.0
    ci95: tuple[float, float] = (0.0, 0.0)
    error: str | None = None


@dataclass
class Validation:
    """Result of re-measuring the top configs; ``winner`` is the declared winner."""

    objective: str
    rounds: int
    entries: list[Validated]
    winner: int | None
    overlap: bool
    trials_at: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> list[str]:
        lines = [f"Re-validated the top {len(self.entries)} ({self.rounds} interleaved rounds, "
                 f"{self.objective}, mean and 95% CI):"]
        for e in sorted(self.entries, key=lambda e: -e.mean):
            mark = "  <- winner" if e.number == self.winner else ""
            if e.error:
                lines.append(f"  #{e.number}: failed: {e.error}")
            else:
                lines.append(f"  #{e.number}: {e.mean:.2f} (95% CI {e.ci95[0]:.2f} .. {e.ci95[1]:.2f}, "
                             f"sd {e.sd:.2f}){mark}")
        if self.overlap:
            lines.append("  The top two intervals overlap: they are not distinguishable at this precision "
                         "(more --validate-rounds narrows the intervals).")
        return lines


def validate_top(
    study: Any,
    engine: Engine,
    workload: Workload,
    base_model: str,
    objective: str,
    k: int,
    rounds: int,
    echo: Callable[[str], None],
    sampler_factory: Callable[[], Any] | None = None,
) -> Validation | None:
    """Re-measure the top ``k`` feasible distinct configs in interleaved rounds (A B C A B C)."""
    seen: set[str] = set()
    top: list[Any] = []
    for t in results.ranked_feasible(study):
        key = results.view(t).config_text()
        if key not in seen:
            seen.add(key)
            top.append(t)
        if len(top) == k:
            break
    if len(top) < 2 or rounds < 2:
        return None
    one = dataclasses.replace(workload, repeats=1)
    entries = {t.number: Validated(t.number) for t in top}
    loaded: Any = None
    echo(f"re-validating the top {len(top)} configs over {rounds} interleaved rounds ...")
    for _ in range(rounds):
        for t in top:
            e = entries[t.number]
            if e.error:
                continue
            v = results.view(t)
            runner = None if v.baseline else v.options
            cfg_key = config_key(v.model, runner, v.server)
            try:
                restarted = engine.prepare(v.server)
                m = measure_config(engine, v.model or base_model, runner, one,
                                   reload=restarted or cfg_key != loaded,
                                   sampler=sampler_factory() if sampler_factory else None)
            except (LoadError, ServerError) as err:
                e.error = str(err)
                loaded = None
                continue
            loaded = cfg_key
            attrs = {**m.metrics, **m.telemetry}
            energy = m.telemetry.get("gpu_energy_j")
            if energy:
                attrs["tokens_per_joule"] = sum(s.eval_tokens for s in m.samples) / energy
            val = objective_value(attrs, objective)
            if val is not None:
                e.values.append(val)
    for e in entries.values():
        if e.values:
            e.mean, e.sd, lo, hi = mean_ci95(e.values)
            e.ci95 = (lo, hi)
    ok = sorted((e for e in entries.values() if e.values and not e.error), key=lambda e: -e.mean)
    if not ok:
        return None
    overlap = len(ok) > 1 and ok[1].ci95[1] >= ok[0].ci95[0]
    return Validation(objective, rounds, list(entries.values()), ok[0].number, overlap,
                      len(study.get_trials(deepcopy=False)))
