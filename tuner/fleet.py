"""The fleet view: every model x hardware in one storage, with its best config and speedup.

Many machines feed one storage (PostgreSQL); each study records the hardware it ran on
(the study attribute ``hardware``: CPU, cores, RAM, the GPUs NVML saw). :func:`fleet_rows`
groups the studies by model, hardware and objective and keeps the best study of each group;
:func:`format_fleet` and :func:`fleet_json` render the rows for ``tune studies --by-hardware``
and :mod:`tuner.report.fleet` draws them as an HTML page.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from tuner import objectives, results
from tuner.checks import last_check
from tuner.machine import accelerator, hardware_label, remote_server
from tuner.record import StudyInfo, TrialRecord, fixed_settings
from tuner.results import StoredStudy
from tuner.show import jsonable
from tuner.storage import open_storage, shown_url
from tuner.terminal import printable


@dataclass(frozen=True)
class LastCheck:
    """The latest ``tune check`` of a study (see :func:`tuner.checks.last_check`)."""

    #: When it ran, ISO 8601 as stored.
    at: str
    #: "ok", "faster", "regression" or "unmeasured".
    verdict: str
    #: The winner now vs stored, in percent, with its 95% interval (None when not measured).
    change_pct: float | None = None
    change_ci95: tuple[float, float] | None = None
    #: The trial it re-measured: the best then, which later trials may have displaced.
    trial: int | None = None
    #: The study it belongs to (one of the row's studies, not always the one shown).
    study: str | None = None

    def text(self, best_trial: int | None = None, study: str | None = None) -> str:
        """e.g. "2026-12-01 ok (-0.8%)"; "of #4" when it checked another trial than ``best_trial``,
        "of STUDY #4" when it belongs to another study than ``study`` (the one shown)."""
        notes = [] if self.change_pct is None else [f"{self.change_pct:+.1f}%"]
        if study is not None and self.study is not None and self.study != study:
            notes.append(f"of {self.study}" + (f" #{self.trial}" if self.trial is not None else ""))
        elif best_trial is not None and self.trial is not None and self.trial != best_trial:
            notes.append(f"of #{self.trial}")
        return f"{self.at[:10]} {self.verdict}" + (f" ({', '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class FleetSpeedup:
    """The best config over the engine's defaults: re-measured interleaved with an interval
    (``source`` "revalidation"), or from the search's single measurements ("search")."""

    ratio: float
    source: str
    ci95: tuple[float, float] | None = None
    rounds: int | None = None

    @property
    def distinguishable(self) -> bool | None:
        """The interval leaves out 1x; None without an interval."""
        return None if self.ci95 is None else not self.ci95[0] <= 1.0 <= self.ci95[1]

    def text(self) -> str:
        """e.g. "1.42x (1.38-1.46)", "1.02x (0.98-1.06, n.s.)" or "1.85x (search)"."""
        if self.ci95 is None:
            return f"{self.ratio:.2f}x (search)"
        ns = "" if self.distinguishable else ", n.s."
        return f"{self.ratio:.2f}x ({self.ci95[0]:.2f}-{self.ci95[1]:.2f}{ns})"


@dataclass(frozen=True)
class FleetRow:
    """One model on one hardware: the best study of that pair and what it found."""

    model: str
    #: How the hardware is shown: GPU names, or "CPU-only: CPU, N cores", ...
    hardware: str
    #: The study attribute ``hardware`` (cpu, cores, ram_gib, gpus); None when not recorded, or
    #: when the server was remote (then it describes the measuring machine, not the server's).
    fingerprint: dict[str, Any] | None
    #: What ran the model: GPU, SERVER_GPU, CPU or UNKNOWN (:func:`tuner.machine.accelerator`).
    accelerator: str
    engine: str
    objective: str
    #: The study shown, and every study of this model x hardware x objective (it first).
    study: str
    studies: tuple[str, ...]
    trials: int
    best_trial: int | None = None
    #: The best config's settings changed from the engine's defaults (``name=value``).
    changed: tuple[str, ...] = ()
    #: The best config in full, as ``tune show`` prints it.
    config: str | None = None
    #: The objective's value: the re-validated geometric mean when the best config was
    #: re-measured ("revalidation", with its 95% interval), else its search value ("search").
    value: float | None = None
    value_ci95: tuple[float, float] | None = None
    value_source: str | None = None
    speedup: FleetSpeedup | None = None
    last_update: dt.datetime | None = None
    last_check: LastCheck | None = None
    #: What makes a number here less certain than it looks.
    warnings: tuple[str, ...] = ()
    #: A remote server's address (``host:port``) when the study measured one; None when the server
    #: ran on the measuring machine.
    server: str | None = None

    @property
    def config_text(self) -> str:
        """The settings changed from the defaults, "defaults", or "no feasible trial"."""
        if self.best_trial is None:
            return "no feasible trial"
        return " ".join(self.changed) or "defaults"


