"""Winner re-validation: the top configs, and the defaults, re-measured in interleaved rounds.

Every interval here is a Student t interval on the log scale. Rates are positive and their
noise multiplies, so the centre is the geometric mean and the bounds,
``exp(mean(log x) +- t * sd(log x) / sqrt(n))``, stay above 0 however noisy a small sample is
(a t-interval on the raw values once printed "-35.02 .. 76.85 tok/s"; clamping it at 0 only
hid that). The speedup over the defaults is the same interval on the per-round ratios
winner / defaults: paired by round, so drift between rounds cancels out of it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Sequence

from tuner import objectives, results
from tuner.engines.base import Engine
from tuner.errors import LoadError, ServerError
from tuner.measure import config_key, measure_config
from tuner.record import TrialRecord
from tuner.results import Speedup, Validated, Validation, overlaps
from tuner.settings import SETTINGS
from tuner.workload import Workload

#: How the intervals are computed, stored with the validation.
INTERVAL = "log-t"


def t975(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom."""
    from scipy.stats import t  # here: scipy takes a while to import and only re-validation needs it

    return float(t.ppf(0.975, df))


def log_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """The geometric mean of positive ``values`` and its 95% interval (t on the log scale).

    Raises ValueError when there is no value or one is not positive (not a rate).
    """
    if not values or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"a log-scale interval needs positive values (got {list(values)})")
    logs = [math.log(v) for v in values]
    centre = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(centre), math.exp(centre), math.exp(centre)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float, float]:
    """A rate's centre, spread and 95% interval: the geometric mean, the sd of the values and
    :func:`log_ci95`'s interval, which lies within (0, inf) by construction."""
    g, lo, hi = log_ci95(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return g, sd, lo, hi


def changed_settings(r: TrialRecord, defaults: TrialRecord | None, base_model: str,
                     fixed: frozenset[str] = frozenset()) -> list[str]:
    """The settings ``r`` sets away from the engine's defaults, as ``name=value``.

    The baseline sends none. A value the baseline also ran (a server setting it reported, the
    ``--context`` it sent) or a setting's "runtime decides" value (``num_thread=0``,
    ``num_gpu=-1``, ``flash_attention=auto``) is the default, so it does not count; neither does
    a setting the study fixed (``fixed``: every config sends the same value, it is no choice).
    """
    if r.baseline:
        return []
    base_opts = defaults.options if defaults is not None else {}
    base_server = defaults.effective_server if defaults is not None else {}
    out = []
    model = defaults.model if defaults is not None and defaults.model else base_model
    if r.model and model and r.model != model:
        out.append(f"variant={r.model_label}")
    for k, v in {**r.options, **r.effective_server}.items():
        s = SETTINGS.get(k)
        if k in fixed or base_opts.get(k, base_server.get(k)) == v or (s is not None and v in (s.auto, "auto")):
            continue
        out.append(f"{k}={v}")
    return out


def decide(entries: Sequence[Validated], maximize: bool = True) -> tuple[int | None, int | None, bool]:
    """(winner, leader, overlap) of re-measured configs.

    The leader has the best centre. When another config's interval overlaps the leader's they
    are not distinguishable, and the winner is the simplest of them: the fewest settings changed
    from the defaults, the better centre on a tie.
    """
    sign = 1.0 if maximize else -1.0
    ok = sorted((e for e in entries if not e.error and len(e.values) >= 2), key=lambda e: -sign * e.mean)
    if not ok:
        return None, None, False
    leader = ok[0]
    tied = [e for e in ok[1:] if overlaps(e.ci95, leader.ci95)]
    winner = min([leader, *tied], key=lambda e: len(e.changed))  # min keeps the first (best) on a tie
    return winner.number, leader.number, bool(tied)


def _summarise(e: Validated) -> None:
    if e.values:
        e.mean, e.sd, lo, hi = mean_ci95(e.values)
        e.ci95 = (lo, hi)


def paired_speedup(rounds: Sequence[dict[int, float]], trial: int, baseline: int) -> Speedup | None:
    """``trial`` over ``baseline`` from the rounds that measured both (None under 2 such rounds)."""
    ratios = [r[trial] / r[baseline] for r in rounds if trial in r and baseline in r]
    if len(ratios) < 2:
        return None
    g, lo, hi = log_ci95(ratios)
    return Speedup(trial, baseline, g, (lo, hi), [round(x, 4) for x in ratios])


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
    max_rounds: int | None = None,
) -> Validation | None:
    """Re-measure the top ``k`` feasible distinct configs in interleaved rounds (A B C A B C),
    with the defaults as one more config when the objective is a maximised rate.

    At least ``rounds`` rounds count; more follow, up to ``max_rounds``, until the leader's
    interval overlaps no other. A round in which any measurement was contended (other
    processes competed, per its telemetry) does not count: it is measured again once, and
    dropped if it is contended again. None when there are fewer than 2 configs or rounds.
    """
    max_rounds = max(rounds, max_rounds or rounds)
    st = results.read_study(study)
    seen: set[str] = set()
    top: list[TrialRecord] = []
    for t in st.ranked():
        key = t.config_text()
        if key not in seen:
            seen.add(key)
            top.append(t)
        if len(top) == k:
            break
    if len(top) < 2 or rounds < 2:
        return None
    maximize = objectives.get(objective).direction == "maximize"
    defaults = st.baseline()
    configs = list(top)
    if maximize and defaults is not None and defaults.number not in {t.number for t in top}:
        configs.append(defaults)
    space = st.attrs.get("space") or {}
    fixed = frozenset(k for k, v in space.items() if isinstance(v, list) and len(v) == 1)
    entries = {t.number: Validated(t.number, changed=changed_settings(t, defaults, base_model, fixed))
               for t in configs}
    one = dataclasses.replace(workload, repeats=1)
    loaded: Any = None

    def measure_round() -> dict[int, float] | None:
        """Each config once; None as soon as a measurement was contended."""
        nonlocal loaded
        got: dict[int, float] = {}
        for t in configs:
            e = entries[t.number]
            if e.error:
                continue
            # The baseline sends what it sent in the search: nothing, or only --context.
            runner = (t.options or None) if t.baseline else t.options
            cfg_key = config_key(t.model, runner, t.effective_server)
            try:
                restarted = engine.prepare(t.effective_server)
                m = measure_config(engine, t.model or base_model, runner, one,
                                   reload=restarted or cfg_key != loaded,
                                   sampler=sampler_factory() if sampler_factory else None)
            except (LoadError, ServerError) as err:
                e.error = str(err)
                loaded = None
                continue
            loaded = cfg_key
            rec = m.record(t.model, runner, t.effective_server)
            if rec.contended:
                return None
            val = objectives.get(objective).value(rec)
            if val is not None and math.isfinite(val) and val > 0:
                got[t.number] = val
        return got

    def separated() -> bool:
        measured = [dataclasses.replace(entries[t.number]) for t in top]
        for e in measured:
            if len(e.values) >= 2:
                _summarise(e)
        return not decide(measured, maximize)[2]

    extra = " and the defaults" if len(configs) > len(top) else ""
    span = f"{rounds}" if max_rounds == rounds else f"{rounds} to {max_rounds}"
    echo(f"re-validating the top {len(top)} configs{extra} over {span} interleaved rounds ...")
    counted: list[dict[int, float]] = []
    contended = dropped = 0
    for slot in range(1, max_rounds + 1):
        got = measure_round()
        if got is None:
            contended += 1
            echo(f"re-validation round {slot} was contended (other processes competed): measuring it again")
            got = measure_round()
            if got is None:
                dropped += 1
                echo(f"re-validation round {slot} was contended again: dropped")
                if dropped >= 2 and not counted:
                    # Busy through four attempts and nothing counted: more would only take time.
                    echo("re-validation stopped: the machine stays busy (re-run when it is quiet)")
                    break
                continue
        counted.append(got)
        for number, v in got.items():
            entries[number].values.append(v)
        if len(counted) >= rounds and separated():
            break
    for e in entries.values():
        _summarise(e)
    chosen = [entries[t.number] for t in top]
    winner, leader, overlap = decide(chosen, maximize) if len(counted) >= 2 else (None, None, False)
    if winner is not None and overlap:
        echo(f"re-validation: not distinguishable after {len(counted)} rounds: recommending #{winner}, "
             "the one with the fewest settings changed from the defaults")
    elif winner is not None:
        echo(f"re-validation: #{winner} is ahead after {len(counted)} rounds (95% CIs do not overlap)")
    base = entries.get(defaults.number) if defaults is not None and maximize else None
    speedup = None
    if base is not None and winner is not None and winner != base.number and not base.error:
        speedup = paired_speedup(counted, winner, base.number)
    return Validation(objective, len(counted), chosen, winner, overlap, len(study.get_trials(deepcopy=False)),
                      max_rounds=max_rounds, leader=leader, contended=contended, dropped=dropped,
                      interval=INTERVAL, baseline=base, speedup=speedup)
