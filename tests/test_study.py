"""The study loop end to end against the fake Ollama server, through the real client."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner import results
from tuner.study import TuneOptions, run_study

STORAGE = "sqlite:///t.db"


def _load(name: str | None = None) -> Any:
    from tuner.storage import open_storage

    return results.load_study(open_storage(STORAGE), name)


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
    v = results.view(top)
    assert v.options["num_gpu"] >= 24
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
        assert t.user_attrs["n_requests"] == 2 * 2  # two built-in prompts, two repeats
        assert t.values[0] == pytest.approx(t.user_attrs["decode_tps_mean"])


def test_warmups_only_after_reloads_and_every_prompt_has_a_fresh_nonce(fake: FakeOllama) -> None:
    # Same config twice in a row: the second trial must not warm up again.
    o = opts(fake, trials=3, baseline=False, params={"num_ctx": [2048], "num_batch": [512], "num_thread": [2],
                                                      "variant": ["gemma3:1b"]})
    run_study(o)
    study = _load()
    warm = [t.number for t in study.trials if "warmup" in t.user_attrs]
    assert warm == [0]
    assert len(fake.loads) == 1
    gens = fake.generate_requests()
    warmups = [g for g in gens if g["options"]["num_predict"] == 8]
    assert len(warmups) == 1
    prompts = [g["prompt"] for g in gens]
    assert len(set(prompts)) == len(prompts)
    assert all(p.startswith("[request ") for p in prompts)
    # measured requests keep the model loaded: no load beyond the warm-up's
    assert all(t.user_attrs["unexpected_reloads"] == 0 for t in study.trials)


def test_reload_cost_is_recorded_separately(fake: FakeOllama) -> None:
    run_study(opts(fake, trials=2))
    for t in _load().trials:
        assert t.user_attrs["reload_ms"] > 1000  # the fake's synthetic load: >= 1.2 s
        assert t.user_attrs["load_ms_max"] < 1  # measured requests exclude the load


def test_oom_trials_are_recorded_as_infeasible(fake: FakeOllama, gpu: None) -> None:
    o = opts(fake, trials=2, params={"variant": ["gemma3:1b-it-fp16"], "num_ctx": [32768],
                                     "num_gpu": [27], "num_thread": [2]})
    summary = run_study(o)
    study = _load()
    failed = [t for t in study.trials if t.user_attrs.get("error")]
    assert failed, "the fp16 / 32k / full-offload config must not fit the fake's 6 GB"
    for t in failed:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.constraints["load"] == 1.0
        assert "memory" in t.user_attrs["error"]
        assert not results.is_feasible(t)
    assert summary.best is not None and summary.best.baseline  # only the baseline ran


def test_constraints_exclude_violating_trials_from_best(gpu: None) -> None:
    with FakeOllama(time_scale=0.01) as fake:
        o = opts(fake, trials=8, repeats=1, max_ttft_ms=40.0,
                 params={"variant": ["gemma3:1b", "gemma3:1b-it-fp16"], "num_gpu": [0, 27],
                         "num_thread": [1], "num_ctx": [2048]})
        summary = run_study(o)
    study = _load()
    slow = [t for t in study.trials if t.user_attrs.get("ttft_ms_p95", 0) > 40.0]
    assert slow, "fp16 on CPU must exceed a 40 ms p95 TTFT at this time scale"
    for t in slow:
        assert not results.is_feasible(t)
        assert t.constraints["ttft_p95_ms"] > 0
        assert any("TTFT" in v for v in t.user_attrs["violations"])
    best = results.best_feasible(study)
    assert best is not None and best.user_attrs["ttft_ms_p95"] <= 40.0
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
            "--num-predict", "8", "--storage", STORAGE, "--param", "num_thread=1,2"]
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


def test_no_gpu_fixes_num_gpu_to_zero(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.engines.ollama import OllamaEngine
    from tuner.study import prepare

    monkeypatch.setattr(OllamaEngine, "has_gpu", lambda self: False)
    p = prepare(opts(fake, params={}, context=8000), lambda s: None)
    p.engine.close()
    assert p.space["num_gpu"].values == (0,) and p.space["num_gpu"].fixed
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
        assert t.user_attrs["pruned_saved_s"] >= 0
        assert len(t.intermediate_values) == n
    # the winner is never pruned
    assert results.best_feasible(study).state.name == "COMPLETE"


def test_winner_revalidation_is_interleaved_and_stored(fake: FakeOllama, gpu: None) -> None:
    o = opts(fake, trials=5, repeats=1, prune=False, validate=3, validate_rounds=2,
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
    # the last requests alternate configs: A B C A B C (each preceded by its warm-up)
    measured = [g for g in fake.generate_requests()[n_before:] if g["options"]["num_predict"] != 8]
    tail = [(g["options"].get("num_gpu"), g["options"].get("num_thread")) for g in measured[-12:]]
    per_round = [tail[i] for i in range(0, 12, 2)]
    assert per_round[:3] == per_round[3:] and len(set(per_round[:3])) == 3


def test_roofline_is_stored_with_the_study(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.roofline as rl

    monkeypatch.setattr(rl, "cpu_bandwidth_gbs", lambda *a, **k: 50.0)
    run_study(opts(fake, trials=2))
    roof = _load().user_attrs["roofline"]
    assert roof["bandwidth_gbs"] == 50.0 and roof["device"] == "CPU"
    assert roof["ceiling_tps"] == pytest.approx(50e9 / roof["model_bytes"])
    assert roof["share"] == pytest.approx(roof["decode_tps"] / roof["ceiling_tps"], rel=1e-3)


def test_concurrency_sends_simultaneous_streams(fake: FakeOllama) -> None:
    run_study(opts(fake, trials=2, repeats=1, concurrency=3, objectives=["aggregate_tps"], validate=0))
    study = _load()
    for t in study.trials:
        assert t.user_attrs["n_requests"] == 2 * 3
        assert t.user_attrs["concurrency"] == 3
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


def test_remote_server_keeps_num_gpu_in_the_search() -> None:
    from tuner.engines.ollama import OllamaEngine

    assert OllamaEngine("http://gpu-box.example:11434").has_gpu()


def test_context_reaches_the_baseline(fake: FakeOllama) -> None:
    run_study(opts(fake, trials=1, context=8192))
    base = _load().trials[0]
    assert base.user_attrs["baseline"] and base.user_attrs["config"]["options"] == {"num_ctx": 8192}
    first = fake.generate_requests()[0]
    assert first["options"]["num_ctx"] == 8192


def test_busy_server_is_a_failed_trial_not_an_infeasible_config(fake: FakeOllama) -> None:
    fake.fail_next(1, status=503, error="server busy, please try again. maximum pending requests exceeded")
    run_study(opts(fake, trials=2, server_wait_s=1))
    t0 = _load().trials[0]
    assert t0.state.name == "FAIL" and "busy (503)" in t0.user_attrs["error"]


def test_a_config_that_times_out_is_infeasible() -> None:
    with FakeOllama(time_scale=1.0) as slow:  # a real 1.2 s+ load
        run_study(opts(slow, trials=1, timeout_s=0.5, num_predict=4))
    t = _load().trials[0]
    assert t.state.name == "COMPLETE" and t.constraints["load"] == 1.0
    assert "no answer within --timeout 0.5 s" in t.user_attrs["error"]
