"""Plain-text views of studies for the terminal: the run summary, `studies`, `show`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner import objectives, results
from tuner.checks import Check, check_line, checks_of
from tuner.effects import Effects, compute as compute_effects
from tuner.record import METRIC_ROWS, TELEMETRY_ROWS, TTFT_MS, TrialRecord, read_study_info, warm_start_sources
from tuner.errors import StudyError
from tuner.metrics import RequestSample
from tuner.storage import open_storage, shown_url, storage_args
from tuner.terminal import command, printable, tune_command

def _num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def format_trial(v: TrialRecord, title: str) -> str:
    """The block that describes one trial: config, metric statistics, telemetry."""
    lines = [f"{title} (trial #{v.number}):"]
    lines.append(f"  {'model':<24} {printable(v.model_label)}")
    if v.baseline:
        lines.append(f"  {'options':<24} none (the engine's defaults)")
    for k, val in {**v.options, **v.effective_server}.items():
        lines.append(f"  {printable(k):<24} {printable(val)}")
    if v.error:
        lines.append(f"  {'error':<24} {printable(v.error)}")
        return "\n".join(lines)
    lines.append(f"  {'metric':<24} {'mean':>10} {'sd':>8} {'p50':>10} {'p95':>10}")
    for label, metric in METRIC_ROWS:
        st = v.stats.get(metric)
        if st is not None:
            lines.append(f"  {label:<24} {_num(st.mean):>10} {_num(st.sd):>8} {_num(st.p50):>10} {_num(st.p95):>10}")
    if v.reload_ms is not None:
        lines.append(f"  {'reload (load) ms':<24} {_num(v.reload_ms):>10}")
    for label, name in TELEMETRY_ROWS:
        value = v.telemetry_value(name)
        if value is not None:
            lines.append(f"  {label:<24} {_num(value, 2):>10}")
    m = v.memory or {}
    if m.get("predicted_mib") is not None:
        seen = m.get("observed_mib", v.server_vram_mib)
        text = f"{_num(m['predicted_mib'], 0):>10}" + (f"  (server reported {_num(seen, 0)}" if seen is not None else "")
        if m.get("error_pct") is not None:
            text += f", error {m['error_pct']:+.1f}%"
        lines.append(f"  {'GPU MiB predicted':<24} {text}{')' if seen is not None else ''}")
    if v.n_requests:
        lines.append(f"  {'requests measured':<24} {v.n_requests:>10}")
    if v.violations:
        lines.append(f"  {'violates':<24} {printable('; '.join(v.violations))}")
    return "\n".join(lines)


def speedup_text(s: results.StudySummary, short: bool = False) -> str:
    """The winner over the defaults in words (:attr:`~tuner.results.StudySummary.winner_speedup`),
    or "" when there is no such number; ``short`` for one-line contexts (the verdict)."""
    w = s.winner_speedup
    defaults = results.defaults_name(s.engine)
    if isinstance(w, results.Speedup):
        text = w.describe(objectives.label(s.objectives[0]), defaults)
        b = s.baseline
        if b is not None and not b.feasible and w.ci95[0] <= 1.0:
            # Not faster than defaults that break a limit: say why those are no choice.
            how = "faster" if w.ci95[1] < 1.0 else "as fast"
            text += printable(f": the defaults are {how} but infeasible ({'; '.join(b.violations)})")
        return text
    if isinstance(w, results.NoSpeedup) and w.reason == results.DEFAULTS_WON:
        # "1.00x vs the defaults" would read as a measured gain of nothing: say what it means.
        if s.only_contended:
            return (f"the {defaults} measured best, but every trial was measured while "
                    "other processes competed: no recommendation until a quiet re-run")
        val = results.Validation.from_dict(s.validation) if s.validation else None
        if val is not None and val.defaults_won and val.speedup is not None:
            sp = val.speedup
            faster = "faster than" if sp.ci95[1] < 1.0 else "as fast as"
            return (f"the {defaults} are {faster} the best tuned config (#{sp.trial}: {sp.ratio:.2f}x, 95% CI "
                    f"{sp.ci95[0]:.2f}-{sp.ci95[1]:.2f}x, re-measured interleaved over {len(sp.ratios)} rounds): "
                    "nothing to change")
        return f"the {defaults} are the best configuration found: nothing to change"
    if isinstance(w, results.SearchSpeedup):
        return results.search_speedup_text(w.ratio, objectives.label(s.objectives[0]), defaults,
                                           (w.baseline, w.baseline_value), w.value, contended=w.contended,
                                           short=short, no_interval=w.no_interval)
    return ""


def format_request(number: int, step: int, sample: RequestSample) -> str:
    """One measured request, for ``tune -v``."""
    return printable(f"  #{number} request {step + 1} ({sample.prompt}, repeat {sample.repeat + 1}): "
                     f"decode {sample.decode_tps:.1f} tok/s  prefill {sample.prefill_tps:.0f} tok/s  "
                     f"TTFT {sample.ttft_ms:.0f} ms  latency {sample.latency_ms:.0f} ms")


def verdict(s: results.StudySummary) -> str:
    """The one-line verdict of ``tune -q``: the best config and its speedup over the defaults."""
    if s.best is None:
        return "No trial completed: nothing to report yet."
    obj = s.objectives[0]
    value = f" ({objectives.label(obj)} {s.best.value:.2f})" if s.best.value is not None else ""
    head = "Best" if s.best_is_feasible else "No feasible configuration; least-violating"
    line = f"{head}: #{s.best.number} {s.best.config_text()}{value}"
    speedup = speedup_text(s, short=True)
    if speedup:
        line += f"; {speedup}"
    if s.only_contended:
        line += "; WARNING: every feasible trial was measured while other processes competed: uncertain"
    return printable(line)


def format_summary(s: Any) -> str:
    """The end-of-run summary printed by ``tune``."""
    out = [""]
    if len(s.objectives) > 1:
        out.append(f"Pareto set ({', '.join(s.objectives)}): {len(s.pareto)} feasible trade-offs")
        for v in s.pareto:
            vals = ", ".join(f"{o}={x:.2f}" for o, x in zip(s.objectives, v.values or []))
            out.append(f"  #{v.number}: {vals}  {printable(v.config_text())}")
    if s.best is None and s.counts.get("imported"):
        out.append(f"No trial measured here yet: the study holds {s.counts['imported']} imported results "
                   "(another tool's numbers, listed by `tune show`).")
    elif s.best is None:
        out.append("No trial completed: nothing to report yet.")
    elif s.best_is_feasible:
        out.append(format_trial(s.best, "Best feasible configuration"))
    else:
        out.append("No feasible configuration: every measured trial violates a limit.")
        out.append(format_trial(s.best, "Least-violating configuration"))
    val = results.Validation.from_dict(s.validation) if s.validation else None
    speedup = speedup_text(s)
    if speedup:
        out.append(speedup[:1].upper() + speedup[1:])
    if val is not None:
        out.extend(val.describe())
    if s.ablation is not None:
        label = objectives.get(s.ablation.objective).label if s.ablation.objective in objectives.OBJECTIVES else ""
        out.extend(printable(line) for line in s.ablation.lines(label or s.ablation.objective))
    if s.fit is not None:
        # Its warning is one of the caveats, printed with them below.
        out.extend(printable(line) for line in s.fit.lines() if not line.startswith("WARNING:"))
    if s.roofline:
        out.append(f"Roofline: {s.roofline['text']}")
    if s.pruned:
        out.append(f"Pruning: {s.pruned} trials stopped early, saving about {s.pruned_saved_s:.1f} s of measurement")
    if s.contended or s.remeasured:
        out.append(f"Interference: {s.remeasured} measurements redone because other processes competed, "
                   f"{s.contended} trials still contended "
                   + ("(all of them: see the warning below); " if s.only_contended else "(left out of the winner); ")
                   + f"{s.contention_lost_s:.0f} s lost to contention")
    out.extend(printable(f"WARNING: {c.text}") for c in s.all_warnings)
    if s.stopped_on_time:
        out.append(printable(s.stopped_on_time[:1].upper() + s.stopped_on_time[1:]))
    counts = ", ".join(f"{n} {k}" for k, n in sorted(s.counts.items()))
    out.append(f"Trials: {sum(s.counts.values())} in study ({counts}); {s.trials_run} run now")
    out.append(printable(f"Stored in {s.storage} as study '{s.study_name}'"))
    at = storage_args(s.storage)
    report = tune_command('report', s.study_name, *at)
    if s.best is not None and (s.best_is_feasible or s.pareto):
        out.append(f"Next: {report}   {tune_command('export', s.study_name, *at, '--format', 'modelfile')}")
    elif s.best is not None:
        # An export hint here would only fail: say what would make one possible.
        out.append(f"Next: {report}; nothing met the limits, so there is nothing to export: relax them and "
                   f"run more trials, or export the least-violating config knowingly with "
                   f"`{tune_command('export', s.study_name, *at, '--allow-infeasible')}`")
    elif s.counts.get("imported") and sum(s.counts.values()) == s.counts["imported"]:
        start = command("tune", "--model", "MODEL", f"--warm-start-from={s.study_name}", *at)
        out.append(f"Next: measure them here: `{start}` seeds a new study with the best imported configs")
    else:
        out.append(f"Next: `{tune_command('show', s.study_name, *at)}` says why each trial failed; fix that "
                   "and run the same command again")
    return "\n".join(out)


def study_names(storage_url: str | None) -> list[str]:
    """The names of the studies in a storage (none when it does not exist yet)."""
    import optuna

    try:
        storage = open_storage(storage_url, create=False)
    except StudyError:
        return []
    return list(optuna.get_all_study_names(storage))


@dataclass(frozen=True)
class StudyRow:
    """One study as ``tune studies`` lists it."""

    study: str
    model: str
    trials: int
    objective: str
    #: The best feasible trial's first objective value; None when no trial is feasible.
    best_value: float | None
    best_trial: int | None
    last_update: dt.datetime | None


def study_rows(storage_url: str | None) -> list[StudyRow]:
    """Every study in a storage, as rows."""
    rows = []
    for st in results.read_all_studies(open_storage(storage_url, create=False)):
        best = st.best()
        rows.append(StudyRow(
            study=st.name,
            model=st.info.model,
            trials=len(st.records),
            objective=st.info.objective,
            best_value=best.value if best is not None else None,
            best_trial=best.number if best is not None else None,
            last_update=st.last_update,
        ))
    return rows


def format_studies(storage_url: str | None) -> str:
    """A table of the studies in a storage."""
    rows = [(
        printable(r.study),
        printable(r.model),
        str(r.trials),
        f"{r.best_value:.2f}" if r.best_value is not None else "-",
        r.last_update.strftime("%Y-%m-%d %H:%M") if r.last_update else "-",
    ) for r in study_rows(storage_url)]
    if not rows:
        return printable(f"no studies in {shown_url(storage_url)}")
    head = ("study", "model", "trials", "best feasible", "last update")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def studies_json(storage_url: str | None) -> list[dict[str, Any]]:
    """``tune studies --json``: one object per study (see README, Machine-readable output)."""
    return [jsonable(dataclasses.asdict(r)) for r in study_rows(storage_url)]


@dataclass
class ShowData:
    """What ``tune show`` prints: the summary, the top-k feasible trials, the parameter
    effects and the failed trials."""

    summary: results.StudySummary
    top: list[TrialRecord]
    effects: Effects
    failed: list[TrialRecord]
    #: The drift checks stored with the study (``tune check``), oldest first.
    checks: list[Check] = dataclasses.field(default_factory=list)
    #: Where the study's warm start came from (tuner/warmstart.py ``WarmStart.to_dict``), or None.
    warm_start: dict[str, Any] | None = None
    #: Results imported from other tools (``tune import``), best first: shown apart.
    imported: list[TrialRecord] = dataclasses.field(default_factory=list)


#: The checks ``tune show`` lists (the latest); ``--json`` has them all.
SHOWN_CHECKS = 10


def show_data(storage_url: str | None, name: str | None, top: int = 10) -> ShowData:
    """Read one study for ``tune show``."""
    storage = open_storage(storage_url, create=False)
    study = results.load_study(storage, name)
    attrs = dict(study.user_attrs)
    info = read_study_info(attrs)
    s = results.summarise_study(study, info.objectives, shown_url(storage_url))
    ranked = results.StoredStudy(s.study_name, {}, [objectives.get(info.objective).direction], s.trials).ranked()
    eff = compute_effects(results.StoredStudy(s.study_name, attrs, results.directions(study), s.trials))
    failed = [v for v in s.trials if v.error or v.state == "FAIL"]
    sign = -1 if objectives.get(info.objective).direction == "maximize" else 1
    imported = sorted((v for v in s.trials if v.imported and v.value is not None), key=lambda v: sign * (v.value or 0))
    return ShowData(s, ranked[:max(top, 0)], eff, failed, checks_of(info), info.warm_start, imported[:max(top, 0)])


def imported_line(v: TrialRecord) -> str:
    """One imported result: its value, config, tests and where it came from (file:line, format)."""
    src = v.source or {}
    files = ", ".join(f"{Path(f).name}" for f in src.get("files", []))
    lines = ",".join(str(x) for x in src.get("lines", []))
    return (f"  {v.number:>4} {v.value or 0:>12.2f}  {v.config_text()}  [{' '.join(src.get('tests', []))}; "
            f"{files}:{lines}, {src.get('format', '?')}]")


def warm_start_line(d: ShowData) -> str | None:
    """'Warm start: from 'A' (same hardware): #1 (A#7), #2 (A#3)', or None without one."""
    if not d.warm_start:
        return None
    found = warm_start_sources(d.warm_start)
    if not found:
        return f"Warm start: none: {d.warm_start.get('reason') or 'no earlier study to start from'}"
    sources = ", ".join(f"'{x.study}' ({x.match})" for x in found)
    busy = {str(x.get("from")) for x in d.warm_start.get("seeds") or [] if isinstance(x, dict) and x.get("contended")}
    seeded = ", ".join(f"#{v.number} ({v.seeded_from}{', contended in its source' if v.seeded_from in busy else ''})"
                       for v in d.summary.trials if v.seeded_from)
    return f"Warm start: from {sources}: {seeded or 'no seeded trial ran'}"


def format_show(storage_url: str | None, name: str | None, top: int = 10) -> str:
    """The best configuration and the top-k table of one study."""
    d = show_data(storage_url, name, top)
    s, obj = d.summary, d.summary.objectives[0]
    text = format_summary(s)
    warm = warm_start_line(d)
    if warm:
        text += "\n" + printable(warm)
    if d.top:
        lines = ["", f"Top {len(d.top)} feasible:"]
        lines.append(f"  {'#':>4} {obj:>12} {'p95 TTFT ms':>12}  config")
        for v in d.top:
            lines.append(f"  {v.number:>4} {v.value or 0:>12.2f} {v.stat(TTFT_MS, 'p95') or 0:>12.0f}  "
                         f"{printable(v.config_text())}")
        text += "\n".join(lines)
    if d.imported:
        text += (f"\n\nImported ({len(d.imported)} best; another tool's numbers, not measured here: "
                 "a warm start from this study measures them again):\n"
                 f"  {'#':>4} {obj:>12}  config  [tests; source]\n"
                 + "\n".join(printable(imported_line(v)) for v in d.imported))
    if d.effects.params:
        text += "\n\n" + "\n".join(printable(line) for line in d.effects.lines())
    if d.failed:
        text += "\n\nFailed or infeasible by error:\n" + "\n".join(
            printable(f"  #{v.number} {v.config_text()}: {v.error or 'failed without an error message'}")
            for v in d.failed)
    if d.checks:
        shown = d.checks[-SHOWN_CHECKS:]
        more = f"; the last {len(shown)} of {len(d.checks)}" if len(shown) < len(d.checks) else ""
        text += f"\n\nChecks (tune check{more}):\n" + "\n".join(check_line(c) for c in shown)
    return text


def show_json(storage_url: str | None, name: str | None, top: int = 10) -> dict[str, Any]:
    """``tune show --json``: the summary's document plus ``top``, ``effects``, ``failed`` and ``checks``."""
    d = show_data(storage_url, name, top)
    return {
        **summary_json(d.summary),
        "top": [trial_json(v) for v in d.top],
        "effects": jsonable(dataclasses.asdict(d.effects)) if d.effects.params else None,
        "failed": [trial_json(v) for v in d.failed],
        "checks": [jsonable(c.to_dict()) for c in d.checks],
        "warm_start": jsonable(d.warm_start),
        "imported": [{**trial_json(v), "source": jsonable(v.source)} for v in d.imported],
    }


