"""Everything ``tune`` takes, with its defaults: the CLI's defaults are read from here."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from tuner.record import DEFAULT_OBJECTIVE
from tuner.storage import GRACE_S, HEARTBEAT_S

#: Optuna samplers offered: the staged search (tuner/staged.py: variant screen at full
#: offload, then TPE), plain TPE, and random and grid (baselines).
SAMPLERS = ("staged", "tpe", "random", "grid")


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
    objectives: list[str] = field(default_factory=lambda: [DEFAULT_OBJECTIVE])
    max_ttft_ms: float | None = None
    max_latency_ms: float | None = None
    max_vram_mib: float | None = None
    #: GPU memory a winner should leave free (MiB); None: tuner.memory.default_headroom_mib.
    vram_headroom_mib: float | None = None
    max_power_w: float | None = None
    sampler: str = "staged"
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
    #: Wall-clock budget of the run in seconds (--max-time); None: no budget.
    max_time_s: float | None = None
    server_wait_s: float = 30.0
    retry_failed: bool = False
    allow_mixed_hardware: bool = False
    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S
    prune: bool = True
    prune_margin: float = 0.02
    validate: int = 3
    #: Re-validation rounds: at least ``validate_rounds``, more (up to ``validate_max_rounds``)
    #: until the leader's 95% interval overlaps no other config's.
    validate_rounds: int = 3
    validate_max_rounds: int = 8
    #: After the re-validation, measure what each of the winner's settings is worth
    #: (tuner/ablate.py), over ``validate_rounds`` interleaved rounds.
    ablation: bool = True
    roofline: bool = True
    #: Enqueue a few informed configs right after the baseline (benchmarks turn it off).
    starting_points: bool = True
    #: Start a new study with the best configs of earlier studies of the same model on the
    #: nearest hardware (tuner/warmstart.py), or of one chosen study, in this or another storage.
    warm_start: bool = True
    warm_start_from: str | None = None
    warm_start_storage: str | None = None
    #: A trial measured while other processes competed is measured again up to this many
    #: times, after waiting up to ``quiet_wait_s`` for the machine to quiet down.
    remeasure_contended: int = 1
    quiet_wait_s: float = 60.0
    #: Measure other processes' CPU/GPU use per trial (off: every measurement counts, as
    #: before interference detection; benchmarks compare the two).
    measure_interference: bool = True


def default(name: str) -> Any:
    """The default of option ``name`` (for the CLI's --help)."""
    f = next(f for f in fields(TuneOptions) if f.name == name)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(f"option {name} has no default")
