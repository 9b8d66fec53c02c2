"""Speculative decoding as a search axis (issue 24): gated by what the server and model say,
measured, and checked for identical greedy output (docs/drafting.md)."""

from __future__ import annotations

import json
from typing import Any

import ollama
import pytest
from fake_ollama import FakeOllama, default_models, draft_speedup, mtp_model

from tuner import record, results
from tuner.engines.ollama import OllamaEngine, mtp_evidence, version_tuple
from tuner.errors import SpaceError
from tuner.metrics import RequestSample
from tuner.record import build_record
from tuner.identity import compare as output_identity, text as identity_text
from tuner.study import TuneOptions, run_study
from tuner.workload import BUILTIN_WORKLOADS, builtin_prompts, workload_prompts

STORAGE = "sqlite:///studies/drafting.db"
MTP = "qwen3.6:27b-mtp"


def _fake(**kw: Any) -> FakeOllama:
    return FakeOllama(models=default_models() + [mtp_model(MTP)], **kw)


def _opts(fake: FakeOllama, model: str, **kw: Any) -> TuneOptions:
    base: dict[str, Any] = dict(model=[model], host=fake.url, trials=5, repeats=1, num_predict=16,
                                storage=STORAGE, seed=1, params={"num_thread": [4], "num_ctx": [2048],
                                                                 "num_batch": [512], "num_gpu": [0]},
                                validate=0, prompts_file="builtin:copy")
    base.update(kw)
    return TuneOptions(**base)


def _records(name: str | None = None) -> list[record.TrialRecord]:
    from tuner.storage import open_storage

    return list(results.read_study(results.load_study(open_storage(STORAGE), name)).records)


def _sent_drafts(fake: FakeOllama) -> list[Any]:
    return [(r.get("options") or {}).get("draft_num_predict") for r in fake.generate_requests()
            if "draft_num_predict" in (r.get("options") or {})]


def test_mtp_evidence_and_versions() -> None:
    assert mtp_evidence({"qwen35.nextn_predict_layers": 1}, []) == "qwen35.nextn_predict_layers=1"
    assert mtp_evidence({"qwen35.nextn_predict_layers": 0}, ["completion"]) == ""
    assert mtp_evidence({}, ["completion", "mtp"]) == "capability 'mtp'"
    assert version_tuple("0.31.2") == (0, 31, 2) and version_tuple("0.30.9-rc1") == (0, 30, 9)
    assert version_tuple("unknown") is None


def test_fake_server_drafts_only_for_mtp_models_on_new_versions() -> None:
    # The speed surface: a copying prompt gains, free chat little; long drafts cost on chat.
    assert draft_speedup(4, 0.85) > 2.0 and draft_speedup(1, 0.35) < 1.25 and draft_speedup(8, 0.35) < 1.0
    with _fake() as fake:
        client = ollama.Client(host=fake.url)
        copy = "copy this: ```a b c```"

        def rate(model: str, **opts: Any) -> float:
            r = client.generate(model=model, prompt=copy, options={"num_predict": 32, **opts})
            return r.eval_count / r.eval_duration * 1e9

        assert rate(MTP, draft_num_predict=4) > 2 * rate(MTP, draft_num_predict=0)
        assert rate(MTP) == pytest.approx(rate(MTP, draft_num_predict=4))  # the default is 4
        assert rate("gemma3:1b", draft_num_predict=4) == pytest.approx(rate("gemma3:1b", draft_num_predict=0))
        fake.version = "0.30.6"
        assert rate(MTP, draft_num_predict=4) == pytest.approx(rate(MTP, draft_num_predict=0))
        info = client.show(MTP).modelinfo or {}
        assert info["qwen35.nextn_predict_layers"] == 1
        assert not any("nextn" in k for k in (client.show("gemma3:1b").modelinfo or {}))


