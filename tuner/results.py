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
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from tuner.errors import StudyError
from tuner.gains import Ablation, Change
from tuner.record import (CREATED_AT, VALIDATION, StudyInfo, TrialRecord, baseline_of, constraints, has_error,
                          read_record, read_study_info)
from tuner.settings import SETTINGS
from tuner.machine import offloads
from tuner.memory import fit_of
from tuner.stats import overlaps
from tuner.storage import lost_trial_key, rdb_trials
from tuner.terminal import tune_command

if TYPE_CHECKING:
    from optuna import Study
    from optuna.trial import FrozenTrial

def engine_name(engine: str) -> str:
    """The engine a study ran on as people call it: "Ollama", "llama.cpp", else "engine"."""
    return {"ollama": "Ollama", "llama-cpp": "llama.cpp"}.get(engine, "engine")


def defaults_name(engine: str) -> str:
    """What the baseline is called: the defaults of the engine a study ran on."""
    return f"{engine_name(engine)} defaults"


def _optuna() -> Any:
    import optuna

    return optuna


def is_complete(t: FrozenTrial) -> bool:
    return t.state == _optuna().trial.TrialState.COMPLETE


def violation(t: FrozenTrial) -> float:
    """Sum of positive constraint values (0 = feasible)."""
    return float(sum(v for v in constraints(t).values() if v > 0))


def is_feasible(t: FrozenTrial) -> bool:
    return is_complete(t) and violation(t) <= 0 and not has_error(t)


def directions(study: Study) -> list[str]:
    return [d.name.lower() for d in study.directions]


def lost_errors(study: Study) -> dict[int, str]:
    """Why each trial failed by the heartbeat check failed (trial number -> text)."""
    return _lost(study.user_attrs)


def _lost(attrs: dict[str, Any]) -> dict[int, str]:
    prefix = lost_trial_key(0)[:-1]
    return {int(k[len(prefix):]): str(v) for k, v in attrs.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def view(t: FrozenTrial, lost: dict[int, str] | None = None) -> TrialRecord:
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

    @cached_property
    def info(self) -> StudyInfo:
        """The study's record (objectives, environment, workload, baseline ...)."""
        return read_study_info(self)

    @property
    def validation(self) -> Validation | None:
        """The stored re-validation, or None (none, or written by another version)."""
        stored = self.attrs.get(VALIDATION)
        try:
            return Validation.from_dict(stored) if isinstance(stored, dict) else None
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    @property
    def ablation(self) -> Ablation | None:
        """What each of the winner's settings is worth, as stored; None without one."""
        return Ablation.from_dict(self.info.ablation)

    def _score(self, r: TrialRecord) -> float:
        sign = 1.0 if self.direction == "maximize" else -1.0
        return sign * (r.values[0] if r.values else -math.inf)

    def ranked(self) -> list[TrialRecord]:
        """Feasible trials with a value, best first (first objective); trials measured while
        other processes competed (contended) take part only when no other trial is feasible."""
        # A trial that reused an earlier one's measurement repeats that trial: listed once.
        feasible = [r for r in self.records if r.feasible and r.values and r.reused_from is None]
        quiet = [r for r in feasible if not r.contended]
        return sorted(quiet or feasible, key=self._score, reverse=True)

    @property
    def last_update(self) -> Any:
        """When a trial last started or finished (Optuna's naive local time), or None."""
        return max((r.datetime_complete or r.datetime_start for r in self.records if r.datetime_start), default=None)

    @property
    def only_contended(self) -> bool:
        """Every feasible trial was measured while other processes competed."""
        feasible = [r for r in self.records if r.feasible and r.values]
        return bool(feasible) and all(r.contended for r in feasible)

    def contention(self) -> tuple[int, int, float]:
        """Trials still flagged contended, measurements discarded for contention, and the
        seconds contention cost (discarded measurements and waits for a quiet machine)."""
        return (sum(1 for r in self.records if r.contended), sum(r.remeasured for r in self.records),
                sum(r.contention_lost_s or 0.0 for r in self.records))

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
            if val.defaults_won:
                # Re-measured in the same quiet rounds as the winner, whatever its search measurement.
                base = self.baseline()
                if base is not None and base.number == val.winner and base.feasible:
                    return base
        return ranked[0]

    def least_violating(self) -> TrialRecord | None:
        """When nothing is feasible: the complete, measured trial closest to the limits."""
        return min((r for r in self.records if r.measured), key=lambda r: (r.violation, -self._score(r)),
                   default=None)

    def baseline(self) -> TrialRecord | None:
        """The measured baseline trial (the engine's defaults), if any."""
        return baseline_of(self.records)

    def speedup(self, r: TrialRecord) -> float | None:
        """``r``'s first objective over the baseline's (maximised objectives only)."""
        base = self.baseline()
        if base is None or not base.values or not r.values or self.direction != "maximize":
            return None
        return r.values[0] / base.values[0] if base.values[0] > 0 else None

    def winner_speedup(self, r: TrialRecord) -> Speedup | SearchSpeedup | NoSpeedup:
        """``r`` over the engine's defaults, as every view shows it: the re-validation's paired
        :class:`Speedup` when it re-measured ``r`` with the defaults, else the search's single
        measurements (:class:`SearchSpeedup`), else why there is none (:class:`NoSpeedup`)."""
        if r.baseline:
            return NoSpeedup(DEFAULTS_WON)
        val = self.validation
        if val is not None and val.speedup is not None and val.speedup.trial == r.number:
            return val.speedup
        base = self.baseline()
        if base is None:
            return NoSpeedup(NO_BASELINE)
        ratio = self.speedup(r)
        if ratio is None:
            return NoSpeedup(NO_RATIO)
        if val is None:
            why = NOT_REVALIDATED
        elif val.rounds < 2 and (val.contended or val.dropped):
            why = NO_QUIET_ROUNDS
        else:
            why = NOT_PAIRED
        return SearchSpeedup(ratio, r.number, r.value, base.number, base.value, bool(r.contended or base.contended),
                             why)

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
                                 f"see `{tune_command('show', self.name)}`")
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


