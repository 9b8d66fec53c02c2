"""The report's header and first screen: the machine, the winner to paste, its speedup and costs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuner import objectives
from tuner import results
from tuner.caveats import Caveat, study_caveats
from tuner.checks import Check, advice, change_text, last_check, pct_text, since_text
from tuner.machine import offloads
from tuner.memory import fit_of
from tuner.record import TrialRecord
from tuner.report.base import _TTFT_P95, _num
from tuner.results import StoredStudy
from tuner.storage import storage_args
from tuner.terminal import command, tune_command

if TYPE_CHECKING:
    from tuner.report.data import ReportData


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
class CostRow:
    """One measure of the winner beside the defaults' (None where it was not measured)."""

    label: str
    winner: float | None
    defaults: float | None
    digits: int = 0
    #: Where the numbers come from, when that differs between sources (VRAM).
    source: str = ""


@dataclass(frozen=True)
class EffectRow:
    """One of the winner's settings and what it is worth (tuner/gains.py SettingEffect)."""

    change: str
    #: The winner over the winner with this setting reverted, as a percentage and its interval.
    effect: str
    #: The defaults with this setting alone over the defaults ("" where not measured).
    alone: str
    #: Exported by default (its effect is distinguishable from none).
    kept: bool


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
    #: What makes this result less certain than it looks (tuner/caveats.py), the same list as
    #: the terminal summary's and ``--json``'s ``warnings``.
    warnings: list[Caveat] = field(default_factory=list)
    #: What each of the winner's settings is worth (the ablation), and the lines under it
    #: (whether the effects add up, the portable config against the winner).
    effects: list[EffectRow] = field(default_factory=list)
    effects_notes: list[str] = field(default_factory=list)


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
                           base.number if base is not None else None, warnings=study_caveats(s))
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
        memory_lines=fit.lines() if fit is not None else [], memory_tight=fit is not None and fit.tight,
        warnings=study_caveats(s, best), **_effects(s, best))


def _effects(s: StoredStudy, best: TrialRecord) -> dict[str, Any]:
    ab = s.ablation
    if ab is None or ab.winner != best.number:
        return {}
    rows = [EffectRow(e.change.text(), e.reverted.pct() if e.reverted else (e.error or "not measured"),
                      e.alone.pct() if e.alone else "", e.kept) for e in ab.effects]
    # The per-setting lines are the table; the lines after them say how they combine.
    return {"effects": rows, "effects_notes": [line.strip() for line in ab.lines("")[1 + len(ab.effects):]]}
