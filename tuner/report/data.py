"""What the report shows, computed from a stored study: plain values, no plotly, no HTML.

The study is read once (one ``get_trials``, one :func:`tuner.record.read_record` per trial);
everything after that works on the records. Figures are drawn from these values only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from tuner import objectives
from tuner import results
from tuner.machine import offloads
from tuner.memory import fit_of
from tuner.checks import Check, DriftSeries, advice, change_text, drift_series, last_check, pct_text, since_text
from tuner.effects import MIN_TRIALS_FOR_IMPORTANCES, Effects, compute as compute_effects
from tuner.record import (DECODE_TPS, HOST_TELEMETRY_ROWS, METRIC_ROWS, PREFILL_TPS, TELEMETRY_ROWS, TOKENS_PER_JOULE,
                          TrialRecord)
from tuner.results import StoredStudy, paused_gc, read_study
from tuner.storage import storage_args
from tuner.terminal import command, tune_command

if TYPE_CHECKING:
    from optuna.study import Study

TOP_N = 10
#: The rate shown beside an objective that is not a rate (tokens/J, p95 TTFT).
DEFAULT_RATE = DECODE_TPS
#: p95 TTFT and p95 latency of a record, as the objectives of those names read them.
_TTFT_P95 = objectives.get("ttft_p95").value
_LATENCY_P95 = objectives.get("latency_p95").value
#: Telemetry plotted against the rate: (figure key, axis label, limit name, caption, value of a record).
TELEMETRY_VIEWS: tuple[tuple[str, str, str | None, str, Any], ...] = (
    ("power", "mean GPU power (W)", "max_power_w", "", lambda r: r.power_mean_w),
    ("vram", "GPU memory (MiB)", "max_vram_mib",
     "NVML's peak during the measured requests where the tuner sees the GPU, else the VRAM the server "
     "reports the model holds: the value --max-vram-mib is checked against.", lambda r: r.vram_peak_mib),
    (TOKENS_PER_JOULE, "tokens per joule", None, "", lambda r: r.tokens_per_joule),
)
#: An axis is drawn on a log scale when its largest value is at least this many times its
#: smallest: one slow outlier (an infeasible 12 s TTFT) no longer flattens 35-68 ms onto zero.
LOG_AXIS_RATIO = 10.0
#: The figures in report order; a figure with no data says why in its place. "parameters"
#: stands for the four parameter figures when there is no trial with searched settings at all.
FIGURE_ORDER = ("history", "parameters", "effects", "importances", "parallel", "slices", "tradeoff", "power",
                "vram", TOKENS_PER_JOULE, "prefill", "host", "timeline", "validation", "drift")


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
    #: Trials by outcome, in the terminal's words (``results.counts``).
    counts: dict[str, int]
    #: Of the infeasible trials, those that failed to load.
    load_failed: int = 0
    #: Trials still contended, measurements redone for contention, the seconds it cost, and
    #: whether every feasible trial was contended (``StoredStudy.contention``).
    contended: int = 0
    remeasured: int = 0
    contention_lost_s: float = 0.0
    only_contended: bool = False
    #: What the study's offload probe found: the server offloads layers to a GPU (True),
    #: runs on the CPU only (False), or no source that observed it said (None; see
    #: ``tuner.machine.offloads``).
    gpu_offloads: bool | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


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
    #: The winner over the defaults (``StoredStudy.winner_speedup``); None when nothing is feasible.
    winner_speedup: results.Speedup | results.SearchSpeedup | results.NoSpeedup | None = None


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
    #: The search stage that chose the trial (screen, tune, offload, ...); None if none did.
    stage: str | None = None


@dataclass(frozen=True)
class ImportRow:
    """One imported result (``tune import``): another tool's number, shown apart and marked."""

    number: int
    value: float | None
    config: str
    tests: str
    #: "file:lines (format)".
    source: str


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
class NamedFigure:
    """A plotly figure and where it goes in the report."""

    key: str
    title: str
    figure: Any
    caption: str = ""