def changed_settings(r: TrialRecord, defaults: TrialRecord | None, base_model: str,
                     fixed: frozenset[str] = frozenset()) -> list[str]:
    """The settings ``r`` sets away from the engine's defaults, as ``name=value``
    (:func:`changes`)."""
    return [f"variant={r.model_label}" if c.kind == "variant" else f"{c.setting}={c.value}"
            for c in changes(r, defaults, base_model, fixed)]


def changes(r: TrialRecord, defaults: TrialRecord | None, base_model: str,
            fixed: frozenset[str] = frozenset()) -> list[Change]:
    """The settings ``r`` sets away from the engine's defaults, with what the defaults ran.

    The baseline sends none. A value the baseline also ran (as the engine reported it: a server
    setting, the context, llama.cpp's batch and threads; or the ``--context`` it sent) or a
    setting's "runtime decides" value (``num_thread=0``, ``num_gpu=-1``, ``flash_attention=auto``)
    is the default, so it does not count; neither does a setting the study fixed (``fixed``:
    every config sends the same value, it is no choice).
    """
    if r.baseline:
        return []
    # What the defaults ran as the engine reported it (llama.cpp's context, batch, threads; the
    # context /api/ps allocated), with what the baseline sent on top.
    base_opts = {**defaults.ran, **defaults.options} if defaults is not None else {}
    base_server = defaults.effective_server if defaults is not None else {}
    out = []
    model = defaults.model if defaults is not None and defaults.model else base_model
    if r.model and model and r.model != model:
        out.append(Change("variant", model, r.model, "variant"))
    server = r.effective_server
    for k, v in {**r.options, **server}.items():
        s = SETTINGS.get(k)
        if k in fixed or base_opts.get(k, base_server.get(k)) == v or (s is not None and v in (s.auto, "auto")):
            continue
        out.append(Change(k, base_opts.get(k, base_server.get(k)), v, "server" if k in server else "option"))
    return out


