"""The HTML report of a study: ``build_report`` computes a ReportData, ``render_html`` draws it.

The file is self-contained (plotly.js inlined once), so it opens offline and can be mailed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import html
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuner import results
from tuner.errors import TunerError, WriteError
from tuner.metrics import METRIC_ROWS, OBJECTIVE_LABELS, TELEMETRY_ROWS

TOP_N = 10
REPORTS_DIR = Path("reports")

#: Shown with the best config: the shared telemetry rows plus the reload cost.
BEST_TELEMETRY_ROWS = (*TELEMETRY_ROWS, ("reload ms", "reload_ms"))
#: Telemetry plotted against tok/s: (figure key, attr, axis label, limit attr).
TELEMETRY_VIEWS = (
    ("power", "gpu_power_mean_w", "mean GPU power (W)", "max_power_w"),
    ("vram", "gpu_mem_used_peak_mib", "peak GPU memory (MiB)", "max_vram_mib"),
    ("tokens_per_joule", "tokens_per_joule", "tokens per joule", None),
)
_OBJECTIVE_LABELS = OBJECTIVE_LABELS


@dataclass(frozen=True)
class Header:
    """Facts about the study and the machine it ran on."""

    study_name: str
    model: str
    engine: str
    host: str
    server_version: str
    gpu: str
    cpu: str
    os: str
    objectives: list[str]
    limits: dict[str, float]
    space: dict[str, list[Any]]
    workload: str
    created_at: str
    counts: dict[str, int]


@dataclass(frozen=True)
class MetricRow:
    """One request metric of a trial with its spread over the measured requests."""

    label: str
    key: str
    mean: float | None
    sd: float | None
    p50: float | None
    p95: float | None


@dataclass(frozen=True)
class BestConfig:
    """The winner (or, when nothing is feasible, the least-violating trial)."""

    number: int
    feasible: bool
    model: str
    options: dict[str, Any]
    server: dict[str, Any]
    baseline: bool
    objective: str
    value: float | None
    metrics: list[MetricRow]
    telemetry: list[tuple[str, float]]
    violations: list[str]
    speedup: float | None
    baseline_number: int | None
    baseline_value: float | None


@dataclass(frozen=True)
class TopRow:
    """One row of the top-configs table."""

    rank: int
    number: int
    value: float | None
    config: str
    tps_mean: float | None
    tps_sd: float | None
    ttft_ms_p95: float | None
    latency_ms_p95: float | None
    vram_mib: float | None
    power_w: float | None
    tokens_per_joule: float | None
    speedup: float | None


@dataclass(frozen=True)
class TradeoffPoint:
    """A measured trial on the tok/s vs p95 TTFT plane."""

    number: int
    tps: float
    ttft_ms_p95: float
    feasible: bool
    baseline: bool
    pareto: bool
    config: str


@dataclass(frozen=True)
class FailureRow:
    """A trial that failed, failed to load, or broke a limit, with why."""

    number: int
    kind: str
    config: str
    message: str


@dataclass(frozen=True)
class ValidationRow:
    """One config re-measured in the interleaved re-validation, with its 95% interval."""

    rank: int
    number: int
    config: str
    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None
    search_value: float | None
    winner: bool
    error: str | None


@dataclass(frozen=True)
class PrunedRow:
    """A trial stopped early because it was clearly worse than the best so far."""

    number: int
    config: str
    requests: int
    planned: int | None
    decode_tps_mean: float | None
    last_value: float | None
    saved_s: float


@dataclass(frozen=True)
class NamedFigure:
    """A plotly figure and where it goes in the report."""

    key: str
    title: str
    figure: Any
    caption: str = ""


@dataclass
class ReportData:
    """Everything the report shows; the numbers are plain fields so tests can check them."""

    header: Header
    best: BestConfig | None
    top: list[TopRow]
    tps_metric: str
    tps_label: str
    tradeoff: list[TradeoffPoint]
    max_ttft_ms: float | None
    failures: list[FailureRow]
    figures: list[NamedFigure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generated_at: str = ""
    #: The re-validation of the top configs (``study.user_attrs["validation"]``), best mean first.
    validation: list[ValidationRow] = field(default_factory=list)
    validation_objective: str = ""
    validation_rounds: int = 0
    validation_trials_at: int = 0
    #: The top two 95% intervals overlap: the winner is not distinguishable from the runner-up.
    validation_overlap: bool = False
    #: The declared winner of the re-validation (None without one).
    winner: int | None = None
    #: The re-validation covers the current leader, so the best config is its winner
    #: (as ``results.best_feasible`` decides); False when later trials took the lead.
    validation_current: bool = False
    #: ``study.user_attrs["roofline"]``: the best config's share of the bandwidth ceiling.
    roofline: dict[str, Any] | None = None
    pruned: list[PrunedRow] = field(default_factory=list)
    pruned_saved_s: float = 0.0

    @property
    def pareto(self) -> list[TradeoffPoint]:
        return sorted((p for p in self.tradeoff if p.pareto), key=lambda p: p.tps)


# ------------------------------------------------------------------------------ compute


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _counts(study: Any) -> dict[str, int]:
    counts = {"total": 0, "complete": 0, "feasible": 0, "infeasible": 0, "load_failed": 0,
              "failed": 0, "pruned": 0, "running": 0}
    for t in study.get_trials(deepcopy=False):
        counts["total"] += 1
        state = t.state.name
        if state == "COMPLETE":
            counts["complete"] += 1
            if results.is_feasible(t):
                counts["feasible"] += 1
            else:
                counts["infeasible"] += 1
                if t.user_attrs.get("error"):
                    counts["load_failed"] += 1
        elif state == "FAIL":
            counts["failed"] += 1
        elif state == "PRUNED":
            counts["pruned"] += 1
        else:
            counts["running"] += 1
    return counts


def _gpu_text(env: dict[str, Any]) -> str:
    gpus = env.get("gpus") or []
    if gpus:
        parts = []
        for g in gpus:
            mem = g.get("memory_total_mib")
            parts.append(f"{g.get('name', 'GPU')}" + (f" ({mem} MiB)" if mem else ""))
        driver = gpus[0].get("driver_version")
        return ", ".join(parts) + (f"; driver {driver}" if driver else "")
    reason = env.get("gpu_unavailable_reason")
    return f"none ({reason})" if reason else "none recorded"


def _cpu_text(env: dict[str, Any]) -> str:
    host = env.get("host") or {}
    model = host.get("cpu_model") or "unknown CPU"
    cores = host.get("cpu_physical_cores")
    threads = host.get("cpu_logical_cores")
    ram = host.get("ram_total_mib")
    extra = [f"{cores} cores" if cores else "", f"{threads} threads" if threads else "",
             f"{ram / 1024:.0f} GiB RAM" if ram else ""]
    extra = [e for e in extra if e]
    return model + (f" ({', '.join(extra)})" if extra else "")


def _workload_text(w: dict[str, Any]) -> str:
    if not w:
        return "not recorded"
    prompts = w.get("prompts") or []
    names = ", ".join(str(p.get("name", "?")) for p in prompts)
    return (f"{len(prompts)} prompt(s) ({names}) x {w.get('repeats', '?')} repeat(s), "
            f"{w.get('num_predict', '?')} tokens generated each; source {w.get('source', '?')}")


def _header(study: Any) -> Header:
    ua = study.user_attrs
    env = dict(ua.get("environment") or {})
    return Header(
        study_name=study.study_name,
        model=str(ua.get("model") or env.get("model") or ""),
        engine=str(ua.get("engine") or env.get("engine") or ""),
        host=str(ua.get("host") or ""),
        server_version=str(ua.get("server_version") or env.get("server_version") or "unknown"),
        gpu=_gpu_text(env),
        cpu=_cpu_text(env),
        os=str(env.get("os") or (env.get("host") or {}).get("os") or ""),
        objectives=list(ua.get("objectives") or ["decode_tps"]),
        limits={k: float(v) for k, v in dict(ua.get("limits") or {}).items() if _num(v) is not None},
        space=dict(ua.get("space") or {}),
        workload=_workload_text(dict(ua.get("workload") or {})),
        created_at=str(ua.get("created_at") or ""),
        counts=_counts(study),
    )


def _metric_rows(m: dict[str, Any]) -> list[MetricRow]:
    return [
        MetricRow(label, key, _num(m.get(f"{key}_mean")), _num(m.get(f"{key}_sd")),
                  _num(m.get(f"{key}_p50")), _num(m.get(f"{key}_p95")))
        for label, key in METRIC_ROWS
        if f"{key}_mean" in m
    ]


def _best(study: Any, objective: str) -> BestConfig | None:
    t = results.best_feasible(study)
    feasible = t is not None
    if t is None:
        t = results.least_violating(study)
    if t is None:
        return None
    v = results.view(t)
    base = results.baseline_trial(study)
    return BestConfig(
        number=v.number,
        feasible=feasible,
        model=v.model,
        options=v.options,
        server=v.server,
        baseline=v.baseline,
        objective=objective,
        value=v.value,
        metrics=_metric_rows(v.metrics),
        telemetry=[(label, float(v.metrics[k])) for label, k in BEST_TELEMETRY_ROWS if _num(v.metrics.get(k)) is not None],
        violations=v.violations,
        speedup=results.speedup(study, t) if feasible else None,
        baseline_number=base.number if base is not None else None,
        baseline_value=base.values[0] if base is not None and base.values else None,
    )


def _top(study: Any, tps_key: str) -> list[TopRow]:
    rows = []
    for rank, t in enumerate(results.ranked_feasible(study)[:TOP_N], start=1):
        v = results.view(t)
        m = v.metrics
        rows.append(TopRow(
            rank=rank,
            number=v.number,
            value=v.value,
            config=v.config_text(),
            tps_mean=_num(m.get(f"{tps_key}_mean")),
            tps_sd=_num(m.get(f"{tps_key}_sd")),
            ttft_ms_p95=_num(m.get("ttft_ms_p95")),
            latency_ms_p95=_num(m.get("latency_ms_p95")),
            vram_mib=_num(m.get("gpu_mem_used_peak_mib")),
            power_w=_num(m.get("gpu_power_mean_w")),
            tokens_per_joule=_num(m.get("tokens_per_joule")),
            speedup=results.speedup(study, t),
        ))
    return rows


def _measured(study: Any) -> list[Any]:
    """Complete trials that actually ran requests (not failed loads)."""
    return [t for t in study.get_trials(deepcopy=False) if results.is_complete(t) and not t.user_attrs.get("error")]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when maximising x and minimising y."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 <= y) and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _tradeoff(study: Any, tps_key: str) -> list[TradeoffPoint]:
    rows = []
    for t in _measured(study):
        m = t.user_attrs
        tps, ttft = _num(m.get(f"{tps_key}_mean")), _num(m.get("ttft_ms_p95"))
        if tps is None or ttft is None:
            continue
        rows.append((t, tps, ttft))
    # The front is drawn over feasible trials only: those are the trade-offs one can pick.
    feasible = [(tps, ttft) for t, tps, ttft in rows if results.is_feasible(t)]
    feasible_idx = [i for i, (t, _, _) in enumerate(rows) if results.is_feasible(t)]
    on_front = {feasible_idx[i] for i in pareto_front(feasible)}
    return [
        TradeoffPoint(
            number=t.number, tps=tps, ttft_ms_p95=ttft, feasible=results.is_feasible(t),
            baseline=bool(t.user_attrs.get("baseline")), pareto=i in on_front,
            config=results.view(t).config_text(),
        )
        for i, (t, tps, ttft) in enumerate(rows)
    ]


def _failures(study: Any) -> list[FailureRow]:
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "PRUNED":  # listed with the pruned trials, not as failures
            continue
        v = results.view(t)
        if t.state.name == "FAIL":
            out.append(FailureRow(v.number, "failed", v.config_text(), v.error or "no error recorded"))
        elif v.error:
            out.append(FailureRow(v.number, "load failed", v.config_text(), v.error))
        elif results.is_complete(t) and not v.feasible:
            out.append(FailureRow(v.number, "infeasible", v.config_text(), "; ".join(v.violations) or "violates a limit"))
    return out


def _validation(study: Any, data: ReportData) -> None:
    """Fill the re-validation fields from ``study.user_attrs["validation"]`` (Validation.to_dict())."""
    val = study.user_attrs.get("validation")
    if not isinstance(val, dict) or not isinstance(val.get("entries"), list):
        return
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    winner = val.get("winner")
    winner = winner if isinstance(winner, int) and not isinstance(winner, bool) else None
    rows: list[ValidationRow] = []
    for e in val["entries"]:
        if not isinstance(e, dict) or not isinstance(e.get("number"), int):
            continue
        values = [x for x in (_num(v) for v in e.get("values") or []) if x is not None]
        ci = e.get("ci95")
        lo, hi = (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
        error = str(e["error"]) if e.get("error") else None
        t = trials.get(e["number"])
        measured = bool(values) and error is None
        rows.append(ValidationRow(
            rank=0, number=e["number"],
            config=results.view(t).config_text() if t is not None else "(trial not in the study)",
            n=len(values), mean=_num(e.get("mean")) if measured else None, sd=_num(e.get("sd")) if measured else None,
            ci_low=_num(lo) if measured else None, ci_high=_num(hi) if measured else None,
            search_value=_num(t.values[0]) if t is not None and t.values else None,
            winner=e["number"] == winner, error=error,
        ))
    # As the terminal summary orders them: best mean first, the failed ones last.
    rows.sort(key=lambda r: (r.mean is None, -(r.mean or 0.0)))
    data.validation = [dataclasses.replace(r, rank=i) for i, r in enumerate(rows, start=1)]
    data.validation_objective = str(val.get("objective") or "")
    data.validation_rounds = int(_num(val.get("rounds")) or 0)
    data.validation_trials_at = int(_num(val.get("trials_at")) or 0)
    data.validation_overlap = bool(val.get("overlap"))
    data.winner = winner
    # Mirrors results.best_feasible: the winner counts while the current leader was re-validated.
    ranked = results.ranked_feasible(study)
    numbers = {r.number for r in data.validation}
    data.validation_current = bool(
        winner is not None and ranked and ranked[0].number in numbers and any(t.number == winner for t in ranked)
    )
    if winner is not None and not data.validation_current:
        leader = f"#{ranked[0].number}" if ranked else "none"
        data.notes.append(
            f"The re-validation (run after {data.validation_trials_at} trials) does not cover the current "
            f"leader ({leader}): the best configuration shown is the top-ranked trial, not its winner; "
            "re-run with --validate to re-check."
        )


def _roofline(study: Any) -> dict[str, Any] | None:
    r = study.user_attrs.get("roofline")
    if not isinstance(r, dict):
        return None
    r = dict(r)
    if not isinstance(r.get("text"), str) or not r["text"]:
        from tuner.roofline import Roofline

        try:
            r["text"] = Roofline(str(r["device"]), float(r["bandwidth_gbs"]), str(r["method"]), int(r["model_bytes"]),
                                 float(r["ceiling_tps"]), float(r["decode_tps"])).describe()
        except (KeyError, TypeError, ValueError):
            return None
    return r


def _planned_requests(study: Any) -> int | None:
    w = study.user_attrs.get("workload") or {}
    repeats, prompts = _num(w.get("repeats")), w.get("prompts")
    return int(repeats) * len(prompts) if repeats and isinstance(prompts, list) and prompts else None


def _last_value(t: Any) -> float | None:
    """The value a pruned trial stopped at: optuna keeps the last reported one."""
    if t.values:
        return _num(t.values[0])
    iv = t.intermediate_values or {}
    return _num(iv[max(iv)]) if iv else None


def _pruned(study: Any) -> list[PrunedRow]:
    planned = _planned_requests(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "PRUNED":
            continue
        ua = t.user_attrs
        samples = ua.get("samples")
        rows.append(PrunedRow(
            number=t.number,
            config=results.view(t).config_text(),
            requests=len(samples) if isinstance(samples, list) else len(t.intermediate_values or {}),
            planned=planned,
            decode_tps_mean=_num(ua.get("decode_tps_mean")),
            last_value=_last_value(t),
            saved_s=_num(ua.get("pruned_saved_s")) or 0.0,
        ))
    return rows


def _copy_study(study: Any, keep: Callable[[Any], bool]) -> Any:
    """An in-memory, single-objective copy for optuna's plots.

    Trials not kept become FAIL placeholders so trial numbers stay the same; user attrs
    are dropped because optuna puts them in hover text (samples would bloat the file).
    """
    import optuna

    copy = optuna.create_study(direction=study.directions[0])
    for t in study.get_trials(deepcopy=False):
        if keep(t) and results.is_complete(t) and t.values:
            copy.add_trial(optuna.trial.create_trial(
                value=t.values[0], params=t.params, distributions=t.distributions,
                constraints=dict(t.constraints or {}),
            ))
        else:
            copy.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return copy


def _searched(study: Any, trials: list[Any]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for t in trials:
        for k, val in t.params.items():
            seen.setdefault(k, set()).add(repr(val))
    space = study.user_attrs.get("space") or {}
    names = [k for k in seen if len(space.get(k, [])) > 1] if space else [k for k, s in seen.items() if len(s) > 1]
    return sorted(names)


def _optuna_figures(study: Any, label: str, notes: list[str]) -> list[NamedFigure]:
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            # PED-ANOVA warns about small samples; the figure caption says so instead.
            warnings.simplefilter("ignore")
            return _draw_optuna_figures(study, label, notes)
    finally:
        optuna.logging.set_verbosity(level)


def _draw_optuna_figures(study: Any, label: str, notes: list[str]) -> list[NamedFigure]:
    import optuna
    import optuna.visualization as vis

    figs: list[NamedFigure] = []
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    # Failed loads score 0 when maximising (a fair "no tokens"), but 1e12 when minimising,
    # which would flatten the plot: leave them out then (they are in the failures table).
    history = _copy_study(study, lambda t: maximize or not t.user_attrs.get("error"))
    if any(results.is_complete(t) for t in history.get_trials(deepcopy=False)):
        fig = vis.plot_optimization_history(history, target_name=label)
        failed = "failed loads, scored 0" if maximize else "failed loads are left out"
        caption = (f"Every complete trial by number; infeasible ones (a limit broken; {failed}) are drawn "
                   "apart from the feasible ones and the best-feasible line.")
        if _add_pruned_trace(study, fig):
            caption += (" Pruned trials (grey crosses) show the last request measured before they "
                        "were stopped; they never count as best.")
        figs.append(NamedFigure("history", "Optimisation history", fig, caption))
    else:
        notes.append("Optimisation history skipped: no complete trial yet.")

    param_trials = [t for t in study.get_trials(deepcopy=False)
                    if results.is_complete(t) and t.values and t.params and not t.user_attrs.get("error")]
    params = _searched(study, param_trials)
    if not param_trials or not params:
        notes.append("Parameter plots skipped: no measured trial with searched parameters "
                     "(only the baseline or fixed settings so far).")
        return figs
    keep = {t.number for t in param_trials}
    pstudy = _copy_study(study, lambda t: t.number in keep)
    if len(param_trials) >= 2 and len(params) > 1:
        try:
            fig = vis.plot_param_importances(pstudy, params=params, target_name=label)
            figs.append(NamedFigure("importances", "Parameter importances", fig,
                                    "How much each setting explains the objective (PED-ANOVA), "
                                    "over measured trials; few trials make it rough."))
        except Exception as e:  # importance evaluators reject degenerate data
            notes.append(f"Parameter importances skipped: {e}")
    else:
        notes.append(
            "Parameter importances skipped: they need at least 2 measured trials and more than "
            f"one searched parameter (have {len(param_trials)} trial(s), {len(params)} parameter(s))."
        )
    figs.append(NamedFigure("parallel", "Parallel coordinates",
                            vis.plot_parallel_coordinate(pstudy, params=params, target_name=label),
                            "Each line is a measured trial; infeasible ones are dotted."))
    figs.append(NamedFigure("slices", f"{label} against each parameter",
                            vis.plot_slice(pstudy, params=params, target_name=label),
                            "Baseline and failed loads are left out (they have no parameters or no measurement)."))
    return figs


def _add_pruned_trace(study: Any, fig: Any) -> bool:
    """Draw pruned trials on the history at the value they were stopped at."""
    import plotly.graph_objects as go

    pts = [(t, _last_value(t)) for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED"]
    pts = [(t, v) for t, v in pts if v is not None]
    if not pts:
        return False
    fig.add_trace(go.Scatter(
        x=[t.number for t, _ in pts], y=[v for _, v in pts], mode="markers", name="Pruned Trial",
        marker={"color": "#999999", "symbol": "x", "size": 8},
        text=[html.escape(f"#{t.number} pruned: {results.view(t).config_text()}") for t, _ in pts],
        hovertemplate="%{text}<br>last request: %{y:.2f}<extra></extra>",
    ))
    return True


def _validation_figure(data: ReportData) -> Any:
    import plotly.graph_objects as go

    label = _OBJECTIVE_LABELS.get(data.validation_objective, data.validation_objective)
    rows = [r for r in data.validation if r.mean is not None]

    def bar(r: ValidationRow) -> tuple[float, float]:
        """(above, below) the mean, for the error bars."""
        m = r.mean or 0.0
        return (r.ci_high - m if r.ci_high is not None else 0.0, m - r.ci_low if r.ci_low is not None else 0.0)

    fig = go.Figure()
    for name, sel, color in (("re-validated", [r for r in rows if not r.winner], "#1f77b4"),
                             ("winner", [r for r in rows if r.winner], "#d62728")):
        if not sel:
            continue
        fig.add_trace(go.Scatter(
            x=[f"#{r.number}" for r in sel], y=[r.mean for r in sel], mode="markers", name=name,
            marker={"color": color, "size": 13 if name == "winner" else 10,
                    "symbol": "star" if name == "winner" else "circle"},
            error_y={"type": "data", "symmetric": False, "color": color, "thickness": 2, "width": 8,
                     "array": [bar(r)[0] for r in sel], "arrayminus": [bar(r)[1] for r in sel]},
            text=[html.escape(f"#{r.number} {r.config}") for r in sel],
            hovertemplate="%{text}<br>mean %{y:.2f}<extra></extra>",
        ))
    searched = [r for r in rows if r.search_value is not None]
    if searched:
        fig.add_trace(go.Scatter(
            x=[f"#{r.number}" for r in searched], y=[r.search_value for r in searched], mode="markers",
            name="value during the search", marker={"color": "#7f7f7f", "symbol": "diamond-open", "size": 10},
            hovertemplate="value during the search: %{y:.2f}<extra></extra>",
        ))
    fig.update_layout(title=f"Re-validated {label}: mean and 95% CI", xaxis_title="trial", yaxis_title=label,
                      xaxis={"type": "category", "categoryorder": "array",
                             "categoryarray": [f"#{r.number}" for r in rows]},
                      legend={"orientation": "h", "y": -0.2}, height=380)
    return fig


def _hover(p: TradeoffPoint) -> str:
    # Plotly renders hover text as pseudo-HTML: escape what came from the study.
    return html.escape(f"#{p.number} {p.config}")


def _tradeoff_figure(data: ReportData) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    groups = (
        ("feasible", [p for p in data.tradeoff if p.feasible and not p.pareto and not p.baseline],
         {"color": "#1f77b4", "symbol": "circle", "size": 9}),
        ("infeasible", [p for p in data.tradeoff if not p.feasible],
         {"color": "#aaaaaa", "symbol": "x", "size": 9}),
        (f"baseline ({results.defaults_name(data.header.engine)})", [p for p in data.tradeoff if p.baseline and not p.pareto],
         {"color": "#2ca02c", "symbol": "star", "size": 14}),
    )
    for name, pts, marker in groups:
        if pts:
            fig.add_trace(go.Scatter(
                x=[p.tps for p in pts], y=[p.ttft_ms_p95 for p in pts], mode="markers", name=name,
                marker=marker, text=[_hover(p) for p in pts], hovertemplate="%{text}<br>%{x:.1f} tok/s, %{y:.0f} ms<extra></extra>",
            ))
    front = data.pareto
    if front:
        fig.add_trace(go.Scatter(
            x=[p.tps for p in front], y=[p.ttft_ms_p95 for p in front], mode="lines+markers",
            name="Pareto front (feasible)", line={"color": "#d62728", "shape": "hv"},
            marker={"color": "#d62728", "size": 11},
            text=[_hover(p) for p in front], hovertemplate="%{text}<br>%{x:.1f} tok/s, %{y:.0f} ms<extra></extra>",
        ))
    if data.max_ttft_ms is not None:
        fig.add_hline(y=data.max_ttft_ms, line_dash="dash", line_color="#d62728",
                      annotation_text=f"max TTFT {data.max_ttft_ms:g} ms", annotation_position="top left")
    fig.update_layout(title="Throughput vs p95 time to first token", xaxis_title=data.tps_label,
                      yaxis_title="p95 TTFT (ms)", legend={"orientation": "h", "y": -0.2})
    return fig


def _telemetry_figures(study: Any, data: ReportData) -> list[NamedFigure]:
    import plotly.graph_objects as go

    limits = data.header.limits
    measured = _measured(study)
    figs = []
    for key, attr, label, limit_key in TELEMETRY_VIEWS:
        pts = [(t, _num(t.user_attrs.get(f"{data.tps_metric}_mean")), _num(t.user_attrs.get(attr))) for t in measured]
        pts = [(t, x, y) for t, x, y in pts if x is not None and y is not None]
        if not pts:
            continue
        fig = go.Figure()
        for name, feas, color, symbol in (("feasible", True, "#1f77b4", "circle"), ("infeasible", False, "#aaaaaa", "x")):
            sel = [(t, x, y) for t, x, y in pts if results.is_feasible(t) == feas]
            if sel:
                fig.add_trace(go.Scatter(
                    x=[x for _, x, _ in sel], y=[y for _, _, y in sel], mode="markers", name=name,
                    marker={"color": color, "symbol": symbol, "size": 9},
                    text=[html.escape(f"#{t.number} {results.view(t).config_text()}") for t, _, _ in sel],
                    hovertemplate="%{text}<br>%{x:.1f} tok/s, %{y:.2f}<extra></extra>",
                ))
        if limit_key and limit_key in limits:
            fig.add_hline(y=limits[limit_key], line_dash="dash", line_color="#d62728",
                          annotation_text=f"{limit_key} {limits[limit_key]:g}", annotation_position="top left")
        fig.update_layout(title=f"{label} against {data.tps_label}", xaxis_title=data.tps_label, yaxis_title=label)
        figs.append(NamedFigure(key, f"{label} against {data.tps_label}", fig))
    if not figs:
        data.notes.append("Telemetry views skipped: no trial recorded GPU power, memory or energy.")
    return figs


def build_report(study: Any) -> ReportData:
    """Compute everything the report shows from a loaded study (no HTML here)."""
    header = _header(study)
    objective = header.objectives[0]
    tps_obj = objective if objective.endswith("_tps") else "decode_tps"
    data = ReportData(
        header=header,
        best=_best(study, objective),
        top=_top(study, tps_obj),
        tps_metric=tps_obj,
        tps_label=_OBJECTIVE_LABELS[tps_obj],
        tradeoff=_tradeoff(study, tps_obj),
        max_ttft_ms=header.limits.get("max_ttft_ms"),
        failures=_failures(study),
        generated_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        roofline=_roofline(study),
        pruned=_pruned(study),
    )
    data.pruned_saved_s = sum(p.saved_s for p in data.pruned)
    _validation(study, data)
    if header.counts["complete"] and data.best is not None and not data.best.feasible:
        data.notes.append("No trial is feasible: the best config shown is the least-violating one.")
    data.figures.extend(_optuna_figures(study, _OBJECTIVE_LABELS.get(objective, objective), data.notes))
    if data.tradeoff:
        data.figures.append(NamedFigure(
            "tradeoff", "Throughput vs time to first token", _tradeoff_figure(data),
            "Upper left is worse, lower right is better; the red steps join the feasible Pareto front.",
        ))
    else:
        data.notes.append("Trade-off plot skipped: no measured trial has both tok/s and p95 TTFT.")
    data.figures.extend(_telemetry_figures(study, data))
    if any(r.mean is not None for r in data.validation):
        data.figures.append(NamedFigure(
            "validation", "Re-validation of the top configurations", _validation_figure(data),
            "Each config re-measured in interleaved rounds: mean with its 95% confidence interval; the "
            "diamond is the single value it scored during the search.",
        ))
    return data


# ------------------------------------------------------------------------------- render

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1300px;padding:1em 2em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dl.facts dt{font-weight:600}dl.facts dd{margin:0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.4em 0}
.warn{background:#fdecea;border-left:4px solid #d62728;padding:.4em .8em;margin:.4em 0}
.speedup{font-size:1.3em;font-weight:600;color:#2a7d2a}.caption{color:#555;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}.figure{min-height:420px}.figure.small{min-height:380px;max-width:800px}
.validated,.roofline{font-weight:600}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _table(head: list[str], rows: list[list[tuple[str, bool]]]) -> str:
    """An HTML table; each cell is (escaped html, is_number)."""
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=\"n\">{c}</td>" if num else f"<td>{c}</td>" for c, num in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _values_text(values: list[Any]) -> str:
    if len(values) > 4 and all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _pruned_text(data: ReportData) -> str:
    return f"{_plural(len(data.pruned), 'trial')} pruned, about {data.pruned_saved_s:,.1f} s of measurement saved"


def _header_html(data: ReportData) -> str:
    h = data.header
    c = h.counts
    facts = [
        ("Model", h.model), ("Engine", h.engine), ("Host", h.host), ("Server version", h.server_version),
        ("GPU", h.gpu), ("CPU", h.cpu), ("OS", h.os),
        ("Objective(s)", ", ".join(h.objectives)),
        ("Limits", ", ".join(f"{k} = {v:g}" for k, v in h.limits.items()) or "none"),
        ("Search space", "; ".join(f"{k}: {_values_text(v)}" for k, v in h.space.items()) or "not recorded"),
        ("Workload", h.workload),
        ("Created", h.created_at or "unknown"),
        ("Trials", f"{c['total']} in all: {c['complete']} complete ({c['feasible']} feasible, "
                   f"{c['infeasible']} infeasible of which {c['load_failed']} failed to load), "
                   f"{c['failed']} failed, {c['pruned']} pruned, {c['running']} running or waiting"),
    ]
    if data.pruned:
        facts.append(("Pruning", _pruned_text(data) + " (clearly worse trials stopped early)"))
    return "<dl class=\"facts\">" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"


def _best_html(data: ReportData) -> str:
    b = data.best
    if b is None:
        return "<h2>Best configuration</h2><p class=\"note\">No trial has completed yet: nothing to report.</p>"
    title = "Best feasible configuration" if b.feasible else "Least-violating configuration (nothing is feasible)"
    parts = [f"<h2>{_e(title)} &mdash; trial #{b.number}</h2>"]
    if b.speedup is not None:
        parts.append(
            f"<p class=\"speedup\">{b.speedup:.2f}&times; {_e(_OBJECTIVE_LABELS.get(b.objective, b.objective))} "
            f"vs {results.defaults_name(data.header.engine)} (baseline trial #{b.baseline_number}: {_f(b.baseline_value, 2)}, "
            f"best: {_f(b.value, 2)})</p>"
        )
    elif b.baseline_number is None:
        parts.append("<p class=\"caption\">No baseline trial (study run with --no-baseline): no speedup to show.</p>")
    parts.extend(_winner_html(data))
    r = data.roofline
    if r is not None:
        of = "" if r.get("trial") in (None, b.number) else f" (measured on trial #{r.get('trial')})"
        parts.append(f"<p class=\"roofline\">Roofline: {_e(r['text'])}{_e(of)}</p>")
    if not b.feasible and b.violations:
        parts.append(f"<p class=\"warn\">Violates: {_e('; '.join(b.violations))}</p>")
    cfg = [("model", b.model)]
    if b.baseline:
        cfg.append(("options", f"none ({results.defaults_name(data.header.engine)})"))
    cfg += [(k, v) for k, v in b.options.items()]
    cfg += [(f"{k} (server)", v) for k, v in b.server.items()]
    parts.append(_table(["setting", "value"], [[(_e(k), False), (_e(v), False)] for k, v in cfg]))
    if b.metrics:
        parts.append(_table(
            ["metric", "mean", "± sd", "p50", "p95"],
            [[(_e(m.label), False), (_f(m.mean), True), (_f(m.sd), True), (_f(m.p50), True), (_f(m.p95), True)]
             for m in b.metrics],
        ))
    if b.telemetry:
        parts.append(_table(["telemetry", "value"], [[(_e(k), False), (_f(v, 2), True)] for k, v in b.telemetry]))
    return "".join(parts)


def _validated(r: ValidationRow, digits: int = 2) -> str:
    return (f"{_f(r.mean, digits)} (95% CI {_f(r.ci_low, digits)} .. {_f(r.ci_high, digits)}, "
            f"sd {_f(r.sd, digits)}, {_plural(r.n, 'round')})")


def _winner_html(data: ReportData) -> list[str]:
    """Lines for the best section: the re-validated winner, and whether it stands out."""
    b = data.best
    win = next((r for r in data.validation if r.winner), None)
    if b is None or win is None or not data.validation_current or b.number != win.number:
        return []
    label = _OBJECTIVE_LABELS.get(data.validation_objective, data.validation_objective)
    out = [f"<p class=\"validated\">Re-validated winner over {data.validation_rounds} interleaved rounds: "
           f"{_e(label)} {_e(_validated(win))}.</p>"]
    if data.top and data.top[0].number != win.number:
        out.append(f"<p class=\"caption\">Chosen over trial #{data.top[0].number}, which scored higher in its single "
                   "measurement during the search.</p>")
    ok = [r for r in data.validation if r.mean is not None]
    if data.validation_overlap and len(ok) > 1:
        out.append(f"<p class=\"warn\">The top two 95% intervals overlap (#{ok[0].number} and #{ok[1].number}): "
                   "they are not distinguishable at this precision; more --validate-rounds narrows the "
                   "intervals.</p>")
    return out


def _validation_html(data: ReportData, figure: str) -> str:
    if not data.validation:
        return ""
    label = _OBJECTIVE_LABELS.get(data.validation_objective, data.validation_objective)
    parts = [f"<h2>Re-validation of the top {len(data.validation)} configurations</h2>",
             f"<p class=\"caption\">{_e(label)} re-measured in {data.validation_rounds} interleaved rounds "
             f"after {data.validation_trials_at} trials, mean and 95% confidence interval.</p>"]
    rows = []
    for r in data.validation:
        if r.error:
            note = f"failed: {r.error}"
        elif r.winner:
            note = "winner" + ("" if data.validation_current else " (not current: later trials took the lead)")
        else:
            note = ""
        rows.append([
            (str(r.rank), True), (f"#{r.number}", True), (_e(r.config), False), (str(r.n), True),
            (_f(r.mean, 2), True), (_f(r.sd, 2), True), (f"{_f(r.ci_low, 2)} .. {_f(r.ci_high, 2)}", True),
            (_f(r.search_value, 2), True), (_e(note), False),
        ])
    parts.append(_table(["rank", "trial", "config", "rounds", "mean", "± sd", "95% CI", "during search", ""], rows))
    if data.validation_overlap and not any("intervals overlap" in line for line in _winner_html(data)):
        parts.append("<p class=\"warn\">The top two intervals overlap: they are not distinguishable at this "
                     "precision (more --validate-rounds narrows the intervals).</p>")
    return "".join(parts) + figure


def _pruned_html(data: ReportData) -> str:
    if not data.pruned:
        return ""
    rows = [[
        (f"#{r.number}", True), (_e(r.config), False),
        (f"{r.requests} of {r.planned}" if r.planned else str(r.requests), True),
        (_f(r.decode_tps_mean), True), (_f(r.last_value, 2), True), (_f(r.saved_s), True),
    ] for r in data.pruned]
    return (f"<h2>Pruned trials</h2><p>{_e(_pruned_text(data))}: each was stopped once it was clearly worse "
            "than the best trial on the same requests.</p>"
            + _table(["trial", "config", "requests measured", "decode tok/s so far", "last request value",
                      "saved s"], rows))


def _top_html(data: ReportData) -> str:
    parts = [f"<h2>Top {TOP_N} feasible configurations</h2>"]
    if not data.top:
        return parts[0] + "<p class=\"note\">No feasible configuration yet.</p>"
    head = ["rank", "trial", "objective", "config", f"{data.tps_label} mean ± sd", "p95 TTFT ms",
            "p95 latency ms", "VRAM peak MiB", "power W", "tokens/J", "speedup"]
    rows = [[
        (str(r.rank), True), (f"#{r.number}", True), (_f(r.value, 2), True), (_e(r.config), False),
        (f"{_f(r.tps_mean)} ± {_f(r.tps_sd)}", True), (_f(r.ttft_ms_p95, 0), True), (_f(r.latency_ms_p95, 0), True),
        (_f(r.vram_mib, 0), True), (_f(r.power_w), True), (_f(r.tokens_per_joule, 2), True),
        ("-" if r.speedup is None else f"{r.speedup:.2f}×", True),
    ] for r in data.top]
    return "".join(parts) + _table(head, rows)


def _failures_html(data: ReportData) -> str:
    if not data.failures:
        return "<h2>Failures</h2><p>No trial failed or broke a limit.</p>"
    rows = [[(f"#{f.number}", True), (_e(f.kind), False), (_e(f.config), False), (_e(f.message), False)]
            for f in data.failures]
    return "<h2>Failures and infeasible trials</h2>" + _table(["trial", "kind", "config", "error or violation"], rows)


def _figure_json(fig: Any) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio

    # optuna sizes some plots in pixels (slices: 300 px a parameter); let them fit the page.
    fig = go.Figure(fig).update_layout(width=None, autosize=True)
    text = pio.to_json(fig, validate=False)
    # Plotly already escapes these; doing it here too keeps "</script>" from ever ending the tag.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: ReportData) -> str:
    """One self-contained HTML page (plotly.js inlined once in <head>)."""
    from plotly.offline import get_plotlyjs

    h = data.header
    scripts = []
    figures: list[tuple[str, str]] = []  # (key, html)
    for i, nf in enumerate(data.figures):
        div = f"fig-{i}-{re.sub(r'[^a-z0-9_-]', '', nf.key.lower())}"
        # The re-validation figure sits in its own section, under its table.
        part = "" if nf.key == "validation" else f"<h2>{_e(nf.title)}</h2>"
        if nf.caption:
            part += f"<p class=\"caption\">{_e(nf.caption)}</p>"
        cls = "figure small" if nf.key == "validation" else "figure"
        part += f"<div id=\"{div}\" class=\"{cls}\"></div>"
        figures.append((nf.key, part))
        scripts.append(f"drawFigure({json.dumps(div)}, {_figure_json(nf.figure)});")
    body = [
        f"<h1>ollama-tuner report: {_e(h.study_name)}</h1>",
        f"<p class=\"caption\">Generated {_e(data.generated_at)}</p>",
        _header_html(data),
        _best_html(data),
        _validation_html(data, "".join(p for k, p in figures if k == "validation")),
    ]
    body += [f"<p class=\"note\">{_e(n)}</p>" for n in data.notes]
    body += [p for k, p in figures if k != "validation"]
    body.append(_top_html(data))
    body.append(_pruned_html(data))
    body.append(_failures_html(data))
    return "\n".join([
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e('ollama-tuner report: ' + h.study_name)}</title>",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<style>{_CSS}</style>",
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>",
        # One figure failing to draw must not stop the others; the error stays visible.
        "<script type=\"text/javascript\">function drawFigure(id, fig){"
        "function fail(e){console.error('figure ' + id + ': ' + e);"
        "document.getElementById(id).textContent = 'This figure could not be drawn: ' + e;}"
        "try {Plotly.newPlot(id, fig.data, fig.layout, {responsive: true, displaylogo: false}).catch(fail);}"
        " catch (e) {fail(e);}}</script>",
        "</head><body>",
        *body,
        "<script type=\"text/javascript\">" + "\n".join(scripts) + "</script>",
        "</body></html>",
        "",
    ])


# -------------------------------------------------------------------------------- write


def safe_name(name: str) -> str:
    """A file-name-safe version of a study name (``gemma3:1b@host:11434`` -> ``gemma3_1b_host_11434``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"
    return s[:150]


def write_atomic(path: Path, data: bytes, what: str, error: type[TunerError] = TunerError) -> None:
    """Write ``data`` to ``path`` via a temp file and rename, so no half-written file is left."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"cannot write the {what} to {path}: {parent} is a file, not a folder; pass another --output") from None
    except OSError as e:
        raise error(f"cannot create the folder {parent} for the {what}: {e.strerror or e}; pass a writable --output") from None
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        text = f"cannot write the {what} to {path}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(f"{text}; free some disk space or pass --output on another disk") from None
        if e.errno == errno.EFBIG:
            raise WriteError(f"{text}; raise the file-size limit (`ulimit -f`) or pass --output on another disk") from None
        raise error(f"{text}; pass a writable --output") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_report(storage_url: str | None, study_name: str | None, output: str | None) -> Path:
    """Build and write the HTML report of a stored study; return the path written.

    ``output`` defaults to ``reports/<safe study name>.html``; an existing folder gets that
    file name inside it. Raises StudyError for a missing study, TunerError when the file
    cannot be written.
    """
    from tuner.storage import open_storage

    storage = open_storage(storage_url, create=False)
    study = results.load_study(storage, study_name)
    data = build_report(study)
    text = render_html(data)
    default = f"{safe_name(study.study_name)}.html"
    if output is None:
        path = REPORTS_DIR / default
    else:
        path = Path(output)
        if path.is_dir():
            path = path / default
    write_atomic(path, text.encode("utf-8"), "report")
    return path
