"""The HTML report of a study, in optuna's visualization split.

:mod:`.data` reads the study once and computes a :class:`ReportData` (tested as plain values),
:mod:`.figures` draws plotly figures from that data only, :mod:`.html` renders the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tuner.report.data import (
    FIGURE_ORDER, LOG_AXIS_RATIO, TOP_N, BenchRow, BenchTable, BestConfig, CostRow, EmptyFigure, FailureRow,
    FirstScreen, Header, MetricRow, NamedFigure, ParamAxis, PrunedRow, ReportData, StoredStudy, TelemetryPoint,
    TelemetryView, TimelineRow, TopRow, TradeoffPoint, TrialPoint, TrialSeries, TrialValue, ValidationRow,
    best_so_far, build_data, log_axis, pareto_front, paused_gc, read_study,
)
from tuner.report.html import render_html

if TYPE_CHECKING:
    from optuna.study import Study

__all__ = [
    "FIGURE_ORDER", "LOG_AXIS_RATIO", "REPORTS_DIR", "TOP_N", "BenchRow", "BenchTable", "BestConfig", "CostRow",
    "EmptyFigure", "FailureRow", "FirstScreen", "Header", "MetricRow", "NamedFigure", "ParamAxis", "PrunedRow",
    "ReportData", "StoredStudy", "TelemetryPoint", "TelemetryView", "TimelineRow", "TopRow", "TradeoffPoint",
    "TrialPoint", "TrialSeries", "TrialValue", "ValidationRow", "best_so_far", "build_data", "build_report",
    "log_axis", "output_path", "pareto_front", "paused_gc", "read_study", "render_html", "write_report",
]

REPORTS_DIR = Path("reports")


def output_path(output: str | None, default_name: str) -> Path | None:
    """Where a report goes, by :func:`tuner.files.output_path`: ``reports/<default_name>``
    without ``output``, ``default_name`` inside a folder, None for ``-`` (standard output)."""
    from tuner.files import output_path as resolve

    return resolve(output, REPORTS_DIR / default_name)


def build_report(source: Study | StoredStudy, storage: str | None = None) -> ReportData:
    """Compute everything the report shows, figures included (no HTML here); ``storage`` is the
    URL the study came from, named in the commands the report prints."""
    from tuner.report.figures import draw

    data = build_data(source, storage)
    data.figures = draw(data)
    return data


def write_report(storage_url: str | None, study_name: str | None, output: str | None) -> Path:
    """Build and write the HTML report of a stored study; return the path written.

    ``output`` defaults to ``reports/<safe study name>.html``; an existing folder gets that
    file name inside it; ``-`` writes the page to standard output (and returns ``Path("-")``).
    Other paths follow :func:`tuner.files.write_output`. Raises StudyError for a missing
    study, TunerError when the file cannot be written.
    """
    from tuner.files import STDOUT, safe_name, write_output
    from tuner.results import load_study
    from tuner.storage import close_storage, open_storage

    storage = open_storage(storage_url, create=False)
    try:
        study = load_study(storage, study_name)
        with paused_gc():  # the objects read stay alive until the page is written: nothing to collect
            text = render_html(build_report(study, storage_url))
    finally:
        close_storage(storage)
    path = output_path(output, f"{safe_name(study.study_name)}.html")
    write_output(path, text.encode("utf-8"), "report")
    return path or Path(STDOUT)
