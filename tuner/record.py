"""The stored records: what one trial measured (:class:`TrialRecord`, written by
:func:`write_record`, read by :func:`read_record`) and what a study is (:class:`StudyInfo`,
written by :func:`write_study_info`, read by :func:`read_study_info`).

Every stored attribute name of a trial, every metric key and the names of the study
attributes :class:`StudyInfo` holds are spelled in this module. Users and optuna-dashboard
see the flat attributes the README lists (the rates and their spread, the constraint
inputs); the rest is grouped into two JSON attributes, ``detail`` and ``telemetry``, so a
trial costs a few storage writes instead of sixty. Studies written before the grouping
(every value flat) read back the same.

This is the bottom of the package: it imports nothing of the tuner but plain values.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from tuner.metrics import RequestSample, describe

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from tuner.telemetry_summary import TelemetrySummary

#: The metric keys: each a RequestSample field summarised per trial (its statistics are stored
#: as ``KEY_STAT``, e.g. ``decode_tps_mean``), and the aggregate rate of concurrent batches.
DECODE_TPS, PREFILL_TPS, E2E_TPS = "decode_tps", "prefill_tps", "e2e_tps"
TTFT_MS, LATENCY_MS, LOAD_MS = "ttft_ms", "latency_ms", "load_ms"
PROMPT_TOKENS, EVAL_TOKENS = "prompt_tokens", "eval_tokens"
#: Metrics summarised per trial from the requests (RequestSample fields).
SUMMARISED = (DECODE_TPS, PREFILL_TPS, E2E_TPS, TTFT_MS, LATENCY_MS, LOAD_MS, PROMPT_TOKENS, EVAL_TOKENS)
#: Summarised from the concurrent batches (tok/s over all simultaneous streams).
AGGREGATE = "aggregate_tps"
#: Every metric key.
METRICS = (*SUMMARISED, AGGREGATE)
STATS = ("mean", "sd", "p50", "p95", "min", "max")
#: Kept as flat attributes for users and the dashboard: (metric, stats).
_FLAT_STATS: dict[str, tuple[str, ...]] = {
    DECODE_TPS: ("mean", "sd", "p50", "p95"),
    PREFILL_TPS: ("mean", "sd", "p50", "p95"),
    E2E_TPS: ("mean", "sd", "p50", "p95"),
    AGGREGATE: ("mean", "sd", "p50", "p95"),
    TTFT_MS: ("p95",),
    LATENCY_MS: ("p95",),
}
#: Telemetry kept flat: the inputs of the VRAM and power limits and of tokens/J.
_FLAT_TELEMETRY = ("gpu_power_mean_w", "gpu_mem_used_peak_mib", "gpu_energy_j")

# The stored names of single values.
CONFIG, WORKER, SAMPLES, WARMUP = "config", "worker", "samples", "warmup"
BASELINE, ERROR, VIOLATIONS, SERVER_EFFECTIVE = "baseline", "error", "violations", "server_effective"
RELOAD_MS, TOKENS_PER_JOULE = "reload_ms", "tokens_per_joule"
SERVER_VRAM_MIB, SERVER_SIZE_MIB = "server_vram_mib", "server_size_mib"
INTERFERENCE_PCT, GPU_INTERFERENCE_PCT, CONTENDED = "interference_pct", "gpu_interference_pct", "contended"
#: A trial is contended when other processes used at least this much CPU (100 = one busy
#: core) or GPU (SM utilisation %) while its requests ran: a quarter of a core already moves
#: 2-thread CPU decode by several percent on a 2-core machine.
CONTENDED_PCT = 25.0
DETAIL, TELEMETRY = "detail", "telemetry"
_N_REQUESTS, _CONCURRENCY, _UNEXPECTED, _DONE = "n_requests", "concurrency", "unexpected_reloads", "done_reasons"
_PRUNED_SAVED = "pruned_saved_s"
#: The runner options the engine reports it ran (resolved defaults included: the context
#: /api/ps allocated, llama.cpp's batch and threads), by tuner name.
_RAN = "ran"
_REMEASURED, _CONTENTION_LOST = "remeasured", "contention_lost_s"
#: The search stage a trial belongs to (tuner/staged.py: baseline, start, warm, screen, tune, offload).
STAGE = "stage"
#: A warm-start trial's source ("STUDY#N"), and the trial whose measurement a config proposed
#: again reuses instead of being measured again (tuner/warmstart.py).
SEEDED_FROM, REUSED_FROM = "seeded_from", "reused_from"
#: Where an imported trial came from (tuner/importing.py): files, rows, format, row digests and
#: the environment the other tool recorded. Such a trial was not measured by the tuner.
SOURCE = "source"
#: True on an imported trial: a flat flag for users and optuna-dashboard to filter by.
IMPORTED = "imported"
#: The memory model's prediction for the trial beside what the server then reported
#: (tuner/memory.py): predicted_mib, prior_mib, verdict, the capacity bounds, skipped.
MEMORY = "memory"
#: Speculative decoding: tokens drafted and accepted over a trial's measured requests (where the
#: engine reports them), and the accepted share (flat, for users and the dashboard).
DRAFT_TOKENS, DRAFT_ACCEPTED, DRAFT_ACCEPTANCE = "draft_tokens", "draft_accepted", "draft_acceptance"
#: The output-identity check of a drafting config (greedy text with drafting == without), and the
#: constraint it sets: 1 when drafting changed the output (the config is infeasible).
OUTPUT_IDENTITY = "output_identity"

#: (label, metric) of the request metrics shown with their spread.
METRIC_ROWS = (
    ("decode tok/s", DECODE_TPS),
    ("prefill tok/s", PREFILL_TPS),
    ("end-to-end tok/s", E2E_TPS),
    ("aggregate tok/s", AGGREGATE),
    ("TTFT ms", TTFT_MS),
    ("latency ms", LATENCY_MS),
    ("load ms", LOAD_MS),
)
#: (label, stored name) of the per-trial telemetry shown for a trial.
TELEMETRY_ROWS = (
    ("GPU power mean W", "gpu_power_mean_w"),
    ("GPU power max W", "gpu_power_max_w"),
    ("GPU energy J", "gpu_energy_j"),
    ("tokens per joule", TOKENS_PER_JOULE),
    ("GPU memory peak MiB", "gpu_mem_used_peak_mib"),
    ("GPU memory increase MiB", "gpu_mem_increase_mib"),
    ("server VRAM MiB", SERVER_VRAM_MIB),
    ("host CPU util %", "host_cpu_util_mean_pct"),
    ("host memory peak MiB", "host_mem_used_peak_mib"),
    ("server RSS peak MiB", "server_rss_peak_mib"),
)
#: The host side of TELEMETRY_ROWS (psutil: the machine's CPU and memory, the server's RSS),
#: recorded with or without a GPU.
HOST_TELEMETRY_ROWS = tuple(row for row in TELEMETRY_ROWS if row[1].startswith(("host_", "server_rss")))


@dataclass(frozen=True)
class ServerMemory:
    """What the server reports a loaded model holds: in VRAM and in all (MiB)."""

    vram_mib: float
    size_mib: float


@dataclass(frozen=True)
class Stats:
    """mean, sd (sample), p50, p95, min, max of one metric over a trial's requests."""

    mean: float
    sd: float
    p50: float
    p95: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        d = describe(values)
        return cls(**{k: round(v, 4) for k, v in d.items()}) if d else None