@dataclass(frozen=True)
class EmptyFigure:
    """A figure the study has no data for, and why; the page says so in the figure's place."""

    key: str
    title: str
    reason: str


@dataclass(frozen=True)
class CostRow:
    """One measure of the winner beside the defaults' (None where it was not measured)."""

    label: str
    winner: float | None
    defaults: float | None
    digits: int = 0
    #: Where the numbers come from, when that differs between sources (VRAM).
    source: str = ""


@dataclass(frozen=True)
class MemoryRow:
    """One trial's GPU memory: the model's prediction (made before it ran) beside the server's report."""

    number: int
    config: str
    predicted_mib: float | None
    observed_mib: float | None
    #: (predicted - reported) / reported, where the layer count is known (None otherwise).
    error_pct: float | None
    verdict: str
    skipped: bool
    failed: bool


@dataclass(frozen=True)
class FirstScreen:
    """What to run: the winner ready to paste, its speedup over the defaults, what it costs."""

    #: The winner (None when nothing is feasible: ``missing`` says why).
    number: int | None
    config: str
    modelfile: str
    #: Why there is no Modelfile to paste ("" when there is one).
    missing: str
    #: ``tune export`` of this study's winner as a Modelfile, and ``ollama create`` from that file.
    export_command: str
    create_command: str
    #: ``tune export --format env`` when the winner sets server-level settings, else "".
    env_command: str
    #: The winner over the defaults on the first objective, with its 95% interval when the two
    #: were re-measured interleaved (the stored ``results.Speedup``), else without.
    speedup: float | None
    speedup_ci: tuple[float, float] | None
    speedup_text: str
    #: Why the speedup has no interval, or why there is no speedup, and how to get one.
    speedup_note: str
    baseline_number: int | None
    costs: list[CostRow] = field(default_factory=list)
    #: The latest ``tune check`` in a line ("" without one), and whether it found a regression.
    check_note: str = ""
    check_regression: bool = False
    #: How the winner fits the GPU (tuner.memory.Fit.lines), and whether it leaves too little.
    memory_lines: list[str] = field(default_factory=list)
    memory_tight: bool = False


@dataclass(frozen=True)
class BenchRow:
    """A top config as llama-bench lists one: model and backend, each setting, the rates."""

    rank: int
    number: int
    stage: str | None
    model: str
    size_gib: float | None
    params: str
    quant: str
    #: The GPU's name, "GPU (server-reported)", "CPU", or "not reported": the server's word.
    backend: str
    #: Every setting column's value ("default" for one the config does not send).
    settings: dict[str, Any]
    decode_tps: float | None
    decode_sd: float | None
    prefill_tps: float | None
    prefill_sd: float | None
    ttft_ms_p95: float | None
    vram_mib: float | None
    tokens_per_joule: float | None
    speedup: float | None


@dataclass(frozen=True)
class BenchTable:
    """The top-configs table: its rows, and the same as text cells and as markdown."""

    rows: list[BenchRow]
    #: The setting columns, in the study's space order.
    settings: list[str]
    columns: list[str]
    #: Which columns hold numbers (right-aligned).
    numeric: list[bool]
    cells: list[list[str]]
    markdown: str


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


# ------------------------------------------------------------------------------ compute


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


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


def _header(s: StoredStudy) -> Header:
    info = s.info
    env = info.environment
    return Header(
        study_name=s.name,
        model=str(info.model or env.get("model") or ""),
        engine=str(info.engine or env.get("engine") or ""),
        host=info.host,
        server_version=str(info.server_version or env.get("server_version") or "unknown"),
        gpu=_gpu_text(env),
        cpu=_cpu_text(env),
        os=str(env.get("os") or (env.get("host") or {}).get("os") or ""),
        objectives=list(info.objectives),
        limits={k: float(v) for k, v in info.limits.items() if _num(v) is not None},
        space=dict(info.space),
        workload=_workload_text(info.workload or {}),
        created_at=info.created_at,
        counts=s.counts(),
        load_failed=sum(1 for r in s.records if r.state == "COMPLETE" and r.error),
        contended=s.contention()[0], remeasured=s.contention()[1], contention_lost_s=s.contention()[2],
        only_contended=s.only_contended,
        gpu_offloads=offloads(env),
    )


