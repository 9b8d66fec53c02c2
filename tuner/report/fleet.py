"""The fleet page: every model x hardware of a storage as one self-contained HTML file.

The rows come from :func:`tuner.fleet.read_fleet`; this module only renders them (no plotly:
the page is tables, so it needs no script at all). Every text from a study is escaped.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from tuner import objectives
from tuner.fleet import SPEEDUP_NOTE, Fleet, FleetRow, read_fleet
from tuner.report import output_path
from tuner.report.html import escape, number, page, table

#: The default file name of ``tune report --fleet`` (in ``reports/``).
FLEET_FILE = "fleet.html"


def _hardware_cell(r: FleetRow) -> str:
    hw = r.fingerprint
    detail = ("" if hw is None else
              f"{hw.get('cpu') or 'unknown CPU'}, {hw.get('cores', '?')} cores, {hw.get('ram_gib', '?')} GiB RAM")
    return escape(r.hardware) + (f"<br><span class=\"caption\">{escape(detail)}</span>" if detail else "")


def _study_cell(r: FleetRow) -> str:
    text = f"<code>{escape(r.study)}</code>"
    others = [s for s in r.studies if s != r.study]
    if others:
        text += (f"<br><span class=\"caption\">best of {len(r.studies)}; also "
                 + ", ".join(f"<code>{escape(s)}</code>" for s in others) + "</span>")
    return text


def _config_cell(r: FleetRow) -> str:
    text = escape(r.config_text)
    if r.best_trial is not None:
        text += f"<br><span class=\"caption\">trial #{r.best_trial}: {escape(r.config or '')}</span>"
    return text


def _value_cell(r: FleetRow) -> str:
    if r.value is None:
        return "-"
    text = f"{number(r.value, 2)} {escape(objectives.label(r.objective))}"
    if r.value_ci95 is not None:
        text += f"<br><span class=\"caption\">95% CI {number(r.value_ci95[0], 2)} .. {number(r.value_ci95[1], 2)}</span>"
    how = "re-validated" if r.value_source == "revalidation" else "search, single measurement"
    return text + f"<br><span class=\"caption\">{escape(how)}</span>"


def _row(r: FleetRow) -> list[tuple[str, bool]]:
    return [
        (_hardware_cell(r), False), (_study_cell(r), False), (_config_cell(r), False), (_value_cell(r), True),
        (escape(r.speedup.text()) if r.speedup else "-", True), (str(r.trials), True),
        (escape(r.last_check.text(r.best_trial, r.study)) if r.last_check else "-", False),
        # Optuna's naive local time, shown in UTC like the single-study report.
        (escape(r.last_update.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")) if r.last_update
         else "-", False),
    ]


def render_fleet(fleet: Fleet, generated_at: str | None = None) -> str:
    """The fleet as one HTML page: a section per model, a row per hardware."""
    at = generated_at or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<h1>ollama-tuner fleet</h1>",
        f"<p class=\"caption\">Generated {escape(at)} from {escape(fleet.storage)}: {fleet.studies} studies, "
        f"{len(fleet.rows)} model x hardware pairs. Where several studies measured the same model on the same "
        "hardware, the one whose best config has the best re-validated value is shown, and the best single search "
        "value only where none was re-validated; each value says which it is.</p>",
    ]
    if not fleet.rows:
        body.append("<p class=\"note\">The storage holds no study.</p>")
    head = ["hardware", "study", "best config (changed from defaults)", "best", "speedup", "trials",
            "last check", "last update"]
    models: dict[str, list[FleetRow]] = {}
    for r in fleet.rows:
        models.setdefault(r.model, []).append(r)
    for model, rows in models.items():
        body.append(f"<h2>{escape(model or '(model not recorded)')}</h2>")
        body.append(table(head, [_row(r) for r in rows]))
        body += [f"<p class=\"warn\">{escape(r.study)}: {escape(w)}</p>" for r in rows for w in r.warnings]
    if fleet.rows:
        body.append(f"<p class=\"caption\">{escape(SPEEDUP_NOTE[0].upper() + SPEEDUP_NOTE[1:])}.</p>")
    return page("ollama-tuner fleet", body)


def write_fleet_report(storage_url: str | None, output: str | None) -> Path:
    """Read the fleet of a storage and write its page; return the path written.

    ``output`` defaults to ``reports/fleet.html``; an existing folder gets ``fleet.html``;
    ``-`` writes the page to standard output (and returns ``Path("-")``). Other paths follow
    :func:`tuner.files.write_output`.
    """
    from tuner.files import STDOUT, write_output

    text = render_fleet(read_fleet(storage_url))
    path = output_path(output, FLEET_FILE)
    write_output(path, text.encode("utf-8"), "fleet report")
    return path or Path(STDOUT)
