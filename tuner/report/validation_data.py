"""The best config's metrics and the interleaved re-validation of the top configs, as stored."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from tuner import results
from tuner.record import DECODE_TPS, METRIC_ROWS, TELEMETRY_ROWS, TrialRecord
from tuner.report.base import EmptyFigure, _num
from tuner.results import StoredStudy

if TYPE_CHECKING:
    from tuner.report.data import ReportData


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