def _metric_rows(r: TrialRecord) -> list[MetricRow]:
    return [
        MetricRow(label, key, _num(r.stat(key, "mean")), _num(r.stat(key, "sd")),
                  _num(r.stat(key, "p50")), _num(r.stat(key, "p95")))
        for label, key in METRIC_ROWS
        if key in r.stats
    ]


def _telemetry_rows(r: TrialRecord) -> list[tuple[str, float]]:
    rows = [(label, _num(r.telemetry_value(name))) for label, name in TELEMETRY_ROWS]
    rows.append(("reload ms", _num(r.reload_ms)))
    return [(label, v) for label, v in rows if v is not None]


def _best(s: StoredStudy, best: TrialRecord | None, feasible: bool, base: TrialRecord | None,
          objective: str) -> BestConfig | None:
    if best is None:
        return None
    return BestConfig(
        number=best.number,
        feasible=feasible,
        model=best.model,
        options=best.options,
        server=best.server,
        baseline=best.baseline,
        objective=objective,
        value=best.value,
        metrics=_metric_rows(best),
        telemetry=_telemetry_rows(best),
        violations=best.violations,
        speedup=s.speedup(best) if feasible else None,
        baseline_number=base.number if base is not None else None,
        baseline_value=base.value if base is not None else None,
        winner_speedup=s.winner_speedup(best) if feasible else None,
    )


def _imported(s: StoredStudy) -> list[ImportRow]:
    sign = -1.0 if s.direction == "maximize" else 1.0
    rows = sorted((r for r in s.records if r.imported), key=lambda r: sign * (r.value or 0.0))
    out = []
    for r in rows:
        src = r.source or {}
        files = ", ".join(str(f).rsplit("/", 1)[-1] for f in src.get("files", []))
        lines = ",".join(str(x) for x in src.get("lines", []))
        out.append(ImportRow(r.number, r.value, r.config_text(), " ".join(src.get("tests", [])),
                             f"{files}:{lines} ({src.get('format', '?')})"))
    return out


def _top(s: StoredStudy, ranked: Sequence[TrialRecord], tps: str) -> list[TopRow]:
    return [
        TopRow(
            rank=rank,
            number=r.number,
            value=r.value,
            config=r.config_text(),
            stage=r.stage,
            tps_mean=_num(r.stat(tps, "mean")),
            tps_sd=_num(r.stat(tps, "sd")),
            ttft_ms_p95=_num(_TTFT_P95(r)),
            latency_ms_p95=_num(_LATENCY_P95(r)),
            vram_mib=_num(r.vram_peak_mib),
            power_w=_num(r.power_mean_w),
            tokens_per_joule=_num(r.tokens_per_joule),
            speedup=s.speedup(r),
        )
        for rank, r in enumerate(ranked[:TOP_N], start=1)
    ]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when maximising x and minimising y.

    One pass over the points sorted by x (descending): linear after the sort, so a study of
    thousands of trials costs milliseconds.
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf  # lowest y among points with a larger x
    i = 0
    while i < len(order):
        # Points with equal x: only those with the group's lowest y can be on the front.
        j = i
        while j < len(order) and points[order[j]][0] == points[order[i]][0]:
            j += 1
        group_y = points[order[i]][1]
        if group_y < best_y:
            front.extend(k for k in order[i:j] if points[k][1] == group_y)
            best_y = group_y
        i = j
    return sorted(front)


def _tradeoff(measured: Sequence[TrialRecord], tps: str) -> list[TradeoffPoint]:
    rows = [(r, _num(r.stat(tps)), _num(_TTFT_P95(r))) for r in measured]
    pts = [(r, x, y) for r, x, y in rows if x is not None and y is not None]
    # The front is drawn over feasible trials only: those are the trade-offs one can pick.
    feasible_idx = [i for i, (r, _, _) in enumerate(pts) if r.feasible]
    front = pareto_front([(pts[i][1], pts[i][2]) for i in feasible_idx])
    on_front = {feasible_idx[i] for i in front}
    return [TradeoffPoint(number=r.number, tps=x, ttft_ms_p95=y, feasible=r.feasible, baseline=r.baseline,
                          pareto=i in on_front, config=r.config_text())
            for i, (r, x, y) in enumerate(pts)]


