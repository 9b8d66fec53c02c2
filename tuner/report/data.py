"""What the report shows, computed from a stored study: plain values, no plotly, no HTML.

The study is read once (one ``get_trials``, one :func:`tuner.record.read_record` per trial);
everything after that works on the records. Figures are drawn from these values only. Each
section's values and their computation live in their own module (:mod:`.base`,
:mod:`.first_screen`, :mod:`.validation_data`, :mod:`.tables`, :mod:`.series`); this one holds
:class:`ReportData`, puts it together in :func:`build_data`, and re-exports their names.
"""

from __future__ import annotations

import datetime as _dt
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuner import objectives
from tuner import results
from tuner.checks import DriftSeries, drift_series
from tuner.effects import Effects
from tuner.report.base import (
    DEFAULT_RATE, FIGURE_ORDER, LOG_AXIS_RATIO, TELEMETRY_VIEWS, TOP_N, EmptyFigure, NamedFigure,
)
from tuner.report.first_screen import CostRow, FirstScreen, Header, _first_screen, _header, tuned_name
from tuner.report.series import (
    DraftPoint, ParamAxis, TelemetryPoint, TelemetryView, TimelineRow, TrialPoint, TrialSeries, TrialValue, _per_trial,
    _search, _telemetry, _timeline, best_so_far, drafting_series, log_axis,
)
from tuner.report.tables import (
    BenchRow, BenchTable, FailureRow, ImportRow, MemoryRow, PrunedRow, TopRow, TradeoffPoint, _bench, _failures,
    _imported, _memory, _planned_requests, _pruned, _top, _tradeoff, pareto_front,
)
from tuner.report.validation_data import (
    BestConfig, MetricRow, ValidationRow, _best, _roofline, _validation, _validation_empty,
)
from tuner.results import StoredStudy, paused_gc, read_study
from tuner.storage import storage_args
from tuner.terminal import tune_command

if TYPE_CHECKING:
    from optuna.study import Study

__all__ = [
    "DEFAULT_RATE", "FIGURE_ORDER", "LOG_AXIS_RATIO", "TELEMETRY_VIEWS", "TOP_N", "BenchRow", "BenchTable",
    "BestConfig", "CostRow", "EmptyFigure", "FailureRow", "FirstScreen", "Header", "ImportRow", "MemoryRow",
    "MetricRow", "NamedFigure", "ParamAxis", "PrunedRow", "ReportData", "StoredStudy", "TelemetryPoint",
    "TelemetryView", "TimelineRow", "TopRow", "TradeoffPoint", "TrialPoint", "TrialSeries", "TrialValue",
    "ValidationRow", "best_so_far", "build_data", "log_axis", "pareto_front", "paused_gc", "read_study", "tuned_name",
]


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
    #: The re-validation of the top configs (the study's stored Validation), best mean first.
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
    #: How the intervals were computed ("log-t"; "" for validations stored before).
    validation_interval: str = ""
    #: Whether the winner stands out, or why it was recommended when it does not.
    validation_verdict: str = ""
    #: Rounds contended and redone or dropped, in words ("" when none was).
    validation_contended: str = ""
    #: The defaults re-measured in the same rounds, and the winner's speedup over them.
    validation_baseline: ValidationRow | None = None
    validation_speedup: results.Speedup | None = None
    #: The stored roofline: the best config's share of the bandwidth ceiling.
    roofline: dict[str, Any] | None = None
    pruned: list[PrunedRow] = field(default_factory=list)
    pruned_saved_s: float = 0.0
    #: Imported results (another tool's numbers, never the winner), best first.
    imported: list[ImportRow] = field(default_factory=list)
    # -- what the search figures draw ----------------------------------------------------
    #: The first objective, its label and whether it is maximised.
    objective: str = ""
    objective_label: str = ""
    maximize: bool = True
    #: Complete trials with a value, by number (failed loads left out when minimising).
    history: list[TrialPoint] = field(default_factory=list)
    #: Measured trials with searched settings, and those settings.
    param_points: list[TrialPoint] = field(default_factory=list)
    params: list[ParamAxis] = field(default_factory=list)
    #: Why the parameter figures show no feasible point ("" when they do, or nothing explains it).
    param_note: str = ""
    #: How much each setting explains the objective (PED-ANOVA), largest first; only computed
    #: from ``MIN_TRIALS_FOR_IMPORTANCES`` measured trials (below, not a ranking to believe).
    importances: list[tuple[str, float]] = field(default_factory=list)
    #: The objective per value of each searched setting with 95% intervals, and the verdict.
    effects: Effects | None = None
    telemetry: list[TelemetryView] = field(default_factory=list)
    #: The winner's speed over time: stored, then each ``tune check`` (None without a check).
    drift: DriftSeries | None = None
    # -- the first screen, the table, and the figures added for them -----------------------
    first: FirstScreen | None = None
    bench: BenchTable | None = None
    #: The trade-off plot's axes on a log scale (``LOG_AXIS_RATIO``): tok/s (x), p95 TTFT (y).
    tradeoff_log_x: bool = False
    tradeoff_log_y: bool = False
    #: Prefill tok/s (mean ± sd) of each measured trial, and its host telemetry.
    prefill: list[TrialValue] = field(default_factory=list)
    #: Decode against draft length per workload prompt (studies that searched drafting).
    drafting: list[DraftPoint] = field(default_factory=list)
    host: list[TrialSeries] = field(default_factory=list)
    timeline: list[TimelineRow] = field(default_factory=list)
    #: The figures with no data, each with why, in report order.
    empty: list[EmptyFigure] = field(default_factory=list)
    #: Every trial the memory model predicted (tuner/memory.py), by number; empty without a GPU.
    memory: list[MemoryRow] = field(default_factory=list)

    @property
    def memory_errors(self) -> list[float]:
        """|prediction - size_vram| / size_vram (%) of every loaded trial with a known layer count."""
        return [abs(m.error_pct) for m in self.memory if m.error_pct is not None]

    @property
    def memory_note(self) -> str:
        """The memory model's error in a sentence."""
        errs = self.memory_errors
        if not errs:
            return "No loaded trial with a known layer count to compare the prediction with yet."
        return (f"The memory model's error against the server's size_vram: median {statistics.median(errs):.1f}%, "
                f"max {max(errs):.1f}% over {len(errs)} loaded trial{'s' if len(errs) != 1 else ''} with a known "
                "layer count (each prediction made before its trial ran, from the trials before it).")

    @property
    def pareto(self) -> list[TradeoffPoint]:
        return sorted((p for p in self.tradeoff if p.pareto), key=lambda p: p.tps)

    @property
    def winner_row(self) -> ValidationRow | None:
        """The re-validated winner when it is the best config shown (its result goes there)."""
        win = next((r for r in self.validation if r.winner), None)
        if self.best is None or win is None or not self.validation_current or self.best.number != win.number:
            return None
        return win

    @property
    def overlap_with_best(self) -> bool:
        """The overlap of the top two intervals is told in the best section (with the winner);
        otherwise the re-validation section tells it."""
        measured = [r for r in self.validation if r.mean is not None]
        return self.validation_overlap and self.winner_row is not None and len(measured) > 1