# ------------------------------------------------------------------------ machine-readable


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON: tuples as lists, datetimes as ISO 8601, non-finite floats as null."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dt.datetime):
        # Optuna keeps naive local times; JSON readers get UTC with its offset, like `tune check`'s.
        return x.astimezone(dt.timezone.utc).isoformat()
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def trial_json(v: TrialRecord) -> dict[str, Any]:
    """One trial: what ran, its outcome, and every measured value under its stored name
    (``metrics``, the same names as ``tune export --format csv``)."""
    return jsonable({
        "number": v.number,
        "state": v.state,
        "outcome": results.outcome(v),
        "feasible": v.feasible,
        "baseline": v.baseline,
        "stage": v.stage,
        "seeded_from": v.seeded_from,
        "reused_from": v.reused_from,
        "model": v.model,
        "config": v.config_text(),
        "options": v.options,
        "server": v.effective_server,
        "values": v.values,
        "violations": v.violations,
        "error": v.error,
        # The memory model's prediction (made before the trial) beside what the server reported.
        "memory": v.memory,
        "ran": v.ran or None,
        # Drafting (speculative decoding): the greedy-output identity check, where it ran;
        # drafted/accepted tokens are among the metrics.
        "output_identity": v.identity,
        "datetime_start": v.datetime_start,
        "datetime_complete": v.datetime_complete,
        "metrics": v.flat(),
    })