def _failures(records: Iterable[TrialRecord]) -> list[FailureRow]:
    out = []
    for r in records:
        if r.state == "PRUNED":  # listed with the pruned trials, not as failures
            continue
        if r.state == "FAIL":
            out.append(FailureRow(r.number, "failed", r.config_text(), r.error or "no error recorded"))
        elif r.error:
            out.append(FailureRow(r.number, "load failed", r.config_text(), r.error))
        elif r.state == "COMPLETE" and not r.feasible:
            out.append(FailureRow(r.number, "infeasible", r.config_text(), "; ".join(r.violations) or "violates a limit"))
    return out


def _validation(s: StoredStudy, data: ReportData, ranked: Sequence[TrialRecord]) -> results.Validation | None:
    """Fill the re-validation fields from the study's stored Validation; return it, or None
    without one (or when it cannot be read)."""
    stored = s.info.validation
    if stored is None:
        return None
    try:
        val = results.Validation.from_dict(stored)
    except (KeyError, TypeError, ValueError, IndexError):
        data.notes.append("The stored re-validation could not be read (written by another version?): left out.")
        return None
    by_number = {r.number: r for r in s.records}

    def row(e: results.Validated) -> ValidationRow:
        values = [x for x in (_num(v) for v in e.values) if x is not None]
        error = str(e.error) if e.error else None
        r = by_number.get(e.number)
        measured = bool(values) and error is None
        return ValidationRow(
            rank=0, number=e.number,
            config=r.config_text() if r is not None else "(trial not in the study)",
            n=len(values), mean=_num(e.mean) if measured else None, sd=_num(e.sd) if measured else None,
            ci_low=_num(e.ci95[0]) if measured else None, ci_high=_num(e.ci95[1]) if measured else None,
            search_value=_num(r.value) if r is not None else None,
            winner=e.number == val.winner, error=error,
        )

    rows = [row(e) for e in val.entries]
    if val.baseline is not None and val.baseline.number not in {e.number for e in val.entries}:
        data.validation_baseline = row(val.baseline)
    data.validation_interval = val.interval
    data.validation_verdict = val.verdict()
    data.validation_speedup = val.speedup
    if val.contended:
        data.validation_contended = (
            f"{val.contended} round{'s' * (val.contended != 1)} contended (other processes competed) and "
            f"measured again; {val.dropped} contended again and dropped.")
    # As the terminal summary orders them: best mean first, the failed ones last.
    rows.sort(key=lambda r: (r.mean is None, -(r.mean or 0.0)))
    data.validation = [dataclasses.replace(r, rank=i) for i, r in enumerate(rows, start=1)]
    data.validation_objective = val.objective
    data.validation_rounds = int(val.rounds)
    data.validation_trials_at = int(val.trials_at)
    data.validation_overlap = bool(val.overlap)
    data.winner = val.winner
    best = s.best(ranked)
    data.validation_current = val.winner is not None and best is not None and best.number == val.winner
    if val.winner is not None and not data.validation_current:
        leader = f"#{ranked[0].number}" if ranked else "none"
        data.notes.append(
            f"The re-validation (run after {data.validation_trials_at} trials) does not cover the current "
            f"leader ({leader}): the best configuration shown is the top-ranked trial, not its winner; "
            "re-run with --validate to re-check."
        )
    return val


def _roofline(stored: dict[str, Any] | None) -> dict[str, Any] | None:
    if stored is None:
        return None
    r = dict(stored)
    if not isinstance(r.get("text"), str) or not r["text"]:
        from tuner.roofline import Roofline

        try:
            r["text"] = Roofline(str(r["device"]), float(r["bandwidth_gbs"]), str(r["method"]), int(r["model_bytes"]),
                                 float(r["ceiling_tps"]), float(r[DECODE_TPS])).describe()
        except (KeyError, TypeError, ValueError):
            return None
    return r


