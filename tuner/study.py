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

from tuner import __version__
from tuner.engines import Engine, GpuOffload, get_engine
from tuner.errors import (LoadError, ServerError, SpaceError, StoppedError, StorageError, StudyError,
                          TrialFailedError, TunerError)
from tuner.measure import config_key, measure_config
from tuner.pruning import PER_REQUEST, make_pruner
from tuner.metrics import OBJECTIVES, objective_value
from tuner.space import RUNNER_PARAMS, SERVER_PARAMS, SearchSpace, SpaceLimits, build_space, load_space_file
from tuner.roofline import roofline
from tuner.storage import mask, open_storage, shown_url, write_failure
from tuner.terminal import printable
from tuner.validate import validate_top
from tuner.workload import Workload, builtin_prompts, load_prompts
from tuner import results

Echo = Callable[[str], None]
SAMPLERS = ("tpe", "random", "grid")
#: A failed load scores this (for maximised objectives) so the sampler learns to avoid it.
FAILED_SCORE = {"maximize": 0.0, "minimize": 1e12}


@dataclass
class TuneOptions:
    """Everything ``tune`` takes; defaults are the CLI's defaults."""

    model: list[str]
    engine: str = "ollama"
    host: str | None = None
    trials: int = 50
    repeats: int = 3
    num_predict: int = 128
    prompts_file: str | None = None
    context: int | None = None
    params: dict[str, list[Any]] = field(default_factory=dict)
    space_file: str | None = None
    variants: list[str] = field(default_factory=list)
    objectives: list[str] = field(default_factory=lambda: ["decode_tps"])
    max_ttft_ms: float | None = None
    max_latency_ms: float | None = None
    max_vram_mib: float | None = None
    max_power_w: float | None = None
    sampler: str = "tpe"
    seed: int | None = None
    storage: str | None = None
    study_name: str | None = None
    baseline: bool = True
    gpus: list[int] | None = None
    telemetry_interval_s: float = 0.1
    timeout_s: float = 600.0
    concurrency: int = 1
    manage_server: bool = False
    ollama_bin: str | None = None
    models_dir: str | None = None
    max_consecutive_failures: int = 3
    server_wait_s: float = 30.0
    retry_failed: bool = False
    allow_mixed_hardware: bool = False
    heartbeat_s: int = 30
    grace_s: int = 90
    prune: bool = True
    prune_margin: float = 0.02
    validate: int = 3
    validate_rounds: int = 3
    roofline: bool = True