def test_an_mtp_model_gets_the_axis_and_finds_the_draft_length() -> None:
    with _fake() as fake:
        said: list[str] = []
        summary = run_study(_opts(fake, MTP, trials=12, sampler="grid"), echo=said.append)
        recs = [r for r in _records() if not r.baseline]
        assert {r.options["draft_num_predict"] for r in recs} == set(range(9))
        assert any(line.startswith("drafting: qwen3.6:27b-mtp drafts with its MTP heads") for line in said)
        by_k = {r.options["draft_num_predict"]: r.stat(record.DECODE_TPS) for r in recs}
        assert by_k[4] > 2 * by_k[0]
        # Every drafting config was checked once, on the first prompt, and kept its output.
        for r in recs:
            if r.options["draft_num_predict"] > 0:
                assert r.identity is not None and r.identity["identical"] is True
                assert r.identity["prompt"] == "code_edit" and r.feasible
            else:
                assert r.identity is None
            assert r.constraints[record.OUTPUT_IDENTITY] == 0.0
        # The baseline sends no options: Ollama drafts 4 tokens on an MTP model by default.
        assert summary.best is not None and summary.best.options.get("draft_num_predict", 4) > 0
        # Ollama reports no drafting statistics: none are invented.
        assert all(r.draft_tokens is None and r.draft_acceptance is None for r in recs)
    # The report draws decode against draft length per prompt (the baseline at Ollama's 4).
    from tuner.report.data import build_data
    from tuner.report.figures import draw
    from tuner.storage import open_storage

    data = build_data(results.load_study(open_storage(STORAGE), None), STORAGE)
    pts = {(p.prompt, p.draft): p for p in data.drafting}
    assert {d for _, d in pts} == set(range(9)) and {p for p, _ in pts} == {"code_edit"}
    assert pts[("code_edit", 4)].decode_tps > 2 * pts[("code_edit", 0)].decode_tps
    assert pts[("code_edit", 4)].requests > pts[("code_edit", 3)].requests  # the baseline drafts 4 too
    assert "drafting" in [f.key for f in draw(data)]


def test_the_drafting_series_splits_by_prompt() -> None:
    from tuner.report.series import drafting_series

    def rec(draft: int | None, prompt_rates: dict[str, float], accepted: int | None = None) -> record.TrialRecord:
        samples = [RequestSample(p, i, 50.0, 1000.0, 100, 50.0, 64, 64 / rate * 1000, 0.1, 1100.0, "length",
                                 draft_tokens=40 if accepted is not None else None, draft_accepted=accepted)
                   for p, rate in prompt_rates.items() for i in range(2)]
        options = {} if draft is None else {"draft_num_predict": draft}
        return build_record("m.gguf", options, {}, samples)

    series = drafting_series([rec(0, {"copy": 40.0, "chat": 40.0}), rec(4, {"copy": 100.0, "chat": 44.0}, 30),
                              rec(None, {"copy": 40.0, "chat": 40.0})], engine_default=0)
    by = {(p.prompt, p.draft): p for p in series}
    assert by[("copy", 4)].decode_tps == pytest.approx(100.0) and by[("chat", 4)].decode_tps == pytest.approx(44.0)
    assert by[("copy", 4)].acceptance == pytest.approx(0.75) and by[("copy", 0)].acceptance is None
    assert by[("copy", 0)].requests == 4  # the config that sent none runs the engine's default, 0
    assert drafting_series([rec(None, {"copy": 40.0})], engine_default=0) == []


def test_a_model_without_mtp_never_sees_the_axis() -> None:
    with _fake() as fake:
        run_study(_opts(fake, "gemma3:1b", trials=3))
        assert _sent_drafts(fake) == []
        with pytest.raises(SpaceError, match="has no multi-token-prediction heads"):
            run_study(_opts(fake, "gemma3:1b", params={"draft_num_predict": [0, 4]}, study_name="asked"))


def test_an_old_server_never_sees_the_axis() -> None:
    with _fake(version="0.30.6") as fake:
        run_study(_opts(fake, MTP, trials=3))
        assert _sent_drafts(fake) == []
        assert all("draft_num_predict" not in r.options for r in _records())
        with pytest.raises(SpaceError, match=r"Ollama 0\.30\.6 .* takes no draft_num_predict"):
            run_study(_opts(fake, MTP, params={"draft_num_predict": [0, 4]}, study_name="asked"))


