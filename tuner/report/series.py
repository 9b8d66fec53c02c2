"""The data series the figures draw: search history, parameters and importances, telemetry, timeline."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from tuner import results
from tuner.effects import MIN_TRIALS_FOR_IMPORTANCES, compute as compute_effects
from tuner.record import HOST_TELEMETRY_ROWS, PREFILL_TPS, TrialRecord
from tuner.report.base import LOG_AXIS_RATIO, TELEMETRY_VIEWS, EmptyFigure, _gpu_names, _num
from tuner.results import StoredStudy

if TYPE_CHECKING:
    from tuner.report.data import ReportData


@dataclass(frozen=True)
class TrialPoint:
    """A complete trial on the search plots: its first objective value and its settings."""

    number: int
    value: float
    feasible: bool
    config: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParamAxis:
    """A searched setting: numeric (a number line) or categorical (its values, in order)."""

    name: str
    numeric: bool
    categories: list[Any]


@dataclass(frozen=True)
class TelemetryPoint:
    """A measured trial's rate against one telemetry value."""

    number: int
    tps: float
    value: float
    feasible: bool
    config: str


@dataclass(frozen=True)
class TelemetryView:
    """One telemetry value against the rate, with the limit on it when the study set one."""

    key: str
    label: str
    limit_name: str | None
    limit: float | None
    points: list[TelemetryPoint]
    caption: str = ""


@dataclass(frozen=True)
class TrialValue:
    """One value of a measured trial, for the per-trial plots."""

    number: int
    value: float
    sd: float | None
    feasible: bool
    config: str


@dataclass(frozen=True)
class TrialSeries:
    """One host telemetry value of every trial that recorded it."""

    key: str
    label: str
    points: list[TrialValue]


@dataclass(frozen=True)
class TimelineRow:
    """A finished trial on the timeline: when it ran, how it ended and its model (re)load."""

    number: int
    #: The trial's outcome in the terminal's words (feasible, infeasible, pruned, failed).
    outcome: str
    start: str
    end: str
    duration_s: float
    reload_ms: float | None
    config: str


def _searched(space: dict[str, list[Any]], points: Sequence[TrialPoint]) -> list[ParamAxis]:
    """The settings that vary (``results.searched_values``), as figure axes."""
    axes = []
    for k, values in sorted(results.searched_values(space, [p.params for p in points]).items()):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        stored = [v for v in space.get(k, []) if v in values]
        cats = stored + sorted((v for v in values if v not in stored), key=repr)
        axes.append(ParamAxis(k, numeric, sorted(cats) if numeric else cats))
    return axes


def best_so_far(points: Sequence[TrialPoint], maximize: bool) -> list[float | None]:
    """The best feasible value up to each point (None before the first feasible one)."""
    out: list[float | None] = []
    best: float | None = None
    for p in points:
        if p.feasible and (best is None or (p.value > best if maximize else p.value < best)):
            best = p.value
        out.append(best)
    return out


def _importances(data: ReportData) -> None:
    """PED-ANOVA importances of the searched settings, computed by optuna over a study
    rebuilt in memory from the parameter points (nothing is read from storage again)."""
    pts, axes = data.param_points, data.params
    if len(pts) < 2 or len(axes) < 2:
        data.empty.append(EmptyFigure(
            "importances", "Parameter importances",
            "Importances need at least 2 measured trials and more than one searched setting "
            f"(have {len(pts)} trial(s), {len(axes)} setting(s))."))
        return
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    dists: dict[str, Any] = {}
    for a in axes:
        if a.numeric and all(isinstance(v, int) for v in a.categories):
            dists[a.name] = IntDistribution(min(a.categories), max(a.categories))
        elif a.numeric:
            dists[a.name] = FloatDistribution(float(min(a.categories)), float(max(a.categories)))
        else:
            dists[a.name] = CategoricalDistribution(a.categories)
    trials = [optuna.trial.create_trial(value=p.value, params={a.name: p.params[a.name] for a in axes},
                                        distributions=dists)
              for p in pts if all(a.name in p.params for a in axes)]
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(direction="maximize" if data.maximize else "minimize")
        study.add_trials(trials)
        with warnings.catch_warnings():
            # PED-ANOVA warns about small samples; the figure caption says so instead.
            warnings.simplefilter("ignore")
            imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except Exception as e:  # importance evaluators reject degenerate data
        data.empty.append(EmptyFigure("importances", "Parameter importances",
                                      f"Importances could not be computed: {e}"))
        return
    finally:
        optuna.logging.set_verbosity(level)
    data.importances = sorted(((k, float(v)) for k, v in imp.items()), key=lambda kv: -kv[1])


