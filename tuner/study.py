"""Optuna wiring: build the space and workload, create or resume the study, run trials."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuner import machine
from tuner.engines import Engine, GpuOffload, get_engine
from tuner.errors import SpaceError, StoppedError, StorageError, StudyError, TrialFailedError, TunerError
from tuner.machine import hardware_fingerprint
from tuner.memory import Architecture, StudyMemory
from tuner.options import SAMPLERS, TuneOptions
from tuner import objectives, record
from tuner.progress import _Progress
from tuner.pruning import make_pruner
from tuner.record import TrialRecord
from tuner.runner import _machine_check, _Runner
from tuner.settings import DRAFT_PARAMS
from tuner.space import SERVER_PARAMS, SearchSpace, SpaceLimits, build_space, load_space_file
from tuner.roofline import roofline
from tuner.start import _BASELINE_DONE, _dead_here, _enqueue_start, _physical_cores
from tuner.storage import mask, open_storage, shown_url, write_failure
from tuner.terminal import printable
from tuner.ablate import ALONE_MAX, ablate
from tuner.validate import validate_top
from tuner.workload import Workload, workload_prompts
from tuner import results

Echo = Callable[[str], None]
#: Called after each measured request of a trial: (trial number, step, sample); ``tune -v``.
OnSample = Callable[[int, int, Any], None]
#: Called when a trial starts (again, when it is re-measured): (trial number, requests planned).
OnTrialStart = Callable[[int, int], None]


@dataclass
class _Prepared:
    engine: Engine
    workload: Workload
    space: SearchSpace
    model: str
    server: dict[str, Any]
    environment: dict[str, Any]
    has_gpu: bool
    warnings: list[str]
    gpu_telemetry: bool = False
    offload: GpuOffload | None = None
    #: Each variant's file size in bytes (0 where the engine cannot tell).
    sizes: dict[str, int] = field(default_factory=dict)
    #: What the memory model knows of the variants and the GPU (None: no GPU offload).
    memory: StudyMemory | None = None


def validate_options(o: TuneOptions) -> None:
    """Reject impossible numbers before anything is contacted."""
    if not o.model:
        raise TunerError("no model given: pass --model, e.g. --model gemma3:1b")
    if any(not m.strip() for m in o.model):
        raise TunerError("--model is empty: pass a model tag or GGUF path, e.g. --model gemma3:1b")
    if o.trials <= 0:
        raise TunerError(f"--trials must be at least 1 (got {o.trials})")
    if o.max_time_s is not None and not (math.isfinite(o.max_time_s) and o.max_time_s > 0):
        raise TunerError(f"--max-time must be a positive duration (got {o.max_time_s:g} s): e.g. --max-time 30m")
    if not (math.isfinite(o.timeout_s) and o.timeout_s > 0):
        raise TunerError(f"--timeout must be a positive number of seconds (got {o.timeout_s:g}): e.g. --timeout 600")
    for name, v in (("--max-ttft-ms", o.max_ttft_ms), ("--max-latency-ms", o.max_latency_ms),
                    ("--max-vram-mib", o.max_vram_mib), ("--max-power-w", o.max_power_w)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise TunerError(f"{name} must be a positive number (got {v:g}): give a limit, or leave it out for none")
    if o.remeasure_contended < 0:
        raise TunerError(f"--remeasure-contended must be 0 or more (got {o.remeasure_contended})")
    if not (math.isfinite(o.quiet_wait_s) and o.quiet_wait_s >= 0):
        raise TunerError(f"--quiet-wait must be 0 or more seconds (got {o.quiet_wait_s:g})")
    if o.seed is not None and not 0 <= o.seed < 2**32:
        raise TunerError(f"--seed must be between 0 and {2**32 - 1} (got {o.seed})")
    if o.max_ttft_ms is not None and o.max_latency_ms is not None and o.max_latency_ms < o.max_ttft_ms:
        raise TunerError(
            f"--max-latency-ms {o.max_latency_ms:g} is below --max-ttft-ms {o.max_ttft_ms:g}: "
            "a request's latency includes its time to first token; raise --max-latency-ms"
        )
    if o.context is not None and o.context <= 0:
        raise TunerError(f"--context must be a positive number of tokens (got {o.context})")
    for obj in o.objectives:
        if obj not in objectives.OBJECTIVES:
            raise TunerError(f"unknown objective '{obj}': choose from {', '.join(objectives.OBJECTIVES)}")
    if len(o.objectives) == 1 and objectives.get(o.objectives[0]).direction == "minimize":
        raise TunerError(
            f"'{o.objectives[0]}' alone is not a useful objective (the tiniest output wins): "
            f"use it with a throughput objective, e.g. --objectives {record.DECODE_TPS},ttft_p95"
        )
    if len(set(o.objectives)) != len(o.objectives):
        raise TunerError("--objectives lists the same objective twice")
    if o.concurrency < 1:
        raise TunerError(f"--concurrency must be at least 1 (got {o.concurrency})")
    for obj in o.objectives:
        if objectives.get(obj).needs_concurrency and o.concurrency < 2:
            raise TunerError(f"objective '{obj}' needs --concurrency 2 or more")
    # Re-validation compares configs across rounds: one config or one round has no interval.
    if o.validate < 0 or o.validate == 1:
        raise TunerError(f"--validate must be 0 (off) or at least 2 (got {o.validate}): it re-measures the "
                         "top K configs to compare them; use --validate 2 or more, or --validate 0")
    if o.validate_rounds < 2:
        raise TunerError(f"--validate-rounds must be at least 2 (got {o.validate_rounds}): one round gives no "
                         "confidence interval; use --validate-rounds 2 or more (--validate 0 turns it off)")
    if o.validate_max_rounds < o.validate_rounds:
        raise TunerError(f"--validate-max-rounds {o.validate_max_rounds} is below --validate-rounds "
                         f"{o.validate_rounds}: raise --validate-max-rounds to {o.validate_rounds} or more")
    if o.sampler not in SAMPLERS:
        raise TunerError(f"unknown sampler '{o.sampler}': choose from {', '.join(SAMPLERS)}")
    if (o.warm_start_from or o.warm_start_storage) and not o.warm_start:
        raise TunerError("--warm-start-from and --warm-start-storage contradict --no-warm-start: pass one of them")


def build_workload(o: TuneOptions) -> Workload:
    prompts = workload_prompts(o.prompts_file)
    return Workload(
        prompts=prompts,
        repeats=o.repeats,
        num_predict=o.num_predict,
        source=str(o.prompts_file or "builtin"),
        concurrency=o.concurrency,
    )


def prepare(o: TuneOptions, echo: Echo) -> _Prepared:
    """Connect, inspect the model, and build the workload and search space."""
    validate_options(o)
    workload = build_workload(o)
    overrides: dict[str, list[Any]] = {}
    if o.space_file:
        overrides.update(load_space_file(o.space_file))
    overrides.update(o.params)
    manage = o.manage_server
    if o.engine == "ollama" and not manage and any(k in SERVER_PARAMS for k in overrides):
        manage = True
        echo("server-level parameters in the space: starting a managed `ollama serve` (--manage-server)")
    from tuner.telemetry import probe_gpus

    probe = probe_gpus(o.gpus)
    engine = get_engine(o.engine, host=o.host, models=o.model, timeout_s=o.timeout_s,
                        manage_server=manage, ollama_bin=o.ollama_bin, models_dir=o.models_dir)
    try:
        # NVML sees this machine's NVIDIA GPUs only: they are the server's only if it runs here.
        gpu_telemetry = probe.available and engine.local
        no_telemetry = probe.reason if not probe.available else f"the server at {getattr(engine, 'host', o.host)} is not on this machine"
        _refuse_unmeasurable_limits(o, engine, gpu_telemetry, no_telemetry)
        server = engine.server_info()
        engine.snapshot_loaded()
        model = o.model[0]
        info = engine.model_info(model)
        variants = engine.variants(model)
        extra = [v for v in o.variants if v not in variants]
        if "variant" in overrides:
            extra += [v for v in overrides["variant"] if v not in variants and v not in extra]
        if extra:
            engine.ensure_models(extra, echo)
            variants += extra
        if "variant" in overrides:
            variants = list(overrides["variant"])
        sizes = {model: info.size_bytes}
        infos = {model: info}
        for v in variants[1:]:
            vi = engine.model_info(v)
            sizes[v] = vi.size_bytes
            infos[v] = vi
            if vi.architecture != info.architecture or vi.block_count != info.block_count:
                raise SpaceError(
                    f"variant '{v}' is a different model ({vi.architecture}, {vi.block_count} blocks) "
                    f"from '{model}' ({info.architecture}, {info.block_count} blocks): "
                    "variants must be quantizations of the same model"
                )
        overrides.pop("variant", None)
        need = workload.needed_context()
        if o.context is not None:
            if o.context > info.context_length:
                raise SpaceError(
                    f"--context {o.context} is above the model's trained context of "
                    f"{info.context_length}: use at most {info.context_length}"
                )
            need = max(need, o.context)
        if need > info.context_length:
            raise SpaceError(
                f"the longest prompt plus --num-predict needs about {need} tokens but the model's "
                f"context is {info.context_length}: use shorter prompts or a smaller --num-predict"
            )
        # Every variant must be able to draft: one that cannot would ignore the setting, and its
        # effect would be put down to drafting.
        drafts = {m: engine.drafting(m) for m in dict.fromkeys([model, *variants])}
        drafting = drafts[model]
        for m, d in drafts.items():
            if not d.available:
                drafting = dataclasses.replace(d, detail=d.detail if m == model else (
                    f"variant {m}: {d.detail} (--param variant=TAG,... limited to variants that draft searches it)"))
                break
        supported = engine.supported_params
        if not drafting.available:
            # A server or model that cannot draft never sees the drafting settings.
            asked = [k for k in DRAFT_PARAMS if k in overrides and k in supported]
            if asked:
                raise SpaceError(f"parameter '{asked[0]}' cannot be searched here: {drafting.detail}")
            supported = tuple(k for k in supported if k not in DRAFT_PARAMS)
        limits = SpaceLimits(
            context_length=info.context_length,
            block_count=info.block_count,
            physical_cores=_physical_cores(),
            has_gpu=True,
            min_ctx=need,
            variants=tuple(variants),
            supported=supported,
            draft_lengths=drafting.default_lengths,
        )
        build_space(limits, overrides)  # a bad space is rejected before anything is loaded
        if "num_gpu" in overrides:
            offload = GpuOffload(True, "--param num_gpu", "num_gpu is given by --param or --space")
        else:
            # Load the model as the baseline runs it and ask the server where it put it.
            offload = engine.gpu_offload(model, {"num_ctx": o.context} if o.context else None)
        has_gpu = offload.offloads
        warnings: list[str] = []
        space = build_space(dataclasses.replace(limits, has_gpu=has_gpu), overrides)
        env = environment(engine, server, info)
        env["gpu_offload"] = {"offloads": offload.offloads, "source": offload.source, "detail": offload.detail}
        env["drafting"] = {"available": drafting.available, "method": drafting.method, "detail": drafting.detail,
                           "engine_default": drafting.engine_default}
        # What the server says of each variant, so the report's table need not guess from tags.
        env["models"] = {name: {"parameter_size": i.parameter_size, "quantization": i.quantization,
                                "size_bytes": i.size_bytes} for name, i in infos.items()}
        if not gpu_telemetry:
            warnings.append(f"no NVIDIA GPU telemetry: {no_telemetry}")
        if server.get("cpu_extra_buffers"):
            warnings.append(str(server["cpu_extra_buffers"]))
        memory = None
        if has_gpu:
            totals = [g.get("memory_total_mib") for g in probe.gpus] if gpu_telemetry else []
            memory = StudyMemory(
                archs={n: Architecture.from_dict(i.arch) for n, i in infos.items() if i.arch},
                file_bytes=dict(sizes), default_ctx=o.context or 4096, swa_full=engine.swa_full_cache,
                total_mib=float(sum(totals)) if totals and all(totals) else None)
        return _Prepared(engine, workload, space, model, server, env, has_gpu, warnings, gpu_telemetry, offload,
                         sizes, memory)
    except BaseException:
        engine.close()
        raise


def _refuse_unmeasurable_limits(o: TuneOptions, engine: Engine, gpu_telemetry: bool, reason: str) -> None:
    """A limit or objective that cannot be measured here is refused, never silently ignored."""
    if gpu_telemetry:
        return
    for name in o.objectives:
        if objectives.get(name).needs_energy:
            raise TunerError(
                f"objective '{name}' needs GPU energy telemetry, and there is none "
                f"({reason}): choose another --objective"
            )
    if o.max_power_w is not None:
        raise TunerError(
            f"--max-power-w needs GPU power telemetry (NVML), and there is none ({reason}): "
            "drop --max-power-w, or run the tuner on the machine with the NVIDIA GPU"
        )
    if o.max_vram_mib is not None and not engine.reports_server_memory:
        raise TunerError(
            f"--max-vram-mib needs GPU memory telemetry, and there is none ({reason}) and the "
            f"{engine.name} engine does not report VRAM: drop --max-vram-mib"
        )


def environment(engine: Engine, server: dict[str, Any], info: Any) -> dict[str, Any]:
    """Machine and software facts recorded once per study (:func:`tuner.machine.environment`)."""
    from tuner.telemetry import this_machine

    return machine.environment(server, info, this_machine())


def default_study_name(o: TuneOptions, server: dict[str, Any]) -> str:
    if o.engine == "ollama" and server.get("managed"):
        # The managed server's port changes every run; the study must not.
        return f"{o.model[0]}@managed-ollama"
    if o.engine == "ollama":
        host = str(server.get("host", "")).split("://")[-1]
        for alias in ("localhost:", "0.0.0.0:", "[::1]:"):
            if host.startswith(alias):
                host = "127.0.0.1:" + host[len(alias):]
        return f"{o.model[0]}@{host}"
    return f"{Path(o.model[0]).name}@{o.engine}"


#: Builds the sampler of a study: (sampler name, space, seed, number of objectives) -> sampler.
SamplerFactory = Callable[[str, SearchSpace, "int | None", int], Any]


def tpe_options(space: SearchSpace, seed: int | None) -> dict[str, Any]:
    """The TPESampler keywords the tuner uses for ``space`` (benchmarks vary them)."""
    return {"seed": seed, "n_startup_trials": min(10, max(3, space.size() // 4)), "multivariate": True,
            "group": True, "constant_liar": True}


def make_sampler(name: str, space: SearchSpace, seed: int | None, n_objectives: int) -> Any:
    """The product's sampler: the staged search or TPE (NSGA-II for several objectives), or a
    random/grid baseline."""
    import optuna

    if name == "staged" and n_objectives == 1:
        from tuner.staged import StagedSampler, narrowed

        # TPE's start-up count follows the space it tunes, not the variants and offload the stages fix.
        return StagedSampler(space, optuna.samplers.TPESampler(**tpe_options(narrowed(space), seed)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if n_objectives > 1:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, space.size())))
    from tuner.staged import FitSampler

    # TPE's proposals repaired by the memory model on a GPU server (plain TPE without one).
    return FitSampler(space, optuna.samplers.TPESampler(**tpe_options(space, seed)))


def _study_identity(o: TuneOptions, p: _Prepared) -> dict[str, Any]:
    return {
        "model": p.model,
        "engine": o.engine,
        "objectives": o.objectives,
        "space_hash": p.space.fingerprint(),
        "workload_hash": p.workload.fingerprint(),
    }


def _prunable(o: TuneOptions) -> bool:
    """Pruning follows one objective that has a value per request."""
    return len(o.objectives) == 1 and objectives.get(o.objectives[0]).per_request is not None


def open_study(o: TuneOptions, p: _Prepared, sampler_factory: SamplerFactory = make_sampler) -> tuple[Any, bool]:
    """Create the study, or resume it if its model, space and workload match; return it and
    whether this call created it."""
    import optuna

    if o.grace_s <= o.heartbeat_s or o.heartbeat_s < 1:
        raise TunerError("--grace-period must be longer than --heartbeat-interval (both in seconds, >= 1)")
    storage = open_storage(o.storage, retry_failed=o.retry_failed, heartbeat_s=o.heartbeat_s, grace_s=o.grace_s)
    name = o.study_name or default_study_name(o, p.server)
    directions: Any = [objectives.get(x).direction for x in o.objectives]
    sampler = sampler_factory(o.sampler, p.space, o.seed, len(o.objectives))
    pruner = None
    if o.prune and _prunable(o):
        pruner = make_pruner(margin=o.prune_margin)
    created = True
    try:
        try:
            study = optuna.create_study(
                study_name=name, storage=storage, directions=directions, sampler=sampler,
                pruner=pruner, load_if_exists=False,
            )
        except optuna.exceptions.DuplicatedStudyError:
            created = False
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except StudyError:
        raise
    except Exception as e:
        reason = mask(str(e).splitlines()[0]) if str(e) else e.__class__.__name__
        raise write_failure(e) or StorageError(
            f"cannot create study '{name}' in {shown_url(o.storage)}: {reason}") from None
    ident = _study_identity(o, p)
    attrs = study.user_attrs
    if "space_hash" not in attrs and not created:
        # Another worker created it a moment ago and is writing its attrs (space_hash last).
        for _ in range(300):
            time.sleep(0.1)
            attrs = study.user_attrs
            if "space_hash" in attrs:
                break
    if "space_hash" in attrs:
        hw = hardware_fingerprint(p.environment)
        if attrs.get("hardware") not in (None, hw) and not o.allow_mixed_hardware:
            raise StudyError(
                f"study '{name}' was measured on different hardware ({_hw_text(attrs['hardware'])}) "
                f"than this machine ({_hw_text(hw)}): use another --study, or pass "
                "--allow-mixed-hardware to mix them on purpose"
            )
        labels = {"model": "model", "engine": "engine", "objectives": "objective(s)",
                  "space_hash": "search space", "workload_hash": "workload (prompts, repeats, num_predict)"}
        for key, label in labels.items():
            if attrs.get(key) != ident[key]:
                raise StudyError(
                    f"study '{name}' was created with a different {label}"
                    + (f" ({attrs.get(key)})" if key in ("model", "engine", "objectives") else "")
                    + ": pass --study NEW_NAME to start a new study, or repeat the original options to resume"
                )
    limits = {k: v for k, v in (("max_ttft_ms", o.max_ttft_ms), ("max_latency_ms", o.max_latency_ms),
                                ("max_vram_mib", o.max_vram_mib), ("max_power_w", o.max_power_w)) if v is not None}
    if "space_hash" not in attrs:
        # space_hash is written last: a worker that sees it sees the whole identity.
        record.write_study_info(study, record.StudyInfo(
            model=ident["model"], engine=ident["engine"], objectives=ident["objectives"],
            workload_hash=ident["workload_hash"], space_hash=ident["space_hash"],
            host=p.server.get("host", ""), managed_server=bool(p.server.get("managed")),
            # Whether the server runs on this machine (its address resolves here): the hardware
            # fingerprint describes the server's machine only then.
            server_local=bool(p.engine.local), server_version=p.server.get("version", ""),
            space=p.space.to_dict(), workload=p.workload.to_dict(), environment=p.environment,
            hardware=hardware_fingerprint(p.environment),
            gpu_offload_source=p.offload.source if p.offload is not None else None,
            memory_model={**p.memory.to_dict(), "headroom_mib": o.vram_headroom_mib} if p.memory is not None else None,
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            # The context the application needs: `tune check` repeats it in the re-tune it suggests.
            context=o.context, limits=limits))
    else:
        record.write_study_info(study, record.StudyInfo(limits=limits), new=False)
    if study.metric_names != o.objectives:
        import warnings

        # optuna-dashboard and trials_dataframe name the objectives from these, not "Objective 0".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(o.objectives))
    return study, created


def _hw_text(hw: dict[str, Any]) -> str:
    gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
    return f"{hw.get('cpu')}, {hw.get('cores')} cores, {hw.get('ram_gib')} GiB, {gpus}"



class _Deadline:
    """``--max-time``: stops sampling once the next trial and the re-validation after it would
    not fit in the budget. Both are estimated from this run's trials (their mean duration; the
    re-validation measures its K configs ``validate_rounds`` times, the ablation its
    ``ablation_configs``)."""

    def __init__(self, o: TuneOptions, progress: _Progress, ablation_configs: int = 0) -> None:
        self.o, self.progress, self.ablation_configs = o, progress, ablation_configs
        self.started = time.monotonic()
        self.stopped = False
        self.text = ""

    def __call__(self, study: Any, trial: Any) -> None:
        o = self.o
        if o.max_time_s is None or self.stopped or self.progress.done >= o.trials:
            return
        elapsed = time.monotonic() - self.started
        per_trial = elapsed / max(1, self.progress.done)
        configs = o.validate + (self.ablation_configs if o.ablation else 0)
        reserve = per_trial * configs * o.validate_rounds if o.validate > 1 and len(o.objectives) == 1 else 0.0
        if elapsed + per_trial + reserve > o.max_time_s:
            self.stopped = True
            self.text = (f"stopped on time: {self.progress.done} of {o.trials} trials in {elapsed:.0f} s, to finish "
                         f"within --max-time {format_duration(o.max_time_s)}"
                         + (f" with about {reserve:.0f} s kept for the re-validation" if reserve else "")
                         + "; run the same command again to continue the search")
            study.stop()


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``10m``, ``1h30m``, ``2.5h``; raises TunerError naming the form."""
    t = text.strip().lower()
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", t)
    if not t or m is None or not any(m.groups()):
        raise TunerError(f"invalid --max-time '{text}': write a duration like 90s, 10m or 1h30m")
    h, mi, se = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + se