@dataclass
class TrialRecord:
    """One trial as measured and as read back; the fields every reader uses.

    Written fields come from the measurement; ``number`` .. ``duration_s`` come from Optuna
    when the record is read back from storage.
    """

    model: str = ""
    #: Runner options sent ({} for the baseline: the engine's defaults).
    options: dict[str, Any] = field(default_factory=dict)
    #: Server settings asked for, and what the server really ran (old versions fall back).
    server: dict[str, Any] = field(default_factory=dict)
    server_effective: dict[str, Any] | None = None
    baseline: bool = False
    worker: dict[str, Any] | None = None
    #: Raw per-request samples (RequestSample.to_dict()), and the discarded warm-up.
    samples: list[dict[str, Any]] = field(default_factory=list)
    warmup: dict[str, Any] | None = None
    reload_ms: float | None = None
    stats: dict[str, Stats] = field(default_factory=dict)
    n_requests: int = 0
    concurrency: int | None = None
    unexpected_reloads: int = 0
    done_reasons: list[str] = field(default_factory=list)
    #: Telemetry by stored name (gpu_power_mean_w, gpu0_temp_max_c, host_cpu_util_mean_pct, ...).
    telemetry: dict[str, Any] = field(default_factory=dict)
    tokens_per_joule: float | None = None
    server_vram_mib: float | None = None
    server_size_mib: float | None = None
    violations: list[str] = field(default_factory=list)
    error: str | None = None
    pruned_saved_s: float | None = None
    #: CPU used by other processes while the requests ran (100 = one busy core), the GPU's
    #: other compute processes' utilisation, and whether either reached CONTENDED_PCT;
    #: None where it cannot be measured (a remote server).
    interference_pct: float | None = None
    gpu_interference_pct: float | None = None
    contended: bool | None = None
    #: Measurements discarded because other processes competed, and the seconds they and the
    #: waits for a quiet machine cost.
    remeasured: int = 0
    contention_lost_s: float | None = None
    #: The search stage that chose this trial (see tuner/staged.py); None when no stage did.
    stage: str | None = None
    #: The earlier study's trial a warm-start trial was seeded from ("STUDY#N").
    seeded_from: str | None = None
    #: The trial of this study whose measurement this one reuses (the same config, proposed
    #: again and clearly not the best): nothing was measured for it.
    reused_from: int | None = None
    #: The memory model's prediction made before the trial ran, and what the server then
    #: reported (MEMORY); ``skipped`` in it: not loaded, predicted not to fit.
    memory: dict[str, Any] | None = None
    #: What the engine reports it ran, by setting name (e.g. the baseline's num_ctx and threads).
    ran: dict[str, Any] = field(default_factory=dict)
    #: An imported result's origin (SOURCE); None for a trial the tuner measured.
    source: dict[str, Any] | None = None
    #: Tokens drafted and accepted over the measured requests (None: no drafting reported).
    draft_tokens: int | None = None
    draft_accepted: int | None = None
    #: The output-identity check (OUTPUT_IDENTITY): identical, prompt, first_difference, ...;
    #: None when the config does not draft or was not checked.
    identity: dict[str, Any] | None = None
    # -- from Optuna, on read --
    number: int = -1
    state: str = ""
    values: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)
    datetime_start: dt.datetime | None = None
    datetime_complete: dt.datetime | None = None
    #: The last value reported to the pruner (Optuna's intermediate values); None if none was.
    last_reported: float | None = None

    # -- derived --------------------------------------------------------------------------
    @property
    def value(self) -> float | None:
        return self.values[0] if self.values else None

    @property
    def violation(self) -> float:
        """Sum of positive constraint values (0 = within every limit)."""
        return float(sum(v for v in self.constraints.values() if v > 0))

    @property
    def imported(self) -> bool:
        """Read from another tool's results, not measured by the tuner on this machine."""
        return self.source is not None

    @property
    def feasible(self) -> bool:
        # An imported result can seed a search, never win one unmeasured.
        return self.state == "COMPLETE" and self.violation <= 0 and not self.error and self.source is None

    @property
    def measured(self) -> bool:
        """Complete and measured here (not a failed load, not a copy of an earlier trial's
        measurement reused for a config proposed again, not imported: no new evidence)."""
        return self.state == "COMPLETE" and not self.error and self.reused_from is None and self.source is None

    @property
    def draft_acceptance(self) -> float | None:
        """Accepted share of the drafted tokens; None without drafting statistics."""
        if not self.draft_tokens or self.draft_accepted is None:
            return None
        return round(self.draft_accepted / self.draft_tokens, 4)

    @property
    def output_changed(self) -> bool:
        """Drafting changed the greedy output (the identity check failed)."""
        return bool(self.identity) and self.identity.get("identical") is False

    @property
    def skipped(self) -> bool:
        """Not loaded: the memory model predicted it would not fit (no server was asked)."""
        return bool(self.memory and self.memory.get("skipped"))

    @property
    def failed_load(self) -> bool:
        """Loaded and refused by the server (not a config skipped on the prediction)."""
        return self.state == "COMPLETE" and self.error is not None and not self.skipped and not self.samples

    @property
    def duration_s(self) -> float | None:
        if self.datetime_start is None or self.datetime_complete is None:
            return None
        return (self.datetime_complete - self.datetime_start).total_seconds()

    @property
    def sent_options(self) -> dict[str, Any] | None:
        """The runner options as the trial sends them: None for a baseline that sends none."""
        return (self.options or None) if self.baseline else self.options

    @property
    def effective_server(self) -> dict[str, Any]:
        """Server settings that really ran."""
        return {**self.server, **(self.server_effective or {})}

    @property
    def model_label(self) -> str:
        """The model as shown: a GGUF path by its file name."""
        return self.model.rsplit("/", 1)[-1] if self.model.endswith(".gguf") else self.model

    @property
    def vram_peak_mib(self) -> float | None:
        """GPU memory in use: NVML's peak when this machine sees the GPU, else what the server
        reports the loaded model holds in VRAM (``size_vram``)."""
        nvml = _float(self.telemetry.get("gpu_mem_used_peak_mib"))
        return nvml if nvml is not None else self.server_vram_mib

    @property
    def power_mean_w(self) -> float | None:
        """Mean GPU power over the measured requests (NVML), summed over GPUs."""
        return _float(self.telemetry.get("gpu_power_mean_w"))

    def stat(self, metric: str, which: str = "mean") -> float | None:
        """One statistic of one metric, e.g. ``stat("ttft_ms", "p95")``; None if not measured."""
        s = self.stats.get(metric)
        return None if s is None else float(getattr(s, which))

    def telemetry_value(self, name: str) -> float | None:
        """A numeric telemetry or server-memory value by its stored name (see TELEMETRY_ROWS)."""
        v = self.flat().get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def request_samples(self) -> list[RequestSample]:
        return [RequestSample.from_dict(s) for s in self.samples]

    def per_request_values(self, field: str) -> list[float]:
        """One RequestSample field (e.g. ``decode_tps``) of every measured request, in order."""
        return [float(getattr(s, field)) for s in self.request_samples()]

    def config_text(self) -> str:
        if self.baseline:
            extra = "".join(f" {k}={v}" for k, v in self.options.items())
            return f"{self.model_label} (defaults: no options sent{extra and ' but' + extra})"
        parts = [f"{k}={v}" for k, v in {**self.options, **self.effective_server}.items()]
        return f"{self.model_label} " + " ".join(parts)

    def flat(self) -> dict[str, Any]:
        """Every measured value under its stored name, flat (for tables, CSV and Parquet)."""
        out: dict[str, Any] = {}
        for metric, s in self.stats.items():
            for stat in STATS:
                out[f"{metric}_{stat}"] = getattr(s, stat)
        for k, v in ((_N_REQUESTS, self.n_requests or None), (_CONCURRENCY, self.concurrency),
                     (RELOAD_MS, self.reload_ms), (_UNEXPECTED, self.unexpected_reloads if self.samples else None),
                     (_DONE, self.done_reasons or None), (TOKENS_PER_JOULE, self.tokens_per_joule),
                     (SERVER_VRAM_MIB, self.server_vram_mib), (SERVER_SIZE_MIB, self.server_size_mib),
                     (_PRUNED_SAVED, self.pruned_saved_s), (INTERFERENCE_PCT, self.interference_pct),
                     (GPU_INTERFERENCE_PCT, self.gpu_interference_pct), (CONTENDED, self.contended),
                     (_REMEASURED, self.remeasured or None), (_CONTENTION_LOST, self.contention_lost_s),
                     (DRAFT_TOKENS, self.draft_tokens), (DRAFT_ACCEPTED, self.draft_accepted),
                     (DRAFT_ACCEPTANCE, self.draft_acceptance)):
            if v is not None:
                out[k] = v
        out.update(self.telemetry)
        return out