def build_data(source: Study | StoredStudy, storage: str | None = None) -> ReportData:
    """Compute everything the report shows from a study (read once) or from its records.

    ``storage`` is the URL the study was read from, for the commands the report prints (None:
    the default storage, so they name none).
    """
    s = source if isinstance(source, StoredStudy) else read_study(source)
    header = _header(s)
    objective = header.objectives[0]
    tps = objective if objective.endswith("_tps") else DEFAULT_RATE
    direction = s.direction
    ranked = s.ranked()
    measured = [r for r in s.records if r.measured]
    base = s.baseline()
    data = ReportData(
        header=header,
        best=None,
        top=_top(s, ranked, tps),
        tps_metric=tps,
        tps_label=objectives.label(tps),
        tradeoff=_tradeoff(measured, tps),
        max_ttft_ms=header.limits.get("max_ttft_ms"),
        failures=_failures(s.records),
        generated_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        roofline=_roofline(results.roofline_of(s.info)),
        pruned=_pruned(s.records, _planned_requests(s.info.workload or {})),
        imported=_imported(s),
        objective=objective,
        objective_label=objectives.label(objective),
        maximize=direction == "maximize",
    )
    data.pruned_saved_s = sum(p.saved_s for p in data.pruned)
    _validation(s, data, ranked)
    best = s.best(ranked)
    feasible = best is not None
    if best is None:
        best = s.least_violating()
    data.best = _best(s, best, feasible, base, objective)
    if measured and data.best is not None and not data.best.feasible:
        data.notes.append("No trial is feasible: the best config shown is the least-violating one.")
    _search(data, s)
    if data.tradeoff:
        data.tradeoff_log_x = log_axis([p.tps for p in data.tradeoff])
        data.tradeoff_log_y = log_axis([p.ttft_ms_p95 for p in data.tradeoff])
    else:
        data.empty.append(EmptyFigure("tradeoff", "Throughput vs time to first token",
                                      "No measured trial has both tok/s and p95 TTFT"
                                      + ("." if measured else ": every trial failed or failed to load.")))
    env = s.info.environment
    _telemetry(measured, data, env)
    _per_trial(measured, data)
    data.drafting = drafting_series(measured, int((env.get("drafting") or {}).get("engine_default") or 0))
    data.drift = drift_series(s.info)
    data.timeline = _timeline(s.records)
    if not data.timeline:
        data.empty.append(EmptyFigure("timeline", "Timeline of trials", "No trial has finished yet."))
    _validation_empty(data)
    if data.drift is None:
        checked = bool(s.info.checks)
        data.empty.append(EmptyFigure(
            "drift", "The winner's speed over time",
            ("No `tune check` of this study measured anything yet (each stored check was unmeasured): "
             if checked else "No `tune check` has run on this study yet: ")
            + f"`{tune_command('check', s.name, *storage_args(storage))}` re-measures the winner and the "
            "defaults and keeps the result."))
    data.bench = _bench(s, ranked, env, data)
    data.memory = _memory(s.records)
    data.first = _first_screen(s, data, best, feasible, base, storage)
    return data