def format_duration(seconds: float) -> str:
    """``1h30m``, ``10m``, ``90s``: how a --max-time is shown back."""
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


def run_study(o: TuneOptions, echo: Echo = lambda s: None,
              sampler_factory: SamplerFactory = make_sampler,
              on_sample: OnSample | None = None,
              on_trial_start: OnTrialStart | None = None) -> results.StudySummary:
    """Run ``o.trials`` measured trials (creating or resuming the study) and summarise.

    ``sampler_factory`` builds the sampler (benchmarks compare others); ``on_sample`` sees
    every measured request of the search (not of the re-validation), ``on_trial_start`` each
    start of a trial's measurement (a live status line needs both); the summary's
    ``trials`` hold every trial of the study, read back as records.
    """
    import warnings

    import optuna

    # Failed trials are reported on our own progress lines; Optuna's warnings repeat them
    # with a traceback each.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # heartbeats and grouped TPE are marked experimental; users need not see that per run.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    validate_options(o)
    from tuner import warmstart

    # Checked before anything is created or contacted: a bad source leaves the storage as it was.
    source = (warmstart.open_source_storage(o.warm_start_storage or o.storage, bool(o.warm_start_storage))
              if o.warm_start and (o.warm_start_from or o.warm_start_storage) else None)
    if source is not None and o.warm_start_from:
        warmstart.check_source(source, o.warm_start_from)
    p = prepare(o, echo)
    try:
        if source is not None and o.warm_start_from:
            variants = [str(v) for v in (p.space["variant"].values if "variant" in p.space else ())]
            warmstart.check_source(source, o.warm_start_from, p.model, variants)
        study, created = open_study(o, p, sampler_factory)
        searched = ", ".join(f"{x.name}[{len(x.values)}]" for x in p.space.searched) or "nothing (all fixed)"
        echo(printable(f"study '{study.study_name}' in {shown_url(o.storage)}"))
        echo(printable(f"model {p.model} on {p.server.get('engine')} {p.server.get('version')}; searching {searched}"))
        if "draft_num_predict" in p.space:
            echo(printable(f"drafting: {p.environment['drafting']['detail']}; every drafting config is checked "
                           "for identical greedy output"))
        if p.space.fixed:
            # The model path was printed in full just above: by its file name from here on.
            echo(printable("fixed: " + ", ".join(
                f"{k}={TrialRecord(model=str(v)).model_label if k == 'variant' else v}"
                for k, v in p.space.fixed.items())))
        steps = p.workload.repeats * len(p.workload.prompts)
        if o.prune and _prunable(o) and steps < 5:
            p.warnings.append(
                f"pruning needs at least 5 requests per trial to be significant (this workload has {steps}): "
                "raise --repeats to let it stop bad trials early"
            )
        for w in p.warnings:
            echo(printable(w))
        if o.measure_interference:
            echo(printable(_machine_check(p)))
        if p.offload is not None:
            echo(f"GPU offload ({p.offload.source}): {p.offload.detail}")
        if not p.has_gpu and "num_gpu" in p.space and p.space["num_gpu"].values == (0,):
            echo("no GPU offload: num_gpu fixed to 0 and left out of the search")
        # A killed worker's running baseline is failed now, so that it counts as not measured.
        optuna.storages.fail_stale_trials(study)
        existing = study.get_trials(deepcopy=False)
        # The baseline is part of the study's plan: until one is measured (or queued or running
        # on another worker), it is queued first, on creation and on every resume.
        if o.baseline and (created or existing) and not any(
                record.is_baseline(t) and t.state.name in _BASELINE_DONE and not _dead_here(t) for t in existing):
            if existing:
                echo("the defaults (baseline) were not measured yet: measuring them first")
            study.enqueue_trial({}, user_attrs={record.BASELINE: True})
        progress = _Progress(o, echo, o.trials)
        start = _enqueue_start(study, o, p, created, echo, source, progress)
        runner = _Runner(o, p, echo, on_sample, on_trial_start)
        n = len(p.space.searched)
        deadline = _Deadline(o, progress, 2 + (2 * n if n <= ALONE_MAX else n))
        study.optimize(runner, n_trials=o.trials, callbacks=[progress, start, deadline], catch=(TrialFailedError,))
        if deadline.stopped:
            echo(printable(deadline.text))
        if progress.stopped_for_failures:
            raise StoppedError(
                f"stopped after {progress.consecutive_failures} consecutive failed trials "
                f"(last: {progress.last_error}); the study is intact: fix the cause and re-run to resume"
            )
        if o.validate > 1 and len(o.objectives) == 1:
            val = validate_top(study, p.engine, p.workload, p.model, o.objectives[0], o.validate,
                               o.validate_rounds, echo, sampler_factory=runner._sampler,
                               max_rounds=o.validate_max_rounds, check=runner.identity_violation)
            if val is not None:
                study.set_user_attr(record.VALIDATION, val.to_dict())
                if o.ablation:
                    ab = ablate(study, p.engine, p.workload, p.model, o.objectives[0], o.validate_rounds, echo,
                                sampler_factory=runner._sampler, check=runner.identity_violation)
                    # None too: an ablation of an earlier winner must not outlive it.
                    study.set_user_attr(record.ABLATION, ab.to_dict() if ab is not None else None)
        # The run's warnings go with the study, so that show and the report carry them too.
        study.set_user_attr(record.RUN_WARNINGS, list(p.warnings))
        if o.roofline:
            _store_roofline(study, p)
        summary = results.summarise_study(study, o.objectives, shown_url(o.storage),
                                          trials_run=progress.done, space=p.space.to_dict())
        summary.warnings = p.warnings
        summary.stopped_on_time = deadline.text if deadline.stopped else ""
        return summary
    finally:
        try:
            for name in p.engine.restore_loaded():
                echo(printable(f"unloaded {name}: it was not loaded before the study"))
        finally:
            p.engine.close()


def _store_roofline(study: Any, p: _Prepared) -> None:
    """Compute the winner's share of the memory-bandwidth ceiling and keep it with the study."""
    v = results.best_feasible(study)
    # A remote server's memory is not this machine's, whose bandwidth is all that can be measured.
    if v is None or not p.engine.local:
        return
    decode = v.stat(record.DECODE_TPS)
    if not decode:
        return
    try:
        size = p.engine.model_info(v.model or p.model).size_bytes
    except TunerError:
        return
    on_gpu = p.has_gpu and v.options.get("num_gpu", -1) != 0
    r = roofline(float(decode), size, on_gpu)
    if r is not None:
        study.set_user_attr(record.ROOFLINE, {**r.to_dict(), "trial": v.number, "text": r.describe()})