def _planned_requests(w: dict[str, Any]) -> int | None:
    repeats, prompts = _num(w.get("repeats")), w.get("prompts")
    return int(repeats) * len(prompts) if repeats and isinstance(prompts, list) and prompts else None


def _last_value(r: TrialRecord) -> float | None:
    """The value a pruned trial stopped at: optuna keeps the last reported one."""
    return _num(r.value) if r.values else _num(r.last_reported)


def _pruned(records: Iterable[TrialRecord], planned: int | None) -> list[PrunedRow]:
    return [
        PrunedRow(number=r.number, config=r.config_text(), requests=len(r.samples), planned=planned,
                  decode_tps_mean=_num(r.stat(DEFAULT_RATE)), last_value=_last_value(r),
                  saved_s=_num(r.pruned_saved_s) or 0.0)
        for r in records if r.state == "PRUNED"
    ]


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


def _timeline(records: Sequence[TrialRecord]) -> list[TimelineRow]:
    """Every finished trial from its start to its end, with its model (re)load time."""
    out = []
    for r in records:
        if r.datetime_start is None or r.datetime_complete is None or r.duration_s is None:
            continue
        out.append(TimelineRow(r.number, results.outcome(r), r.datetime_start.isoformat(),
                               r.datetime_complete.isoformat(), r.duration_s, _num(r.reload_ms), r.config_text()))
    return out


def _validation_empty(data: ReportData) -> None:
    if any(r.mean is not None for r in data.validation):
        return
    if data.validation:
        reason = "Every re-validated configuration failed: no interval to draw (see the table above)."
    else:
        reason = ("No re-validation in this study: each configuration was measured once during the search. "
                  "Run the study with --validate 2 or more to re-measure the top configurations "
                  "interleaved, each with a 95% interval.")
    data.empty.append(EmptyFigure("validation", "Re-validation of the top configurations", reason))