def summary_json(s: results.StudySummary) -> dict[str, Any]:
    """The run summary as one JSON object (see README, Machine-readable output): the same
    data as :func:`format_summary`, numbers as numbers."""
    w = s.winner_speedup
    speedup: dict[str, Any] | None = None
    if isinstance(w, results.Speedup):
        speedup = {"ratio": w.ratio, "ci95": list(w.ci95), "rounds": len(w.ratios),
                   "distinguishable": w.distinguishable, "source": "revalidation", "baseline_trial": w.baseline}
    elif isinstance(w, results.SearchSpeedup):
        speedup = {"ratio": w.ratio, "ci95": None, "rounds": None, "distinguishable": None,
                   "source": "search", "baseline_trial": w.baseline}
    return jsonable({
        "study": s.study_name,
        "storage": s.storage,
        "engine": s.engine,
        "objectives": s.objectives,
        "best": trial_json(s.best) if s.best is not None else None,
        "best_is_feasible": s.best_is_feasible,
        "baseline": trial_json(s.baseline) if s.baseline is not None else None,
        "speedup": speedup,
        "verdict": verdict(s),
        "pareto": [trial_json(v) for v in s.pareto],
        "validation": s.validation,
        "ablation": s.ablation.to_dict() if s.ablation is not None else None,
        "roofline": s.roofline,
        "trials_run": s.trials_run,
        "counts": s.counts,
        "pruned": {"trials": s.pruned, "saved_s": s.pruned_saved_s},
        "contention": {"trials": s.contended, "redone": s.remeasured, "lost_s": s.contention_lost_s,
                       "only_contended": s.only_contended},
        "gpu_fit": None if s.fit is None else {
            "observed_mib": s.fit.observed_mib, "predicted_mib": s.fit.predicted_mib,
            "spare_at_most_mib": s.fit.spare_mib, "bound": s.fit.bound, "headroom_mib": s.fit.headroom_mib,
            "tight": s.fit.tight},
        "warnings": [c.to_dict() for c in s.all_warnings],
        "stopped_on_time": s.stopped_on_time or None,
    })
