"""The replay engine: serves the samples of a recorded grid instead of running a model.

A grid file (written by ``benchmarks/record_grid.py``) holds every configuration of a
search space measured for real, with each request's sample. Replaying it lets samplers be
compared on a real response surface in seconds. It is a benchmarking tool, never a default:
``--engine replay --model GRID.json[.gz]`` with the recorded prompts, ``--num-predict`` and
the recorded values as ``--param`` (the space must equal the grid).

Serving rules:

* a request is answered with the next recorded sample of the same configuration and prompt,
  cycling through the recorded repeats in order (deterministic);
* the first request after a configuration change carries the recorded reload cost as
  ``load_ms`` (added to its latency and TTFT, as a real reload would be);
* a request shorter than the recorded ``num_predict`` is the warm-up: it gets the recorded
  warm-up sample;
* ``runner_options=None`` (the study's baseline) gets the recorded baseline, if any;
* a configuration outside the grid raises ``LoadError("config not in the recorded grid: ...")``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.engines.base import Engine, GpuOffload, ModelInfo
from tuner.errors import LoadError, ModelNotFoundError, TunerError, WorkloadError
from tuner.metrics import RequestSample
from tuner.record import RELOAD_MS, TrialRecord, build_record

FORMAT = "ollama-tuner-grid/1"
_NONCE = re.compile(r"^\[request [0-9a-f]+\]\n")
#: Key of the recorded baseline (engine defaults, no options sent).
BASELINE_KEY: tuple[tuple[str, Any], ...] = (("__baseline__", True),)

ConfigKey = tuple[tuple[str, Any], ...]


def config_key(config: dict[str, Any]) -> ConfigKey:
    """A hashable, order-free key of one configuration."""
    return tuple(sorted(config.items()))


@dataclass
class GridEntry:
    """One recorded configuration: its warm-up, its measured samples, its reload cost."""

    config: dict[str, Any] | None
    samples: list[RequestSample]
    warmup: RequestSample | None
    reload_ms: float
    error: str | None = None

    def by_prompt(self, prompt: str) -> list[RequestSample]:
        return [s for s in self.samples if s.prompt == prompt]


@dataclass
class Grid:
    """A recorded grid, as read from its file."""

    path: str
    axes: dict[str, list[Any]]
    entries: dict[ConfigKey, GridEntry]
    prompts: dict[str, str]
    num_predict: int
    warmup_predict: int
    repeats: int
    model: dict[str, Any]
    source: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> GridEntry | None:
        return self.entries.get(BASELINE_KEY)

    def configs(self) -> list[GridEntry]:
        """The grid's configurations (the baseline left out)."""
        return [e for k, e in self.entries.items() if k != BASELINE_KEY]