def _search(data: ReportData, s: StoredStudy) -> None:
    """The history, parameter and importance data of the search figures."""
    complete = [r for r in s.records if r.state == "COMPLETE" and r.values and _num(r.values[0]) is not None]
    # Failed loads score 0 when maximising (a fair "no tokens"), but 1e12 when minimising,
    # which would flatten the plot: leave them out then (they are in the failures table).
    data.history = [TrialPoint(r.number, r.values[0], r.feasible, r.config_text())
                    for r in complete if r.values and (data.maximize or not r.error)]
    if not data.history:
        data.empty.append(EmptyFigure("history", "Optimisation history", "No complete trial yet: nothing to plot."))
    data.param_points = [TrialPoint(r.number, r.values[0], r.feasible, r.config_text(), r.params)
                         for r in complete if r.values and r.params and not r.error]
    data.params = _searched(data.header.space, data.param_points)
    if not data.param_points or not data.params:
        data.param_points, data.params = [], []
        data.empty.append(EmptyFigure("parameters", "Parameter effects, importances, parallel coordinates, slices",
                                      _no_parameters(s)))
        return
    if not any(p.feasible for p in data.param_points) and any(r.baseline and r.feasible for r in s.records):
        data.param_note = ("Only the baseline was feasible, and it has no searched settings: every trial drawn "
                           "here broke a limit (see Failures).")
    data.effects = compute_effects(s)
    if not data.effects.params:
        data.empty.append(EmptyFigure("effects", "Parameter effects",
                                      "No searched setting has measured trials (contended trials are left out "
                                      "when uncontended ones exist)."))
    if len(data.param_points) < MIN_TRIALS_FOR_IMPORTANCES:
        data.empty.append(EmptyFigure(
            "importances", "Parameter importances",
            f"Fewer than {MIN_TRIALS_FOR_IMPORTANCES} measured trials for importances "
            f"({len(data.param_points)} measured): PED-ANOVA contrasts the top 10% of trials with all of them, "
            "so a ranking from fewer rests on one or two lucky trials; Parameter effects shows what these "
            "trials do show."))
        return
    _importances(data)


def _gpu_reason(env: dict[str, Any], what: str) -> str:
    """Why no trial recorded a GPU value, from what the study stored about the machine."""
    names = _gpu_names(env)
    if not names:
        why = env.get("gpu_unavailable_reason")
        return (f"No {what}: no GPU telemetry, NVML not available on the server's machine"
                + (f" ({why})." if why else "."))
    return (f"No {what}: NVML saw {names} but no measured trial recorded it (the server runs on another "
            "machine, or the model ran on the CPU).")


def _telemetry(measured: Sequence[TrialRecord], data: ReportData, env: dict[str, Any]) -> None:
    limits = data.header.limits
    for key, label, limit_name, caption, get in TELEMETRY_VIEWS:
        pts = [(r, _num(r.stat(data.tps_metric)), _num(get(r))) for r in measured]
        points = [TelemetryPoint(r.number, x, y, r.feasible, r.config_text()) for r, x, y in pts
                  if x is not None and y is not None]
        title = f"{label} against {data.tps_label}"
        if points:
            limit = limits.get(limit_name) if limit_name else None
            data.telemetry.append(TelemetryView(key, label, limit_name if limit is not None else None, limit, points,
                                                caption))
        elif not measured:
            data.empty.append(EmptyFigure(key, title, "No trial was measured (every trial failed or failed to load)."))
        elif key == "vram":
            data.empty.append(EmptyFigure(key, title, _gpu_reason(env, "GPU memory")[:-1]
                                          + "; and the server reported no VRAM use."))
        else:
            data.empty.append(EmptyFigure(key, title, _gpu_reason(env, label)))


def log_axis(values: Sequence[float]) -> bool:
    """Whether an axis of these values reads better on a log scale: all positive, and the
    largest at least ``LOG_AXIS_RATIO`` times the smallest."""
    vals = [v for v in values if v is not None]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) >= LOG_AXIS_RATIO