# ---------------------------------------------------------------------------- building


def build_record(
    model: str,
    options: dict[str, Any] | None,
    server: dict[str, Any],
    samples: Sequence[RequestSample] = (),
    *,
    warmup: RequestSample | None = None,
    reload_ms: float | None = None,
    aggregate_tps: Sequence[float] = (),
    concurrency: int | None = None,
    unexpected_reloads: int = 0,
    telemetry: TelemetrySummary | None = None,
    server_memory: ServerMemory | None = None,
    server_effective: dict[str, Any] | None = None,
    baseline: bool = False,
    worker: dict[str, Any] | None = None,
) -> TrialRecord:
    """The record of one measurement: statistics, tokens/J and telemetry computed here, once."""
    stats: dict[str, Stats] = {}
    for name in SUMMARISED:
        s = Stats.of(getattr(x, name) for x in samples)
        if s is not None:
            stats[name] = s
    agg = Stats.of(aggregate_tps)
    if agg is not None:
        stats[AGGREGATE] = agg
    tel = telemetry_attrs(telemetry) if telemetry is not None else {}
    cpu_i = _round(telemetry.interference_pct if telemetry is not None else None)
    gpu_i = _round(telemetry.gpu_interference_pct if telemetry is not None else None)
    measured = [x for x in (cpu_i, gpu_i) if x is not None]
    energy = tel.get("gpu_energy_j")
    tokens = sum(x.eval_tokens for x in samples)
    tpj = round(tokens / energy, 6) if isinstance(energy, (int, float)) and math.isfinite(energy) and energy > 0 else None
    return TrialRecord(
        model=model, options=dict(options or {}), server=dict(server), server_effective=server_effective,
        baseline=baseline, worker=worker,
        samples=[x.to_dict() for x in samples], warmup=warmup.to_dict() if warmup is not None else None,
        reload_ms=reload_ms, stats=stats, n_requests=len(samples),
        concurrency=concurrency if aggregate_tps else None, unexpected_reloads=unexpected_reloads,
        done_reasons=sorted({x.done_reason for x in samples}), telemetry=tel, tokens_per_joule=tpj,
        server_vram_mib=server_memory.vram_mib if server_memory else None,
        server_size_mib=server_memory.size_mib if server_memory else None,
        interference_pct=cpu_i, gpu_interference_pct=gpu_i,
        contended=any(x >= CONTENDED_PCT for x in measured) if measured else None,
        draft_tokens=_sum_known(x.draft_tokens for x in samples),
        draft_accepted=_sum_known(x.draft_accepted for x in samples),
    )


