"""Reading a stored study: feasibility, the best trial, the baseline, a flat table.

Everything here reads only the Optuna study, so ``report``, ``export`` and ``show``
work on any storage, from any machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from tuner.errors import StudyError
from tuner.record import TrialRecord, constraints, has_error, read_record
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


@dataclass
class StoredStudy:
    """A study read once: its attributes, directions and one record per trial, and every
    decision the read side makes about it (best, baseline, speedup, counts)."""

    name: str
    attrs: dict[str, Any]
    directions: list[str]
    records: list[TrialRecord]

    @property
    def direction(self) -> str:
        return self.directions[0]

    @property
    def validation(self) -> Validation | None:
        """The stored re-validation, or None (none, or written by another version)."""
        stored = self.attrs.get("validation")
        try:
            return Validation.from_dict(stored) if isinstance(stored, dict) else None
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def _score(self, r: TrialRecord) -> float:
        sign = 1.0 if self.direction == "maximize" else -1.0
        return sign * (r.values[0] if r.values else -math.inf)

    def ranked(self) -> list[TrialRecord]:
        """Feasible trials with a value, best first (first objective)."""
        return sorted((r for r in self.records if r.feasible and r.values), key=self._score, reverse=True)

    def best(self, ranked: Sequence[TrialRecord] | None = None) -> TrialRecord | None:
        """The best feasible trial: the re-validated winner while the validation covers the
        current leader, else the highest-ranked trial."""
        ranked = self.ranked() if ranked is None else ranked
        if not ranked:
            return None
        val = self.validation
        if val is not None and val.winner is not None and ranked[0].number in {e.number for e in val.entries}:
            for r in ranked:
                if r.number == val.winner:
                    return r
        return ranked[0]

    def least_violating(self) -> TrialRecord | None:
        """When nothing is feasible: the complete, measured trial closest to the limits."""
        return min((r for r in self.records if r.measured), key=lambda r: (r.violation, -self._score(r)),
                   default=None)

    def baseline(self) -> TrialRecord | None:
        """The measured baseline trial (the engine's defaults), if any."""
        return next((r for r in self.records if r.baseline and r.measured), None)

    def speedup(self, r: TrialRecord) -> float | None:
        """``r``'s first objective over the baseline's (maximised objectives only)."""
        base = self.baseline()
        if base is None or not base.values or not r.values or self.direction != "maximize":
            return None
        return r.values[0] / base.values[0] if base.values[0] > 0 else None

    def counts(self) -> dict[str, int]:
        """Trials by outcome (see :func:`outcome`)."""
        out: dict[str, int] = {}
        for r in self.records:
            key = outcome(r)
            out[key] = out.get(key, 0) + 1
        return out

    def pick(self, number: int | None, allow_infeasible: bool = False) -> TrialRecord:
        """Trial ``number``, or the best feasible one; raise StudyError if there is none."""
        if number is not None:
            r = next((r for r in self.records if r.number == number), None)
            if r is None:
                raise StudyError(f"study '{self.name}' has no trial {number}: "
                                 f"see `{command('tune', 'show', self.name)}`")
            if not r.feasible and not allow_infeasible:
                raise StudyError(
                    f"trial {number} is not feasible ({r.state.lower()}{': ' + r.error if r.error else ''}): "
                    "pass --allow-infeasible to use it anyway"
                )
            return r
        best = self.best()
        if best is None and allow_infeasible:
            best = self.least_violating()
        if best is None:
            raise StudyError(
                f"study '{self.name}' has no feasible trial: relax the limits and run more trials, "
                "or pass --allow-infeasible to use the least-violating one"
            )
        return best


def read_study(study: Any) -> StoredStudy:
    """Read ``study`` once: one ``get_trials`` and one record per trial."""
    with paused_gc():
        lost = lost_errors(study)
        records = sorted((read_record(t, lost) for t in study.get_trials(deepcopy=False)), key=lambda r: r.number)
        return StoredStudy(study.study_name, dict(study.user_attrs), directions(study), records)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block without the cyclic garbage collector (it is restored after).

    Reading a study creates tens of thousands of objects that all stay alive; the collector
    would scan them again and again as they pile up: half the load time of 1,000 trials.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def ranked_feasible(study: Any) -> list[TrialRecord]:
    """Feasible trials of a stored study, best first."""
    return read_study(study).ranked()


def best_feasible(study: Any) -> TrialRecord | None:
    """The best feasible trial of a stored study (see :meth:`StoredStudy.best`)."""
    return read_study(study).best()


def pick_trial(study: Any, number: int | None, allow_infeasible: bool = False) -> TrialRecord:
    """Trial ``number`` of a stored study, or its best feasible one (see :meth:`StoredStudy.pick`)."""
    return read_study(study).pick(number, allow_infeasible)


#: Trial states by the words of :func:`outcome` (a COMPLETE one is feasible or infeasible).
_OUTCOMES = {"COMPLETE": "feasible", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def outcome(r: TrialRecord) -> str:
    """A trial's outcome, the one vocabulary of the terminal and the report: feasible,
    infeasible (complete but over a limit, or failed to load), pruned, failed, running."""
    key = _OUTCOMES.get(r.state, r.state.lower())
    return "infeasible" if key == "feasible" and not r.feasible else key


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
    for v in read_study(study).records:
        row: dict[str, Any] = {
            "number": v.number,
            "state": v.state,
            "feasible": v.feasible,
            "baseline": v.baseline,
            "model": v.model,
            "datetime_start": v.datetime_start,
            "datetime_complete": v.datetime_complete,
            "duration_s": v.duration_s,
        }
        if v.values:
            for i, val in enumerate(v.values):
                row["value" if i == 0 else f"value_{i}"] = val
        for k, val in {**v.options, **v.effective_server}.items():
            row[f"params_{k}"] = val
        for k, val in v.flat().items():
            if isinstance(val, (int, float, str, bool)) or val is None:
                row[k] = val
            elif isinstance(val, list):
                row[k] = ",".join(map(str, val))
        for k, val in v.constraints.items():
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


def summarise_study(study: Any, objectives: list[str], storage: str, trials_run: int = 0,
                    space: dict[str, list[Any]] | None = None) -> StudySummary:
    """The run summary of a stored study."""
    st = read_study(study)
    best = st.best()
    feasible = best is not None
    if best is None:
        best = st.least_violating()
    pruned = [r for r in st.records if r.state == "PRUNED"]
    pareto: list[TrialRecord] = []
    if len(objectives) > 1:
        on_front = {t.number for t in study.best_trials}
        pareto = [r for r in st.records if r.number in on_front and r.feasible]
    return StudySummary(
        study_name=st.name,
        storage=storage,
        objectives=objectives,
        trials_run=trials_run,
        counts=st.counts(),
        best=best,
        best_is_feasible=feasible,
        baseline=st.baseline(),
        speedup=st.speedup(best) if best is not None and feasible else None,
        pareto=pareto,
        space=space if space is not None else dict(st.attrs.get("space", {})),
        validation=st.attrs.get("validation"),
        engine=str(st.attrs.get("engine", "ollama")),
        roofline=st.attrs.get("roofline"),
        pruned=len(pruned),
        pruned_saved_s=sum(r.pruned_saved_s or 0.0 for r in pruned),
        trials=st.records,
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
