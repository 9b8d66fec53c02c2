"""Reading a stored study: feasibility, the best trial, the baseline, a flat table.

Everything here reads only the Optuna study, so ``report``, ``export`` and ``show``
work on any storage, from any machine.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from tuner.errors import StudyError
from tuner.record import TrialRecord, constraints, has_error, is_baseline, read_record
from tuner.storage import lost_trial_key
from tuner.terminal import command


def defaults_name(engine: str) -> str:
    """What the baseline is called: the defaults of the engine a study ran on."""
    return {"ollama": "Ollama defaults", "llama-cpp": "llama.cpp defaults"}.get(engine, "engine defaults")


def _optuna() -> Any:
    import optuna

    return optuna


def is_complete(t: Any) -> bool:
    return t.state == _optuna().trial.TrialState.COMPLETE


def violation(t: Any) -> float:
    """Sum of positive constraint values (0 = feasible)."""
    return float(sum(v for v in constraints(t).values() if v > 0))


def is_feasible(t: Any) -> bool:
    return is_complete(t) and violation(t) <= 0 and not has_error(t)


def directions(study: Any) -> list[str]:
    return [d.name.lower() for d in study.directions]


def lost_errors(study: Any) -> dict[int, str]:
    """Why each trial failed by the heartbeat check failed (trial number -> text)."""
    prefix = lost_trial_key(0)[:-1]
    return {int(k[len(prefix):]): str(v) for k, v in study.user_attrs.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def view(t: Any, lost: dict[int, str] | None = None) -> TrialRecord:
    """The trial as users read it; ``lost`` (from :func:`lost_errors`) explains heartbeat failures."""
    return read_record(t, lost)


def _sort_key(study: Any) -> Any:
    sign = 1.0 if directions(study)[0] == "maximize" else -1.0
    return lambda t: sign * (t.values[0] if t.values else -math.inf)


def ranked_feasible(study: Any) -> list[Any]:
    """Feasible complete trials, best first (first objective)."""
    trials = [t for t in study.get_trials(deepcopy=False) if is_feasible(t) and t.values]
    return sorted(trials, key=_sort_key(study), reverse=True)


def best_feasible(study: Any) -> Any | None:
    """The best feasible trial: the re-validated winner when the validation covered the
    current leader, else the highest-ranked trial."""
    ranked = ranked_feasible(study)
    if not ranked:
        return None
    val = study.user_attrs.get("validation") or {}
    numbers = {e["number"] for e in val.get("entries", [])}
    if val.get("winner") is not None and ranked[0].number in numbers:
        for t in ranked:
            if t.number == val["winner"]:
                return t
    return ranked[0]


def least_violating(study: Any) -> Any | None:
    """When nothing is feasible: the complete, measured trial closest to the limits."""
    cands = [t for t in study.get_trials(deepcopy=False) if is_complete(t) and not has_error(t)]
    if not cands:
        return None
    key = _sort_key(study)
    return min(cands, key=lambda t: (violation(t), -key(t)))


def baseline_trial(study: Any) -> Any | None:
    for t in study.get_trials(deepcopy=False):
        if is_baseline(t) and is_complete(t) and not has_error(t):
            return t
    return None


def pick_trial(study: Any, number: int | None, allow_infeasible: bool = False) -> Any:
    """Trial ``number``, or the best feasible one; raise StudyError if there is none."""
    if number is not None:
        for t in study.get_trials(deepcopy=False):
            if t.number == number:
                if not is_feasible(t) and not allow_infeasible:
                    raise StudyError(
                        f"trial {number} is not feasible ({t.state.name.lower()}"
                        f"{': ' + str(read_record(t).error) if has_error(t) else ''}): "
                        "pass --allow-infeasible to use it anyway"
                    )
                return t
        raise StudyError(f"study '{study.study_name}' has no trial {number}: see `{command('tune', 'show', study.study_name)}`")
    best = best_feasible(study)
    if best is not None:
        return best
    if allow_infeasible:
        lv = least_violating(study)
        if lv is not None:
            return lv
    raise StudyError(
        f"study '{study.study_name}' has no feasible trial: relax the limits and run more trials, "
        "or pass --allow-infeasible to use the least-violating one"
    )


def speedup(study: Any, trial: Any) -> float | None:
    """The trial's first objective over the baseline's (maximise objectives only)."""
    base = baseline_trial(study)
    if base is None or not base.values or not trial.values or directions(study)[0] != "maximize":
        return None
    return trial.values[0] / base.values[0] if base.values[0] > 0 else None


# The same decisions over records read once (the report reads each trial a single time).


def rank_records(records: Iterable[TrialRecord], direction: str) -> list[TrialRecord]:
    """:func:`ranked_feasible` over records: feasible ones with a value, best first."""
    sign = 1.0 if direction == "maximize" else -1.0
    return sorted((r for r in records if r.feasible and r.values), key=lambda r: sign * (r.value or 0.0),
                  reverse=True)


def best_record(ranked: Sequence[TrialRecord], validation: Validation | None) -> TrialRecord | None:
    """:func:`best_feasible` over :func:`rank_records`: the re-validated winner while the
    validation covers the current leader, else the top-ranked record."""
    if not ranked:
        return None
    if validation is not None and validation.winner is not None \
            and ranked[0].number in {e.number for e in validation.entries}:
        for r in ranked:
            if r.number == validation.winner:
                return r
    return ranked[0]


def least_violating_record(records: Iterable[TrialRecord], direction: str) -> TrialRecord | None:
    """:func:`least_violating` over records."""
    sign = 1.0 if direction == "maximize" else -1.0
    cands = [r for r in records if r.measured]
    return min(cands, key=lambda r: (r.violation, -sign * (r.values[0] if r.values else -math.inf)),
               default=None)


def baseline_record(records: Iterable[TrialRecord]) -> TrialRecord | None:
    """:func:`baseline_trial` over records."""
    return next((r for r in records if r.baseline and r.measured), None)


def record_speedup(r: TrialRecord, base: TrialRecord | None, direction: str) -> float | None:
    """:func:`speedup` over records: ``r``'s first objective over the baseline's."""
    if base is None or not base.values or not r.values or direction != "maximize":
        return None
    return r.values[0] / base.values[0] if base.values[0] > 0 else None


def outcome(r: TrialRecord) -> str:
    """A trial's outcome in the vocabulary of :func:`counts`."""
    key = _OUTCOMES.get(r.state, r.state.lower())
    return "infeasible" if key == "feasible" and not r.feasible else key