def _sum_known(values: Iterable[int | None]) -> int | None:
    """The sum of the values that are known; None when none is."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def telemetry_attrs(summary: TelemetrySummary) -> dict[str, Any]:
    """Stored telemetry of one trial window; keys with None values are omitted."""
    attrs: dict[str, Any] = {}
    for g in summary.gpus:
        p = f"gpu{g.index}_"
        attrs[p + "power_mean_w"] = g.power_mean_w
        attrs[p + "power_max_w"] = g.power_max_w
        attrs[p + "energy_j"] = g.energy_j
        attrs[p + "energy_source"] = g.energy_source
        attrs[p + "mem_used_peak_mib"] = g.mem_used_peak_mib
        attrs[p + "mem_increase_mib"] = g.mem_increase_mib
        attrs[p + "util_mean_pct"] = g.util_gpu_mean_pct
        attrs[p + "mem_util_mean_pct"] = g.util_mem_mean_pct
        attrs[p + "temp_max_c"] = g.temp_max_c
        attrs[p + "sm_clock_mean_mhz"] = g.sm_clock_mean_mhz
        attrs[p + "fan_mean_pct"] = g.fan_mean_pct
        attrs[p + "throttle_reasons"] = list(g.throttle_reasons) if g.throttle_reasons is not None else None
        attrs[p + "samples"] = g.samples
    for name in ("energy_j", "power_mean_w", "power_max_w", "mem_used_peak_mib", "mem_increase_mib"):
        attrs["gpu_" + name] = summary.total(name)
    attrs["host_cpu_util_mean_pct"] = summary.host.cpu_util_mean_pct
    attrs["host_mem_used_peak_mib"] = summary.host.mem_used_peak_mib
    attrs["server_rss_peak_mib"] = summary.host.server_rss_peak_mib
    attrs["host_samples"] = summary.host.samples
    attrs["host_load_avg_1m"] = summary.host.load_avg_1m
    attrs["host_cpu_freq_min_ratio"] = summary.host.cpu_freq_min_ratio
    attrs["host_busiest"] = summary.host.busiest
    attrs["host_busiest_pct"] = summary.host.busiest_pct
    for g in summary.gpus:
        attrs[f"gpu{g.index}_other_processes"] = g.other_processes
        attrs[f"gpu{g.index}_other_util_pct"] = g.other_util_pct
    return {k: v for k, v in attrs.items() if v is not None}


# ---------------------------------------------------------------------------- storing


def stored_attrs(r: TrialRecord) -> dict[str, Any]:
    """The user attributes that store ``r``: the layout of a trial in the storage."""
    attrs: dict[str, Any] = {CONFIG: {"model": r.model, "options": r.options, "server": r.server}}
    if r.worker is not None:
        attrs[WORKER] = r.worker
    if r.server_effective is not None and r.server:
        attrs[SERVER_EFFECTIVE] = r.server_effective
    if r.error is not None:
        attrs[ERROR] = r.error
    if r.stage is not None:
        attrs[STAGE] = r.stage
    if r.seeded_from is not None:
        attrs[SEEDED_FROM] = r.seeded_from
    if r.reused_from is not None:
        attrs[REUSED_FROM] = r.reused_from
    if r.memory is not None:
        attrs[MEMORY] = r.memory
    if r.identity is not None:
        attrs[OUTPUT_IDENTITY] = r.identity
    if r.source is not None:
        attrs[SOURCE], attrs[IMPORTED] = r.source, True
    if not r.samples and r.source is None:
        if r.violations:
            attrs[VIOLATIONS] = r.violations
        return attrs
    attrs[SAMPLES] = r.samples
    if r.warmup is not None:
        attrs[WARMUP] = r.warmup
    attrs[VIOLATIONS] = r.violations
    detail: dict[str, Any] = {}
    for metric, s in r.stats.items():
        flat = _FLAT_STATS.get(metric, ())
        for stat in STATS:
            (attrs if stat in flat else detail)[f"{metric}_{stat}"] = getattr(s, stat)
    attrs[RELOAD_MS] = r.reload_ms
    for k, v in ((TOKENS_PER_JOULE, r.tokens_per_joule), (SERVER_VRAM_MIB, r.server_vram_mib)):
        if v is not None:
            attrs[k] = v
    # Every measured trial says whether it was measured alone: null where it cannot be told.
    attrs[INTERFERENCE_PCT], attrs[CONTENDED] = r.interference_pct, r.contended
    if r.gpu_interference_pct is not None:
        attrs[GPU_INTERFERENCE_PCT] = r.gpu_interference_pct
    detail.update({_N_REQUESTS: r.n_requests, _UNEXPECTED: r.unexpected_reloads, _DONE: r.done_reasons})
    if r.ran:
        detail[_RAN] = r.ran
    for k, v in ((_CONCURRENCY, r.concurrency), (SERVER_SIZE_MIB, r.server_size_mib),
                 (_PRUNED_SAVED, r.pruned_saved_s), (_REMEASURED, r.remeasured or None),
                 (_CONTENTION_LOST, r.contention_lost_s), (DRAFT_TOKENS, r.draft_tokens),
                 (DRAFT_ACCEPTED, r.draft_accepted)):
        if v is not None:
            detail[k] = v
    if r.draft_acceptance is not None:
        attrs[DRAFT_ACCEPTANCE] = r.draft_acceptance
    attrs[DETAIL] = detail
    tel = {k: v for k, v in r.telemetry.items() if k not in _FLAT_TELEMETRY}
    attrs.update({k: v for k, v in r.telemetry.items() if k in _FLAT_TELEMETRY})
    if tel:
        attrs[TELEMETRY] = tel
    return attrs


def write_record(trial: Any, r: TrialRecord) -> None:
    """Store ``r`` on a running Optuna trial; attributes already stored with the same value
    are not written again (the config and worker are written when the trial starts)."""
    have = trial.user_attrs
    changed = {k: v for k, v in stored_attrs(r).items() if k not in have or have[k] != v}
    system = _constraint_attrs(r.constraints) if r.constraints else {}
    if not _write_in_one_transaction(trial, changed, system):
        for k, v in changed.items():
            trial.set_user_attr(k, v)
        for k, v in system.items():
            trial.storage.set_trial_system_attr(trial._trial_id, k, v)
    elif getattr(trial, "_cached_frozen_trial", None) is not None:
        trial._cached_frozen_trial.user_attrs.update(changed)


def _write_in_one_transaction(trial: Any, user: Mapping[str, Any], system: Mapping[str, Any]) -> bool:
    """Write a trial's attributes in one commit on an RDB storage; False where it cannot.

    Optuna commits every ``set_user_attr`` alone: a trial's ~25 attributes cost ~25 commits
    (about 0.8 ms each on SQLite with WAL). This makes the same upserts Optuna makes, through
    its own per-attribute method, inside one session. Any other storage (journal, in-memory),
    or an Optuna whose internals differ, takes the public per-attribute path.
    """
    if not user and not system:
        return True
    storage = getattr(trial, "storage", None)
    backend = getattr(storage, "_backend", storage)
    try:
        from optuna.storages import RDBStorage
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
    except ImportError:  # pragma: no cover - an Optuna without these internals
        return False
    if not isinstance(backend, RDBStorage) or not hasattr(backend, "_set_trial_attr_without_commit"):
        return False
    from sqlalchemy.exc import IntegrityError

    try:
        with _create_scoped_session(backend.scoped_session) as session:
            row = models.TrialModel.find_or_raise_by_id(trial._trial_id, session)
            backend.check_trial_is_updatable(trial._trial_id, row.state)
            for model, attrs in ((models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system)):
                if attrs:
                    _upsert(backend, session, model, trial._trial_id, attrs)
    except (AttributeError, TypeError, IntegrityError):
        # Internals that differ in another Optuna, or a key written meanwhile by another
        # process: nothing was committed; Optuna's own per-attribute path writes it.
        backend.scoped_session().rollback()
        return False
    return True


def _upsert(backend: Any, session: Any, model: Any, trial_id: int, attrs: Mapping[str, Any]) -> None:
    """One multi-row upsert of ``attrs`` (the statement Optuna makes per attribute)."""
    import json
    import sqlite3

    rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    name = backend.engine.name
    if name == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:
        for k, v in attrs.items():
            backend._set_trial_attr_without_commit(session, model, trial_id, k, v)
        return
    stmt = insert(model).values(rows)
    session.execute(stmt.on_conflict_do_update(index_elements=[model.trial_id, model.key],
                                               set_={"value_json": stmt.excluded.value_json}))


def read_record(t: FrozenTrial, lost: Mapping[int, str] | None = None) -> TrialRecord:
    """The record of a stored trial, whatever layout it was written in.

    ``lost`` (trial number -> reason) explains trials failed by the heartbeat check, which
    could not be written on the trial itself.
    """
    ua = t.user_attrs
    flat: dict[str, Any] = {**ua, **(ua.get(DETAIL) or {}), **(ua.get(TELEMETRY) or {})}
    cfg = ua.get(CONFIG) or {}
    stats: dict[str, Stats] = {}
    for metric in (*SUMMARISED, AGGREGATE):
        if f"{metric}_mean" in flat:
            stats[metric] = Stats(**{s: float(flat.get(f"{metric}_{s}", math.nan)) for s in STATS})
    prefixes = tuple(f"{m}_" for m in (*SUMMARISED, AGGREGATE))
    known = {CONFIG, WORKER, SAMPLES, WARMUP, BASELINE, ERROR, VIOLATIONS, SERVER_EFFECTIVE, RELOAD_MS,
             TOKENS_PER_JOULE, SERVER_VRAM_MIB, SERVER_SIZE_MIB, DETAIL, TELEMETRY, _N_REQUESTS, _CONCURRENCY,
             _UNEXPECTED, _DONE, _PRUNED_SAVED, INTERFERENCE_PCT, GPU_INTERFERENCE_PCT, CONTENDED, _REMEASURED,
             _CONTENTION_LOST, STAGE, SEEDED_FROM, REUSED_FROM, MEMORY, _RAN, SOURCE, IMPORTED,
             DRAFT_TOKENS, DRAFT_ACCEPTED, DRAFT_ACCEPTANCE, OUTPUT_IDENTITY}
    telemetry = {k: v for k, v in flat.items()
                 if k not in known and not (k.startswith(prefixes) and k.rsplit("_", 1)[-1] in STATS)
                 and (k.startswith(("gpu", "host_", "server_rss")))}
    error = ua.get(ERROR)
    if error is None and t.state.name == "FAIL" and lost:
        error = lost.get(t.number)
    return TrialRecord(
        model=str(cfg.get("model", "")),
        options=dict(cfg.get("options") or {}),
        server=dict(cfg.get("server") or {}),
        server_effective=dict(ua[SERVER_EFFECTIVE]) if ua.get(SERVER_EFFECTIVE) else None,
        baseline=bool(ua.get(BASELINE, False)),
        worker=ua.get(WORKER),
        samples=list(ua.get(SAMPLES) or []),
        warmup=ua.get(WARMUP),
        reload_ms=_float(flat.get(RELOAD_MS)),
        stats=stats,
        n_requests=int(flat.get(_N_REQUESTS) or 0),
        concurrency=int(flat[_CONCURRENCY]) if flat.get(_CONCURRENCY) else None,
        unexpected_reloads=int(flat.get(_UNEXPECTED) or 0),
        done_reasons=list(flat.get(_DONE) or []),
        telemetry=telemetry,
        tokens_per_joule=_float(flat.get(TOKENS_PER_JOULE)),
        server_vram_mib=_float(flat.get(SERVER_VRAM_MIB)),
        server_size_mib=_float(flat.get(SERVER_SIZE_MIB)),
        violations=list(ua.get(VIOLATIONS) or []),
        error=str(error) if error else None,
        pruned_saved_s=_float(flat.get(_PRUNED_SAVED)),
        interference_pct=_float(flat.get(INTERFERENCE_PCT)),
        gpu_interference_pct=_float(flat.get(GPU_INTERFERENCE_PCT)),
        contended=bool(flat[CONTENDED]) if flat.get(CONTENDED) is not None else None,
        remeasured=int(flat.get(_REMEASURED) or 0),
        contention_lost_s=_float(flat.get(_CONTENTION_LOST)),
        stage=str(ua[STAGE]) if ua.get(STAGE) else None,
        seeded_from=str(ua[SEEDED_FROM]) if ua.get(SEEDED_FROM) else None,
        reused_from=int(ua[REUSED_FROM]) if isinstance(ua.get(REUSED_FROM), int) else None,
        memory=dict(ua[MEMORY]) if isinstance(ua.get(MEMORY), dict) else None,
        ran=dict(flat[_RAN]) if isinstance(flat.get(_RAN), dict) else {},
        source=dict(ua[SOURCE]) if isinstance(ua.get(SOURCE), dict) else None,
        draft_tokens=int(flat[DRAFT_TOKENS]) if isinstance(flat.get(DRAFT_TOKENS), int) else None,
        draft_accepted=int(flat[DRAFT_ACCEPTED]) if isinstance(flat.get(DRAFT_ACCEPTED), int) else None,
        identity=dict(ua[OUTPUT_IDENTITY]) if isinstance(ua.get(OUTPUT_IDENTITY), dict) else None,
        number=t.number,
        state=t.state.name,
        values=list(t.values) if t.values is not None else None,
        params=dict(t.params),
        constraints=constraints(t),
        datetime_start=t.datetime_start,
        datetime_complete=t.datetime_complete,
        last_reported=_float(t.intermediate_values[max(t.intermediate_values)]) if t.intermediate_values else None,
    )


#: Optuna's list-form constraints attr: the one form that optuna-dashboard reads (as
#: ``constraints``) and that Optuna's samplers read too (as keys "0", "1", ...).
CONSTRAINTS_KEY = "constraints"
#: The names of that list's values, in order (the dashboard and the samplers ignore it).
CONSTRAINT_NAMES_KEY = "tuner:constraint_names"
_NAMED_PREFIX = CONSTRAINTS_KEY + ":"


def store_constraints(trial: Any, values: dict[str, float]) -> None:
    """Write a running trial's constraints once, as a list plus its names.

    Not ``Trial.set_constraint``: optuna-dashboard 0.21 shows only the list form, and a trial
    holding both forms has each constraint counted twice by TPE and NSGA-II (Optuna 5 merges
    them in ``_get_constraints_from_system_attrs``).
    """
    # Trial has no public setter for system attributes; this is the call Optuna itself makes.
    for k, v in _constraint_attrs(values).items():
        trial.storage.set_trial_system_attr(trial._trial_id, k, v)


def _constraint_attrs(values: Mapping[str, float]) -> dict[str, Any]:
    return {CONSTRAINT_NAMES_KEY: list(values), CONSTRAINTS_KEY: [float(v) for v in values.values()]}


def constraints(t: Any) -> dict[str, float]:
    """A trial's constraints by name, each once, whichever form stored them.

    Studies from before ``store_constraints`` hold ``Trial.set_constraint``'s
    ``constraints:NAME`` keys; a list beside such keys without names is a copy of them.
    """
    attrs = getattr(t, "system_attrs", None)
    if attrs is None:
        return dict(t.constraints or {})
    named = {k[len(_NAMED_PREFIX):]: float(v) for k, v in attrs.items() if k.startswith(_NAMED_PREFIX)}
    listed = attrs.get(CONSTRAINTS_KEY) or []
    names = attrs.get(CONSTRAINT_NAMES_KEY)
    if names and len(names) == len(listed):
        return {**dict(zip(names, map(float, listed))), **named}
    if named:
        return named
    return {str(i): float(v) for i, v in enumerate(listed)}


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def is_baseline(t: FrozenTrial) -> bool:
    """Whether a stored trial is the baseline (the engine's defaults), without reading it all."""
    return bool(t.user_attrs.get(BASELINE))


def has_error(t: FrozenTrial) -> bool:
    """Whether a stored trial carries an error (a failed load, a failed measurement)."""
    return bool(t.user_attrs.get(ERROR))


def baseline_of(records: Iterable[TrialRecord]) -> TrialRecord | None:
    """The measured baseline trial (the engine's defaults) among ``records``, if any."""
    return next((r for r in records if r.baseline and r.measured), None)


# ---------------------------------------------------------------------------- the study

# The stored names of a study's attributes. Identity (a resumed study must match it):
MODEL, ENGINE, OBJECTIVES, SPACE_HASH, WORKLOAD_HASH = "model", "engine", "objectives", "space_hash", "workload_hash"
# Where and on what it was measured, and what it measures:
HOST, MANAGED_SERVER, SERVER_LOCAL, SERVER_VERSION = "host", "managed_server", "server_local", "server_version"
SPACE, WORKLOAD, ENVIRONMENT, HARDWARE = "space", "workload", "environment", "hardware"
GPU_OFFLOAD_SOURCE, MEMORY_MODEL, CREATED_AT, CONTEXT, LIMITS = (
    "gpu_offload_source", "memory_model", "created_at", "context", "limits")
#: Kept after trials: the re-validation, the roofline, the warm start's sources, the checks.
VALIDATION, ROOFLINE, WARM_START, CHECKS = "validation", "roofline", "warm_start", "checks"
#: Kept after the re-validation: what each of the winner's settings is worth (tuner/gains.py).
ABLATION = "ablation"
#: The warnings the latest run printed before measuring (no GPU telemetry, ...), for every view.
RUN_WARNINGS = "run_warnings"

#: The objective of a study that stored none, and the engine of one that stored none.
DEFAULT_OBJECTIVE = DECODE_TPS
DEFAULT_ENGINE = "ollama"
#: The engine of a study of imported results only (``tune import``).
IMPORTED_ENGINE = "imported"


@dataclass(frozen=True)
class WarmStartSource:
    """A study that seeded this one (see tuner/warmstart.py), and how near its hardware is."""

    study: str
    match: str


@dataclass
class StudyInfo:
    """What a study is, as stored with it: written once by :func:`write_study_info` when the
    study is created (the limits on every run), read by :func:`read_study_info`.

    A value the study did not store reads as empty ("", {}, None), except the objectives.
    """

    name: str = ""
    model: str = ""
    #: The engine as stored; "" when none was (see :attr:`engine_or_default`).
    engine: str = ""
    #: The objectives' names, the one single-objective views rank by first (their metric keys,
    #: directions and units: tuner/objectives.py); [DEFAULT_OBJECTIVE] when none was stored.
    objectives: list[str] = field(default_factory=lambda: [DEFAULT_OBJECTIVE])
    #: Optuna's direction of each objective ("maximize", "minimize"); [] when read from the
    #: attributes alone.
    directions: list[str] = field(default_factory=list)
    #: The limits as given (max_ttft_ms, max_latency_ms, max_vram_mib, max_power_w).
    limits: dict[str, Any] = field(default_factory=dict)
    #: The workload measured (tuner.workload.Workload.to_dict()); None when not stored.
    workload: dict[str, Any] | None = None
    #: The context the application needs (--context); None when not given.
    context: int | None = None
    host: str = ""
    managed_server: bool = False
    #: Whether the server ran on the measuring machine, as the tuner saw it; None when not stored.
    server_local: bool | None = None
    server_version: str = ""
    #: Machine and software facts (tuner/machine.py ``environment``), and the hardware
    #: fingerprint (``hardware_fingerprint``; None when not stored).
    environment: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] | None = None
    space: dict[str, Any] = field(default_factory=dict)
    space_hash: str | None = None
    workload_hash: str | None = None
    gpu_offload_source: str | None = None
    #: The memory model's inputs (tuner/memory.py StudyMemory.to_dict() and headroom_mib).
    memory_model: dict[str, Any] | None = None
    created_at: str = ""
    #: Stored after trials ran: the re-validation (results.Validation.to_dict()), the roofline,
    #: the warm start (tuner/warmstart.py WarmStart.to_dict()), the checks (tuner/checks.py).
    validation: dict[str, Any] | None = None
    roofline: dict[str, Any] | None = None
    #: The one-factor ablation of the winner (tuner/gains.py Ablation.to_dict()).
    ablation: dict[str, Any] | None = None
    #: What the latest run warned about before measuring (tuner/caveats.py codes them).
    run_warnings: list[str] = field(default_factory=list)
    warm_start: dict[str, Any] | None = None
    checks: list[Any] = field(default_factory=list)
    #: The measured baseline trial's number; None without one, or when read without trials.
    baseline: int | None = None

    @property
    def objective(self) -> str:
        """The first objective."""
        return self.objectives[0]

    @property
    def engine_or_default(self) -> str:
        return self.engine or DEFAULT_ENGINE

    @property
    def warm_start_sources(self) -> list[WarmStartSource]:
        """The studies the warm start took its configs from ([] without a warm start)."""
        return warm_start_sources(self.warm_start or {})


