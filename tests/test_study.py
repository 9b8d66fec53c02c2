"""The study loop end to end against the fake Ollama server, through the real client."""

from __future__ import annotations

import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner import record, results
from tuner.errors import ServerError, StoppedError, TunerError
from tuner.record import read_record
from tuner.study import TuneOptions, run_study

STORAGE = "sqlite:///t.db"


def _load(name: str | None = None) -> Any:
    from tuner.storage import open_storage

    return results.load_study(open_storage(STORAGE), name)


def _flat(t: Any) -> dict[str, Any]:
    """Every stored value of a trial under its documented name, however it is grouped."""
    return read_record(t).flat()


def opts(fake: FakeOllama, **kw: Any) -> TuneOptions:
    base: dict[str, Any] = dict(
        model=["gemma3:1b"], host=fake.url, trials=4, repeats=2, num_predict=16,
        storage=STORAGE, seed=1, params={"num_thread": [1, 2, 4, 8]},
    )
    base.update(kw)
    return TuneOptions(**base)


def test_finds_the_optimum_region(fake: FakeOllama, gpu: None) -> None:
    o = opts(fake, trials=40, repeats=1, params={"num_thread": [1, 2, 4, 8], "num_ctx": [2048, 4096, 8192]})
    summary = run_study(o)
    best = optuna.load_study(study_name=summary.study_name, storage=STORAGE)
    optimum = FakeOllama.optimum(num_ctx=[2048, 4096, 8192], num_batch=[2**i for i in range(5, 12)],
                                 num_gpu=range(-1, 28), num_thread=[1, 2, 4, 8])
    top = results.best_feasible(best)
    assert top is not None
    assert top.values[0] >= 0.9 * optimum["decode_tps"]
    assert top.options["num_gpu"] >= 24
    assert summary.speedup is not None and summary.speedup > 1.3


def test_measured_metrics_equal_what_the_server_reported(fake: FakeOllama, gpu: None) -> None:
    run_study(opts(fake, trials=3))
    study = _load()
    for t in study.trials:
        v = results.view(t)
        if v.error:
            continue
        prefill, decode = fake.speed(v.model, v.options or None)
        for s in t.user_attrs["samples"]:
            assert s["eval_tokens"] == 16
            # eval_duration is whole nanoseconds, so the rate matches to ~1e-6
            assert math.isclose(s["decode_tps"], decode, rel_tol=1e-5)
        assert math.isclose(t.user_attrs["decode_tps_mean"], decode, rel_tol=1e-4)
        assert _flat(t)["n_requests"] == 2 * 2  # two built-in prompts, two repeats
        assert t.values[0] == pytest.approx(t.user_attrs["decode_tps_mean"])


def test_warmups_only_after_reloads_and_every_prompt_has_a_fresh_nonce(fake: FakeOllama) -> None:
    # Same config twice in a row: the second trial must not warm up again.
    o = opts(fake, trials=3, baseline=False, params={"num_ctx": [2048], "num_batch": [512], "num_thread": [2],
                                                      "num_gpu": [27], "variant": ["gemma3:1b"]})
    run_study(o)
    study = _load()
    warm = [t.number for t in study.trials if "warmup" in t.user_attrs]
    assert warm == [0]
    assert len(fake.loads) == 1
    gens = fake.prompt_requests()
    warmups = [g for g in gens if g["options"]["num_predict"] == 8]
    assert len(warmups) == 1
    prompts = [g["prompt"] for g in gens]
    assert len(set(prompts)) == len(prompts)
    assert all(p.startswith("[request ") for p in prompts)
    # measured requests keep the model loaded: no load beyond the warm-up's
    assert all(_flat(t)["unexpected_reloads"] == 0 for t in study.trials)


def test_reload_cost_is_recorded_separately(fake: FakeOllama) -> None:
    run_study(opts(fake, trials=2))
    for t in _load().trials:
        assert t.user_attrs["reload_ms"] > 1000  # the fake's synthetic load: >= 1.2 s
        assert _flat(t)["load_ms_max"] < 1  # measured requests exclude the load