@dataclass
class _Candidate:
    """One study, before grouping."""

    st: StoredStudy
    row: FleetRow
    key: tuple[str, str, str, str]
    #: The value shown (signed so higher is better): the re-validated mean where there is one,
    #: else the search value.
    score: float
    #: Its best config was re-measured with an interval: preferred over single search values.
    validated: bool = False


def _model_label(model: str) -> str:
    """A GGUF path by its file name (machines keep their files in different folders)."""
    return model.rsplit("/", 1)[-1] if model.endswith(".gguf") else model


def _last_check(info: StudyInfo, study: str | None = None) -> LastCheck | None:
    c = last_check(info)
    if c is None:
        return None
    return LastCheck(at=c.at, verdict=c.verdict, change_pct=c.change_pct, change_ci95=c.change_ci95,
                     trial=c.winner_trial, study=study)


def _value(st: StoredStudy, best: TrialRecord, objective: str) -> tuple[float | None, tuple[float, float] | None, str]:
    """The best config's value: re-validated when its re-measurement counts, else the search's."""
    val = st.validation
    if val is not None and val.objective == objective:
        # The defaults, when they won, were re-measured in the same rounds.
        entries = [*val.entries, *([val.baseline] if val.baseline is not None else [])]
        entry = next((e for e in entries if e.number == best.number), None)
        if entry is not None and not entry.error and entry.values and entry.mean > 0:
            return entry.mean, ((entry.ci95[0], entry.ci95[1]) if len(entry.values) > 1 else None), "revalidation"
    return (best.values[0] if best.values else None), None, "search"


def _speedup(w: results.Speedup | results.SearchSpeedup | results.NoSpeedup) -> FleetSpeedup | None:
    """The column's form of ``StoredStudy.winner_speedup``; None when there is none (the defaults won, ...)."""
    if isinstance(w, results.Speedup):
        return FleetSpeedup(w.ratio, "revalidation", (w.ci95[0], w.ci95[1]), len(w.ratios))
    return FleetSpeedup(w.ratio, "search") if isinstance(w, results.SearchSpeedup) else None


def _candidate(st: StoredStudy) -> _Candidate:
    info = st.info
    objective = info.objective
    model = _model_label(info.model)
    server = remote_server(info)
    # A remote server is its own machine: the fingerprint describes the one that measured it.
    hw = info.hardware if server is None else None
    kind = accelerator(info)
    best = st.best()
    last = st.last_update
    row = FleetRow(
        model=model, hardware=hardware_label(info), fingerprint=hw, accelerator=kind,
        engine=info.engine_or_default, objective=objective, study=st.name, studies=(st.name,),
        trials=len(st.records), last_update=last, last_check=_last_check(info, st.name), server=server,
    )
    machine = f"server {server}" if server is not None else json.dumps(hw, sort_keys=True, default=str)
    key = (model, objective, machine, kind)
    if best is None:
        return _imported_candidate(st, row, key)
    value, ci95, source = _value(st, best, objective)
    space = info.space
    fixed = fixed_settings(space)
    base = st.baseline()
    warnings = []
    if st.only_contended:
        warnings.append("every feasible trial was measured while other processes competed: the best is uncertain")
    w = st.winner_speedup(best)
    speedup = _speedup(w)
    if isinstance(w, results.SearchSpeedup) and w.contended:
        warnings.append("the speedup was measured while other processes competed: not a number to rely on")
    row = dataclasses.replace(
        row, best_trial=best.number,
        changed=tuple(results.changed_settings(best, base, info.model, fixed)),
        config=best.config_text(), value=value, value_ci95=ci95, value_source=source, speedup=speedup,
        warnings=tuple(warnings))
    sign = 1.0 if st.direction == "maximize" else -1.0
    validated = source == "revalidation" or (speedup is not None and speedup.ci95 is not None)
    return _Candidate(st, row, key, sign * value if value is not None else -math.inf, validated)