def count_records(records: Iterable[TrialRecord]) -> dict[str, int]:
    """:func:`counts` over records."""
    out: dict[str, int] = {}
    for r in records:
        key = outcome(r)
        out[key] = out.get(key, 0) + 1
    return out


def _recency(s: Any) -> tuple[Any, ...]:
    """Sort key of a StudySummary: first trial's start, then the tuner's creation time, then name.

    A study without trials ranks below every study with one.
    """
    return (s.datetime_start is not None, s.datetime_start or 0, str(s.user_attrs.get("created_at", "")),
            s.study_name)


def load_study(storage: Any, name: str | None) -> Any:
    """Load study ``name``; with no name, the only (or most recent) study in the storage."""
    optuna = _optuna()
    # Names cost one query; summaries read every trial of every study (seconds for a large
    # one), so they are read only to pick the most recent of several studies.
    names = optuna.get_all_study_names(storage)
    if not names:
        raise StudyError("the storage holds no study: run `tune --model MODEL` first")
    if name is None:
        name = names[0] if len(names) == 1 else \
            max(optuna.get_all_study_summaries(storage, include_best_trial=False), key=_recency).study_name
    elif name not in names:
        known = ", ".join(sorted(names))
        raise StudyError(f"no study named '{name}' in this storage: known studies are {known}")
    return optuna.load_study(study_name=name, storage=storage)