def test_oom_trials_are_recorded_as_infeasible(fake: FakeOllama, gpu: None) -> None:
    fake.memory_budget_mib = 4000  # fp16 at 32k with batch 2048 needs 4.2 GB
    o = opts(fake, trials=2, params={"variant": ["gemma3:1b-it-fp16"], "num_ctx": [32768], "num_batch": [2048],
                                     "num_gpu": [27], "num_thread": [2]})
    summary = run_study(o)
    study = _load()
    failed = [t for t in study.trials if t.user_attrs.get("error")]
    assert failed, "the fp16 / 32k / full-offload config must not fit the fake's 4 GB"
    for t in failed:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert record.constraints(t)["load"] == 1.0
        assert "memory" in t.user_attrs["error"]
        assert not results.is_feasible(t)
    assert summary.best is not None and summary.best.baseline  # only the baseline ran


def test_constraints_exclude_violating_trials_from_best(gpu: None) -> None:
    with FakeOllama(time_scale=0.01) as fake:
        o = opts(fake, trials=8, repeats=1, max_ttft_ms=40.0, sampler="tpe",
                 params={"variant": ["gemma3:1b", "gemma3:1b-it-fp16"], "num_gpu": [0, 27],
                         "num_thread": [1], "num_ctx": [2048]})
        summary = run_study(o)
    study = _load()
    slow = [t for t in study.trials if t.user_attrs.get("ttft_ms_p95", 0) > 40.0]
    assert slow, "fp16 on CPU must exceed a 40 ms p95 TTFT at this time scale"
    for t in slow:
        assert not results.is_feasible(t)
        assert record.constraints(t)["ttft_p95_ms"] > 0
        assert any("TTFT" in v for v in t.user_attrs["violations"])
    best = results.best_feasible(study)
    assert best is not None and (best.stat("ttft_ms", "p95") or 0) <= 40.0
    assert summary.best is not None and summary.best.number == best.number


def test_no_feasible_trial_shows_the_least_violating(fake: FakeOllama) -> None:
    summary = run_study(opts(fake, trials=2, max_ttft_ms=0.001))
    assert not summary.best_is_feasible
    assert summary.best is not None and summary.best.violations


def test_resume_adds_trials_and_keeps_one_baseline(fake: FakeOllama) -> None:
    run_study(opts(fake, trials=3))
    summary = run_study(opts(fake, trials=2))
    study = _load()
    assert len(study.trials) == 5
    assert summary.trials_run == 2
    assert sum(1 for t in study.trials if t.user_attrs.get("baseline")) == 1


def test_study_reused_with_a_different_space_is_refused(fake: FakeOllama) -> None:
    run_study(opts(fake, trials=1))
    from tuner.errors import StudyError

    with pytest.raises(StudyError, match="different search space: pass --study NEW_NAME"):
        run_study(opts(fake, trials=1, params={"num_thread": [1, 2]}))
    assert [t.state.name for t in _load().trials if t.state.name != "WAITING"] == ["COMPLETE"]


def test_truncated_stream_fails_the_trial_and_the_study_goes_on(fake: FakeOllama) -> None:
    fake.truncate_next_stream(after_chunks=2)
    run_study(opts(fake, trials=3, server_wait_s=1))
    study = _load()
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 2
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "final message" in failed.user_attrs["error"] or "broke off" in failed.user_attrs["error"]


def test_consecutive_failures_stop_the_study_intact(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.engines.ollama import OllamaEngine
    from tuner.errors import ServerError, TunerError

    def boom(self: Any, *a: Any, **k: Any) -> Any:
        raise ServerError("connection reset")

    run_study(opts(fake, trials=1))
    monkeypatch.setattr(OllamaEngine, "generate", boom)
    with pytest.raises(TunerError, match="stopped after 3 consecutive failed trials"):
        run_study(opts(fake, trials=10, server_wait_s=0))
    study = _load()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "FAIL"]


