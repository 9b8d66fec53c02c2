"""The report's tables: top configs (llama-bench style), trade-off, failures, pruned, imported, memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from tuner.machine import offloads
from tuner.record import PREFILL_TPS, TrialRecord
from tuner.report.base import DEFAULT_RATE, TOP_N, _LATENCY_P95, _TTFT_P95, _gpu_names, _num
from tuner.results import StoredStudy

if TYPE_CHECKING:
    from tuner.report.data import ReportData


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
    #: Drafting: the share of drafted tokens accepted (None: no drafting statistics), and the
    #: greedy-output identity check ("same", "differs" or "" where it did not run).
    draft_acceptance: float | None = None
    identity: str = ""


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


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


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
            tokens_per_joule=_num(r.tokens_per_joule), speedup=s.speedup(r), draft_acceptance=r.draft_acceptance,
            identity="" if not r.identity else ("differs" if r.output_changed else "same")))
    other = data.tps_metric not in (DEFAULT_RATE, PREFILL_TPS)
    drafting = "draft_num_predict" in settings or any(r.draft_acceptance is not None or r.identity for r in rows)
    stage = any(r.stage for r in rows)
    speedup = any(r.speedup is not None for r in rows)
    columns = (["rank", "trial"] + (["stage"] if stage else []) + ["model", "size", "params", "quant", "backend"]
               + settings + ["decode tok/s", "prefill tok/s"] + ([f"{data.tps_label}"] if other else [])
               + ["p95 TTFT ms", "VRAM MiB", "tokens/J"] + (["drafts accepted", "greedy output"] if drafting else [])
               + (["x defaults"] if speedup else []))
    numeric = [c in ("rank", "trial", "size", "decode tok/s", "prefill tok/s", data.tps_label, "p95 TTFT ms",
                     "VRAM MiB", "tokens/J", "drafts accepted", "x defaults") for c in columns]
    cells = []
    for row, r in zip(rows, top):
        cells.append(
            [str(row.rank), f"#{row.number}"] + ([row.stage or "-"] if stage else [])
            + [row.model, "-" if row.size_gib is None else f"{row.size_gib:.2f} GiB", row.params, row.quant,
               row.backend] + [str(row.settings[k]) for k in settings]
            + [_pm(row.decode_tps, row.decode_sd), _pm(row.prefill_tps, row.prefill_sd)]
            + ([_pm(_num(r.stat(data.tps_metric)), _num(r.stat(data.tps_metric, "sd")))] if other else [])
            + [_cell(row.ttft_ms_p95, 0), _cell(row.vram_mib, 0), _cell(row.tokens_per_joule, 3)]
            + ([_pct(row.draft_acceptance), row.identity or "-"] if drafting else [])
            + (["-" if row.speedup is None else f"{row.speedup:.2f}x"] if speedup else []))
    md = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
          "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    md += ["| " + " | ".join(_md_cell(c) for c in line) + " |" for line in cells]
    return BenchTable(rows, settings, columns, numeric, cells, "\n".join(md) + "\n" if rows else "")


def _memory(records: Sequence[TrialRecord]) -> list[MemoryRow]:
    return [MemoryRow(r.number, r.config_text(), _num(r.memory.get("predicted_mib")),
                      _num(r.memory.get("observed_mib", r.server_vram_mib)), _num(r.memory.get("error_pct")),
                      str(r.memory.get("verdict") or ""), r.skipped, r.failed_load)
            for r in records if r.memory and r.memory.get("predicted_mib") is not None]