def read_grid_json(path: str | Path) -> dict[str, Any]:
    """The raw JSON of a grid file (``.gz`` is decompressed)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ModelNotFoundError(f"cannot read recorded grid '{p}': {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise TunerError(f"'{p}' is not a recorded grid (invalid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TunerError(f"'{p}' is not a recorded grid (no \"format\": \"{FORMAT}\"): record one with benchmarks/record_grid.py")
    return data


def load_grid(path: str | Path) -> Grid:
    """Read a grid file written by ``benchmarks/record_grid.py``."""
    data = read_grid_json(path)
    entries: dict[ConfigKey, GridEntry] = {}
    for c in data.get("configs", []):
        cfg = c.get("config")
        entry = GridEntry(
            config=dict(cfg) if cfg is not None else None,
            samples=[RequestSample.from_dict(s) for s in c.get("samples", [])],
            warmup=RequestSample.from_dict(c["warmup"]) if c.get("warmup") else None,
            reload_ms=float(c.get(RELOAD_MS) or 0.0),
            error=c.get("error"),
        )
        entries[BASELINE_KEY if cfg is None else config_key(cfg)] = entry
    wl = data.get("workload", {})
    return Grid(
        path=str(path),
        axes={k: list(v) for k, v in data.get("axes", {}).items()},
        entries=entries,
        prompts={p["name"]: p["text"] for p in wl.get("prompts", [])},
        num_predict=int(wl.get("num_predict", 0)),
        warmup_predict=int(wl.get("warmup_predict", 0)),
        repeats=int(wl.get("repeats", 0)),
        model=dict(data.get("model", {})),
        source=dict(data.get("source", {})),
        machine=dict(data.get("machine", {})),
        raw=data,
    )


def write_prompts(grid: Grid, path: str | Path) -> Path:
    """Write the recorded prompts as a ``.jsonl`` prompts file (for ``--prompts``)."""
    p = Path(path)
    if p.suffix != ".jsonl":
        raise TunerError(f"write the recorded prompts to a .jsonl file (got '{p}'): names must survive")
    p.write_text("".join(json.dumps({"name": n, "prompt": t}) + "\n" for n, t in grid.prompts.items()),
                 encoding="utf-8")
    return p


class ReplayEngine(Engine):
    """Serves a recorded grid's samples; ``models=[grid_path]``."""

    name = "replay"

    def __init__(self, models: list[str]) -> None:
        if not models:
            raise TunerError("the replay engine needs a recorded grid: pass --model GRID.json (or .json.gz)")
        self.path = str(models[0])
        self.grid = load_grid(self.path)
        self.supported_params = tuple(self.grid.axes)
        self._server: dict[str, Any] = {}
        self._loaded: ConfigKey | None = None
        self._cursor: dict[tuple[ConfigKey, str], int] = {}
        self._texts = {text.strip(): name for name, text in self.grid.prompts.items()}

    # -- identity --------------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        src = self.grid.source
        return {
            "engine": "replay",
            "host": f"replay of {Path(self.path).name}",
            "version": f"replay of {src.get('engine', '?')} {src.get('version', '?')}",
            "source": {**src, "grid": self.path, "recorded_at": self.grid.raw.get("recorded_at")},
        }

    def _variants(self) -> list[str]:
        return [str(v) for v in self.grid.axes.get("variant", [])]

    def _known(self, model: str) -> bool:
        return model == self.path or model in self._variants()

    def model_info(self, model: str) -> ModelInfo:
        if not self._known(model):
            raise ModelNotFoundError(
                f"'{model}' is not in the recorded grid {self.path}: use the grid path or one of its variants"
            )
        m = self.grid.model
        return ModelInfo(
            name=str(model),
            architecture=str(m.get("architecture", "")),
            block_count=int(m.get("block_count", 0)),
            context_length=int(m.get("context_length", 0)),
            family=str(m.get("family", m.get("architecture", ""))),
            parameter_size=str(m.get("parameter_size", "")),
            quantization=str(m.get("quantization", "")),
            digest=str(m.get("digest", "")),
            size_bytes=int(m.get("size_bytes", 0)),
        )

    def variants(self, model: str) -> list[str]:
        recorded = self._variants()
        if not recorded:
            return [model]
        first = recorded[0] if model == self.path else model
        return [first] + [v for v in recorded if v != first]

    def gpu_offload(self, model: str, runner_options: dict[str, Any] | None) -> GpuOffload:
        if any(int(v) != 0 for v in self.grid.axes.get("num_gpu", [])):
            return GpuOffload(True, "recorded grid", "the recorded grid has GPU layers")
        return GpuOffload(False, "recorded grid", "the recorded grid was measured on the CPU only")

    def prepare(self, server_settings: dict[str, Any]) -> bool:
        self._server = dict(server_settings)
        return False

    # -- serving ---------------------------------------------------------------------
    def _key(self, model: str, runner_options: dict[str, Any] | None) -> ConfigKey:
        if runner_options is None:
            if self._server:
                raise LoadError(f"config not in the recorded grid: baseline with {self._server}")
            return BASELINE_KEY
        config = {**runner_options, **self._server}
        if "variant" in self.grid.axes:
            config["variant"] = self.variants(model)[0]
        return config_key(config)

    def _prompt_name(self, prompt: str) -> str:
        text = _NONCE.sub("", prompt, count=1).strip()
        name = self._texts.get(text)
        if name is None:
            raise WorkloadError(
                f"prompt not in the recorded grid {self.path}: replay needs the recorded prompts "
                "(write them with tuner.engines.replay.write_prompts and pass them as --prompts)"
            )
        return name

    def generate(
        self,
        model: str,
        prompt: str,
        runner_options: dict[str, Any] | None,
        predict_options: dict[str, Any],
    ) -> RequestSample:
        if not self._known(model):
            raise LoadError(f"config not in the recorded grid: model '{model}'")
        key = self._key(model, runner_options)
        entry = self.grid.entries.get(key)
        if entry is None:
            shown = ", ".join(f"{k}={v}" for k, v in key)
            raise LoadError(f"config not in the recorded grid: {shown}")
        if entry.error:
            raise LoadError(entry.error)
        name = self._prompt_name(prompt)
        n = int(predict_options.get("num_predict", self.grid.num_predict))
        changed = key != self._loaded
        self._loaded = key
        if n != self.grid.num_predict:
            if n != self.grid.warmup_predict or entry.warmup is None:
                raise WorkloadError(
                    f"the grid {self.path} was recorded with num_predict={self.grid.num_predict} "
                    f"(warm-up {self.grid.warmup_predict}); got {n}: pass --num-predict {self.grid.num_predict}"
                )
            sample = entry.warmup
        else:
            recorded = entry.by_prompt(name)
            if not recorded:
                raise LoadError(f"config not in the recorded grid: no sample of prompt '{name}'")
            i = self._cursor.get((key, name), 0)
            self._cursor[(key, name)] = i + 1
            sample = recorded[i % len(recorded)]
        # The recorded first request paid the recorded reload inside its latency; any served
        # sample pays it exactly when it is the first one after a change.
        load = entry.reload_ms if changed else 0.0
        extra = load - sample.load_ms
        return dataclasses.replace(
            sample,
            prompt="",
            repeat=0,
            load_ms=load,
            ttft_ms=sample.ttft_ms + extra,
            latency_ms=sample.latency_ms + extra,
            total_ms=sample.total_ms + extra,
        )

    def close(self) -> None:
        self._loaded = None


def true_metrics(entry: GridEntry) -> TrialRecord:
    """The record of one configuration over all its recorded samples, as a trial would store it."""
    config = entry.config or {}
    return build_record(str(config.get("model", "")), config.get("options"), {}, entry.samples)


__all__ = ["BASELINE_KEY", "FORMAT", "Grid", "GridEntry", "ReplayEngine", "config_key", "load_grid", "read_grid_json",
           "true_metrics", "write_prompts"]
