"""Optuna wiring: build the space and workload, create or resume the study, run trials."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuner import machine
from tuner.engines import Engine, GpuOffload, get_engine
from tuner.errors import (LoadError, ServerError, ServerHungError, SpaceError, StoppedError, StorageError,
                          StudyError, TrialFailedError, TunerError)
from tuner.measure import config_key, measure_config
from tuner.machine import hardware_fingerprint
from tuner.leaderboard import Leaderboard, TrialCache
from tuner.memory import Architecture, Evidence, StudyMemory
from tuner.options import SAMPLERS, TuneOptions
from tuner import objectives, record
from tuner.pruning import make_pruner
from tuner.record import TrialRecord
from tuner.space import RUNNER_PARAMS, SERVER_PARAMS, SearchSpace, SpaceLimits, build_space, load_space_file
from tuner.stats import log_ci95, overlaps
from tuner.roofline import roofline
from tuner.storage import mask, open_storage, shown_url, write_failure
from tuner.terminal import printable
from tuner.validate import validate_top
from tuner.workload import Workload, builtin_prompts, load_prompts
from tuner import results

Echo = Callable[[str], None]
#: Called after each measured request of a trial: (trial number, step, sample); ``tune -v``.
OnSample = Callable[[int, int, Any], None]
#: Called when a trial starts (again, when it is re-measured): (trial number, requests planned).
OnTrialStart = Callable[[int, int], None]
#: A failed load scores this (for maximised objectives) so the sampler learns to avoid it.
FAILED_SCORE = {"maximize": 0.0, "minimize": 1e12}


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


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        return os.cpu_count() or 1


def validate_options(o: TuneOptions) -> None:
    """Reject impossible numbers before anything is contacted."""
    if not o.model:
        raise TunerError("no model given: pass --model, e.g. --model gemma3:1b")
    if any(not m.strip() for m in o.model):
        raise TunerError("--model is empty: pass a model tag or GGUF path, e.g. --model gemma3:1b")
    if o.trials <= 0:
        raise TunerError(f"--trials must be at least 1 (got {o.trials})")
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
    prompts = load_prompts(o.prompts_file) if o.prompts_file else builtin_prompts()
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
        limits = SpaceLimits(
            context_length=info.context_length,
            block_count=info.block_count,
            physical_cores=_physical_cores(),
            has_gpu=True,
            min_ctx=need,
            variants=tuple(variants),
            supported=engine.supported_params,
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


class _StartQueue:
    """The study's start (warm-start seeds, starting point or screen), queued once no baseline
    waits: trials are taken from the queue in order, so the baseline always runs first. The
    plan is kept on the study until queued, so a run stopped during the baseline queues it on
    resume."""

    def __init__(self, o: TuneOptions, progress: _Progress) -> None:
        self.o, self.progress, self.pending = o, progress, True

    def __call__(self, study: Any, trial: Any = None) -> None:
        if not self.pending:
            return
        trials = study.get_trials(deepcopy=False)
        if any(record.is_baseline(t) and t.state.name in ("WAITING", "RUNNING") for t in trials):
            return
        queue = study.user_attrs.get(_START_QUEUE)
        self.pending = False
        if not queue:
            return
        # Never queue more than this run measures: a leftover waiting trial is a config with no record.
        room = (self.o.trials - self.progress.done) - sum(1 for t in trials if t.state.name == "WAITING")
        for point, attrs in queue[:max(0, room)]:
            study.enqueue_trial(point, user_attrs=attrs, skip_if_exists=True)
        study.set_user_attr(_START_QUEUE, [])


def _dead_here(t: Any) -> bool:
    """Whether a RUNNING trial's worker was a process of this machine that is gone (killed, or
    stopped by a full disk before it could mark the trial failed): it will never finish, though
    its heartbeat has not gone stale yet."""
    w = t.user_attrs.get(record.WORKER) or {}
    if t.state.name != "RUNNING" or w.get("hostname") != platform.node() or not isinstance(w.get("pid"), int):
        return False
    if w["pid"] == os.getpid():
        return False
    try:
        os.kill(w["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


#: A baseline in one of these states is measured, or about to be: no second one is queued.
_BASELINE_DONE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
#: Study attribute: the start's configs not queued yet (params, user attrs).
_START_QUEUE = "start_queue"


def _enqueue_start(study: Any, o: TuneOptions, p: _Prepared, created: bool, echo: Echo = lambda s: None,
                   source: Any = None, progress: _Progress | None = None) -> _StartQueue:
    """Plan the warm start's configs (earlier studies' winners), then the informed starting
    point, or with the staged search its screen (one config per variant at full offload, less
    the variants the warm start's sources screened on this hardware), and tell the staged
    sampler what it cannot read from trials. The plan is queued now, or after the baseline
    when one waits (:class:`_StartQueue`)."""
    from tuner import staged

    sampler = study.sampler
    points = starting_points(p.space, p.has_gpu, _physical_cores())
    planned = False
    if isinstance(sampler, staged.FitSampler):
        sampler.default_model, sampler.memory = p.model, p.memory
    if isinstance(sampler, staged.StagedSampler):
        sampler.sizes = dict(p.sizes)
        if p.memory is not None and points and staged.full_offload(p.space) is not None:
            # The screen is planned trial by trial from what the memory model predicts fits.
            sampler.start, planned = dict(points[0]), True
        else:
            sampler.memory = None  # the stages as before: nothing to offload
    start = _StartQueue(o, progress or _Progress(o, echo, o.trials))
    if not (created and o.starting_points):
        start(study)  # a plan kept from a run stopped during its baseline
        return start
    warm = _warm_start(study, o, p, echo, source)
    queue: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (s.params, {record.STAGE: staged.WARM, record.SEEDED_FROM: s.origin}) for s in warm.seeds]
    stage = staged.START
    if planned:
        points = []
    elif isinstance(sampler, staged.StagedSampler) and points and staged.screens(p.space):
        points, stage = staged.screen_points(p.space, points[0]), staged.SCREEN
        if warm.seeds:
            # A variant is screened unless a seed runs it at full offload or a source on this
            # hardware measured it there.
            full = staged.full_offload(p.space)
            covered = warm.screened | {s.params.get("variant", p.model) for s in warm.seeds
                                       if full is None or s.params.get("num_gpu") == full}
            points = [x for x in points if x.get("variant", p.model) not in covered]
    elif warm.seeds:
        points = []  # the seeds are better informed than the generic starting point
    queue += [(x, {record.STAGE: stage}) for x in points]
    study.set_user_attr(_START_QUEUE, [[point, attrs] for point, attrs in queue])
    start(study)
    return start


def _warm_start(study: Any, o: TuneOptions, p: _Prepared, echo: Echo, source: Any = None) -> Any:
    """Plan the warm start of a new study, say what it found and keep it with the study;
    ``source``: the storage of the sources when the run opened (and checked) it already."""
    from tuner import warmstart

    if not o.warm_start:
        return warmstart.WarmStart()
    # The sources are read through a storage of their own (a "memory" storage has none).
    storage = source if source is not None else open_storage(o.storage, create=False)
    ws = warmstart.plan(storage, study.study_name, p.model, p.space, study.user_attrs,
                        from_study=o.warm_start_from)
    for line in ws.lines():
        echo(printable(line))
    if ws.sources:
        study.set_user_attr(warmstart.ATTR, ws.to_dict())
    elif o.warm_start_from:
        echo(printable(f"warm start: study '{o.warm_start_from}' has no feasible config measured without "
                       "contention to start from"))
    return ws


def starting_points(space: SearchSpace, has_gpu: bool, cores: int) -> list[dict[str, Any]]:
    """A few informed configs tried right after the baseline."""
    if not space.searched:
        return []
    prefs: dict[str, list[Any]] = {
        "num_ctx": [min(space["num_ctx"].values)] if "num_ctx" in space else [],
        "num_batch": [512, 256, 1024],
        "num_gpu": [max(space["num_gpu"].values)] if "num_gpu" in space and has_gpu else [0],
        # A GPU server's own thread count (0: the runtime decides) is the safe start: this
        # machine's cores need not be the server's, and offloaded layers hardly use them.
        "num_thread": ([0] if has_gpu else []) + [cores, max(1, cores // 2)],
    }
    point: dict[str, Any] = {}
    for p in space.searched:
        choice = next((v for v in prefs.get(p.name, []) if v in p.values), p.values[0])
        point[p.name] = choice
    return [point]


class _Runner:
    """The objective and its per-process state (what is loaded now)."""

    def __init__(self, o: TuneOptions, p: _Prepared, echo: Echo, on_sample: OnSample | None = None,
                 on_trial_start: OnTrialStart | None = None) -> None:
        self.o, self.p, self.echo, self.on_sample = o, p, echo, on_sample
        self.on_trial_start = on_trial_start
        self.loaded_key: Any = None
        #: The machine stayed busy through a whole --quiet-wait: flag without waiting.
        self.stays_busy = False
        #: Trials of this run whose requests got no answer in --timeout, and those answered.
        self.hung, self.answered = 0, 0
        hw = hardware_fingerprint(p.environment)
        self.worker = {"hostname": platform.node(), "pid": os.getpid(), "gpus": hw["gpus"],
                       "server": p.server.get("host", "")}
        self.directions = [objectives.get(x).direction for x in o.objectives]
        # The study's finished trials, each read once (the memory model and _settled read them
        # before every trial), and the best of them kept as they arrive.
        self._board = Leaderboard(self.directions[0])
        self._finished = TrialCache(("COMPLETE", "PRUNED"), self._board)
        self._evidence = Evidence(p.memory) if p.memory is not None else None

    def _sampler(self) -> Any:
        from tuner.telemetry import TelemetrySampler

        return TelemetrySampler(
            interval_s=self.o.telemetry_interval_s,
            gpu_indices=self.o.gpus,
            server_pids=self.p.engine.server_pids(),
            gpus=self.p.gpu_telemetry,
            # A remote server's competitors are not on this machine: nothing to measure here.
            interference=self.p.engine.local and self.o.measure_interference,
        )

    def __call__(self, trial: Any) -> Any:
        o, p = self.o, self.p
        # One read: each read of a running trial's attributes is a query (the stage was set at ask).
        attrs = trial.user_attrs
        baseline = bool(attrs.get(record.BASELINE))
        if baseline:
            model = p.model
            # The defaults, except a context the application needs (else the "winner" could be
            # a config that silently truncates its prompts).
            runner: dict[str, Any] | None = {"num_ctx": o.context} if o.context else None
            server: dict[str, Any] = {}
        else:
            config = p.space.suggest(trial)
            model = config.pop("variant", p.model)
            runner = {k: config[k] for k in RUNNER_PARAMS if k in config}
            server = {k: config[k] for k in SERVER_PARAMS if k in config}
        # What is tried, stored before measuring: a trial that dies still says what it was.
        # The baseline's stage is named as its flag (tuner.staged.BASELINE; that module loads optuna).
        stage = record.BASELINE if baseline else attrs.get(record.STAGE)
        rec = TrialRecord(model=model, options=runner or {}, server=server, baseline=baseline, worker=self.worker,
                          stage=stage, seeded_from=attrs.get(record.SEEDED_FROM))
        rec.memory = self._predict(trial, rec)
        record.write_record(trial, rec)
        if rec.skipped:
            return self._skip(trial, rec)
        prior = None if baseline else self._settled(trial, rec)
        if prior is not None:
            return self._reuse(trial, rec, prior)
        self._started(trial.number)
        try:
            restarted = p.engine.prepare(server)
            rec.server_effective = getattr(p.engine, "effective_server_settings", lambda s: None)(server)
            key = config_key(model, runner, server)
            reload = restarted or key != self.loaded_key
            t0 = time.monotonic()
            m = measure_config(p.engine, model, runner, p.workload, reload=reload,
                               sampler=self._sampler(), on_request=self._reporter(trial, baseline),
                               on_sample=self._sample_hook(trial.number))
            lost_s, tries = 0.0, 0
            # A measurement other processes competed with is not a measurement: measure again
            # once the machine is quiet (bounded), and keep what it cost.
            while (not m.stopped_early and tries < o.remeasure_contended and not self.stays_busy
                   and m.record(model, runner, server).contended):
                tries += 1
                lost_s += time.monotonic() - t0
                waited, quiet = self._wait_for_quiet(trial.number)
                lost_s += waited
                if not quiet:
                    # Busy for the whole wait: waiting again for every trial would only multiply
                    # the study's time; flag the rest until a trial runs quiet.
                    self.stays_busy = True
                    self.echo(f"  the machine stayed busy for {waited:.0f} s: measuring on without waiting; "
                              "contended trials are flagged and kept out of the winner")
                    break
                self._started(trial.number)
                t0 = time.monotonic()
                m = measure_config(p.engine, model, runner, p.workload, reload=False, sampler=self._sampler(),
                                   on_sample=self._sample_hook(trial.number))
            if m.record(model, runner, server).contended is False:
                self.stays_busy = False
        except LoadError as e:
            self.loaded_key = None
            self.answered += 1
            return self._failed_load(trial, rec, str(e))
        except ServerError as e:
            self.loaded_key = None
            rec.error = str(e)
            record.write_record(trial, rec)
            if isinstance(e, ServerHungError):
                self.hung += 1
                if not self.answered and self.hung >= min(2, o.trials):
                    raise StoppedError(
                        f"the server is not generating: none of the {self.hung} trials run got an answer "
                        f"within --timeout {o.timeout_s:g} s, though it answers /api/version; check the "
                        "server's log (a hung runner, a stuck GPU), then run the same command again to resume"
                    ) from None
            self._wait_for_server()
            raise TrialFailedError(str(e)) from None
        except KeyboardInterrupt:
            self.loaded_key = None
            rec.error = "interrupted (Ctrl-C)"
            record.write_record(trial, rec)
            raise
        self.loaded_key = key
        self.answered += 1
        predicted = rec.memory
        server_memory = p.engine.server_memory(model)
        rec = m.record(model, runner, server, server_effective=rec.server_effective, baseline=baseline,
                       worker=self.worker, server_memory=server_memory)
        rec.memory = _observed(predicted, server_memory)
        rec.ran = p.engine.ran_options(model)
        rec.remeasured, rec.contention_lost_s = tries, round(lost_s, 2) if tries else None
        rec.stage = stage
        rec.constraints, rec.violations = self._limits(rec, load_failed=False)
        if m.stopped_early:
            import optuna

            total = p.workload.repeats * len(p.workload.prompts)
            done = len(m.samples) // max(1, p.workload.concurrency)
            mean_s = sum(s.latency_ms for s in m.samples) / len(m.samples) / 1e3
            rec.pruned_saved_s = round(max(0, total - done) * mean_s, 3)
            record.write_record(trial, rec)
            raise optuna.TrialPruned(f"worse than the best after {done} of {total} requests")
        values = []
        for name in o.objectives:
            v = objectives.get(name).value(rec)
            if v is None:
                rec.error = f"objective '{name}' could not be measured"
                record.write_record(trial, rec)
                raise TrialFailedError(
                    f"objective '{name}' could not be measured (no GPU energy counter?): "
                    "choose another --objective"
                )
            values.append(v)
        record.write_record(trial, rec)
        return values[0] if len(values) == 1 else values

    def _started(self, number: int) -> None:
        if self.on_trial_start is not None:
            self.on_trial_start(number, self.p.workload.repeats * len(self.p.workload.prompts))

    def _settled(self, trial: Any, rec: TrialRecord) -> TrialRecord | None:
        """An earlier quiet measurement of this very config in this study (same workload by
        the study's identity) whose 95% interval lies clear of the current best's: measuring
        it again would not change the answer. None when there is none, or it is the best or
        close to it (then a new measurement does add evidence)."""
        field = objectives.get(self.o.objectives[0]).per_request if len(self.o.objectives) == 1 else None
        if field is None:
            return None
        from optuna.trial import TrialState

        finished = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        params = trial.params
        # The params alone say whether this config ran before (the usual answer: no).
        if not any(t.params == params for t in finished):
            return None
        done = self._finished.records(finished)
        same = [r for r in done if not r.baseline and r.reused_from is None and r.measured and r.contended is not True
                and (r.model, r.options, r.server) == (rec.model, rec.options, rec.server) and len(r.samples) > 1]
        if not same:
            return None
        # Every complete trial is on the board (pruned ones never rank): the best of ``done``.
        best = self._board.best()
        if best is None or best.number == same[0].number or len(best.samples) < 2:
            return None
        try:
            mine = log_ci95(same[0].per_request_values(field))
            theirs = log_ci95(best.per_request_values(field))
        except (ValueError, TypeError):
            return None
        return None if overlaps(mine[1:], theirs[1:]) else same[0]

    def _reuse(self, trial: Any, rec: TrialRecord, prior: TrialRecord) -> Any:
        """Record ``prior``'s measurement for this trial, measuring nothing."""
        # No load and no warm-up happened for this trial: those stay empty.
        reused = dataclasses.replace(prior, stage=rec.stage, seeded_from=rec.seeded_from, worker=self.worker,
                                     reused_from=prior.number, remeasured=0, contention_lost_s=None,
                                     reload_ms=None, warmup=None)
        reused.constraints, reused.violations = self._limits(reused, load_failed=False)
        record.write_record(trial, reused)
        values = [objectives.get(name).value(reused) for name in self.o.objectives]
        return values[0] if len(values) == 1 else values

    def _sample_hook(self, number: int) -> Callable[[int, Any], None] | None:
        hook = self.on_sample
        return None if hook is None else (lambda step, sample: hook(number, step, sample))

    def _reporter(self, trial: Any, baseline: bool) -> Callable[[int, Any], bool] | None:
        """Report each request's objective value; ask the pruner whether to stop."""
        field = objectives.get(self.o.objectives[0]).per_request if len(self.o.objectives) == 1 else None
        if field is None:
            return None

        def on_request(step: int, sample: Any) -> bool:
            trial.report(float(getattr(sample, field)), step)
            return bool(self.o.prune and not baseline and trial.should_prune())

        return on_request

    def _limits(self, rec: TrialRecord, load_failed: bool) -> tuple[dict[str, float], list[str]]:
        """Every constraint (the same keys on every trial) and the violations in words."""
        o = self.o
        out: list[str] = []
        values: dict[str, float] = {"load": 1.0 if load_failed else 0.0}
        checks = (
            ("ttft_p95_ms", o.max_ttft_ms, rec.stat(record.TTFT_MS, "p95"), "p95 TTFT", "ms"),
            ("latency_p95_ms", o.max_latency_ms, rec.stat(record.LATENCY_MS, "p95"), "p95 latency", "ms"),
            ("vram_mib", o.max_vram_mib, rec.vram_peak_mib, "VRAM peak", "MiB"),
            ("power_w", o.max_power_w, rec.power_mean_w, "mean power", "W"),
        )
        for key, limit, value, label, unit in checks:
            if limit is None:
                continue
            # NaN counts as unmeasured: stored, it would read as feasible and break the dashboard's JSON.
            if load_failed or value is None or value != value:
                values[key] = 0.0 if not load_failed else 1.0
                continue
            excess = float(value) - limit
            # Normalised so that limits in ms and in W weigh alike in the sampler.
            values[key] = excess / limit
            if excess > 0:
                out.append(f"{label} {value:.0f} {unit} > {limit:g} {unit}")
        return values, out

    def _predict(self, trial: Any, rec: TrialRecord) -> dict[str, Any] | None:
        """The memory model's prediction for this config from the evidence so far (None
        without a GPU); ``skipped`` when a config at least as large did not load."""
        mem = self.p.memory
        if mem is None:
            return None
        pred = mem.predict(rec.model, rec.options, rec.server)
        if pred is None:
            return None
        assert self._evidence is not None
        cal = self._evidence.calibrate(self._finished.update(trial.study))
        auto = rec.options.get("num_gpu") is None or int(rec.options["num_gpu"]) < 0
        out: dict[str, Any] = {"prior_mib": round(pred.total_mib, 1), "predicted_mib": round(cal.need(pred.total_mib), 1),
                               "layers": None if auto else pred.layers, "weights_mib": round(pred.weights_mib, 1),
                               "kv_mib": round(pred.kv_mib, 1), "compute_mib": round(pred.compute_mib, 1),
                               "verdict": mem.verdict(cal, rec.model, rec.options, rec.server),
                               "capacity": cal.to_dict()}
        # Auto placement never fails for lack of GPU memory: the server places what fits.
        if not auto and not rec.baseline and cal.skip(pred.total_mib):
            out["skipped"] = True
        return out

    def _skip(self, trial: Any, rec: TrialRecord) -> Any:
        """Store a config predicted not to fit as infeasible without loading it."""
        m = rec.memory or {}
        cap = m.get("capacity") or {}
        which = (f"#{cap['fails_trial']} needing {cap['fails_mib']:,.0f} MiB did not load"
                 if cap.get("fails_trial") is not None else f"the GPU has {cap.get('total_mib') or 0:,.0f} MiB")
        error = f"skipped: predicted to need {m.get('predicted_mib', 0):,.0f} MiB of GPU memory, and {which}"
        return self._not_loaded(trial, rec, error, error)

    def _failed_load(self, trial: Any, rec: TrialRecord, error: str) -> Any:
        return self._not_loaded(trial, rec, error, f"failed to load: {error}")

    def _not_loaded(self, trial: Any, rec: TrialRecord, error: str, violation: str) -> Any:
        """Store a config that did not run (it failed to load, or was skipped) as infeasible."""
        rec.error = error
        rec.constraints, _ = self._limits(rec, load_failed=True)
        rec.violations = [violation]
        record.write_record(trial, rec)
        vals = [FAILED_SCORE[d] for d in self.directions]
        return vals[0] if len(vals) == 1 else vals

    def _wait_for_quiet(self, number: int) -> tuple[float, bool]:
        """Wait (up to --quiet-wait) until other processes leave the CPU alone; return the
        seconds waited and whether the machine is quiet now."""
        from tuner.telemetry import machine_busy

        t0 = time.monotonic()
        deadline = t0 + self.o.quiet_wait_s
        said = False
        while True:
            busy = machine_busy(1.0, exclude_pids=sorted({os.getpid(), *self.p.engine.server_pids()}))
            if busy.interference_pct is None or busy.interference_pct < record.CONTENDED_PCT:
                return time.monotonic() - t0, True
            if not said:
                self.echo(printable(
                    f"  #{number} was measured while other processes competed ({_busy_text(busy)}): waiting up to "
                    f"{self.o.quiet_wait_s:.0f} s for a quiet machine, then measuring it again"))
                said = True
            if time.monotonic() >= deadline:
                return time.monotonic() - t0, False

    def _wait_for_server(self) -> None:
        deadline = time.monotonic() + self.o.server_wait_s
        first = True
        while time.monotonic() < deadline:
            try:
                self.p.engine.server_info()
                return
            except ServerError:
                if first:
                    self.echo(f"  server not answering; waiting up to {self.o.server_wait_s:.0f} s for it ...")
                    first = False
                time.sleep(1.0)


def _observed(predicted: dict[str, Any] | None, mem: Any) -> dict[str, Any] | None:
    """The prediction with what the server reported beside it (size_vram, its error)."""
    if predicted is None:
        return None
    out = dict(predicted)
    if mem is not None:
        out["observed_mib"] = mem.vram_mib
        if out.get("predicted_mib") and mem.vram_mib and out.get("layers") is not None:
            out["error_pct"] = round(100.0 * (out["predicted_mib"] - mem.vram_mib) / mem.vram_mib, 1)
    return out


def _busy_text(busy: Any) -> str:
    """'other processes use 98% of a core (busiest: python3 at 97%)'."""
    text = f"other processes use {busy.interference_pct or 0:.0f}% of a core"
    if busy.busiest:
        text += f" (busiest: {busy.busiest} at {busy.busiest_pct or 0:.0f}%)"
    return text


def _machine_check(p: _Prepared) -> str:
    """One line before the study: how busy the machine is, and which process is the busiest."""
    if not p.engine.local:
        return (f"machine check: interference is not measured: the server at {p.server.get('host')} "
                "is not on this machine")
    from tuner.telemetry import machine_busy

    busy = machine_busy(1.0, exclude_pids=sorted({os.getpid(), *p.engine.server_pids()}))
    if busy.interference_pct is None:
        return "machine check: other processes' CPU use cannot be measured here (psutil missing?)"
    if busy.interference_pct >= record.CONTENDED_PCT:
        return (f"machine check: BUSY: {_busy_text(busy)}; trials measured while it competes are flagged "
                "and measured again")
    return f"machine check: quiet ({_busy_text(busy)})"


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _contended_text(v: TrialRecord) -> str:
    """' | CONTENDED: other processes used 81% of a core, GPU 30%' for a trial's line."""
    return (f" | CONTENDED: other processes used {v.interference_pct or 0:.0f}% of a core"
            + (f", GPU {v.gpu_interference_pct:.0f}%" if v.gpu_interference_pct else ""))


class _Progress:
    """One line per finished trial, with the best feasible so far and an ETA."""

    def __init__(self, o: TuneOptions, echo: Echo, total: int) -> None:
        self.o, self.echo, self.total = o, echo, total
        self.done = 0
        self.started = time.monotonic()
        self.consecutive_failures = 0
        self.last_error = ""
        self.stopped_for_failures = False
        # Every worker's complete trials, each read once: the best is kept as they arrive.
        self.board = Leaderboard(objectives.get(o.objectives[0]).direction)
        self._complete = TrialCache(("COMPLETE",), self.board)

    def __call__(self, study: Any, trial: Any) -> None:
        self.done += 1
        v = results.view(trial)
        self._complete.put(trial, v)
        self._complete.update(study)
        obj = self.o.objectives[0]
        if trial.state.name == "PRUNED":
            self.consecutive_failures = 0
            status = f"pruned (clearly worse; saved {v.pruned_saved_s or 0.0:.1f} s)"
            if v.contended:
                status += _contended_text(v)
            metric = f"decode {v.stat(record.DECODE_TPS) or 0:.1f} tok/s so far  "
        elif trial.state.name == "FAIL":
            self.consecutive_failures += 1
            self.last_error = v.error or "unknown error"
            status = f"FAILED: {self.last_error}"
            metric = ""
        else:
            self.consecutive_failures = 0
            metric = (
                f"decode {v.stat(record.DECODE_TPS) or 0:.1f} tok/s  "
                f"prefill {v.stat(record.PREFILL_TPS) or 0:.0f} tok/s  "
                f"p95 TTFT {v.stat(record.TTFT_MS, 'p95') or 0:.0f} ms  "
                if not v.error else ""
            )
            status = "feasible" if v.feasible else "infeasible: " + "; ".join(v.violations)
            if v.contended:
                status += _contended_text(v) + " (not used for the winner)"
            elif v.remeasured:
                status += f" | re-measured on a quiet machine ({v.contention_lost_s or 0:.0f} s lost to contention)"
            if v.reused_from is not None:
                status += f" | proposed again: #{v.reused_from}'s measurement reused (clearly behind the best)"
        best = self.board.best(results.StoredStudy(study.study_name, study.user_attrs, [], []).validation)
        best_txt = f"best {best.values[0]:.2f} ({obj})" if best is not None and best.values else "no feasible yet"
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        stage = f"[{v.stage}] " if v.stage else ""
        self.echo(printable(
            f"[{self.done}/{self.total}] #{trial.number} {stage}{v.config_text()} | {metric}{status} | "
            f"{best_txt} | ETA {_fmt_eta(eta)}"
        ))
        if self.consecutive_failures >= self.o.max_consecutive_failures:
            self.stopped_for_failures = True
            study.stop()


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
        study.optimize(runner, n_trials=o.trials, callbacks=[progress, start], catch=(TrialFailedError,))
        if progress.stopped_for_failures:
            raise StoppedError(
                f"stopped after {progress.consecutive_failures} consecutive failed trials "
                f"(last: {progress.last_error}); the study is intact: fix the cause and re-run to resume"
            )
        if o.validate > 1 and len(o.objectives) == 1:
            val = validate_top(study, p.engine, p.workload, p.model, o.objectives[0], o.validate,
                               o.validate_rounds, echo, sampler_factory=runner._sampler,
                               max_rounds=o.validate_max_rounds)
            if val is not None:
                study.set_user_attr(record.VALIDATION, val.to_dict())
        if o.roofline:
            _store_roofline(study, p)
        summary = results.summarise_study(study, o.objectives, shown_url(o.storage),
                                          trials_run=progress.done, space=p.space.to_dict())
        summary.warnings = p.warnings
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
    if v is None:
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