def test_ctrl_c_keeps_completed_trials_and_resumes(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.engines.ollama import OllamaEngine

    real = OllamaEngine.generate
    calls = {"n": 0}

    def interrupt_on_tenth(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(OllamaEngine, "generate", interrupt_on_tenth)
    args = ["--model", "gemma3:1b", "--host", fake.url, "--trials", "5", "--repeats", "1",
            "--num-predict", "8", "--storage", STORAGE, "--param", "num_thread=1,2", "--sampler", "tpe"]
    r = invoke(*args)
    assert r.exit_code == 130
    assert "Interrupted" in r.output and "resume" in r.output
    study = _load()
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") >= 2 and states[-1] == "FAIL"
    assert study.trials[-1].user_attrs["error"] == "interrupted (Ctrl-C)"
    monkeypatch.setattr(OllamaEngine, "generate", real)
    r = invoke(*args[:4], "--trials", "2", *args[6:])
    assert r.exit_code == 0, r.output
    assert len(_load().trials) == len(states) + 2


def test_variants_come_from_tags_of_the_same_model(fake: FakeOllama) -> None:
    from tuner.engines.ollama import OllamaEngine

    eng = OllamaEngine(fake.url)
    v = eng.variants("gemma3:1b")
    assert v[0] == "gemma3:1b"
    # gemma3:1b-it-q4_K_M has the same digest as gemma3:1b: not a separate variant
    assert set(v) == {"gemma3:1b", "gemma3:1b-it-qat", "gemma3:1b-it-q8_0", "gemma3:1b-it-fp16"}
    assert all(not x.startswith("llama") for x in v)


def test_space_is_built_from_the_model(fake: FakeOllama, gpu: None) -> None:
    from tuner.study import prepare

    p = prepare(opts(fake, params={}), lambda s: None)
    space = p.space.to_dict()
    p.engine.close()
    assert space["num_gpu"] == list(range(-1, 28))  # block_count 26 + output layer, plus auto
    assert space["num_ctx"][-1] == 32768 and all(c >= 1024 for c in space["num_ctx"])
    assert space["num_batch"] == [32, 64, 128, 256, 512, 1024, 2048]
    assert space["num_thread"][0] == 0


def test_a_cpu_only_server_fixes_num_gpu_to_zero() -> None:
    from tuner.study import prepare

    with FakeOllama(memory_budget_mib=0) as cpu_only:  # /api/ps reports size_vram 0
        p = prepare(opts(cpu_only, params={}, context=8000), lambda s: None)
        p.engine.close()
    assert p.space["num_gpu"].values == (0,) and p.space["num_gpu"].fixed
    assert p.offload is not None and p.offload.source == "ollama-ps" and not p.offload.offloads
    assert min(p.space["num_ctx"].values) == 8192  # never below --context


def test_pulls_missing_variants_with_progress(fake: FakeOllama) -> None:
    from fake_ollama import default_models

    with FakeOllama(models=[m for m in default_models() if m.name != "gemma3:1b-it-q8_0"]) as f:
        lines: list[str] = []
        run_study(opts(f, trials=1, variants=["gemma3:1b-it-q8_0"]), echo=lines.append)
        assert any("pulling gemma3:1b-it-q8_0" in line for line in lines)
        assert any("success" in line for line in lines)
        assert "gemma3:1b-it-q8_0" in f.model_names()


def test_pruning_stops_clearly_worse_trials_and_keeps_what_they_measured(fake: FakeOllama, gpu: None) -> None:
    o = opts(fake, trials=10, repeats=3, validate=0,
             params={"variant": ["gemma3:1b", "gemma3:1b-it-fp16"], "num_gpu": [0, 27], "num_thread": [1, 4],
                     "num_ctx": [2048], "num_batch": [512]})
    summary = run_study(o)
    study = _load()
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and summary.pruned == len(pruned)
    for t in pruned:
        n = len(t.user_attrs["samples"])
        assert 3 <= n < 6  # stopped before the workload's 3 repeats x 2 prompts
        assert t.user_attrs["decode_tps_mean"] > 0
        assert _flat(t)["pruned_saved_s"] >= 0
        assert len(t.intermediate_values) == n
    # the winner is never pruned
    assert results.best_feasible(study).state == "COMPLETE"


def test_winner_revalidation_is_interleaved_and_stored(fake: FakeOllama, gpu: None) -> None:
    # The ablation would follow with its own rounds: this looks at the re-validation's.
    o = opts(fake, trials=5, repeats=1, prune=False, validate=3, validate_rounds=2, ablation=False,
             params={"num_gpu": [0, 27], "num_thread": [1, 4], "num_ctx": [2048], "num_batch": [512],
                     "variant": ["gemma3:1b"]})
    n_before = 0
    summary = run_study(o)
    study = _load()
    val = study.user_attrs["validation"]
    assert val["rounds"] == 2 and len(val["entries"]) == 3
    assert summary.validation is not None
    assert val["winner"] == results.best_feasible(study).number
    for e in val["entries"]:
        assert len(e["values"]) == 2 and e["ci95"][0] <= e["mean"] <= e["ci95"][1]
    # the last requests alternate configs, each round every config once, the order turned by one
    # from round to round (A B C, B C A: no config always follows the same one); each is
    # preceded by its warm-up
    measured = [g for g in fake.prompt_requests()[n_before:] if g["options"]["num_predict"] != 8]
    tail = [(g["options"].get("num_gpu"), g["options"].get("num_thread")) for g in measured[-12:]]
    per_round = [tail[i] for i in range(0, 12, 2)]
    assert len(set(per_round[:3])) == 3 and set(per_round[:3]) == set(per_round[3:])
    assert per_round[3:] == per_round[1:3] + per_round[:1]


def test_roofline_is_stored_with_the_study(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.roofline as rl

    monkeypatch.setattr(rl, "cpu_bandwidth_gbs", lambda *a, **k: 50.0)
    # A CPU-only server: a server that offloads to a GPU gets no CPU ceiling.
    with FakeOllama(memory_budget_mib=0) as cpu_only:
        run_study(opts(cpu_only, trials=2))
    roof = _load().user_attrs["roofline"]
    assert roof["bandwidth_gbs"] == 50.0 and roof["device"] == "CPU"
    assert roof["ceiling_tps"] == pytest.approx(50e9 / roof["model_bytes"])
    assert roof["share"] == pytest.approx(roof["decode_tps"] / roof["ceiling_tps"], rel=1e-3)


def test_concurrency_sends_simultaneous_streams() -> None:
    # Requests slow enough (tens of ms) that the streams overlap even on a busy machine.
    with FakeOllama(time_scale=0.02) as fake:
        run_study(opts(fake, trials=2, repeats=1, concurrency=3, objectives=["aggregate_tps"], validate=0,
                       params={"num_thread": [1, 2, 4, 8], "num_gpu": [0]}))
    study = _load()
    for t in study.trials:
        assert _flat(t)["n_requests"] == 2 * 3
        assert _flat(t)["concurrency"] == 3
        assert t.user_attrs["aggregate_tps_mean"] > 0
        assert t.values[0] == pytest.approx(t.user_attrs["aggregate_tps_mean"])
    # the streams overlapped: the fake serves one at a time and reports the queueing in
    # load_duration, so all but the first stream of a batch waited
    samples = study.trials[-1].user_attrs["samples"]
    waits = sorted(s["load_ms"] for s in samples if s["prompt"] == "chat")
    assert waits[-1] > 10 * max(waits[0], 0.05)


@pytest.mark.parametrize("given,expected", [
    (None, "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://0.0.0.0:11434"),
    ("localhost:11500", "http://localhost:11500"),
    (":11434", "http://127.0.0.1:11434"),
    ("http://example.com", "http://example.com:80"),
    ("https://example.com", "https://example.com:443"),
    ("https://example.com:8443/ollama/", "https://example.com:8443/ollama"),
    ("[::1]:11434", "http://[::1]:11434"),
])
def test_ollama_host_forms(given: str | None, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.engines.ollama import normalise_host

    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert normalise_host(given) == expected


def _no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.telemetry as telemetry

    monkeypatch.setattr(telemetry, "probe_gpus", lambda indices=None: telemetry.GpuProbe(
        available=False, reason="NVML library not found (no NVIDIA driver installed?)"))


def test_the_gpu_is_whatever_the_server_says_it_is(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU NVML cannot see (WSL, Vulkan, a container): the server's /api/ps decides.
    _no_nvml(monkeypatch)
    lines: list[str] = []
    summary = run_study(opts(fake, trials=30, repeats=1, params={}, validate=0), echo=lines.append)
    assert "GPU offload (ollama-ps): the server offloads to a GPU: /api/ps reports " in "\n".join(lines)
    assert summary.space["num_gpu"] == list(range(-1, 28))
    study = _load()
    assert study.user_attrs["gpu_offload_source"] == "ollama-ps"
    assert summary.speedup is not None and summary.speedup > 1.2
    best = results.best_feasible(study)
    assert best.options["num_gpu"] >= 27
    measured = [t for t in study.trials if t.state.name == "COMPLETE" and not t.user_attrs.get("error")]
    for t in measured:
        used = fake.memory(t.user_attrs["config"]["model"], t.user_attrs["config"]["options"] or None)
        assert t.user_attrs["server_vram_mib"] == pytest.approx(used["gpu_mib"], abs=0.1)
    # The probe's load is undone; the baseline measured its own load.
    assert study.trials[0].user_attrs["reload_ms"] > 1000


def test_vram_limit_uses_the_servers_report_without_nvml(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_nvml(monkeypatch)
    run_study(opts(fake, trials=3, params={"num_gpu": [0, 27], "num_thread": [4], "variant": ["gemma3:1b"],
                                           "num_ctx": [2048], "num_batch": [512]}, sampler="grid",
                   max_vram_mib=300, validate=0, baseline=False))
    study = _load()
    for t in study.trials:
        vram = t.user_attrs["server_vram_mib"]
        assert results.is_feasible(t) == (vram <= 300), (t.params, vram)
    assert {t.params["num_gpu"] for t in study.trials} == {0, 27}


def test_limits_that_cannot_be_measured_are_refused(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_nvml(monkeypatch)
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--max-power-w", "200")
    assert r.exit_code == 2
    assert r.output == ("Error: --max-power-w needs GPU power telemetry (NVML), and there is none (NVML library "
                        "not found (no NVIDIA driver installed?)): drop --max-power-w, or run the tuner on the "
                        "machine with the NVIDIA GPU\n")
    assert fake.prompt_requests() == [] and not Path("studies/tuner.db").exists()


def test_the_server_is_left_as_it_was(fake: FakeOllama) -> None:
    import ollama

    client = ollama.Client(host=fake.url)
    fake.max_loaded_models = 3
    client.generate(model="gemma3:1b-it-qat", prompt="", keep_alive="1h")  # the user's own model
    run_study(opts(fake, trials=3, params={"variant": ["gemma3:1b", "gemma3:1b-it-q8_0"], "num_thread": [4]}))
    assert [m["model"] for m in fake.loaded_models()] == ["gemma3:1b-it-qat"]


def test_context_reaches_the_baseline(fake: FakeOllama) -> None:
    run_study(opts(fake, trials=1, context=8192))
    base = _load().trials[0]
    assert base.user_attrs["baseline"] and base.user_attrs["config"]["options"] == {"num_ctx": 8192}
    first = fake.generate_requests()[0]
    assert first["options"]["num_ctx"] == 8192


def test_busy_server_is_a_failed_trial_not_an_infeasible_config(fake: FakeOllama, gpu: None) -> None:
    fake.fail_next(1, status=503, error="server busy, please try again. maximum pending requests exceeded")
    run_study(opts(fake, trials=2, server_wait_s=1))
    t0 = _load().trials[0]
    assert t0.state.name == "FAIL" and "busy (503)" in t0.user_attrs["error"]


def test_a_server_that_never_generates_stops_the_run() -> None:
    # /api/version answers at once; after the first load, /api/generate never answers.
    with FakeOllama() as fake:
        fake.hang(120, paths=["/api/generate"], after_generates=2)
        with pytest.raises(StoppedError) as e:
            run_study(opts(fake, trials=3, timeout_s=0.5, num_predict=4))
    assert str(e.value) == (
        "the server is not generating: none of the 2 trials run got an answer within --timeout 0.5 s, though "
        "it answers /api/version; check the server's log (a hung runner, a stuck GPU), then run the same "
        "command again to resume")
    trials = _load().trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["error"].startswith("server did not answer in 0.5 s (") for t in trials)
    assert not any("load" in record.constraints(t) for t in trials)


def test_a_hung_server_fails_trials_and_never_makes_a_config_infeasible(fake: FakeOllama, gpu: None) -> None:
    # The baseline (warm-up + 2 requests) is answered, then the server freezes entirely.
    fake.hang(120, after_generates=3)
    with pytest.raises(TunerError) as e:
        run_study(opts(fake, trials=5, repeats=1, timeout_s=1, server_wait_s=1, validate=0, roofline=False,
                       sampler="tpe"))
    assert str(e.value).startswith("stopped after 3 consecutive failed trials (last: Ollama at ")
    assert "stopped answering" in str(e.value)
    trials = _load().trials
    assert trials[0].state.name == "COMPLETE" and results.is_feasible(trials[0])
    assert [t.state.name for t in trials[1:]] == ["FAIL"] * 3
    for t in trials[1:]:
        assert "stopped answering: no reply to a generate request within --timeout 1 s" in t.user_attrs["error"]
        assert "the server is hung or overloaded" in t.user_attrs["error"]


def test_a_server_that_hangs_from_the_start_is_named_before_any_trial() -> None:
    with FakeOllama() as fake:
        fake.hang(120, paths=["/api/generate"])
        with pytest.raises(ServerError) as e:
            run_study(opts(fake, trials=3, timeout_s=0.5, num_predict=4))
    assert str(e.value) == (
        "the server is not generating: loading gemma3:1b with its defaults got no answer within --timeout 0.5 s, "
        "though it answers /api/version; check the server's log (a hung runner, a stuck GPU), or raise --timeout "
        "if loads are this slow")


def test_a_request_with_no_answer_is_a_failed_trial_not_an_infeasible_config(fake: FakeOllama, gpu: None) -> None:
    fake.hang(120, paths=["/api/generate"], after_generates=3)  # /api/version still answers
    run_study(opts(fake, trials=2, repeats=1, timeout_s=1, validate=0, roofline=False))
    t = _load().trials[1]
    assert t.state.name == "FAIL"
    assert t.user_attrs["error"] == ("server did not answer in 1 s (a generate request; it answers /api/version): "
                                     "check the server's log, or raise --timeout if loads are this slow")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_failed_by_the_heartbeat_check_says_why(fake: FakeOllama, gpu: None) -> None:
    from tuner.storage import open_storage

    beat = dict(heartbeat_s=1, grace_s=2, validate=0, roofline=False, trials=1, repeats=1)
    run_study(opts(fake, **beat))
    storage = open_storage(STORAGE, heartbeat_s=1, grace_s=2)
    study = optuna.load_study(study_name=_load().study_name, storage=storage)
    lost = study.ask()  # a worker started a trial, beat once, and was killed
    lost.set_user_attr("worker", {"hostname": "box", "pid": 4242})
    storage.record_heartbeat(lost._trial_id)
    time.sleep(3.5)  # SQLite timestamps have whole seconds
    run_study(opts(fake, **beat))  # the next worker fails it
    assert _load().trials[lost.number].state.name == "FAIL"
    r = invoke("show", "--storage", STORAGE)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith(f"  #{lost.number} "))
    assert re.search(r": its worker \(box pid 4242\) sent no heartbeat for 2 s: it was killed, crashed or hung "
                     rf"\(marked failed by {re.escape(platform.node())} pid {os.getpid()} at [0-9-]+ [0-9:]+ UTC\); "
                     "--retry-failed measures such trials again$", line), line


class _ScriptedSampler:
    """Stands in for the telemetry sampler: each measurement reports the next CPU interference."""

    def __init__(self, interference: list[float]) -> None:
        self.interference = interference

    def __call__(self) -> Any:
        from tuner.telemetry import HostSummary, TelemetrySummary

        pct = self.interference.pop(0) if len(self.interference) > 1 else self.interference[0]

        class One:
            def start(self) -> None:
                pass

            def stop(self) -> Any:
                host = HostSummary(samples=2, cpu_util_mean_pct=50.0, mem_used_peak_mib=1.0, server_rss_peak_mib=None,
                                   wall_s=2.0, foreign_cpu_s=pct / 100 * 2.0, busiest="yes", busiest_pct=pct)
                return TelemetrySummary(gpus=[], host=host)

        return One()


def _script(monkeypatch: pytest.MonkeyPatch, interference: list[float], busy: list[float]) -> None:
    from types import SimpleNamespace

    import tuner.runner as runner_mod
    import tuner.telemetry as telemetry

    sampler = _ScriptedSampler(interference)
    monkeypatch.setattr(runner_mod._Runner, "_sampler", lambda self: sampler())

    def machine_busy(seconds: float = 1.0, exclude_pids: Any = None) -> Any:
        pct = busy.pop(0) if len(busy) > 1 else busy[0]
        return SimpleNamespace(interference_pct=pct, busiest="yes", busiest_pct=pct)

    monkeypatch.setattr(telemetry, "machine_busy", machine_busy)


def test_a_contended_trial_is_measured_again_on_a_quiet_machine(fake: FakeOllama, gpu: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine check is quiet; the baseline is measured while a neighbour busy-loops a core
    # (95%), the machine stays busy for one more second, then everything is quiet.
    _script(monkeypatch, interference=[95.0, 2.0], busy=[3.0, 90.0, 4.0])
    lines: list[str] = []
    summary = run_study(opts(fake, trials=2, validate=0, roofline=False, params={"num_thread": [4]}),
                        echo=lines.append)
    text = "\n".join(lines)
    assert "machine check: quiet (other processes use 3% of a core (busiest: yes at 3%))" in text
    assert ("#0 was measured while other processes competed (other processes use 90% of a core (busiest: yes at "
            "90%)): waiting up to 60 s for a quiet machine, then measuring it again") in text
    base = summary.trials[0]
    assert base.remeasured == 1 and base.contended is False and base.interference_pct == 2.0
    assert base.contention_lost_s is not None and base.contention_lost_s > 0
    assert "re-measured on a quiet machine" in lines[[i for i, x in enumerate(lines) if x.startswith("[1/2]")][0]]
    assert summary.remeasured == 1 and summary.contended == 0
    assert all(r.interference_pct is not None for r in summary.trials)


def test_contended_trials_never_decide_the_study(fake: FakeOllama, gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.show import format_summary

    import tuner.runner as runner_mod

    # No re-measuring: the two slow configs run quiet, the fast one only while the machine is busy.
    _script(monkeypatch, interference=[0.0], busy=[0.0])
    real = runner_mod.measure_config

    def measure(engine: Any, model: str, runner: Any, workload: Any, **kw: Any) -> Any:
        kw["sampler"] = _ScriptedSampler([80.0 if (runner or {}).get("num_thread") == 4 else 0.0])()
        return real(engine, model, runner, workload, **kw)

    monkeypatch.setattr(runner_mod, "measure_config", measure)
    summary = run_study(opts(fake, trials=3, validate=0, roofline=False, baseline=False, sampler="grid",
                             starting_points=False, remeasure_contended=0,
                             params={"num_thread": [1, 2, 4], "num_gpu": [0], "num_ctx": [2048], "num_batch": [512],
                                     "variant": ["gemma3:1b"]}))
    by_threads = {r.options["num_thread"]: r for r in summary.trials}
    fastest = max(summary.trials, key=lambda r: r.value or 0)
    assert fastest.contended and not any(r.contended for r in summary.trials if r is not fastest)
    assert summary.best is not None and summary.best.number != fastest.number
    assert summary.contended == 1 and not summary.only_contended
    assert "1 trials still contended (left out of the winner)" in format_summary(summary)
    assert by_threads  # three configs measured


def test_a_machine_that_stays_busy_is_said_plainly(fake: FakeOllama, gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.show import format_summary

    _script(monkeypatch, interference=[95.0], busy=[90.0])
    lines: list[str] = []
    summary = run_study(opts(fake, trials=3, validate=0, roofline=False, quiet_wait_s=0.5), echo=lines.append)
    text = "\n".join(lines)
    assert "machine check: BUSY: other processes use 90% of a core (busiest: yes at 90%)" in text
    # One wait, then no more: the rest is flagged without waiting.
    assert text.count("waiting up to 0 s for a quiet machine") == 1
    assert text.count("the machine stayed busy for") == 1
    assert all(r.contended for r in summary.trials) and summary.only_contended
    assert sum(line.count("CONTENDED") for line in lines) == 3
    assert ("WARNING: every feasible trial was measured while other processes competed for the machine: "
            "the winner above is uncertain; re-run when the machine is quiet") in format_summary(summary)
    # `tune run --json` carries it too, with its code.
    from tuner.show import summary_json

    warnings = summary_json(summary)["warnings"]
    assert [w for w in warnings if w["code"] == "contended"][0]["detail"]["only_contended"] is True


def test_defaults_that_win_only_under_contention_are_not_recommended(
        fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from tuner.show import format_summary, verdict

    _script(monkeypatch, interference=[95.0], busy=[90.0])
    summary = run_study(opts(fake, trials=1, validate=0, roofline=False, quiet_wait_s=0.5))
    assert summary.best is not None and summary.best.baseline and summary.only_contended
    text = format_summary(summary)
    assert ("\nThe Ollama defaults measured best, but every trial was measured while other processes competed: "
            "no recommendation until a quiet re-run\n") in text
    assert "nothing to change" not in text and "nothing to change" not in verdict(summary)
    assert "1 trials still contended (all of them: see the warning below)" in text
    quiet = dataclasses.replace(summary, only_contended=False)
    assert "The Ollama defaults are the best configuration found: nothing to change" in format_summary(quiet)


def test_a_baseline_interrupted_is_measured_first_on_resume(fake: FakeOllama) -> None:
    def interrupt(number: int, total: int) -> None:
        raise KeyboardInterrupt

    o = opts(fake, trials=4, repeats=1, validate=0, roofline=False, sampler="random")
    with pytest.raises(KeyboardInterrupt):
        run_study(o, on_trial_start=interrupt)
    study = _load()
    assert [(t.state.name, record.is_baseline(t)) for t in study.trials] == [("FAIL", True)]
    assert study.user_attrs["start_queue"]  # the start waits for the baseline, kept with the study
    lines: list[str] = []
    summary = run_study(o, echo=lines.append)
    assert "the defaults (baseline) were not measured yet: measuring them first" in lines
    trials = _load().trials
    # The resumed run measures the baseline before the start it had planned.
    assert record.is_baseline(trials[1]) and trials[1].state.name == "COMPLETE"
    assert trials[2].user_attrs.get("stage") == "start"
    assert _load().user_attrs["start_queue"] == []
    assert summary.winner_speedup is not None


def test_no_baseline_means_none_on_resume_either(fake: FakeOllama) -> None:
    o = opts(fake, trials=2, repeats=1, validate=0, roofline=False, baseline=False)
    run_study(o)
    run_study(o)
    assert not any(record.is_baseline(t) for t in _load().trials)


def test_a_baseline_left_running_by_a_killed_process_is_measured_again(fake: FakeOllama) -> None:
    import signal
    import subprocess
    import sys

    from tuner.start import _dead_here

    # The first worker hangs in the baseline's generate and is killed there (as kill -9, or a
    # full disk that stops it before it can mark the trial failed, would leave it).
    fake.hang(120, paths=["/api/generate"], after_generates=2)
    args = ["--model", "gemma3:1b", "--host", fake.url, "--storage", STORAGE, "--study", "s", "--trials", "2",
            "--repeats", "1", "--num-predict", "16", "--validate", "0", "--no-roofline", "--param", "num_thread=1,2"]
    p = subprocess.Popen([sys.executable, "-c", "from tuner.cli import cli; cli()", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tuner.storage import open_storage

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:  # read-only: the poll must not race the worker creating the storage
            trials = optuna.load_study(study_name="s", storage=open_storage(STORAGE, create=False)).trials
        except Exception:
            trials = []
        if trials and trials[0].state.name == "RUNNING" and trials[0].user_attrs.get("worker"):
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _dead_here(_load("s").trials[0])
    fake.hang(0)
    lines: list[str] = []
    run_study(opts(fake, study_name="s", trials=2, repeats=1, validate=0, roofline=False,
                   params={"num_thread": [1, 2]}), echo=lines.append)
    assert "the defaults (baseline) were not measured yet: measuring them first" in lines
    trials = _load("s").trials
    assert record.is_baseline(trials[1]) and trials[1].state.name == "COMPLETE"
    assert trials[0].state.name == "RUNNING"  # failed by the heartbeat check once its grace is over
    assert not _dead_here(trials[1])