def _no_parameters(s: StoredStudy) -> str:
    """Why there is no trial to draw the parameter figures from."""
    measured = [r for r in s.records if r.measured]
    if not measured:
        return "No trial was measured yet (every trial failed or failed to load): no settings to plot."
    if all(r.baseline for r in measured):
        if any(not r.baseline and r.state == "COMPLETE" for r in s.records):
            how = "feasible" if any(r.feasible for r in measured) else "measured"
            return (f"Only the baseline (the engine's defaults) was {how}: every trial with searched settings "
                    "failed to load (see Failures).")
        return "Only the baseline (the engine's defaults) was measured: no trial with searched settings yet."
    return "No setting varied between the measured trials (fixed settings only): nothing to compare."


def _per_trial(measured: Sequence[TrialRecord], data: ReportData) -> None:
    """Prefill tok/s and the host telemetry of each measured trial, by trial number."""
    data.prefill = [TrialValue(r.number, v, _num(r.stat(PREFILL_TPS, "sd")), r.feasible, r.config_text())
                    for r in measured if (v := _num(r.stat(PREFILL_TPS))) is not None]
    if not data.prefill:
        data.empty.append(EmptyFigure("prefill", "Prefill tok/s per trial",
                                      "No measured trial recorded prefill tok/s."
                                      if measured else "No trial was measured (every trial failed or failed to load)."))
    # Host values live in the record's telemetry group (``telemetry_value`` would flatten every
    # record once per value: 30 ms at 1,000 trials).
    configs = {p.number: p.config for p in data.prefill}
    for label, name in HOST_TELEMETRY_ROWS:
        pts = [TrialValue(r.number, v, None, r.feasible, configs.get(r.number) or r.config_text())
               for r in measured if (v := _num(r.telemetry.get(name))) is not None]
        if pts:
            data.host.append(TrialSeries(name, label, pts))
    if not data.host:
        data.empty.append(EmptyFigure(
            "host", "Host CPU and memory per trial",
            "No host telemetry: no measured trial recorded CPU use or the server's memory (psutil not "
            "installed where the tuner ran, or no trial measured yet)."))


@dataclass(frozen=True)
class DraftPoint:
    """Decode tok/s of one workload prompt at one draft length, over every request measured so."""

    prompt: str
    #: Tokens drafted per step (0: no drafting; a config that sent none runs the engine's default).
    draft: int
    #: Geometric mean of the per-request decode rates and its 95% interval (None: one request).
    decode_tps: float
    ci95: tuple[float, float] | None
    requests: int
    #: Accepted share of the drafted tokens (None: the engine reports no counts).
    acceptance: float | None
    #: Trials at this draft length whose greedy output differed with drafting.
    changed_output: int = 0


def drafting_series(measured: Sequence[TrialRecord], engine_default: int) -> list[DraftPoint]:
    """Decode against draft length per workload prompt, from the raw samples of the measured
    trials (contended ones left out); [] when no trial chose a draft length."""
    from tuner.stats import log_ci95

    if not any("draft_num_predict" in r.options for r in measured):
        return []
    rates: dict[tuple[str, int], list[float]] = {}
    drafted: dict[tuple[str, int], list[int]] = {}
    changed: dict[int, int] = {}
    for r in measured:
        if r.contended:
            continue
        draft = int(r.options.get("draft_num_predict", engine_default))
        changed[draft] = changed.get(draft, 0) + int(r.output_changed)
        for x in r.request_samples():
            if x.eval_tokens > 0 and x.eval_ms > 0:
                rates.setdefault((x.prompt, draft), []).append(x.decode_tps)
            if x.draft_tokens:
                d = drafted.setdefault((x.prompt, draft), [0, 0])
                d[0] += x.draft_tokens
                d[1] += x.draft_accepted or 0
    out = []
    for (prompt, draft), values in sorted(rates.items()):
        if len(values) >= 2:
            g, lo, hi = log_ci95(values)
            ci: tuple[float, float] | None = (lo, hi)
        else:
            g, ci = values[0], None
        d = drafted.get((prompt, draft))
        out.append(DraftPoint(prompt, draft, g, ci, len(values), d[1] / d[0] if d else None, changed.get(draft, 0)))
    return out


def _timeline(records: Sequence[TrialRecord]) -> list[TimelineRow]:
    """Every finished trial from its start to its end, with its model (re)load time."""
    out = []
    for r in records:
        if r.datetime_start is None or r.datetime_complete is None or r.duration_s is None:
            continue
        out.append(TimelineRow(r.number, results.outcome(r), r.datetime_start.isoformat(),
                               r.datetime_complete.isoformat(), r.duration_s, _num(r.reload_ms), r.config_text()))
    return out