def test_a_config_that_changes_the_output_is_infeasible_with_that_cause() -> None:
    with _fake(draft_changes_output=True) as fake:
        summary = run_study(_opts(fake, MTP, trials=4, params={"draft_num_predict": [0, 4], "num_thread": [4],
                                                              "num_ctx": [2048], "num_batch": [512],
                                                              "num_gpu": [0]}, sampler="grid"))
        recs = {r.options.get("draft_num_predict"): r for r in _records() if not r.baseline}
        bad, good = recs[4], recs[0]
        assert bad.identity is not None and bad.identity["identical"] is False
        assert bad.constraints[record.OUTPUT_IDENTITY] == 1.0 and not bad.feasible
        assert any(v.startswith("drafting changed the output: greedy text on prompt 'code_edit' with "
                                "draft_num_predict=4 differs") for v in bad.violations)
        # The defaults draft too (4 tokens on an MTP model): checked, and they changed the output.
        base = next(r for r in _records() if r.baseline)
        assert base.identity is not None and base.identity["identical"] is False and not base.feasible
        assert good.feasible and summary.best is not None and summary.best.options["draft_num_predict"] == 0
        # Ollama's API gives no logits: no batched-scoring control is claimed.
        assert "batched_scoring" not in bad.identity
        # The check ran once per drafting config, with greedy sampling and a fixed seed.
        checks = [r for r in fake.generate_requests() if r.get("stream") is False and r.get("prompt")]
        assert len(checks) == 4
        assert all(r["options"]["temperature"] == 0 and r["options"]["seed"] == 42 for r in checks)
        assert sorted(str(r["options"].get("draft_num_predict")) for r in checks) == ["0", "0", "4", "None"]
    # Every view carries the drafting statistics and the identity check.
    from tuner.report.data import build_data
    from tuner.show import trial_json
    from tuner.storage import open_storage

    doc = trial_json(bad)
    # Ollama reports no drafted/accepted counts, so there are none in the metrics here.
    assert doc["output_identity"]["identical"] is False
    bench = build_data(results.load_study(open_storage(STORAGE), None), STORAGE).bench
    assert "drafts accepted" in bench.columns and "greedy output" in bench.columns
    col = bench.columns.index("greedy output")
    assert {line[col] for line in bench.cells} <= {"same", "differs", "-"}


def test_a_failed_check_runs_the_batched_scoring_control_and_says_what_it_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def control(self: Any, model: str, prompt: str, runner: dict[str, Any], predict: dict[str, Any]) -> dict[str, Any]:
        calls.append(runner)
        return {"batch": int(runner.get("draft_num_predict", 4)) + 1, "tokens": 8, "max_logit_difference": 0.8,
                "flips_at_token": 3, "flip_batch": 2, "top_two_gap": 0.01}

    monkeypatch.setattr(OllamaEngine, "batched_scoring", control)
    with _fake(draft_changes_output=True) as fake:
        run_study(_opts(fake, MTP, trials=3, params={"draft_num_predict": [0, 2], "num_thread": [4],
                                                              "num_ctx": [2048], "num_batch": [512],
                                                              "num_gpu": [0]}, sampler="grid"))
        recs = {r.options.get("draft_num_predict"): r for r in _records() if not r.baseline}
    bad = recs[2]
    assert bad.identity is not None and bad.identity["batched_scoring"]["batch"] == 3
    assert any("with no drafter at all, scoring the text without drafting in batches of 2 to 3 tokens" in v
               and "generated token 3 (batches of 2;" in v for v in bad.violations), bad.violations
    # Only the failed checks ran it (the defaults draft 4 and failed too; draft 0 is no check).
    assert sorted(int(c.get("draft_num_predict", 4)) for c in calls) == [2, 4]