def _imported_candidate(st: StoredStudy, row: FleetRow, key: tuple[str, str, str, str]) -> _Candidate:
    """A study of imported results (``tune import``): one machine's entry, its best imported
    config and value marked as another tool's numbers; or no value when it holds none."""
    sign = 1.0 if st.direction == "maximize" else -1.0
    imported = sorted((r for r in st.records if r.imported and r.value is not None and r.model == st.info.model),
                      key=lambda r: sign * (r.value or 0), reverse=True)
    if not imported:
        return _Candidate(st, row, key, -math.inf)
    best = imported[0]
    src = best.source or {}
    env = dict(src.get("environment") or {})
    machine = str(env.get("gpu_info") or env.get("cpu_info") or "hardware not recorded")
    changed = tuple(f"{k}={v}" for k, v in {**best.options, **best.server}.items())
    files = ", ".join(str(f).rsplit("/", 1)[-1] for f in src.get("files", []))
    row = dataclasses.replace(
        row, hardware=f"{machine} (imported)", best_trial=best.number, changed=changed, config=best.config_text(),
        value=best.value, value_source="imported",
        warnings=(f"imported from {files} ({src.get('format', '?')}): another tool's numbers, not measured by "
                  "the tuner",))
    # Imported numbers compete only with other imports of the same machine and tool.
    return _Candidate(st, row, (key[0], key[1], f"imported {machine}", key[3]), sign * (best.value or 0))


def fleet_rows(studies: Sequence[StoredStudy]) -> list[FleetRow]:
    """One row per model x hardware x objective: of the studies whose best config was re-validated,
    the one with the best re-validated value; only without any, the one with the best search value
    (a single measurement can be lucky); ties: the most recently updated. The row names every study
    of the group and the latest check among them. Sorted by model, then hardware."""
    groups: dict[tuple[str, str, str, str], list[_Candidate]] = {}
    for st in studies:
        c = _candidate(st)
        groups.setdefault(c.key, []).append(c)
    never = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    best: list[_Candidate] = []
    for members in groups.values():
        members.sort(key=lambda c: (c.validated, c.score, _aware(c.row.last_update) or never, c.st.name),
                     reverse=True)
        best.append(members[0])
        checks = [c.row.last_check for c in members if c.row.last_check is not None]
        latest = max(checks, key=lambda k: _aware(_parse(k.at)) or never, default=None)
        members[0].row = dataclasses.replace(members[0].row, studies=tuple(c.st.name for c in members),
                                             last_check=latest)
    # Two machines whose short labels read the same (same GPUs, another CPU) get the long label.
    hardware_of: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for c in best:
        hardware_of.setdefault((c.row.model, c.row.hardware), set()).add(c.key[2:])
    rows = [dataclasses.replace(c.row, hardware=hardware_label(c.st.info, detailed=True))
            if len(hardware_of[(c.row.model, c.row.hardware)]) > 1 else c.row for c in best]
    return sorted(rows, key=lambda r: (r.model, r.hardware, r.objective, r.study))


