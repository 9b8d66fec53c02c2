"""Reading a stored study: feasibility, the best trial, the baseline, a flat table.

Everything here reads only the Optuna study, so ``report``, ``export`` and ``show``
work on any storage, from any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tuner.errors import StudyError
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


#: Optuna's list-form constraints attr: the one form that optuna-dashboard reads (as
#: ``constraints``) and that Optuna's samplers read too (as keys "0", "1", ...).
CONSTRAINTS_KEY = "constraints"
#: The names of that list's values, in order (the dashboard and the samplers ignore it).
CONSTRAINT_NAMES_KEY = "tuner:constraint_names"
_NAMED_PREFIX = CONSTRAINTS_KEY + ":"


def store_constraints(trial: Any, values: dict[str, float]) -> None:
    """Write a running trial's constraints once, as a list plus its names.

    Not ``Trial.set_constraint``: optuna-dashboard 0.21 shows only the list form, and a trial
    holding both forms has each constraint counted twice by TPE and NSGA-II (Optuna 5 merges
    them in ``_get_constraints_from_system_attrs``).
    """
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINT_NAMES_KEY, list(values))
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_KEY, [float(v) for v in values.values()])


def constraints(t: Any) -> dict[str, float]:
    """A trial's constraints by name, each once, whichever form stored them.

    Studies from before ``store_constraints`` hold ``Trial.set_constraint``'s
    ``constraints:NAME`` keys; a list beside such keys without names is a copy of them.
    """
    attrs = getattr(t, "system_attrs", None)
    if attrs is None:
        return dict(t.constraints or {})
    named = {k[len(_NAMED_PREFIX):]: float(v) for k, v in attrs.items() if k.startswith(_NAMED_PREFIX)}
    listed = attrs.get(CONSTRAINTS_KEY) or []
    names = attrs.get(CONSTRAINT_NAMES_KEY)
    if names and len(names) == len(listed):
        return {**dict(zip(names, map(float, listed))), **named}
    if named:
        return named
    return {str(i): float(v) for i, v in enumerate(listed)}


def violation(t: Any) -> float:
    """Sum of positive constraint values (0 = feasible)."""
    return float(sum(v for v in constraints(t).values() if v > 0))


def is_feasible(t: Any) -> bool:
    return is_complete(t) and violation(t) <= 0 and not t.user_attrs.get("error")


def directions(study: Any) -> list[str]:
    return [d.name.lower() for d in study.directions]


@dataclass
class TrialView:
    """A stored trial, reduced to what users read."""

    number: int
    state: str
    model: str
    options: dict[str, Any]
    #: Server settings that really ran (an old server may fall back from what was asked).
    server: dict[str, Any]
    values: list[float] | None
    feasible: bool
    violations: list[str]
    metrics: dict[str, Any]
    baseline: bool
    error: str | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        return self.values[0] if self.values else None

    @property
    def model_label(self) -> str:
        """The model as shown: a GGUF path by its file name."""
        return self.model.rsplit("/", 1)[-1] if self.model.endswith(".gguf") else self.model

    def config_text(self) -> str:
        if self.baseline:
            extra = "".join(f" {k}={v}" for k, v in self.options.items())
            return f"{self.model_label} (defaults: no options sent{extra and ' but' + extra})"
        parts = [f"{k}={v}" for k, v in {**self.options, **self.server}.items()]
        return f"{self.model_label} " + " ".join(parts)


def lost_errors(study: Any) -> dict[int, str]:
    """Why each trial failed by the heartbeat check failed (trial number -> text)."""
    prefix = lost_trial_key(0)[:-1]
    return {int(k[len(prefix):]): str(v) for k, v in study.user_attrs.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def view(t: Any, lost: dict[int, str] | None = None) -> TrialView:
    """The trial as users read it; ``lost`` (from :func:`lost_errors`) explains heartbeat failures."""
    ua = t.user_attrs
    cfg = ua.get("config", {})
    metric_keys = {k: v for k, v in ua.items()
                   if k not in ("config", "samples", "warmup", "error", "violations", "baseline", "server_effective")}
    return TrialView(
        number=t.number,
        state=t.state.name,
        model=cfg.get("model", ""),
        options=dict(cfg.get("options") or {}),
        server={**dict(cfg.get("server") or {}), **dict(ua.get("server_effective") or {})},
        values=list(t.values) if t.values is not None else None,
        feasible=is_feasible(t),
        violations=list(ua.get("violations", [])),
        metrics=metric_keys,
        baseline=bool(ua.get("baseline", False)),
        error=ua.get("error") or ((lost or {}).get(t.number) if t.state.name == "FAIL" else None),
        params=dict(t.params),
    )


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
    cands = [t for t in study.get_trials(deepcopy=False) if is_complete(t) and not t.user_attrs.get("error")]
    if not cands:
        return None
    key = _sort_key(study)
    return min(cands, key=lambda t: (violation(t), -key(t)))


def baseline_trial(study: Any) -> Any | None:
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("baseline") and is_complete(t) and not t.user_attrs.get("error"):
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
                        f"{': ' + t.user_attrs['error'] if t.user_attrs.get('error') else ''}): "
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


def load_study(storage: Any, name: str | None) -> Any:
    """Load study ``name``; with no name, the only (or most recent) study in the storage."""
    optuna = _optuna()
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if not summaries:
        raise StudyError("the storage holds no study: run `tune --model MODEL` first")
    if name is None:
        latest = max(summaries, key=lambda s: (s.datetime_start is not None, s.datetime_start or 0, s._study_id))
        name = latest.study_name
    elif name not in {s.study_name for s in summaries}:
        known = ", ".join(sorted(s.study_name for s in summaries))
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
        for k, val in {**v.options, **v.server}.items():
            row[f"params_{k}"] = val
        for k, val in v.metrics.items():
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