def fixed_settings(space: Mapping[str, Any] | None) -> frozenset[str]:
    """The settings a stored space fixes (one value: every config sends it, it is no choice)."""
    return frozenset(k for k, v in (space or {}).items() if isinstance(v, list) and len(v) == 1)


def user_fixed(info: StudyInfo) -> frozenset[str]:
    """The settings the study fixed because it was asked to (``--param k=v``, a space file,
    ``--context``): :func:`fixed_settings` without the tuner's own pin of num_gpu to 0 on a
    server that offloads nothing, which a portable export must not carry."""
    fixed = fixed_settings(info.space)
    if info.space.get("num_gpu") == [0] and info.gpu_offload_source != "--param num_gpu":
        fixed -= {"num_gpu"}
    return fixed


def warm_start_sources(stored: Mapping[str, Any]) -> list[WarmStartSource]:
    """The sources of a stored warm start (the study attribute ``warm_start``)."""
    return [WarmStartSource(str(x.get("study")), str(x.get("match")))
            for x in stored.get("sources") or [] if isinstance(x, dict)]


def write_study_info(study: Any, info: StudyInfo, *, new: bool = True) -> None:
    """Store ``info`` with an Optuna study: all of it when the study is ``new``, ``space_hash``
    last (a worker that sees it sees the whole identity); only the limits on a resume."""
    if new:
        attrs: list[tuple[str, Any]] = [
            (MODEL, info.model), (ENGINE, info.engine), (OBJECTIVES, info.objectives),
            (WORKLOAD_HASH, info.workload_hash), (HOST, info.host), (MANAGED_SERVER, info.managed_server),
            (SERVER_LOCAL, info.server_local), (SERVER_VERSION, info.server_version), (SPACE, info.space),
            (WORKLOAD, info.workload), (ENVIRONMENT, info.environment), (HARDWARE, info.hardware)]
        attrs += [(k, v) for k, v in ((GPU_OFFLOAD_SOURCE, info.gpu_offload_source),
                                      (MEMORY_MODEL, info.memory_model)) if v is not None]
        attrs.append((CREATED_AT, info.created_at))
        if info.context is not None:
            attrs.append((CONTEXT, info.context))
        attrs.append((SPACE_HASH, info.space_hash))
        for k, v in attrs:
            study.set_user_attr(k, v)
    study.set_user_attr(LIMITS, info.limits)