def _parse(at: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(at)
    except (TypeError, ValueError):
        return None


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    """Optuna stores naive local times; comparing them with aware ones would raise."""
    return None if t is None else (t if t.tzinfo else t.astimezone(dt.timezone.utc))


@dataclass
class Fleet:
    """The fleet of one storage: where it is, how many studies it holds, its rows."""

    storage: str
    studies: int
    rows: list[FleetRow] = field(default_factory=list)


def read_fleet(storage_url: str | None) -> Fleet:
    """Read every study of a storage once and compute its fleet rows."""
    storage = open_storage(storage_url, create=False)
    studies = results.read_all_studies(storage)
    return Fleet(shown_url(storage_url), len(studies), fleet_rows(studies))


def _value_text(r: FleetRow, with_label: bool) -> str:
    if r.value is None:
        return "-"
    unit = objectives.OBJECTIVES[r.objective].unit if r.objective in objectives.OBJECTIVES else ""
    digits = 0 if unit == "ms" else 1 if unit == "tok/s" else 2
    text = f"{r.value:,.{digits}f}" + {"imported": " (imported)", "search": " (search)"}.get(r.value_source or "", "")
    return f"{text} {objectives.label(r.objective)}" if with_label else text


def _study_text(r: FleetRow) -> str:
    return r.study if len(r.studies) == 1 else f"{r.study} (best of {len(r.studies)})"


SPEEDUP_NOTE = ("value: the re-validated geometric mean, (search): a single search measurement; speedup vs the "
                "engine's defaults: (low-high) 95% CI, re-measured interleaved; n.s.: not distinguishable; "
                "(search): single measurements, no interval")


def format_fleet(fleet: Fleet) -> str:
    """The fleet as a terminal table: a heading per model, a row per hardware."""
    if not fleet.rows:
        return printable(f"no studies in {fleet.storage}")
    objs = {r.objective for r in fleet.rows}
    value_head = objectives.label(next(iter(objs))) if len(objs) == 1 else "best"
    head = ("hardware", "study", "best config (changed from defaults)", value_head, "speedup", "trials", "last check")
    cells = [(
        printable(r.hardware), printable(_study_text(r)), printable(r.config_text),
        _value_text(r, len(objs) > 1), r.speedup.text() if r.speedup else "-", str(r.trials),
        printable(r.last_check.text(r.best_trial, r.study)) if r.last_check else "-",
    ) for r in fleet.rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    right = {3, 5}

    def line(c: Sequence[str]) -> str:
        return "  " + "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths)))

    out = [printable(f"{_plural(fleet.studies, 'study', 'studies')} in {fleet.storage}: "
                     f"{_plural(len(fleet.rows), 'model x hardware pair')}"), line(head).rstrip()]
    model: str | None = None
    notes: list[str] = []
    for r, c in zip(fleet.rows, cells):
        if r.model != model:
            model = r.model
            out.append(printable(r.model or "(model not recorded)"))
        out.append(line(c).rstrip())
        notes += [printable(f"  ! {r.study}: {w}") for w in r.warnings]
    out.append(SPEEDUP_NOTE)
    return "\n".join(out + notes)


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


def row_json(r: FleetRow) -> dict[str, Any]:
    """One row as plain JSON (see README, Machine-readable output)."""
    s = r.speedup
    return jsonable({
        "model": r.model,
        "hardware": {"label": r.hardware, "accelerator": r.accelerator, "fingerprint": r.fingerprint,
                     "server": r.server},
        "engine": r.engine,
        "objective": r.objective,
        "study": r.study,
        "studies": list(r.studies),
        "trials": r.trials,
        "best_trial": r.best_trial,
        "changed": list(r.changed),
        "config": r.config,
        "value": r.value,
        "value_ci95": r.value_ci95,
        "value_source": r.value_source,
        "speedup": None if s is None else {"ratio": s.ratio, "ci95": s.ci95, "rounds": s.rounds,
                                           "distinguishable": s.distinguishable, "source": s.source},
        "last_update": r.last_update,
        "last_check": None if r.last_check is None else {
            "at": r.last_check.at, "verdict": r.last_check.verdict, "change_pct": r.last_check.change_pct,
            "change_ci95": r.last_check.change_ci95, "trial": r.last_check.trial, "study": r.last_check.study},
        "warnings": list(r.warnings),
    })


def fleet_json(fleet: Fleet) -> dict[str, Any]:
    """``tune studies --by-hardware --json``: the storage, its study count and the rows."""
    return {"storage": fleet.storage, "studies": fleet.studies, "rows": [row_json(r) for r in fleet.rows]}
