"""Winner re-validation: the top configs re-measured interleaved, with 95% intervals."""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable

from tuner import objectives, results
from tuner.engines.base import Engine
from tuner.errors import LoadError, ServerError
from tuner.measure import config_key, measure_config
from tuner.results import Validated, Validation
from tuner.workload import Workload

def t975(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom."""
    from scipy.stats import t  # here: scipy takes a while to import and only re-validation needs it

    return float(t.ppf(0.975, df))


def mean_ci95(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sd, and the 95% confidence interval of the mean (rates cannot go below 0)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0, m, m
    sd = statistics.stdev(values)
    half = t975(len(values) - 1) * sd / math.sqrt(len(values))
    return m, sd, max(0.0, m - half), m + half


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
        key = t.config_text()
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
            v = t
            runner = None if v.baseline else v.options
            cfg_key = config_key(v.model, runner, v.effective_server)
            try:
                restarted = engine.prepare(v.effective_server)
                m = measure_config(engine, v.model or base_model, runner, one,
                                   reload=restarted or cfg_key != loaded,
                                   sampler=sampler_factory() if sampler_factory else None)
            except (LoadError, ServerError) as err:
                e.error = str(err)
                loaded = None
                continue
            loaded = cfg_key
            val = objectives.get(objective).value(m.record(v.model, runner, v.effective_server))
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