def read_study_info(source: Any) -> StudyInfo:
    """The record of a stored study, from an Optuna study (or FrozenStudy), a study read once
    (``results.StoredStudy``: with its baseline) or its user attributes alone."""
    if isinstance(source, StudyInfo):
        return source
    name, directions, baseline = "", [], None
    if isinstance(source, Mapping):
        attrs: Mapping[str, Any] = source
    elif hasattr(source, "records"):
        attrs, name, directions = source.attrs, source.name, list(source.directions)
        base = baseline_of(source.records)
        baseline = base.number if base is not None else None
    else:
        attrs, name = source.user_attrs, source.study_name
        directions = [d.name.lower() for d in source.directions]

    def mapping(key: str) -> dict[str, Any] | None:
        v = attrs.get(key)
        return dict(v) if isinstance(v, dict) else None

    local, context, checks = attrs.get(SERVER_LOCAL), attrs.get(CONTEXT), attrs.get(CHECKS)
    return StudyInfo(
        name=name,
        model=str(attrs.get(MODEL) or ""),
        engine=str(attrs.get(ENGINE) or ""),
        objectives=[str(x) for x in attrs.get(OBJECTIVES) or ()] or [DEFAULT_OBJECTIVE],
        directions=directions,
        limits=mapping(LIMITS) or {},
        workload=mapping(WORKLOAD),
        context=context if isinstance(context, int) and not isinstance(context, bool) else None,
        host=str(attrs.get(HOST) or ""),
        managed_server=bool(attrs.get(MANAGED_SERVER)),
        server_local=local if isinstance(local, bool) else None,
        server_version=str(attrs.get(SERVER_VERSION) or ""),
        environment=mapping(ENVIRONMENT) or {},
        hardware=mapping(HARDWARE),
        space=mapping(SPACE) or {},
        space_hash=_str(attrs.get(SPACE_HASH)),
        workload_hash=_str(attrs.get(WORKLOAD_HASH)),
        gpu_offload_source=_str(attrs.get(GPU_OFFLOAD_SOURCE)),
        memory_model=mapping(MEMORY_MODEL),
        created_at=str(attrs.get(CREATED_AT) or ""),
        validation=mapping(VALIDATION),
        roofline=mapping(ROOFLINE),
        ablation=mapping(ABLATION),
        run_warnings=[str(w) for w in attrs.get(RUN_WARNINGS) or [] if isinstance(w, str)],
        warm_start=mapping(WARM_START),
        checks=list(checks) if isinstance(checks, list) else [],
        baseline=baseline,
    )


def _str(v: Any) -> str | None:
    return str(v) if v is not None else None