def searched_values(space: dict[str, Any] | None, params: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The settings that were searched and the values trials took: those with more than one
    value in the stored ``space`` (without one, those that varied), stored order first."""
    seen: dict[str, list[Any]] = {}
    for p in params:
        for k, v in p.items():
            vals = seen.setdefault(k, [])
            if v not in vals:
                vals.append(v)
    if space:
        return {k: [v for v in space[k] if v in seen[k]] + [v for v in seen[k] if v not in space[k]]
                for k in space if isinstance(space[k], list) and len(space[k]) > 1 and k in seen}
    return {k: v for k, v in seen.items() if len(v) > 1}


def roofline_of(info: StudyInfo) -> dict[str, Any] | None:
    """The stored roofline, less a CPU ceiling stored for a server that offloads to a GPU (an
    older version stored one): that is not the GPU's ceiling."""
    r = info.roofline
    if r and str(r.get("device")) == "CPU" and offloads(info) is True:
        return None
    return r


def read_study(study: Study) -> StoredStudy:
    """Read ``study`` once: its trials in one read (:func:`trials_of`), one record per trial."""
    with paused_gc():
        attrs = dict(study.user_attrs)
        lost = _lost(attrs)
        records = sorted((read_record(t, lost) for t in trials_of(study)), key=lambda r: r.number)
        return StoredStudy(study.study_name, attrs, directions(study), records)


def trials_of(study: Study) -> list[FrozenTrial]:
    """``study.get_trials(deepcopy=False)``; from an RDB storage, read with one plain query
    per table (:func:`tuner.storage.rdb_trials`: several times faster on a large study)."""
    storage, study_id = getattr(study, "_storage", None), getattr(study, "_study_id", None)
    try:
        trials = rdb_trials(storage, study_id) if storage is not None and isinstance(study_id, int) else None
    except Exception:  # a schema this reader does not know: Optuna's own read is always right
        trials = None
    return study.get_trials(deepcopy=False) if trials is None else trials


def read_all_studies(storage: Any) -> list[StoredStudy]:
    """Every study in ``storage``, each read once: the studies and their attributes in one
    call (``get_all_studies``), then one ``get_all_trials`` per study."""
    out = []
    with paused_gc():
        for fs in storage.get_all_studies():
            attrs = dict(fs.user_attrs)
            lost = _lost(attrs)
            trials = storage.get_all_trials(storage.get_study_id_from_name(fs.study_name), deepcopy=False)
            records = sorted((read_record(t, lost) for t in trials), key=lambda r: r.number)
            out.append(StoredStudy(fs.study_name, attrs, [d.name.lower() for d in fs.directions], records))
    return out


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


def ranked_feasible(study: Study) -> list[TrialRecord]:
    """Feasible trials of a stored study, best first."""
    return read_study(study).ranked()


def best_feasible(study: Study) -> TrialRecord | None:
    """The best feasible trial of a stored study (see :meth:`StoredStudy.best`)."""
    return read_study(study).best()


def pick_trial(study: Study, number: int | None, allow_infeasible: bool = False) -> TrialRecord:
    """Trial ``number`` of a stored study, or its best feasible one (see :meth:`StoredStudy.pick`)."""
    return read_study(study).pick(number, allow_infeasible)


#: Trial states by the words of :func:`outcome` (a COMPLETE one is feasible or infeasible).
_OUTCOMES = {"COMPLETE": "feasible", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def outcome(r: TrialRecord) -> str:
    """A trial's outcome, the one vocabulary of the terminal and the report: feasible,
    infeasible (complete but over a limit, or failed to load), pruned, failed, running, and
    imported (another tool's result: tuner/importing.py)."""
    if r.imported:
        return "imported"
    key = _OUTCOMES.get(r.state, r.state.lower())
    return "infeasible" if key == "feasible" and not r.feasible else key


def _recency(s: Any) -> tuple[Any, ...]:
    """Sort key of a StudySummary: first trial's start, then the tuner's creation time, then name.

    A study without trials ranks below every study with one.
    """
    return (s.datetime_start is not None, s.datetime_start or 0, str(s.user_attrs.get(CREATED_AT, "")),
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


def trials_frame(study: Study) -> Any:
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
    #: Trials flagged contended, measurements redone for contention, seconds it cost, and
    #: whether every feasible trial was contended (then the winner is uncertain).
    contended: int = 0
    remeasured: int = 0
    contention_lost_s: float = 0.0
    only_contended: bool = False
    #: The feasible winner over the defaults (:meth:`StoredStudy.winner_speedup`); None when
    #: nothing is feasible.
    winner_speedup: Speedup | SearchSpeedup | NoSpeedup | None = None
    #: How the winner fits the GPU (reported and predicted memory, what is left); None without a model.
    fit: Any = None
    #: Why sampling stopped before --trials (--max-time), in words; "" when it did not.
    stopped_on_time: str = ""
    #: What each of the winner's settings is worth (tuner/gains.py); None without an ablation.
    ablation: Ablation | None = None
    #: What makes the result less certain than it looks (tuner/caveats.py), from the stored
    #: study; :attr:`all_warnings` adds the run's own ``warnings``.
    caveats: list[Any] = field(default_factory=list)

    @property
    def all_warnings(self) -> list[Any]:
        """Every caveat every view shows: the run's warnings (coded), then the study's."""
        from tuner.caveats import all_caveats

        return all_caveats(self.warnings, self.caveats)


def summarise_study(study: Study, objectives: list[str], storage: str, trials_run: int = 0,
                    space: dict[str, list[Any]] | None = None) -> StudySummary:
    """The run summary of a stored study."""
    from tuner.caveats import study_caveats

    st = read_study(study)
    best = st.best()
    feasible = best is not None
    if best is None:
        best = st.least_violating()
    pruned = [r for r in st.records if r.state == "PRUNED"]
    contended, remeasured, lost_s = st.contention()
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
        space=space if space is not None else st.info.space,
        validation=st.info.validation,
        engine=st.info.engine_or_default,
        roofline=roofline_of(st.info),
        pruned=len(pruned),
        pruned_saved_s=sum(r.pruned_saved_s or 0.0 for r in pruned),
        trials=st.records,
        contended=contended, remeasured=remeasured, contention_lost_s=lost_s,
        only_contended=st.only_contended,
        winner_speedup=st.winner_speedup(best) if best is not None and feasible else None,
        fit=fit_of(best, st.attrs, st.records) if best is not None and feasible else None,
        caveats=study_caveats(st, best if feasible else None),
        # The ablation of the winner shown, not of an earlier one.
        ablation=st.ablation if st.ablation is not None and best is not None and feasible
        and st.ablation.winner == best.number else None,
    )


def _fields(cls: Any, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without keys ``cls`` does not know (written by a later version)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Validated:
    """One config re-measured: its value in each counted round, their centre and 95% interval,
    and the settings it changes from the engine's defaults."""

    number: int
    values: list[float] = field(default_factory=list)
    #: The centre: the geometric mean (``Validation.interval`` "log-t"); the arithmetic mean
    #: in validations stored before.
    mean: float = 0.0
    #: The sample sd of ``values`` (their spread, not the interval's).
    sd: float = 0.0
    ci95: tuple[float, float] = (0.0, 0.0)
    error: str | None = None
    #: Settings set away from the engine's defaults, as ``name=value`` (fewest = simplest).
    changed: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Validated:
        return cls(**{**_fields(cls, d), "ci95": tuple(d.get("ci95") or (0.0, 0.0))})

    def text(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if not self.values:
            return "not measured (no uncontended round)"
        return f"{self.mean:.2f} (95% CI {self.ci95[0]:.2f} .. {self.ci95[1]:.2f}, sd {self.sd:.2f})"


@dataclass
class Speedup:
    """The winner over the defaults re-measured in the same interleaved rounds: the geometric
    mean of the per-round ratios and its 95% interval (t on the log scale)."""

    #: The config compared (the validation's winner) and the baseline trial.
    trial: int
    baseline: int
    ratio: float
    ci95: tuple[float, float]
    #: winner / defaults in each round that measured both.
    ratios: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Speedup:
        return cls(**{**_fields(cls, d), "ci95": tuple(d["ci95"])})

    @property
    def distinguishable(self) -> bool:
        """The interval leaves out 1x: the winner really differs from the defaults."""
        return not self.ci95[0] <= 1.0 <= self.ci95[1]

    def describe(self, label: str, defaults: str) -> str:
        """e.g. "1.83x decode tok/s vs llama.cpp defaults (95% CI 1.71-1.95x, re-measured ...)"."""
        text = (f"{self.ratio:.2f}x {label} vs {defaults} (95% CI {self.ci95[0]:.2f}-{self.ci95[1]:.2f}x, "
                f"re-measured interleaved over {_plural(len(self.ratios), 'round')})")
        return text if self.distinguishable else text + ": not distinguishable from the defaults"


@dataclass(frozen=True)
class SearchSpeedup:
    """A trial over the defaults from the search's single measurement of each: no interval."""

    ratio: float
    #: The trial and the baseline trial, with their search values.
    trial: int
    value: float | None
    baseline: int
    baseline_value: float | None
    #: Either was measured while other processes competed.
    contended: bool = False
    #: Why there is no interval: NOT_REVALIDATED, NO_QUIET_ROUNDS or NOT_PAIRED.
    no_interval: str = "not revalidated"


#: Why a speedup has no interval (:attr:`SearchSpeedup.no_interval`): no re-validation ran; it ran
#: but every round was contended; it ran but did not re-measure this trial with the defaults.
NOT_REVALIDATED, NO_QUIET_ROUNDS, NOT_PAIRED = "not revalidated", "no quiet rounds", "not paired"
#: Each reason in words, and what to do about it.
NO_INTERVAL_TEXT = {
    NOT_REVALIDATED: ("the winner and the defaults were never re-measured together",
                      "--validate 2 (or more) re-measures them interleaved and gives a 95% interval"),
    NO_QUIET_ROUNDS: ("the re-validation found no round free of other processes' load",
                      "re-run when the machine is quiet to re-measure them interleaved"),
    NOT_PAIRED: ("the stored re-validation did not re-measure this trial together with the defaults",
                 "a resumed run with --validate 2 (or more) re-measures the current top with the defaults"),
}


#: Why a trial has no speedup over the defaults (:attr:`NoSpeedup.reason`): it is the defaults;
#: the study has no baseline trial; no ratio exists (the objective is minimised, or a value is missing).
DEFAULTS_WON = "defaults won"
NO_BASELINE = "no baseline"
NO_RATIO = "no ratio"


@dataclass(frozen=True)
class NoSpeedup:
    """No speedup over the defaults, and why (``DEFAULTS_WON``, ``NO_BASELINE`` or ``NO_RATIO``)."""

    reason: str


#: How a speedup from the search's single measurements (not the re-validation's interleaved
#: rounds) is qualified wherever it is shown; the short form for one-line contexts.
SEARCH_ONLY = "each measured once in the search; no interval: --validate 2 gives one"
SEARCH_ONLY_SHORT = "single search measurements, no interval"


def search_only(no_interval: str = NOT_REVALIDATED) -> str:
    """:data:`SEARCH_ONLY`, with the reason when a re-validation ran and still gave no interval."""
    if no_interval == NOT_REVALIDATED:
        return SEARCH_ONLY
    why, todo = NO_INTERVAL_TEXT[no_interval]
    return f"each measured once in the search; no interval: {why}; {todo}"


def search_speedup_text(ratio: float, label: str, defaults: str, baseline: tuple[int, float | None] | None = None,
                        best: float | None = None, contended: bool = False, short: bool = False,
                        no_interval: str = NOT_REVALIDATED) -> str:
    """A speedup from the search's single measurements, saying so: e.g. "1.85x decode tok/s vs
    Ollama defaults (baseline trial #0: 160.49, best: 297.30; each measured once in the search;
    no interval: --validate 2 gives one)"; ``short``: "(single search measurements, no interval)"."""
    notes = [] if short or baseline is None else [
        f"baseline trial #{baseline[0]}: {_two(baseline[1])}, best: {_two(best)}"]
    notes.append(SEARCH_ONLY_SHORT if short else search_only(no_interval))
    if contended:
        notes.append("measured while other processes competed: not a number to rely on")
    return f"{ratio:.2f}x {label} vs {defaults} ({'; '.join(notes)})"


def _two(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


@dataclass
class Validation:
    """Result of re-measuring the top configs; ``winner`` is the recommended one."""

    objective: str
    #: Rounds that counted (contended ones dropped).
    rounds: int
    entries: list[Validated]
    winner: int | None
    #: Another config's interval overlaps the leader's: not distinguishable.
    overlap: bool
    trials_at: int
    #: The most rounds allowed (0: stored before rounds were adaptive).
    max_rounds: int = 0
    #: The best centre; differs from ``winner`` when a simpler config is not distinguishable.
    leader: int | None = None
    #: Rounds found contended (each measured again once) and those dropped when it was again.
    contended: int = 0
    dropped: int = 0
    #: How the intervals were computed: "log-t" (t on the log scale); "" for validations
    #: stored before (a t-interval on the values, clamped at 0).
    interval: str = ""
    #: The defaults re-measured in the same rounds, and the winner's speedup over them.
    baseline: Validated | None = None
    speedup: Speedup | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Validation:
        """Read back what ``to_dict`` stored (the study attribute ``validation``), from any version."""
        entries = [Validated.from_dict(e) for e in d.get("entries", [])]
        base = Validated.from_dict(d["baseline"]) if d.get("baseline") else None
        speedup = Speedup.from_dict(d["speedup"]) if d.get("speedup") else None
        return cls(**{**_fields(cls, d), "entries": entries, "baseline": base, "speedup": speedup})

    @property
    def defaults_won(self) -> bool:
        """The recommendation is the defaults: the leader was not faster, paired round by round."""
        return self.baseline is not None and self.winner == self.baseline.number and self.speedup is not None

    def tied(self) -> list[Validated]:
        """The leader, then every measured config whose interval overlaps it, best first."""
        lead = next((e for e in self.entries if e.number == (self.leader if self.leader is not None
                                                              else self.winner)), None)
        if lead is None:
            return []
        others = sorted((e for e in self.entries if e is not lead and not e.error and len(e.values) >= 2
                         and overlaps(e.ci95, lead.ci95)), key=lambda e: -e.mean)
        return [lead, *others]

    def verdict(self) -> str:
        """Whether the winner stands out, and why it was recommended when it does not."""
        if self.winner is None:
            if self.rounds < 2:
                return (f"Too few uncontended rounds ({self.rounds}) to compare the top configs: "
                        "the best configuration is the search's leader.")
            return ""
        if self.defaults_won and self.speedup is not None:
            sp = self.speedup
            return (f"#{sp.trial} is not distinguishable from the defaults (paired {sp.ratio:.2f}x, 95% CI "
                    f"{sp.ci95[0]:.2f}-{sp.ci95[1]:.2f}x over {len(sp.ratios)} rounds): recommending the defaults, "
                    "which change nothing.")
        if not self.interval:
            return ("The top two intervals overlap: they are not distinguishable at this precision "
                    "(more --validate-rounds narrows the intervals)." if self.overlap else "")
        if not self.overlap:
            return f"#{self.winner} is ahead of the others (95% CIs do not overlap after {self.rounds} rounds)."
        tied = self.tied()
        nums = [f"#{e.number}" for e in tied]
        names = ", ".join(nums[:-1]) + " and " + nums[-1]
        win = next(e for e in tied if e.number == self.winner)
        what = _plural(len(win.changed), "setting") + (f" ({', '.join(win.changed)})" if win.changed else "")
        head = (f"{names} are not distinguishable (95% CIs overlap after {self.rounds} rounds): "
                f"recommending #{win.number}")
        if win is not tied[0]:
            return f"{head}, which changes {what} from the defaults instead of {len(tied[0].changed)}."
        return (f"{head}, the best measured, which changes {what} from the defaults, no more than the others "
                "(more --validate-max-rounds narrows the intervals).")

    def describe(self) -> list[str]:
        how = "geometric mean and 95% CI" if self.interval else "mean and 95% CI"
        of = f" of at most {self.max_rounds}" if self.max_rounds > self.rounds else ""
        lines = [f"Re-validated the top {len(self.entries)} ({self.rounds} interleaved rounds{of}, "
                 f"{self.objective}, {how}):"]
        for e in sorted(self.entries, key=lambda e: -e.mean):
            mark = "  <- winner" if e.number == self.winner else ""
            lines.append(f"  #{e.number}: {e.text()}{mark}")
        if self.baseline is not None and self.baseline.number not in {e.number for e in self.entries}:
            mark = "  <- winner" if self.defaults_won else ""
            lines.append(f"  #{self.baseline.number} (defaults): {self.baseline.text()}{mark}")
        verdict = self.verdict()
        if verdict:
            lines.append(f"  {verdict}")
        if self.contended:
            lines.append(f"  {_plural(self.contended, 'round')} contended (other processes competed) and measured "
                         f"again; {self.dropped} contended again and dropped")
        return lines