@dataclass
class StudySummary:
    """What a run ends with: where the study is, its counts, the winner and the baseline."""

    study_name: str
    storage: str
    objectives: list[str]
    trials_run: int
    counts: dict[str, int]
    best: results.TrialView | None
    best_is_feasible: bool
    baseline: results.TrialView | None
    speedup: float | None
    pareto: list[results.TrialView] = field(default_factory=list)
    space: dict[str, list[Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    validation: Any = None
    roofline: dict[str, Any] | None = None
    engine: str = "ollama"
    pruned: int = 0
    pruned_saved_s: float = 0.0


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
        if obj not in OBJECTIVES:
            raise TunerError(f"unknown objective '{obj}': choose from {', '.join(OBJECTIVES)}")
    if len(o.objectives) == 1 and OBJECTIVES[o.objectives[0]] == "minimize":
        raise TunerError(
            f"'{o.objectives[0]}' alone is not a useful objective (the tiniest output wins): "
            "use it with a throughput objective, e.g. --objectives decode_tps,ttft_p95"
        )
    if len(set(o.objectives)) != len(o.objectives):
        raise TunerError("--objectives lists the same objective twice")
    if o.concurrency < 1:
        raise TunerError(f"--concurrency must be at least 1 (got {o.concurrency})")
    if "aggregate_tps" in o.objectives and o.concurrency < 2:
        raise TunerError("objective 'aggregate_tps' needs --concurrency 2 or more")
    if o.validate < 0 or o.validate_rounds < 1:
        raise TunerError("--validate must be >= 0 and --validate-rounds >= 1")
    if o.sampler not in SAMPLERS:
        raise TunerError(f"unknown sampler '{o.sampler}': choose from {', '.join(SAMPLERS)}")


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
        for v in variants[1:]:
            vi = engine.model_info(v)
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
        if not gpu_telemetry:
            warnings.append(f"no NVIDIA GPU telemetry: {no_telemetry}")
        return _Prepared(engine, workload, space, model, server, env, has_gpu, warnings, gpu_telemetry, offload)
    except BaseException:
        engine.close()
        raise


def _refuse_unmeasurable_limits(o: TuneOptions, engine: Engine, gpu_telemetry: bool, reason: str) -> None:
    """A limit or objective that cannot be measured here is refused, never silently ignored."""
    if gpu_telemetry:
        return
    if "tokens_per_joule" in o.objectives:
        raise TunerError(
            f"objective 'tokens_per_joule' needs GPU energy telemetry, and there is none "
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
    """Machine and software facts recorded once per study."""
    env: dict[str, Any] = {
        "tuner_version": __version__,
        "engine": server.get("engine"),
        "server_version": server.get("version"),
        "model": info.name,
        "model_digest": info.digest,
        "quantization": info.quantization,
        "parameter_size": info.parameter_size,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
    try:
        from tuner.telemetry import host_environment, probe_gpus

        env["host"] = host_environment()
        probe = probe_gpus()
        env["gpus"] = probe.gpus if probe.available else []
        if not probe.available:
            env["gpu_unavailable_reason"] = probe.reason
    except Exception as e:  # telemetry must never stop a study
        env["telemetry_error"] = str(e)
    return env


def hardware_fingerprint(env: dict[str, Any]) -> dict[str, Any]:
    """What makes two workers' measurements comparable: CPU, cores, RAM, GPUs."""
    host = env.get("host") or {}
    ram = host.get("ram_total_mib")
    return {
        "cpu": host.get("cpu_model"),
        "cores": host.get("cpu_physical_cores"),
        "ram_gib": round(ram / 1024) if ram else None,
        "gpus": sorted(g.get("name", "") for g in env.get("gpus") or []),
    }


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


def make_sampler(name: str, space: SearchSpace, seed: int | None, n_objectives: int) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if n_objectives > 1:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, space.size())))
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=min(10, max(3, space.size() // 4)),
        multivariate=True,
        group=True,
        constant_liar=True,
    )


def _study_identity(o: TuneOptions, p: _Prepared) -> dict[str, Any]:
    return {
        "model": p.model,
        "engine": o.engine,
        "objectives": o.objectives,
        "space_hash": p.space.fingerprint(),
        "workload_hash": p.workload.fingerprint(),
    }


def open_study(o: TuneOptions, p: _Prepared) -> Any:
    """Create the study, or resume it if its model, space and workload match."""
    import optuna

    if o.grace_s <= o.heartbeat_s or o.heartbeat_s < 1:
        raise TunerError("--grace-period must be longer than --heartbeat-interval (both in seconds, >= 1)")
    storage = open_storage(o.storage, retry_failed=o.retry_failed, heartbeat_s=o.heartbeat_s, grace_s=o.grace_s)
    name = o.study_name or default_study_name(o, p.server)
    directions: Any = [OBJECTIVES[x] for x in o.objectives]
    sampler = make_sampler(o.sampler, p.space, o.seed, len(o.objectives))
    pruner = None
    if o.prune and len(o.objectives) == 1 and o.objectives[0] in PER_REQUEST:
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
    setattr(study, "_tuner_created", created)
    ident = _study_identity(o, p)
    attrs = study.user_attrs
    if "space_hash" not in attrs and not created:
        # Another worker created it a moment ago and is writing its attrs.
        for _ in range(50):
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
    else:
        for k, v in ident.items():
            study.set_user_attr(k, v)
        study.set_user_attr("host", p.server.get("host", ""))
        study.set_user_attr("managed_server", bool(p.server.get("managed")))
        study.set_user_attr("server_version", p.server.get("version", ""))
        study.set_user_attr("space", p.space.to_dict())
        study.set_user_attr("workload", p.workload.to_dict())
        study.set_user_attr("environment", p.environment)
        study.set_user_attr("hardware", hardware_fingerprint(p.environment))
        if p.offload is not None:
            study.set_user_attr("gpu_offload_source", p.offload.source)
        study.set_user_attr("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat())
    study.set_user_attr(
        "limits",
        {k: v for k, v in (("max_ttft_ms", o.max_ttft_ms), ("max_latency_ms", o.max_latency_ms),
                           ("max_vram_mib", o.max_vram_mib), ("max_power_w", o.max_power_w)) if v is not None},
    )
    if study.metric_names != o.objectives:
        import warnings

        # optuna-dashboard and trials_dataframe name the objectives from these, not "Objective 0".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(o.objectives))
    return study


def _hw_text(hw: dict[str, Any]) -> str:
    gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
    return f"{hw.get('cpu')}, {hw.get('cores')} cores, {hw.get('ram_gib')} GiB, {gpus}"


def starting_points(space: SearchSpace, has_gpu: bool, cores: int) -> list[dict[str, Any]]:
    """A few informed configs tried right after the baseline."""
    if not space.searched:
        return []
    prefs: dict[str, list[Any]] = {
        "num_ctx": [min(space["num_ctx"].values)] if "num_ctx" in space else [],
        "num_batch": [512, 256, 1024],
        "num_gpu": [max(space["num_gpu"].values)] if "num_gpu" in space and has_gpu else [0],
        "num_thread": [cores, max(1, cores // 2)],
    }
    point: dict[str, Any] = {}
    for p in space.searched:
        choice = next((v for v in prefs.get(p.name, []) if v in p.values), p.values[0])
        point[p.name] = choice
    return [point]


class _Runner:
    """The objective and its per-process state (what is loaded now)."""

    def __init__(self, o: TuneOptions, p: _Prepared, echo: Echo) -> None:
        self.o, self.p, self.echo = o, p, echo
        self.loaded_key: Any = None
        hw = hardware_fingerprint(p.environment)
        self.worker = {"hostname": platform.node(), "pid": os.getpid(), "gpus": hw["gpus"],
                       "server": p.server.get("host", "")}
        self.directions = [OBJECTIVES[x] for x in o.objectives]

    def _sampler(self) -> Any:
        from tuner.telemetry import TelemetrySampler

        return TelemetrySampler(
            interval_s=self.o.telemetry_interval_s,
            gpu_indices=self.o.gpus,
            server_pids=self.p.engine.server_pids(),
            gpus=self.p.gpu_telemetry,
        )

    def __call__(self, trial: Any) -> Any:
        o, p = self.o, self.p
        baseline = bool(trial.user_attrs.get("baseline"))
        if baseline:
            config: dict[str, Any] = {}
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
        trial.set_user_attr("config", {"model": model, "options": runner or {}, "server": server})
        trial.set_user_attr("worker", self.worker)
        try:
            restarted = p.engine.prepare(server)
            effective = getattr(p.engine, "effective_server_settings", lambda s: None)(server)
            if effective is not None and server:
                trial.set_user_attr("server_effective", effective)
            key = config_key(model, runner, server)
            reload = restarted or key != self.loaded_key
            m = measure_config(p.engine, model, runner, p.workload, reload=reload,
                               sampler=self._sampler(), on_request=self._reporter(trial, baseline))
        except LoadError as e:
            self.loaded_key = None
            return self._failed_load(trial, str(e))
        except ServerError as e:
            self.loaded_key = None
            trial.set_user_attr("error", str(e))
            self._wait_for_server()
            raise TrialFailedError(str(e)) from None
        except KeyboardInterrupt:
            self.loaded_key = None
            trial.set_user_attr("error", "interrupted (Ctrl-C)")
            raise
        self.loaded_key = key
        attrs: dict[str, Any] = dict(m.metrics)
        attrs.update(m.telemetry)
        attrs.update(p.engine.server_memory(model) or {})
        energy = m.telemetry.get("gpu_energy_j")
        tokens = sum(s.eval_tokens for s in m.samples)
        if energy:
            attrs["tokens_per_joule"] = round(tokens / energy, 6)
        attrs["reload_ms"] = m.reload_ms
        attrs["unexpected_reloads"] = m.unexpected_reloads
        attrs["done_reasons"] = sorted({s.done_reason for s in m.samples})
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("samples", [s.to_dict() for s in m.samples])
        if m.warmup is not None:
            trial.set_user_attr("warmup", m.warmup.to_dict())
        violations = self._constrain(trial, attrs, load_failed=False)
        trial.set_user_attr("violations", violations)
        if m.stopped_early:
            import optuna

            total = p.workload.repeats * len(p.workload.prompts)
            done = len(m.samples) // max(1, p.workload.concurrency)
            mean_s = sum(s.latency_ms for s in m.samples) / len(m.samples) / 1e3
            trial.set_user_attr("pruned_saved_s", round(max(0, total - done) * mean_s, 3))
            raise optuna.TrialPruned(f"worse than the best after {done} of {total} requests")
        values = []
        for obj, direction in zip(o.objectives, self.directions):
            v = objective_value(attrs, obj)
            if v is None:
                trial.set_user_attr("error", f"objective '{obj}' could not be measured")
                raise TrialFailedError(
                    f"objective '{obj}' could not be measured (no GPU energy counter?): "
                    "choose another --objective"
                )
            values.append(v)
        return values[0] if len(values) == 1 else values

    def _reporter(self, trial: Any, baseline: bool) -> Callable[[int, Any], bool] | None:
        """Report each request's objective value; ask the pruner whether to stop."""
        if len(self.o.objectives) != 1 or self.o.objectives[0] not in PER_REQUEST:
            return None
        metric = PER_REQUEST[self.o.objectives[0]]

        def on_request(step: int, sample: Any) -> bool:
            trial.report(float(getattr(sample, metric)), step)
            return bool(self.o.prune and not baseline and trial.should_prune())

        return on_request

    def _constrain(self, trial: Any, attrs: dict[str, Any], load_failed: bool) -> list[str]:
        """Set every constraint (same keys on every trial) and return the violations."""
        o = self.o
        out: list[str] = []
        values: dict[str, float] = {"load": 1.0 if load_failed else 0.0}
        checks = (
            ("ttft_p95_ms", o.max_ttft_ms, "ttft_ms_p95", "p95 TTFT", "ms"),
            ("latency_p95_ms", o.max_latency_ms, "latency_ms_p95", "p95 latency", "ms"),
            # NVML's peak when this machine sees the GPU, else what the server says the model holds.
            ("vram_mib", o.max_vram_mib,
             "gpu_mem_used_peak_mib" if "gpu_mem_used_peak_mib" in attrs else "server_vram_mib", "VRAM peak", "MiB"),
            ("power_w", o.max_power_w, "gpu_power_mean_w", "mean power", "W"),
        )
        for key, limit, metric, label, unit in checks:
            if limit is None:
                continue
            value = attrs.get(metric)
            # NaN counts as unmeasured: stored, it would read as feasible and break the dashboard's JSON.
            if load_failed or value is None or value != value:
                values[key] = 0.0 if not load_failed else 1.0
                continue
            excess = float(value) - limit
            # Normalised so that limits in ms and in W weigh alike in the sampler.
            values[key] = excess / limit
            if excess > 0:
                out.append(f"{label} {value:.0f} {unit} > {limit:g} {unit}")
        results.store_constraints(trial, values)
        return out

    def _failed_load(self, trial: Any, error: str) -> Any:
        trial.set_user_attr("error", error)
        trial.set_user_attr("violations", [f"failed to load: {error}"])
        self._constrain(trial, {}, load_failed=True)
        vals = [FAILED_SCORE[d] for d in self.directions]
        return vals[0] if len(vals) == 1 else vals

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


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """One line per finished trial, with the best feasible so far and an ETA."""

    def __init__(self, o: TuneOptions, echo: Echo, total: int) -> None:
        self.o, self.echo, self.total = o, echo, total
        self.done = 0
        self.started = time.monotonic()
        self.consecutive_failures = 0
        self.last_error = ""
        self.stopped_for_failures = False

    def __call__(self, study: Any, trial: Any) -> None:
        self.done += 1
        v = results.view(trial)
        obj = self.o.objectives[0]
        if trial.state.name == "PRUNED":
            self.consecutive_failures = 0
            saved = trial.user_attrs.get("pruned_saved_s", 0.0)
            status = f"pruned (clearly worse; saved {saved:.1f} s)"
            metric = f"decode {v.metrics.get('decode_tps_mean', 0):.1f} tok/s so far  "
        elif trial.state.name == "FAIL":
            self.consecutive_failures += 1
            self.last_error = v.error or "unknown error"
            status = f"FAILED: {self.last_error}"
            metric = ""
        else:
            self.consecutive_failures = 0
            metric = (
                f"decode {v.metrics.get('decode_tps_mean', 0):.1f} tok/s  "
                f"prefill {v.metrics.get('prefill_tps_mean', 0):.0f} tok/s  "
                f"p95 TTFT {v.metrics.get('ttft_ms_p95', 0):.0f} ms  "
                if not v.error else ""
            )
            status = "feasible" if v.feasible else "infeasible: " + "; ".join(v.violations)
        best = results.best_feasible(study)
        best_txt = f"best {best.values[0]:.2f} ({obj})" if best is not None and best.values else "no feasible yet"
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        self.echo(printable(
            f"[{self.done}/{self.total}] #{trial.number} {v.config_text()} | {metric}{status} | "
            f"{best_txt} | ETA {_fmt_eta(eta)}"
        ))
        if self.consecutive_failures >= self.o.max_consecutive_failures:
            self.stopped_for_failures = True
            study.stop()


def run_study(o: TuneOptions, echo: Echo = lambda s: None) -> StudySummary:
    """Run ``o.trials`` measured trials (creating or resuming the study) and summarise."""
    import warnings

    import optuna

    # Failed trials are reported on our own progress lines; Optuna's warnings repeat them
    # with a traceback each.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # heartbeats and grouped TPE are marked experimental; users need not see that per run.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    p = prepare(o, echo)
    try:
        study = open_study(o, p)
        searched = ", ".join(f"{x.name}[{len(x.values)}]" for x in p.space.searched) or "nothing (all fixed)"
        echo(printable(f"study '{study.study_name}' in {shown_url(o.storage)}"))
        echo(printable(f"model {p.model} on {p.server.get('engine')} {p.server.get('version')}; searching {searched}"))
        if p.space.fixed:
            echo(printable("fixed: " + ", ".join(f"{k}={v}" for k, v in p.space.fixed.items())))
        steps = p.workload.repeats * len(p.workload.prompts)
        if o.prune and len(o.objectives) == 1 and o.objectives[0] in PER_REQUEST and steps < 5:
            p.warnings.append(
                f"pruning needs at least 5 requests per trial to be significant (this workload has {steps}): "
                "raise --repeats to let it stop bad trials early"
            )
        for w in p.warnings:
            echo(printable(w))
        if p.offload is not None:
            echo(f"GPU offload ({p.offload.source}): {p.offload.detail}")
        if not p.has_gpu and "num_gpu" in p.space and p.space["num_gpu"].values == (0,):
            echo("no GPU offload: num_gpu fixed to 0 and left out of the search")
        existing = study.get_trials(deepcopy=False)
        created = getattr(study, "_tuner_created", False)
        # Only the worker that created the study (or a resumed study lacking one) queues the
        # baseline, so concurrent workers never measure it twice.
        if o.baseline and not any(t.user_attrs.get("baseline") for t in existing) and (created or existing):
            study.enqueue_trial({}, user_attrs={"baseline": True})
        if created:
            for point in starting_points(p.space, p.has_gpu, _physical_cores()):
                study.enqueue_trial(point, skip_if_exists=True)
        runner = _Runner(o, p, echo)
        progress = _Progress(o, echo, o.trials)
        study.optimize(runner, n_trials=o.trials, callbacks=[progress], catch=(TrialFailedError,))
        if progress.stopped_for_failures:
            raise StoppedError(
                f"stopped after {progress.consecutive_failures} consecutive failed trials "
                f"(last: {progress.last_error}); the study is intact: fix the cause and re-run to resume"
            )
        if o.validate > 1 and len(o.objectives) == 1:
            val = validate_top(study, p.engine, p.workload, p.model, o.objectives[0], o.validate,
                               o.validate_rounds, echo, sampler_factory=runner._sampler)
            if val is not None:
                study.set_user_attr("validation", val.to_dict())
        if o.roofline:
            _store_roofline(study, p)
        summary = summarise_study(study, o.objectives, shown_url(o.storage),
                                  trials_run=progress.done, space=p.space)
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
    best = results.best_feasible(study)
    if best is None:
        return
    v = results.view(best)
    decode = v.metrics.get("decode_tps_mean")
    if not decode:
        return
    try:
        size = p.engine.model_info(v.model or p.model).size_bytes
    except TunerError:
        return
    on_gpu = p.has_gpu and v.options.get("num_gpu", -1) != 0
    r = roofline(float(decode), size, on_gpu)
    if r is not None:
        study.set_user_attr("roofline", {**r.to_dict(), "trial": best.number, "text": r.describe()})


def summarise_study(study: Any, objectives: list[str], storage: str, trials_run: int = 0,
                    space: SearchSpace | None = None) -> StudySummary:
    """The run summary of a stored study."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.state.name.lower()
        if t.state.name == "COMPLETE" and not results.is_feasible(t):
            key = "infeasible"
        counts[key] = counts.get(key, 0) + 1
    best = results.best_feasible(study)
    feasible = best is not None
    if best is None:
        best = results.least_violating(study)
    base = results.baseline_trial(study)
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED"]
    pareto: list[results.TrialView] = []
    if len(objectives) > 1:
        pareto = [results.view(t) for t in study.best_trials if results.is_feasible(t)]
    return StudySummary(
        study_name=study.study_name,
        storage=storage,
        objectives=objectives,
        trials_run=trials_run,
        counts=counts,
        best=results.view(best) if best is not None else None,
        best_is_feasible=feasible,
        baseline=results.view(base) if base is not None else None,
        speedup=results.speedup(study, best) if best is not None and feasible else None,
        pareto=pareto,
        space=space.to_dict() if space else dict(study.user_attrs.get("space", {})),
        validation=study.user_attrs.get("validation"),
        engine=str(study.user_attrs.get("engine", "ollama")),
        roofline=study.user_attrs.get("roofline"),
        pruned=len(pruned),
        pruned_saved_s=sum(float(t.user_attrs.get("pruned_saved_s", 0.0)) for t in pruned),
    )
