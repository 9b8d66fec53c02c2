"""``tune import``: other tools' results stored as trials of a study, marked imported.

Rows (tuner/importers.py) that share a file, a model, the settings and the environment are one
config: one trial, holding each of its tests' rates (llama-bench's pp512 and tg128 rows of one
config; the epochs of an Ollama bench run, as samples). A trial keeps its rows' digests, so a
file imported again adds nothing. Imported trials are never feasible and never measured here:
the views show them apart, and a warm start measures them again before one can win.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tuner import importers, objectives, settings
from tuner.errors import TunerError
from tuner.importers import ImportedRow, ImportFileError
from tuner.record import (CREATED_AT, ENGINE, ENVIRONMENT, IMPORTED_ENGINE, MODEL, OBJECTIVES, SOURCE, Stats,
                          TrialRecord, stored_attrs)

#: The largest mapping file read.
MAX_MAP_BYTES = 1 << 20


@dataclass
class ImportReport:
    """What ``tune import`` did: counts, and the reasons rows were skipped, grouped."""

    study: str
    storage: str
    files: int = 0
    rows: int = 0
    trials_added: int = 0
    already_present: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        fmts = ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items())) or "none"
        out = [f"read {self.rows} rows from {self.files} file(s) ({fmts}); added {self.trials_added} trial(s) "
               f"to study '{self.study}' in {self.storage}; {self.already_present} row(s) already present"]
        for why, n in self.skipped.most_common():
            out.append(f"  skipped {n}: {why}")
        return out


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The ``--map`` TOML file (see the README): ``model``, ``rows``, ``[metrics]``, ``[settings]``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    from tuner.inputs import read_text

    text = read_text(path, "mapping file", MAX_MAP_BYTES, ImportFileError, "--map")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ImportFileError(f"mapping file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"model", "model_name", "rows", "metrics", "settings"})
    if unknown:
        raise ImportFileError(f"mapping file {path}: unknown key(s) {', '.join(unknown)}: use model, model_name, "
                              "rows, [metrics] and [settings]")
    for name in dict(data.get("settings") or {}):
        settings.get(name)  # an unknown setting is named with the known ones
    return data


def import_results(paths: Iterable[str | Path], study_name: str, storage_url: str | None, *,
                   map_file: str | None = None, objective: str | None = None,
                   echo: Callable[[str], None] = lambda s: None) -> ImportReport:
    """Read every file under ``paths`` and store its rows as imported trials of ``study_name``.

    One named file that cannot be read raises ImportFileError; in a folder, such a file is
    counted as skipped with its reason and the rest is imported.
    """
    import optuna

    from tuner.storage import open_storage, shown_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if not study_name:
        raise TunerError("--study is required: name the study the results go into, e.g. --study llama-bench-4080")
    mapping = read_mapping(map_file) if map_file else None
    paths = list(paths)
    files = importers.files_in(paths)
    single = len(paths) == 1 and Path(paths[0]).is_file()
    report = ImportReport(study_name, shown_url(storage_url))
    rows: list[ImportedRow] = []
    for f in files:
        try:
            fmt, got = importers.read_file(f, mapping)
        except ImportFileError as e:
            if single:
                raise
            report.skipped[str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)] += 1
            continue
        report.files += 1
        report.formats[fmt] += 1
        report.rows += len(got)
        rows += got
    if not rows:
        raise ImportFileError(f"nothing to import: no readable result in {', '.join(map(str, paths))}")
    objective = objective or _objective(rows)
    direction = objectives.get(objective).direction
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=study_name, storage=storage, directions=[direction],
                                load_if_exists=True)
    if study.directions[0].name.lower() != direction:
        raise TunerError(f"study '{study_name}' ranks another way than {objective}: pass another --study")
    present = {d for t in study.get_trials(deepcopy=False)
               for d in (t.user_attrs.get(SOURCE) or {}).get("digests", [])}
    if not study.user_attrs:
        import datetime as dt

        first = rows[0]
        for k, v in ((MODEL, first.model), (ENGINE, IMPORTED_ENGINE), (OBJECTIVES, [objective]),
                     (ENVIRONMENT, {"imported": first.environment}),
                     (CREATED_AT, dt.datetime.now(dt.timezone.utc).isoformat())):
            study.set_user_attr(k, v)
    for group in _configs(rows):
        new = [r for r in group if r.digest not in present]
        report.already_present += len(group) - len(new)
        if not new:
            continue
        rec = _record(group)
        if objective not in rec.stats:
            report.skipped[f"no {objective} in the config's rows (e.g. a prefill-only run): pass --objective"] += \
                len(group)
            continue
        value = rec.stats[objective].mean
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, values=[value],
                                                  user_attrs=stored_attrs(rec)))
        present |= {r.digest for r in group}
        report.trials_added += 1
    for line in report.lines():
        echo(line)
    return report


def _objective(rows: list[ImportedRow]) -> str:
    from tuner.record import DECODE_TPS

    metrics = {r.metric for r in rows}
    return DECODE_TPS if DECODE_TPS in metrics or not metrics else sorted(metrics)[0]


def _configs(rows: list[ImportedRow]) -> list[list[ImportedRow]]:
    """Rows grouped by config: same file, model, settings and environment; a second rate of
    the same metric from another test starts a new config, one from the same test is a sample."""
    import json

    groups: dict[str, list[list[ImportedRow]]] = {}
    for r in rows:
        key = json.dumps([r.source, r.model, r.settings, r.environment], sort_keys=True, default=str)
        configs = groups.setdefault(key, [[]])
        for cfg in configs:
            if not any(x.metric == r.metric and x.test != r.test for x in cfg):
                cfg.append(r)
                break
        else:
            configs.append([r])
    return [cfg for configs in groups.values() for cfg in configs if cfg]


def _record(group: list[ImportedRow]) -> TrialRecord:
    first = group[0]
    runner = {k: v for k, v in first.settings.items() if k in settings.RUNNER_PARAMS}
    server = {k: v for k, v in first.settings.items() if k in settings.SERVER_PARAMS}
    stats: dict[str, Stats] = {}
    for metric in dict.fromkeys(r.metric for r in group):
        rows = [r for r in group if r.metric == metric]
        samples = [x for r in rows for x in (r.samples or (r.mean,))]
        s = Stats.of(samples)
        if s is not None and len(rows) == 1 and rows[0].sd is not None:
            s = Stats(mean=rows[0].mean, sd=rows[0].sd, p50=s.p50, p95=s.p95, min=s.min,
                      max=s.max)
        if s is not None and all(math.isfinite(v) for v in (s.mean, s.sd)):
            stats[metric] = s
    source = {"files": sorted({r.source for r in group}), "lines": [r.line for r in group],
              "format": first.fmt, "tests": [r.test for r in group], "digests": [r.digest for r in group],
              "environment": first.environment, "raw": first.raw}
    return TrialRecord(model=first.model or first.settings.get("variant", ""), options=runner, server=server,
                       stats=stats, n_requests=max(len(r.samples) or 1 for r in group), source=source)