def test_the_check_covers_the_longest_prompt_where_only_a_long_context_changes_the_output(
        tmp_path: Any) -> None:
    # Drafting changes the text only past 40 prompt tokens: the first prompt (short) keeps it,
    # the longest does not; checking the first prompt alone would have called the config safe.
    short, long = "Say hello.", " ".join(f"word{i}" for i in range(120))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"name": "short", "prompt": short}) + "\n"
                       + json.dumps({"name": "long", "prompt": long}) + "\n")
    with _fake(draft_changes_output=40) as fake:
        run_study(_opts(fake, MTP, trials=3, prompts_file=str(prompts),
                        params={"draft_num_predict": [0, 2], "num_thread": [4], "num_ctx": [2048],
                                "num_batch": [512], "num_gpu": [0]}, sampler="grid"))
        recs = {r.options.get("draft_num_predict"): r for r in _records() if not r.baseline}
    bad = recs[2]
    assert bad.identity is not None and bad.identity["identical"] is False, bad.identity
    assert bad.identity["prompt"] == "long" and bad.identity["checked"] == ["short", "long"]
    assert not bad.feasible and any("on prompt 'long'" in v for v in bad.violations)
    assert recs[0].feasible and recs[0].identity is None


def test_identity_text_names_the_cause_the_control_found() -> None:
    ident = output_identity("chat", 2, "a b c.", "a b c d")
    plain = identity_text(ident)
    assert plain.startswith("drafting changed the output") and "batches" not in plain
    ident["batched_scoring"] = {"batch": 3, "tokens": 64, "max_logit_difference": 1.19, "flips_at_token": 16,
                                "flip_batch": 3, "top_two_gap": 0.009}
    assert "already changes the greedy choice at generated token 16 (batches of 3; top two logits 0.009 apart" \
        in identity_text(ident)
    ident["batched_scoring"] = {"batch": 9, "tokens": 64, "max_logit_difference": 1.3, "flips_at_token": 16,
                                "flip_batch": 8, "top_two_gap": 0.06,
                                "max_logit_difference_by_batch": {str(b): 0.0 if b < 8 else 1.3 for b in range(2, 10)}}
    assert identity_text(ident).endswith("batches of up to 7 tokens gave exactly the same logits, so "
                                         "draft_num_predict <= 6 may keep the output (docs/drafting.md)")
    ident["batched_scoring"] = {"batch": 3, "tokens": 64, "max_logit_difference": 0.0, "flips_at_token": None}
    assert identity_text(ident).endswith("changes no greedy choice (logits differ by up to 0.0): batching at those "
                                         "offsets does not explain it")
    ident["batched_scoring"] = {"error": "llama.cpp failed to score m in batches: boom"}
    assert identity_text(ident) == plain


def test_identity_record_and_draft_statistics_round_trip() -> None:
    ident = output_identity("chat", 4, "one two three", "one two four")
    assert ident["identical"] is False and ident["first_difference"] == 8
    samples = [RequestSample("p", 0, 1, 2, 3, 4.0, 5, 6.0, 0, 7, "length", draft_tokens=10, draft_accepted=6),
               RequestSample("p", 1, 1, 2, 3, 4.0, 5, 6.0, 0, 7, "length", draft_tokens=6, draft_accepted=2)]
    rec = build_record("m", {"draft_num_predict": 4}, {}, samples)
    assert (rec.draft_tokens, rec.draft_accepted, rec.draft_acceptance) == (16, 8, 0.5)
    rec.identity = ident
    attrs = record.stored_attrs(rec)
    assert attrs[record.OUTPUT_IDENTITY] == ident and attrs[record.DRAFT_ACCEPTANCE] == 0.5
    flat = rec.flat()
    assert flat[record.DRAFT_TOKENS] == 16 and flat[record.DRAFT_ACCEPTED] == 8
    # A request without drafting stores no drafting fields.
    assert "draft_tokens" not in RequestSample("p", 0, 1, 2, 3, 4.0, 5, 6.0, 0, 7, "stop").to_dict()
    assert build_record("m", {}, {}, samples[:0]).draft_tokens is None


def test_builtin_workloads() -> None:
    assert set(BUILTIN_WORKLOADS) == {"default", "copy", "chat"}
    assert [p.name for p in workload_prompts(None)] == ["chat", "document"]
    assert [p.name for p in workload_prompts("builtin:copy")] == ["code_edit"]
    assert "copy" in builtin_prompts("copy")[0].text.lower()
    from tuner.errors import WorkloadError

    with pytest.raises(WorkloadError, match="unknown built-in workload 'nope': choose from builtin:default"):
        workload_prompts("builtin:nope")


