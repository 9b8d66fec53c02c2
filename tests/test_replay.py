"""The replay engine over a tiny synthetic grid: serving order, reloads, errors, a whole study."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tuner.engines import get_engine
from tuner.engines.replay import FORMAT, ReplayEngine, load_grid, write_prompts
from tuner.errors import LoadError, ModelNotFoundError, TunerError, WorkloadError
from tuner.study import TuneOptions, run_study
from tuner.workload import with_nonce

PROMPT = "Say hello."
PREDICT = {"num_predict": 4, "temperature": 0.0, "seed": 42}
#: decode tok/s of each config's two repeats; (2, 64) is the best.
RATES = {(1, 32): (10.0, 12.0), (1, 64): (11.0, 13.0), (2, 32): (20.0, 22.0), (2, 64): (30.0, 28.0)}
RELOAD_MS = 500.0


def _sample(tps: float, repeat: int, load_ms: float = 0.0, eval_tokens: int = 3) -> dict[str, Any]:
    eval_ms = eval_tokens / tps * 1e3
    return {"prompt": "p1", "repeat": repeat, "ttft_ms": 50.0 + load_ms, "latency_ms": 50.0 + eval_ms + load_ms,
            "prompt_tokens": 10, "prompt_eval_ms": 40.0, "eval_tokens": eval_tokens, "eval_ms": eval_ms,
            "load_ms": load_ms, "total_ms": 50.0 + eval_ms + load_ms, "done_reason": "length", "decode_tps": tps}


def _entry(config: dict[str, Any] | None, rates: tuple[float, ...]) -> dict[str, Any]:
    return {"config": config, "reload_ms": RELOAD_MS, "warmup": _sample(5.0, 0, RELOAD_MS, eval_tokens=1),
            "samples": [_sample(r, i) for i, r in enumerate(rates)], "load_average": [0.1, 0.1, 0.1]}


def write_grid(path: Path, compress: bool = False) -> Path:
    configs = [_entry({"num_ctx": 2048, "num_thread": t, "num_batch": b}, r) for (t, b), r in RATES.items()]
    data = {
        "format": FORMAT,
        "recorded_at": "2026-01-01T00:00:00+00:00",
        "source": {"engine": "llama-cpp", "version": "0.3.test", "model": "tiny.gguf"},
        "model": {"name": "tiny.gguf", "architecture": "gemma3", "block_count": 18, "context_length": 32768,
                  "parameter_size": "268M", "quantization": "Q4_K_M", "size_bytes": 253_000_000},
        "machine": {"load_average_start": [0.1, 0.1, 0.1]},
        "workload": {"prompts": [{"name": "p1", "text": PROMPT}], "repeats": 2, "num_predict": 4,
                     "warmup_predict": 2, "temperature": 0.0, "seed": 42},
        # A fixed num_ctx, as the space builder always has one.
        "axes": {"num_ctx": [2048], "num_thread": [1, 2], "num_batch": [32, 64]},
        "configs": [_entry(None, (15.0, 15.0))] + configs,
    }
    blob = json.dumps(data).encode()
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return path


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    return write_grid(tmp_path / "grid.json")


def test_model_facts_axes_and_identity(grid: Path) -> None:
    e = get_engine("replay", models=[str(grid)])
    assert isinstance(e, ReplayEngine)
    info = e.model_info(str(grid))
    assert (info.architecture, info.block_count, info.context_length, info.size_bytes) == ("gemma3", 18, 32768, 253_000_000)
    assert e.supported_params == ("num_ctx", "num_thread", "num_batch")
    assert e.variants(str(grid)) == [str(grid)]
    assert e.gpu_offload(e.path, None).offloads is False
    server = e.server_info()
    assert server["engine"] == "replay" and server["source"]["engine"] == "llama-cpp"
    with pytest.raises(ModelNotFoundError):
        e.model_info("other.gguf")


def test_serves_recorded_samples_in_order_cycling(grid: Path) -> None:
    e = ReplayEngine([str(grid)])
    opts = {"num_ctx": 2048, "num_thread": 2, "num_batch": 64}
    warm = e.generate(str(grid), with_nonce(PROMPT), opts, {**PREDICT, "num_predict": 2})
    assert warm.load_ms == RELOAD_MS and warm.eval_tokens == 1
    served = [e.generate(str(grid), with_nonce(PROMPT), opts, PREDICT) for _ in range(3)]
    assert [round(s.decode_tps, 6) for s in served] == [30.0, 28.0, 30.0]
    assert [s.load_ms for s in served] == [0.0, 0.0, 0.0]


def test_first_request_after_a_change_pays_the_recorded_reload(grid: Path) -> None:
    e = ReplayEngine([str(grid)])
    a = e.generate(str(grid), PROMPT, {"num_ctx": 2048, "num_thread": 1, "num_batch": 32}, PREDICT)
    b = e.generate(str(grid), PROMPT, {"num_ctx": 2048, "num_thread": 1, "num_batch": 32}, PREDICT)
    c = e.generate(str(grid), PROMPT, {"num_ctx": 2048, "num_thread": 1, "num_batch": 64}, PREDICT)
    assert (a.load_ms, b.load_ms, c.load_ms) == (RELOAD_MS, 0.0, RELOAD_MS)
    recorded_latency = 50.0 + 3 / 10.0 * 1e3  # the first repeat of (1, 32)
    assert a.latency_ms == pytest.approx(recorded_latency + RELOAD_MS)
    assert a.ttft_ms == pytest.approx(50.0 + RELOAD_MS)


def test_baseline_and_gzip(tmp_path: Path) -> None:
    path = write_grid(tmp_path / "grid.json.gz", compress=True)
    e = ReplayEngine([str(path)])
    assert e.generate(str(path), PROMPT, None, PREDICT).decode_tps == pytest.approx(15.0)


def test_off_grid_config_is_a_load_error(grid: Path) -> None:
    e = ReplayEngine([str(grid)])
    with pytest.raises(LoadError, match="config not in the recorded grid: .*num_thread=3"):
        e.generate(str(grid), PROMPT, {"num_ctx": 2048, "num_thread": 3, "num_batch": 32}, PREDICT)
    e.prepare({"flash_attention": "on"})
    with pytest.raises(LoadError, match="config not in the recorded grid"):
        e.generate(str(grid), PROMPT, {"num_ctx": 2048, "num_thread": 1, "num_batch": 32}, PREDICT)


def test_other_workloads_are_refused_loudly(grid: Path) -> None:
    e = ReplayEngine([str(grid)])
    with pytest.raises(WorkloadError, match="prompt not in the recorded grid"):
        e.generate(str(grid), "another prompt", {"num_ctx": 2048, "num_thread": 1, "num_batch": 32}, PREDICT)
    with pytest.raises(WorkloadError, match="num_predict=4"):
        e.generate(str(grid), PROMPT, {"num_ctx": 2048, "num_thread": 1, "num_batch": 32}, {**PREDICT, "num_predict": 64})


def test_not_a_grid(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(TunerError, match="not a recorded grid"):
        ReplayEngine([str(bad)])
    with pytest.raises(TunerError, match="needs a recorded grid"):
        ReplayEngine([])


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_study_over_the_replay_finds_the_recorded_best(grid: Path, tmp_path: Path, sampler: str) -> None:
    prompts = write_prompts(load_grid(grid), tmp_path / "prompts.jsonl")
    summary = run_study(TuneOptions(
        model=[str(grid)], engine="replay", storage="memory", study_name="replay", trials=12, seed=0,
        sampler=sampler, prune=False, validate=0, roofline=False, repeats=2, num_predict=4,
        prompts_file=str(prompts), params={"num_ctx": [2048], "num_thread": [1, 2], "num_batch": [32, 64]},
    ))
    assert summary.best is not None and summary.best_is_feasible
    assert summary.best.options == {"num_ctx": 2048, "num_thread": 2, "num_batch": 64}
    assert summary.best.value == pytest.approx(29.0)
    assert summary.baseline is not None and summary.baseline.value == pytest.approx(15.0)


def test_the_committed_cpu_grid_covers_its_axes() -> None:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "cpu-grid-gemma3-270m.json.gz"
    assert path.exists(), "the recorded CPU grid is part of the repository"
    grid = load_grid(path)
    assert len(grid.configs()) == math.prod(len(v) for v in grid.axes.values())
    assert grid.baseline is not None
    for e in grid.configs():
        assert e.error or len(e.samples) == grid.repeats * len(grid.prompts)
    e = ReplayEngine([str(path)])
    assert e.model_info(str(path)).architecture == "gemma3"
    assert not e.gpu_offload(e.path, None).offloads
