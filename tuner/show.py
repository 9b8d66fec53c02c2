"""Plain-text views of studies for the terminal: the run summary, `studies`, `show`."""

from __future__ import annotations

from typing import Any

from tuner import objectives, results
from tuner.effects import compute as compute_effects
from tuner.record import METRIC_ROWS, TELEMETRY_ROWS, TrialRecord
from tuner.errors import StudyError
from tuner.storage import default_storage_url, open_storage, shown_url
from tuner.terminal import command, printable

def _num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def format_trial(v: TrialRecord, title: str) -> str:
    """The block that describes one trial: config, metric statistics, telemetry."""
    lines = [f"{title} (trial #{v.number}):"]
    lines.append(f"  {'model':<24} {printable(v.model)}")
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
    if v.n_requests:
        lines.append(f"  {'requests measured':<24} {v.n_requests:>10}")
    if v.violations:
        lines.append(f"  {'violates':<24} {printable('; '.join(v.violations))}")
    return "\n".join(lines)


def format_summary(s: Any) -> str:
    """The end-of-run summary printed by ``tune``."""
    out = [""]
    if len(s.objectives) > 1:
        out.append(f"Pareto set ({', '.join(s.objectives)}): {len(s.pareto)} feasible trade-offs")
        for v in s.pareto:
            vals = ", ".join(f"{o}={x:.2f}" for o, x in zip(s.objectives, v.values or []))
            out.append(f"  #{v.number}: {vals}  {printable(v.config_text())}")
    if s.best is None:
        out.append("No trial completed: nothing to report yet.")
    elif s.best_is_feasible:
        out.append(format_trial(s.best, "Best feasible configuration"))
    else:
        out.append("No feasible configuration: every measured trial violates a limit.")
        out.append(format_trial(s.best, "Least-violating configuration"))
    val = results.Validation.from_dict(s.validation) if s.validation else None
    # The speedup re-measured in the same rounds as the winner compares like with like; the
    # search's single measurements of each are the fallback.
    again = val.speedup if val is not None and s.best is not None and s.best_is_feasible else None
    if again is not None and s.best is not None and again.trial == s.best.number:
        out.append(again.describe(objectives.label(s.objectives[0]), results.defaults_name(s.engine)))
    elif s.speedup is not None and s.baseline is not None and s.best is not None:
        obj = s.objectives[0]
        out.append(
            f"{s.speedup:.2f}x {objectives.label(obj)} vs {results.defaults_name(s.engine)} "
            f"(baseline trial #{s.baseline.number}: {s.baseline.value:.2f}, best: {s.best.value:.2f}"
            + ("; measured while other processes competed: not a number to rely on)"
               if s.best.contended or s.baseline.contended else ")")
        )
    if val is not None:
        out.extend(val.describe())
    if s.roofline:
        out.append(f"Roofline: {s.roofline['text']}")
    if s.pruned:
        out.append(f"Pruning: {s.pruned} trials stopped early, saving about {s.pruned_saved_s:.1f} s of measurement")
    if s.contended or s.remeasured:
        out.append(f"Interference: {s.remeasured} measurements redone because other processes competed, "
                   f"{s.contended} trials still contended (left out of the winner); "
                   f"{s.contention_lost_s:.0f} s lost to contention")
    if s.only_contended:
        out.append("WARNING: every feasible trial was measured while other processes competed for the machine: "
                   "the winner above is uncertain; re-run when the machine is quiet")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(s.counts.items()))
    out.append(f"Trials: {sum(s.counts.values())} in study ({counts}); {s.trials_run} run now")
    out.append(printable(f"Stored in {s.storage} as study '{s.study_name}'"))
    at = () if s.storage == default_storage_url() else ("--storage", s.storage)
    out.append(f"Next: {command('tune', 'report', s.study_name, *at)}   "
               f"{command('tune', 'export', s.study_name, *at, '--format', 'modelfile')}")
    return "\n".join(out)


def study_names(storage_url: str | None) -> list[str]:
    """The names of the studies in a storage (none when it does not exist yet)."""
    import optuna

    try:
        storage = open_storage(storage_url, create=False)
    except StudyError:
        return []
    return list(optuna.get_all_study_names(storage))


def format_studies(storage_url: str | None) -> str:
    """A table of the studies in a storage."""
    import optuna

    storage = open_storage(storage_url, create=False)
    rows = []
    for name in optuna.get_all_study_names(storage):
        st = results.read_study(optuna.load_study(study_name=name, storage=storage))
        best = st.best()
        last = max((r.datetime_complete or r.datetime_start for r in st.records if r.datetime_start), default=None)
        rows.append((
            printable(name),
            printable(st.attrs.get("model", "")),
            str(len(st.records)),
            f"{best.value:.2f}" if best is not None and best.value is not None else "-",
            last.strftime("%Y-%m-%d %H:%M") if last else "-",
        ))
    if not rows:
        return printable(f"no studies in {shown_url(storage_url)}")
    head = ("study", "model", "trials", "best feasible", "last update")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def format_show(storage_url: str | None, name: str | None, top: int = 10) -> str:
    """The best configuration and the top-k table of one study."""
    storage = open_storage(storage_url, create=False)
    study = results.load_study(storage, name)
    names = list(study.user_attrs.get("objectives", ["decode_tps"]))
    s = results.summarise_study(study, names, shown_url(storage_url))
    text = format_summary(s)
    ranked = results.StoredStudy(s.study_name, {}, [objectives.get(names[0]).direction], s.trials).ranked()
    if ranked[:max(top, 0)]:
        lines = ["", f"Top {len(ranked[:top])} feasible:"]
        lines.append(f"  {'#':>4} {names[0]:>12} {'p95 TTFT ms':>12}  config")
        for v in ranked[:top]:
            lines.append(f"  {v.number:>4} {v.value or 0:>12.2f} {v.stat('ttft_ms', 'p95') or 0:>12.0f}  "
                         f"{printable(v.config_text())}")
        text += "\n".join(lines)
    eff = compute_effects(results.StoredStudy(s.study_name, dict(study.user_attrs), results.directions(study), s.trials))
    if eff.params:
        text += "\n\n" + "\n".join(printable(line) for line in eff.lines())
    failed = [v for v in s.trials if v.error or v.state == "FAIL"]
    if failed:
        text += "\n\nFailed or infeasible by error:\n" + "\n".join(
            printable(f"  #{v.number} {v.config_text()}: {v.error or 'failed without an error message'}")
            for v in failed)
    return text