def test_the_engine_reports_what_the_server_can_draft() -> None:
    with _fake() as fake:
        engine = OllamaEngine(fake.url)
        try:
            d = engine.drafting(MTP)
            assert d.available and d.method == "mtp" and d.engine_default == 4 and d.default_lengths[0] == 0
            assert not engine.drafting("gemma3:1b").available
            assert engine.greedy_pair(MTP, "copy ```x```", {}, {"num_predict": 8, "temperature": 0, "seed": 1}) \
                is not None
        finally:
            engine.close()


def test_a_setting_that_keeps_drafting_identical_is_kept_by_the_ablation_and_the_export(tmp_path: Any) -> None:
    # Drafting keeps the greedy output only with num_batch 256 (as llama.cpp's flash attention keeps
    # it for short batches): reverting num_batch alone from the winner changes the output, so the
    # ablation must not measure that config as if it were a candidate, and the portable export must
    # keep num_batch however small its effect on speed.
    from tuner import export

    storage = f"sqlite:///{tmp_path / 'keep.db'}"
    with _fake(draft_changes_output=lambda o: o.get("num_batch") != 256) as fake:
        echoed: list[str] = []
        summary = run_study(_opts(fake, MTP, trials=6, storage=storage, study_name="keep", sampler="grid",
                                  prune=False, validate=2, validate_rounds=3, warm_start=False,
                                  params={"draft_num_predict": [0, 4], "num_batch": [256, 512], "num_thread": [4],
                                          "num_ctx": [2048], "num_gpu": [0]}), echo=echoed.append)
    best = summary.best
    assert best is not None and best.options["draft_num_predict"] == 4 and best.options["num_batch"] == 256
    from tuner.storage import open_storage

    ab = results.read_study(results.load_study(open_storage(storage), "keep")).ablation
    assert ab is not None and ab.winner == best.number
    batch = ab.effect("num_batch")
    assert batch is not None and batch.reverted is None and batch.kept
    assert batch.error is not None and batch.error.startswith("drafting changed the output"), batch.error
    assert "num_batch" in ab.portable and ab.portable_error is None
    assert any("num_batch auto->256: not measured, kept (drafting changed the output" in line
               for line in ab.lines("decode tok/s"))
    # Reverting draft_num_predict sends none: the server drafts its default 4, the same config.
    draft = ab.effect("draft_num_predict")
    assert draft is not None and draft.reverted is not None and not draft.kept
    text = export.export(storage, "keep", "modelfile").text
    assert "PARAMETER num_batch 256" in text, text
    # The defaults are faster here but change the output: never recommended.
    assert summary.baseline is not None and not summary.baseline.feasible
    assert any("the defaults are infeasible" in line for line in echoed)
    from tuner.show import speedup_text

    assert ": the defaults are faster but infeasible (drafting changed the output" in speedup_text(summary)


def test_a_resumed_study_checks_the_drafting_configs_it_re_validates_again(tmp_path: Any) -> None:
    # The first run's drafting winner kept the output; before the study is resumed the server
    # starts changing it (another version). The re-validation checks it again before timing it:
    # refused, it cannot be the recommendation.
    from tuner.storage import open_storage

    storage = f"sqlite:///{tmp_path / 'resume.db'}"
    kw: dict[str, Any] = dict(storage=storage, study_name="resume", sampler="grid", prune=False, validate=2,
                              validate_rounds=2, warm_start=False, ablation=False,
                              params={"draft_num_predict": [0, 4], "num_thread": [4], "num_ctx": [2048],
                                      "num_batch": [512], "num_gpu": [27]})
    with _fake() as fake:
        first = run_study(_opts(fake, MTP, trials=4, **kw))
        assert first.best is not None and not first.best.baseline
        assert first.best.identity is not None and first.best.identity["identical"]
        fake.draft_changes_output = True
        echoed: list[str] = []
        second = run_study(_opts(fake, MTP, trials=5, **kw), echo=echoed.append)
    val = results.read_study(results.load_study(open_storage(storage), "resume")).validation
    assert val is not None
    refused = {e.number: e.error for e in val.entries if e.error}
    assert first.best.number in refused and refused[first.best.number].startswith("drafting changed the output")
    assert second.best is None or second.best.number != first.best.number