def _gpu_names(env: dict[str, Any]) -> str:
    """The GPUs NVML saw, as names ("2x NVIDIA H200"); "" when it saw none."""
    names = [str(g["name"]) for g in env.get("gpus") or [] if isinstance(g, dict) and g.get("name")]
    return ", ".join(f"{names.count(n)}x {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names))


def _backend(r: TrialRecord, env: dict[str, Any], gpus: str) -> str:
    """Where a config ran, as the server reported it: VRAM in use is a GPU (by NVML's name),
    none is the CPU; without a report, only a study-wide "no offload" says CPU."""
    if r.server_vram_mib is not None:
        on_gpu = r.server_vram_mib > 0
    else:
        if offloads(env) is False:
            on_gpu = False
        else:
            return "not reported"
    if not on_gpu:
        return "CPU"
    return gpus or "GPU (server-reported)"


def _model_facts(env: dict[str, Any], model: str) -> tuple[float | None, str, str]:
    """(size GiB, parameters, quantization) of a model as the server reported them."""
    facts = (env.get("models") or {}).get(model)
    if not isinstance(facts, dict) and model == env.get("model"):
        facts = {"parameter_size": env.get("parameter_size"), "quantization": env.get("quantization")}
    if not isinstance(facts, dict):
        # Variants are quantizations of one model, so they share its parameter count.
        return None, str(env.get("parameter_size") or "-"), "-"
    size = _num(facts.get("size_bytes"))
    return (size / 2**30 if size else None, str(facts.get("parameter_size") or env.get("parameter_size") or "-"),
            str(facts.get("quantization") or "-"))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _pm(mean: float | None, sd: float | None) -> str:
    return "-" if mean is None else f"{mean:.2f} ± {sd:.2f}" if sd is not None else f"{mean:.2f}"


def _cell(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _bench(s: StoredStudy, ranked: Sequence[TrialRecord], env: dict[str, Any], data: ReportData) -> BenchTable:
    """The top configs as llama-bench prints them: one column per setting, rates ± sd."""
    top = ranked[:TOP_N]
    gpus = _gpu_names(env)
    space = list(data.header.space)
    keys = {k for r in top for k in (*r.options, *r.effective_server)}
    settings = [k for k in space if k in keys] + sorted(keys - set(space))
    rows = []
    for rank, r in enumerate(top, start=1):
        size, params, quant = _model_facts(env, r.model)
        sent = {**r.options, **r.effective_server}
        rows.append(BenchRow(
            rank=rank, number=r.number, stage=r.stage, model=r.model_label, size_gib=size, params=params,
            quant=quant, backend=_backend(r, env, gpus), settings={k: sent.get(k, "default") for k in settings},
            decode_tps=_num(r.stat(DEFAULT_RATE)), decode_sd=_num(r.stat(DEFAULT_RATE, "sd")),
            prefill_tps=_num(r.stat(PREFILL_TPS)), prefill_sd=_num(r.stat(PREFILL_TPS, "sd")),
            ttft_ms_p95=_num(_TTFT_P95(r)), vram_mib=_num(r.vram_peak_mib),
            tokens_per_joule=_num(r.tokens_per_joule), speedup=s.speedup(r)))
    other = data.tps_metric not in (DEFAULT_RATE, PREFILL_TPS)
    stage = any(r.stage for r in rows)
    speedup = any(r.speedup is not None for r in rows)
    columns = (["rank", "trial"] + (["stage"] if stage else []) + ["model", "size", "params", "quant", "backend"]
               + settings + ["decode tok/s", "prefill tok/s"] + ([f"{data.tps_label}"] if other else [])
               + ["p95 TTFT ms", "VRAM MiB", "tokens/J"] + (["x defaults"] if speedup else []))
    numeric = [c in ("rank", "trial", "size", "decode tok/s", "prefill tok/s", data.tps_label, "p95 TTFT ms",
                     "VRAM MiB", "tokens/J", "x defaults") for c in columns]
    cells = []
    for row, r in zip(rows, top):
        cells.append(
            [str(row.rank), f"#{row.number}"] + ([row.stage or "-"] if stage else [])
            + [row.model, "-" if row.size_gib is None else f"{row.size_gib:.2f} GiB", row.params, row.quant,
               row.backend] + [str(row.settings[k]) for k in settings]
            + [_pm(row.decode_tps, row.decode_sd), _pm(row.prefill_tps, row.prefill_sd)]
            + ([_pm(_num(r.stat(data.tps_metric)), _num(r.stat(data.tps_metric, "sd")))] if other else [])
            + [_cell(row.ttft_ms_p95, 0), _cell(row.vram_mib, 0), _cell(row.tokens_per_joule, 3)]
            + (["-" if row.speedup is None else f"{row.speedup:.2f}x"] if speedup else []))
    md = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
          "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    md += ["| " + " | ".join(_md_cell(c) for c in line) + " |" for line in cells]
    return BenchTable(rows, settings, columns, numeric, cells, "\n".join(md) + "\n" if rows else "")


def _vram(r: TrialRecord | None) -> tuple[float | None, str]:
    """The VRAM a config holds, the server's report first, and where it comes from."""
    if r is None:
        return None, ""
    if r.server_vram_mib is not None:
        return r.server_vram_mib, "server-reported"
    v = _num(r.vram_peak_mib)
    return v, "NVML peak" if v is not None else ""


def _cpu_only(data: ReportData) -> bool:
    """The study's offload probe said the server runs the model on the CPU only."""
    return data.header.gpu_offloads is False


def _costs(win: TrialRecord, base: TrialRecord | None, data: ReportData) -> list[CostRow]:
    """The winner beside the defaults: its rate, and what it costs in VRAM, power and TTFT."""
    def stat(r: TrialRecord | None, metric: str) -> float | None:
        return None if r is None else _num(r.stat(metric))

    (vw, sw), (vb, sb) = _vram(win), _vram(base)
    again = {r.number: r.mean for r in [*data.validation, *([data.validation_baseline] if data.validation_baseline
                                                             else [])] if r.mean is not None}
    rows = []
    if win.number in again and base is not None and base.number in again:
        # The same rounds as the speedup above it, so the two agree.
        rows.append(CostRow(data.tps_label, again[win.number], again[base.number], 2,
                            f"re-validated, {data.validation_rounds} interleaved rounds"))
    rows.append(CostRow(data.tps_label, stat(win, data.tps_metric), stat(base, data.tps_metric), 1,
                        "search" if rows else ""))
    if vw is None and vb is None and _cpu_only(data):
        rows.append(CostRow("VRAM MiB", 0.0, 0.0, 0, "CPU only: the server offloads nothing"))
    else:
        rows.append(CostRow("VRAM MiB", vw, vb, 0, " / ".join(dict.fromkeys(x for x in (sw, sb) if x))))
    power = (_num(win.power_mean_w), _num(base.power_mean_w) if base is not None else None)
    if any(p is not None for p in power):
        rows.append(CostRow("mean GPU power W", power[0], power[1], 1))
    rows.append(CostRow("p95 TTFT ms", _num(_TTFT_P95(win)), _num(_TTFT_P95(base)) if base is not None else None, 0))
    tpj = (_num(win.tokens_per_joule), _num(base.tokens_per_joule) if base is not None else None)
    if any(t is not None for t in tpj):
        rows.append(CostRow("tokens per joule", tpj[0], tpj[1], 3))
    return rows


def tuned_name(r: TrialRecord) -> str:
    """The Ollama model name the report suggests creating: ``gemma3:1b`` -> ``gemma3-1b-tuned``."""
    base = r.model_label[:-5] if r.model_label.endswith(".gguf") else r.model_label
    return (re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "model") + "-tuned"


def _defaults_won(s: StoredStudy, defaults: str) -> str:
    """Why the defaults are the config to run: faster than every feasible tuned one, or the only
    feasible one (tuned ones may be faster, but broke a limit)."""
    tuned = [r for r in s.records if not r.baseline and r.state == "COMPLETE"]
    feasible = [r for r in tuned if r.feasible and r.values]
    if s.only_contended or any(not r.contended for r in feasible):
        return f"The {defaults} are the best configuration: no tuned one beat them, so there is nothing to change."
    if feasible:
        return (f"The {defaults} are the best configuration measured on a quiet machine: every feasible tuned config "
                "was measured while other processes competed, so none counts; re-run when the machine is quiet.")
    if tuned:
        broke = "broke a limit" if all(not r.error for r in tuned) else "broke a limit or failed to load"
        return (f"The {defaults} are the only feasible configuration: every tuned config {broke} (see Failures); "
                "relax the limits or search other settings.")
    return f"The {defaults} are the only configuration measured so far: run more trials to compare tuned ones."


def _speedup(s: StoredStudy, data: ReportData,
             win: TrialRecord) -> tuple[float | None, tuple[float, float] | None, str, str]:
    """(ratio, 95% interval, text, note) of the winner over the defaults."""
    label = objectives.label(data.objective)
    defaults = results.defaults_name(data.header.engine)
    w = s.winner_speedup(win)
    if isinstance(w, results.Speedup):
        return w.ratio, (w.ci95[0], w.ci95[1]), w.describe(label, defaults), ""
    if isinstance(w, results.NoSpeedup):
        if w.reason == results.DEFAULTS_WON:
            return None, None, "", _defaults_won(s, defaults)
        if w.reason == results.NO_BASELINE:
            return None, None, "", ("No speedup: the study has no baseline trial (run with --no-baseline); a new "
                                    "study without it measures the defaults first, then --validate 2 gives an "
                                    "interval.")
        return None, None, "", (f"No speedup: {label} is minimised, so there is no ratio over the defaults; "
                                "compare the costs below.")
    ratio = w.ratio
    text = (f"{ratio:.2f}x {label} vs {defaults} (trial #{w.trial} vs baseline #{w.baseline}, "
            "each measured once during the search)")
    why, todo = results.NO_INTERVAL_TEXT[w.no_interval]
    return ratio, None, text, f"No interval: {why}; {todo}."


def _check_note(c: Check | None, winner: int) -> str:
    """The latest ``tune check`` in one line, from its stored fields; a regression says to re-tune."""
    if c is None:
        return ""
    date = c.at[:10]
    if c.verdict == "unmeasured" or c.change_pct is None:
        return f"Last `tune check` ({date}) could not measure: {c.error or 'no measurement'}."
    what = "the winner" if c.winner_trial in (None, winner) else f"trial #{c.winner_trial} (the winner then)"
    since = since_text(c.environment_changes)
    pct, ci = c.change_pct, c.change_ci95
    if c.verdict == "regression":
        interval = (f" (95% CI {pct_text(-ci[1], signed=False, unit='')}-{pct_text(-ci[0], signed=False)} slower)"
                    if ci is not None else "")
        return (f"Last `tune check` ({date}): {what} is now {pct_text(-pct, signed=False)} slower{interval}{since}"
                f"{advice(c)}")
    return f"Last `tune check` ({date}): {c.verdict}, {what} measured {change_text(pct, ci)} vs stored{since}."


def _first_screen(s: StoredStudy, data: ReportData, best: TrialRecord | None, feasible: bool,
                  base: TrialRecord | None, storage: str | None) -> FirstScreen:
    """What to run, from the stored study alone."""
    if best is None or not feasible:
        missing = ("No trial has completed yet: nothing to run." if best is None else
                   f"No configuration is feasible: every measured trial breaks a limit (the least-violating, "
                   f"trial #{best.number}, is below). Relax the limits or run more trials.")
        return FirstScreen(None, "", "", missing, "", "", "", None, None, "", "",
                           base.number if base is not None else None)
    from tuner.errors import ExportError
    from tuner.export import modelfile_text

    try:
        modelfile, missing = modelfile_text(best, s), ""
    except ExportError as e:
        modelfile, missing = "", f"No Modelfile for this winner: {e}."
    at = storage_args(storage)
    name = tuned_name(best)
    fit = fit_of(best, s.attrs, s.records)
    env_command = (tune_command("export", s.name, *at, "--format", "env", "-o", f"{name}.env")
                   if best.effective_server else "")
    ratio, ci, text, note = _speedup(s, data, best)
    check = last_check(s.info)
    return FirstScreen(
        number=best.number, config=best.config_text(), modelfile=modelfile, missing=missing,
        export_command=tune_command("export", s.name, *at, "--format", "modelfile", "-o", f"{name}.Modelfile")
        if modelfile else "",
        create_command=command("ollama", "create", name, "-f", f"{name}.Modelfile") if modelfile else "",
        env_command=env_command, speedup=ratio, speedup_ci=ci, speedup_text=text, speedup_note=note,
        baseline_number=base.number if base is not None else None, costs=_costs(best, base, data),
        check_note=_check_note(check, best.number),
        check_regression=check is not None and check.verdict == "regression",
        memory_lines=fit.lines() if fit is not None else [], memory_tight=fit is not None and fit.tight)


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
        roofline=_roofline(s.info.roofline),
        pruned=_pruned(s.records, _planned_requests(s.info.workload or {})),
        imported=_imported(s),
        objective=objective,
        objective_label=objectives.label(objective),
        maximize=direction == "maximize",
    )
    data.pruned_saved_s = sum(p.saved_s for p in data.pruned)
    val = _validation(s, data, ranked)
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


def _memory(records: Sequence[TrialRecord]) -> list[MemoryRow]:
    return [MemoryRow(r.number, r.config_text(), _num(r.memory.get("predicted_mib")),
                      _num(r.memory.get("observed_mib", r.server_vram_mib)), _num(r.memory.get("error_pct")),
                      str(r.memory.get("verdict") or ""), r.skipped, r.failed_load)
            for r in records if r.memory and r.memory.get("predicted_mib") is not None]