def trials_frame(study: Any) -> Any:
    """One row per trial: number, state, value(s), feasibility, model, options and metrics."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        v = view(t)
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "feasible": v.feasible,
            "baseline": v.baseline,
            "model": v.model,
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        if t.values:
            for i, val in enumerate(t.values):
                row["value" if i == 0 else f"value_{i}"] = val
        for k, val in {**v.options, **v.effective_server}.items():
            row[f"params_{k}"] = val
        for k, val in v.flat().items():
            if isinstance(val, (int, float, str, bool)) or val is None:
                row[k] = val
            elif isinstance(val, list):
                row[k] = ",".join(map(str, val))
        for k, val in constraints(t).items():
            row[f"constraint_{k}"] = val
        row["violations"] = "; ".join(v.violations)
        row["error"] = v.error or ""
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class StudySummary:
    """What a run ends with: where the study is, its counts, the winner and the baseline."""

    study_name: str
    storage: str
    objectives: list[str]
    trials_run: int
    counts: dict[str, int]
    best: TrialRecord | None
    best_is_feasible: bool
    baseline: TrialRecord | None
    speedup: float | None
    pareto: list[TrialRecord] = field(default_factory=list)
    space: dict[str, list[Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    validation: Any = None
    roofline: dict[str, Any] | None = None
    engine: str = "ollama"
    pruned: int = 0
    pruned_saved_s: float = 0.0
    #: Every trial of the study, by number.
    trials: list[TrialRecord] = field(default_factory=list)


#: Trial states by the words of :func:`counts` (a COMPLETE one is feasible or infeasible).
_OUTCOMES = {"COMPLETE": "feasible", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def counts(study: Any) -> dict[str, int]:
    """Trials by outcome, the one vocabulary of the terminal and the report: feasible,
    infeasible (complete but over a limit, or failed to load), pruned, failed, running."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = _OUTCOMES.get(t.state.name, t.state.name.lower())
        if key == "feasible" and not is_feasible(t):
            key = "infeasible"
        out[key] = out.get(key, 0) + 1
    return out


def summarise_study(study: Any, objectives: list[str], storage: str, trials_run: int = 0,
                    space: dict[str, list[Any]] | None = None) -> StudySummary:
    """The run summary of a stored study."""
    best = best_feasible(study)
    feasible = best is not None
    if best is None:
        best = least_violating(study)
    base = baseline_trial(study)
    lost = lost_errors(study)
    trials = sorted((view(t, lost) for t in study.get_trials(deepcopy=False)), key=lambda r: r.number)
    pruned = [r for r in trials if r.state == "PRUNED"]
    pareto: list[TrialRecord] = []
    if len(objectives) > 1:
        pareto = [view(t) for t in study.best_trials if is_feasible(t)]
    return StudySummary(
        study_name=study.study_name,
        storage=storage,
        objectives=objectives,
        trials_run=trials_run,
        counts=counts(study),
        best=view(best) if best is not None else None,
        best_is_feasible=feasible,
        baseline=view(base) if base is not None else None,
        speedup=speedup(study, best) if best is not None and feasible else None,
        pareto=pareto,
        space=space if space is not None else dict(study.user_attrs.get("space", {})),
        validation=study.user_attrs.get("validation"),
        engine=str(study.user_attrs.get("engine", "ollama")),
        roofline=study.user_attrs.get("roofline"),
        pruned=len(pruned),
        pruned_saved_s=sum(v.pruned_saved_s or 0.0 for v in pruned),
        trials=trials,
    )


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Validation:
        """Read back what ``to_dict`` stored (the study attribute ``validation``)."""
        entries = [Validated(**{**e, "ci95": tuple(e["ci95"])}) for e in d.get("entries", [])]
        return cls(**{**d, "entries": entries})

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
