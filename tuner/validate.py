"""Winner re-validation: the top configs, and the defaults, re-measured in interleaved rounds.

Every interval here is a Student t interval on the log scale (:mod:`tuner.stats`). Rates are
positive and their noise multiplies, so the centre is the geometric mean and the bounds,
``exp(mean(log x) +- t * sd(log x) / sqrt(n))``, stay above 0 however noisy a small sample is
(a t-interval on the raw values once printed "-35.02 .. 76.85 tok/s"; clamping it at 0 only
hid that). The speedup over the defaults is the same interval on the per-round ratios
winner / defaults: paired by round, so drift between rounds cancels out of it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence, TypeVar

from tuner import objectives, results
from tuner.engines.base import Engine
from tuner.errors import LoadError, ServerError
from tuner.measure import config_key, measure_config
from tuner.gains import Ratio
from tuner.record import TrialRecord, fixed_settings
from tuner.results import Speedup, Validated, Validation, changed_settings
from tuner.stats import mean_ci95, overlaps
from tuner.workload import Workload

#: How the intervals are computed, stored with the validation.
INTERVAL = "log-t"


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
    r = Ratio.of([r[trial] / r[baseline] for r in rounds if trial in r and baseline in r])
    return None if r is None else Speedup(trial, baseline, r.ratio, r.ci95, list(r.ratios))


class Interleaved:
    """Measures configs one after another, each with the workload once, the order turned by one
    each round (A B C, B C A, C A B ...) so that no config always follows the same one (a
    config measured right after another inherits its warm caches or heat: a fixed order would
    put that into every paired ratio); a config is loaded (one discarded warm-up) only when it
    differs from what ran last.

    A config that fails to load or run, or that ``check`` refuses (asked once per config, its
    server settings in place, before its first measurement: the output-identity check of a
    drafting config the search never ran), is kept in ``errors`` and skipped from then on. The
    trials in ``exempt`` are never asked about (the defaults: the reference whatever they do).
    """

    def __init__(self, engine: Engine, workload: Workload, base_model: str,
                 sampler_factory: Callable[[], Any] | None = None,
                 check: Callable[[TrialRecord], str | None] | None = None, exempt: Iterable[int] = ()) -> None:
        self.engine, self.base_model, self.sampler_factory = engine, base_model, sampler_factory
        self.check, self._checked = check, set(exempt)
        self.one = dataclasses.replace(workload, repeats=1)
        self.loaded: Any = None
        self._turn = 0
        #: Why a config could not be measured, by trial number.
        self.errors: dict[int, str] = {}

    def round(self, configs: Sequence[TrialRecord]) -> dict[int, TrialRecord] | None:
        """Each config once: its measurement's record by trial number; None as soon as one
        measurement was contended (other processes competed, per its telemetry)."""
        got: dict[int, TrialRecord] = {}
        k = self._turn % len(configs) if configs else 0
        self._turn += 1
        for t in [*configs[k:], *configs[:k]]:
            if t.number in self.errors:
                continue
            # The baseline sends what it sent in the search: nothing, or only --context.
            runner = t.sent_options
            cfg_key = config_key(t.model, runner, t.effective_server)
            try:
                restarted = self.engine.prepare(t.effective_server)
                if self.check is not None and t.number not in self._checked:
                    self._checked.add(t.number)
                    refused = self.check(t)
                    if refused:
                        self.errors[t.number] = refused
                        self.loaded = None
                        continue
                m = measure_config(self.engine, t.model or self.base_model, runner, self.one,
                                   reload=restarted or cfg_key != self.loaded,
                                   sampler=self.sampler_factory() if self.sampler_factory else None)
            except (LoadError, ServerError) as err:
                self.errors[t.number] = str(err)
                self.loaded = None
                continue
            self.loaded = cfg_key
            rec = m.record(t.model, runner, t.effective_server)
            if rec.contended:
                return None
            got[t.number] = rec
        return got


Round = TypeVar("Round")


def interleaved_rounds(measure: Callable[[], Round | None], rounds: int, max_rounds: int,
                       echo: Callable[[str], None], what: str,
                       enough: Callable[[list[Round]], bool] | None = None) -> tuple[list[Round], int, int]:
    """Measure rounds (``measure`` returns one, or None when it was contended) until ``rounds``
    counted and ``enough`` says so (without ``enough``: as soon as ``rounds`` counted), or
    ``max_rounds`` were tried: (counted, contended, dropped).

    A contended round is measured again once, and dropped if it is contended again; after two
    dropped rounds with nothing counted the machine stays busy, and it stops.
    """
    counted: list[Round] = []
    contended = dropped = 0
    for slot in range(1, max_rounds + 1):
        got = measure()
        if got is None:
            contended += 1
            echo(f"{what} round {slot} was contended (other processes competed): measuring it again")
            got = measure()
            if got is None:
                dropped += 1
                echo(f"{what} round {slot} was contended again: dropped")
                if dropped >= 2 and not counted:
                    # Busy through four attempts and nothing counted: more would only take time.
                    echo(f"{what} stopped: the machine stays busy (re-run when it is quiet)")
                    break
                continue
        counted.append(got)
        if len(counted) >= rounds and (enough is None or enough(counted)):
            break
    return counted, contended, dropped


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
    check: Callable[[TrialRecord], str | None] | None = None,
) -> Validation | None:
    """Re-measure the top ``k`` feasible distinct configs in interleaved rounds (:class:`Interleaved`),
    with the defaults as one more config when the objective is a maximised rate.

    At least ``rounds`` rounds count; more follow, up to ``max_rounds``, until the leader's
    interval overlaps no other. A round in which any measurement was contended (other
    processes competed, per its telemetry) does not count: it is measured again once, and
    dropped if it is contended again. None when there are fewer than 2 configs or rounds.
    ``check`` may refuse a config before it is measured (the output-identity check of a drafting
    config that an earlier run or another worker measured); the defaults are never refused.
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
    fixed = fixed_settings(space)
    entries = {t.number: Validated(t.number, changed=changed_settings(t, defaults, base_model, fixed))
               for t in configs}
    meter = Interleaved(engine, workload, base_model, sampler_factory, check,
                        exempt=[defaults.number] if defaults is not None else [])

    def measure_round() -> dict[int, float] | None:
        """Each config once (its objective value); None as soon as a measurement was contended."""
        recs = meter.round(configs)
        for number, err in meter.errors.items():
            entries[number].error = err
        if recs is None:
            return None
        got: dict[int, float] = {}
        for number, rec in recs.items():
            val = objectives.get(objective).value(rec)
            if val is not None and math.isfinite(val) and val > 0:
                got[number] = val
        return got

    def separated(counted: list[dict[int, float]]) -> bool:
        measured = [dataclasses.replace(entries[t.number], values=[r[t.number] for r in counted if t.number in r])
                    for t in top]
        for e in measured:
            if len(e.values) >= 2:
                _summarise(e)
        return not decide(measured, maximize)[2]

    extra = " and the defaults" if len(configs) > len(top) else ""
    span = f"{rounds}" if max_rounds == rounds else f"{rounds} to {max_rounds}"
    echo(f"re-validating the top {len(top)} configs{extra} over {span} interleaved rounds ...")
    counted, contended, dropped = interleaved_rounds(measure_round, rounds, max_rounds, echo, "re-validation",
                                                     enough=separated)
    for got in counted:
        for number, v in got.items():
            entries[number].values.append(v)
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
        if speedup is not None and speedup.ci95[0] <= 1.0:
            how = "slower than" if speedup.ci95[1] < 1.0 else "not distinguishable from"
            paired = f"paired {speedup.ratio:.2f}x, 95% CI {speedup.ci95[0]:.2f}-{speedup.ci95[1]:.2f}x"
            if defaults is not None and not defaults.feasible:
                # The defaults break a limit (latency, changed output): never the recommendation.
                why = "; ".join(defaults.violations) or "a limit"
                echo(f"re-validation: #{winner} is {how} the defaults ({paired}), but the defaults are infeasible "
                     f"({why}): keeping #{winner}")
            else:
                # Paired round by round, the winner is not faster than the defaults: the simplest
                # config is no change at all (a tuned one would pin settings worth nothing measured).
                echo(f"re-validation: #{winner} is {how} the defaults ({paired}): recommending the defaults")
                winner = base.number
    return Validation(objective, len(counted), chosen, winner, overlap, len(study.get_trials(deepcopy=False)),
                      max_rounds=max_rounds, leader=leader, contended=contended, dropped=dropped,
                      interval=INTERVAL, baseline=base, speedup=speedup)
