"""Telemetry inside the study loop: stored per trial, limits as constraints, energy objectives,
multi-objective Pareto sets — with a scripted NVML (no GPU on the test machines)."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama
from test_telemetry import FakeNvml, constant_gpu, mem

from tuner.record import read_record
from tuner import gpu_telemetry, results
from tuner.study import TuneOptions, run_study

STORAGE = "sqlite:///t.db"


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    monkeypatch.setattr(gpu_telemetry, "_nvml_ready", False)
    return FakeNvml([constant_gpu(mem=[mem(1000), mem(3000)])]).install(monkeypatch)


def opts(fake: FakeOllama, **kw: Any) -> TuneOptions:
    base: dict[str, Any] = dict(model=["gemma3:1b"], host=fake.url, trials=3, repeats=1, num_predict=8,
                                storage=STORAGE, seed=1, validate=0, roofline=False, prune=False,
                                telemetry_interval_s=0.01,
                                params={"num_thread": [1, 2, 4], "num_ctx": [2048], "num_batch": [512]})
    base.update(kw)
    return TuneOptions(**base)


def _trials() -> list[Any]:
    storage = optuna.storages.RDBStorage(STORAGE)
    name = optuna.get_all_study_names(storage)[0]
    return optuna.load_study(study_name=name, storage=storage).trials


def test_every_trial_carries_gpu_and_host_telemetry(fake: FakeOllama, nvml: FakeNvml) -> None:
    # Requests of tens of ms: CPU times tick in 10 ms steps, so a shorter window can read 0 s.
    fake.time_scale = 0.02
    lines: list[str] = []
    run_study(opts(fake), echo=lines.append)
    assert not any("no NVIDIA GPU telemetry" in line for line in lines)
    for t in _trials():
        a = {**t.user_attrs, **read_record(t).flat()}
        assert a["gpu0_power_mean_w"] == 150.0 and a["gpu_power_mean_w"] == 150.0
        assert a["gpu0_mem_used_peak_mib"] == 3000.0 and a["gpu0_mem_increase_mib"] >= 0.0
        assert a["gpu0_samples"] >= 2 and a["host_samples"] >= 2
        assert a["gpu_energy_j"] > 0
        assert a["tokens_per_joule"] == pytest.approx(sum(s["eval_tokens"] for s in a["samples"]) / a["gpu_energy_j"])
        assert "host_cpu_util_mean_pct" in a and "host_mem_used_peak_mib" in a
    env = optuna.load_study(study_name=optuna.get_all_study_names(STORAGE)[0], storage=STORAGE).user_attrs["environment"]
    assert env["gpus"][0]["name"] == "Fake RTX" and env["gpus"][0]["driver_version"] == "550.54.15"
    for key in ("tuner_version", "server_version", "model_digest", "quantization", "os"):
        assert env[key]
    assert env["host"]["cpu_logical_cores"] >= 1 and env["host"]["ram_total_mib"] > 0


def test_vram_and_power_limits_are_constraints(fake: FakeOllama, nvml: FakeNvml) -> None:
    summary = run_study(opts(fake, max_vram_mib=2500, max_power_w=100))
    for t in _trials():
        assert results.constraints(t)["vram_mib"] > 0 and results.constraints(t)["power_w"] > 0
        assert not results.is_feasible(t)
        assert any("VRAM peak 3000 MiB > 2500 MiB" in v for v in t.user_attrs["violations"])
    assert not summary.best_is_feasible


def test_tokens_per_joule_objective(fake: FakeOllama, nvml: FakeNvml) -> None:
    run_study(opts(fake, objectives=["tokens_per_joule"]))
    for t in _trials():
        assert t.values[0] == pytest.approx(t.user_attrs["tokens_per_joule"])


def test_multi_objective_prints_the_pareto_set(fake: FakeOllama, gpu: None) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "6", "--repeats", "1", "--num-predict", "8",
               "--storage", STORAGE, "--objectives", "decode_tps,ttft_p95", "--param", "num_thread=1,2,4",
               "--param", "num_gpu=0,27", "--seed", "2", "--no-roofline")
    assert r.exit_code == 0, r.output
    assert "Pareto set (decode_tps, ttft_p95):" in r.output
    study = optuna.load_study(study_name=optuna.get_all_study_names(STORAGE)[0], storage=STORAGE)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    front = {t.number for t in study.best_trials}
    for n in front:
        assert f"  #{n}: decode_tps=" in r.output


def test_no_gpu_is_one_warning_line_and_host_telemetry_still_collected(fake: FakeOllama) -> None:
    lines: list[str] = []
    run_study(opts(fake, trials=1), echo=lines.append)
    assert sum("no NVIDIA GPU telemetry:" in line for line in lines) == 1
    a = read_record(_trials()[0]).flat()
    assert not any(k.startswith("gpu") for k in a)
    assert a["host_samples"] >= 2


def test_journal_file_storage(fake: FakeOllama, tmp_path: Any) -> None:
    url = f"journal://{tmp_path}/j/tuner.log"
    run_study(opts(fake, storage=url, trials=2))
    run_study(opts(fake, storage=url, trials=1))
    r = invoke("studies", "--storage", url)
    assert r.exit_code == 0 and "gemma3:1b@127.0.0.1" in r.output
    r = invoke("show", "--storage", url)
    assert r.exit_code == 0 and "Best feasible configuration" in r.output
