"""What each of the winner's settings is worth (tuner/ablate.py, tuner/gains.py), and the
portable export that keeps only the settings that count.

The fake server's surface is known here: num_batch 256 gives +30% decode, num_ctx 2048 +20%,
num_thread nothing; each response carries 0.5% multiplicative noise so intervals are real.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import optuna
import pytest

from fake_ollama import FakeOllama
from test_export import check_parameters, parse_modelfile
from tuner import export, gains
from tuner.results import read_study
from tuner.show import summary_json
from tuner.study import TuneOptions, run_study

def surface(model: str, o: dict[str, Any]) -> tuple[float, float]:
    decode = 40.0 * (1.3 if o.get("num_batch") == 256 else 1.0) * (1.2 if o.get("num_ctx") == 2048 else 1.0)
    return 400.0, decode * math.exp(random.gauss(0.0, 0.005))


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> Any:
    global STORAGE
    STORAGE = f"sqlite:///{tmp_path_factory.mktemp('ablation')}/a.db"
    random.seed(7)
    with FakeOllama(speed_fn=surface) as fake:
        o = TuneOptions(model=["gemma3:1b"], host=fake.url, trials=9, repeats=1, num_predict=16, storage=STORAGE,
                        study_name="known", seed=1, sampler="grid", prune=False,
                        # num_gpu fixed (the user asked for it: exported), one variant: three changes.
                        params={"num_batch": [256, 512], "num_ctx": [2048, 4096], "num_thread": [2, 4],
                                "num_gpu": [27], "variant": ["gemma3:1b"]},
                        starting_points=False, warm_start=False, roofline=False, validate=2, validate_rounds=6,
                        measure_interference=False)
        return run_study(o)


def test_each_setting_is_measured_alone_and_the_effects_add_up(summary: Any) -> None:
    st = read_study(optuna.load_study(study_name="known", storage=STORAGE))
    ab = st.ablation
    assert ab is not None and ab.rounds == 6
    assert ab.winner == summary.best.number
    by = {e.change.setting: e for e in ab.effects}
    assert set(by) == {"num_batch", "num_ctx", "num_thread"}
    # Ollama reports the context it allocated (/api/ps), not the batch: that default is "auto".
    assert by["num_batch"].change.value == 256 and by["num_ctx"].change.default == 4096
    assert by["num_batch"].change.default is None
    assert by["num_batch"].reverted.ratio == pytest.approx(1.3, rel=0.02)
    assert by["num_ctx"].reverted.ratio == pytest.approx(1.2, rel=0.02)
    assert by["num_thread"].reverted.ratio == pytest.approx(1.0, abs=0.02)
    assert by["num_batch"].kept and by["num_ctx"].kept
    assert not any(e.kept for k, e in by.items() if k not in ("num_batch", "num_ctx"))
    # Three changes: each one applied alone to the defaults is measured too.
    assert by["num_batch"].alone.ratio == pytest.approx(1.3, rel=0.02)
    assert by["num_thread"].alone is not None and not by["num_thread"].alone.distinguishable
    # Done when: the effects multiply (sum on the log scale) to within the winner's measured gain.
    assert ab.total is not None and ab.total.ratio == pytest.approx(1.56, rel=0.03)
    assert ab.adds_up is True
    assert ab.combined is not None and ab.combined.ratio == pytest.approx(ab.product)
    assert sorted(ab.portable) == ["num_batch", "num_ctx"] and ab.portable_holds


def test_every_view_reads_the_effects(summary: Any) -> None:
    doc = json.loads(json.dumps(summary_json(summary)))
    settings = {e["change"]["setting"]: e for e in doc["ablation"]["effects"]}
    assert settings["num_batch"]["reverted"]["ratio"] == pytest.approx(1.3, rel=0.02)
    from tuner.show import format_summary

    text = format_summary(summary)
    assert "what each setting is worth" in text and "num_batch auto->256: +" in text
    assert "num_thread auto->" in text and "not distinguishable from no effect" in text


def test_the_default_export_keeps_only_what_counts(summary: Any) -> None:
    r = export.export(STORAGE, "known", "modelfile")
    source, params = parse_modelfile(r.text)
    check_parameters(params)
    assert source == "gemma3:1b"
    # num_gpu 27 was fixed by the study (--param): the user asked for it.
    assert params == {"num_batch": ["256"], "num_ctx": ["2048"], "num_gpu": ["27"]}
    assert "# num_batch auto->256: +" in r.text
    assert "left to the server: num_thread=" in r.text
    # Context honesty: the server gives this model 4096 by default.
    assert "num_ctx 2048 is below the 4096 tokens of context" in r.text
    assert "keeping 4096 costs that much" in r.text and "--context 4096" in r.text
    threads = str(summary.best.options["num_thread"])
    full = parse_modelfile(export.export(STORAGE, "known", "modelfile", all_settings=True).text)[1]
    assert full["num_thread"] == [threads]
    kept = parse_modelfile(export.export(STORAGE, "known", "modelfile", keep=("num_thread",)).text)[1]
    assert kept == {"num_batch": ["256"], "num_ctx": ["2048"], "num_gpu": ["27"], "num_thread": [threads]}
    options = json.loads(export.export(STORAGE, "known", "json").text)["options"]
    assert options == {"num_batch": 256, "num_ctx": 2048, "num_gpu": 27}


STORAGE = ""


def test_keep_names_a_setting() -> None:
    with pytest.raises(export.ExportError, match="^--keep num_thrad: not a setting; choose from variant, num_ctx, "):
        export.select(None, None, keep=("num_thrad",))


def test_the_record_reads_back() -> None:
    c = gains.Change("num_batch", 512, 256)
    ab = gains.Ablation("decode_tps", 3, 0, 4, [gains.SettingEffect(c, gains.Ratio.of([1.1, 1.12, 1.09]))],
                        gains.Ratio.of([1.1, 1.1, 1.12]), ["num_batch"])
    back = gains.Ablation.from_dict(json.loads(json.dumps(ab.to_dict())))
    assert back is not None and back.effects[0].reverted == ab.effects[0].reverted and back.portable == ["num_batch"]
    assert gains.Ablation.from_dict({"winner": "x"}) is None
    assert gains.Ratio.of([1.2]) is None


def test_tune_show_the_report_and_the_caveat_carry_the_effects(summary: Any) -> None:
    from tuner.report.data import build_data
    from tuner.report.html import render_html
    from tuner.show import format_show, show_json

    text = format_show(STORAGE, "known")
    assert "what each setting is worth" in text and "num_ctx 4096->2048: +" in text
    doc = show_json(STORAGE, "known")
    assert doc["ablation"]["portable"] and doc["ablation"]["adds_up"] is True
    # Context honesty travels with the warnings, with the measured cost of keeping the default.
    ctx = next(w for w in doc["warnings"] if w["code"] == "context_lowered")
    assert "lowering it measured +" in ctx["text"] and "--context 4096" in ctx["text"]
    assert ctx["detail"]["gain"]["ratio"] == pytest.approx(1.2, rel=0.02)
    data = build_data(optuna.load_study(study_name="known", storage=STORAGE), STORAGE)
    rows = {r.change.split(" ")[0]: r for r in data.first.effects}
    assert rows["num_batch"].kept and rows["num_ctx"].kept and not rows["num_thread"].kept
    assert any("add up" in line for line in data.first.effects_notes)
    # The Modelfile on the first screen is the portable export.
    assert "PARAMETER num_thread" not in data.first.modelfile and "PARAMETER num_batch 256" in data.first.modelfile
    page = render_html(data)
    assert "What each setting is worth" in page and "left to the server" in page


def test_a_setting_whose_effect_was_not_measured_is_kept() -> None:
    """Reverting num_gpu may not load at all: a setting without a measured effect stays."""
    failed = gains.SettingEffect(gains.Change("num_gpu", None, 20), None, None, "did not fit: out of memory")
    none = gains.SettingEffect(gains.Change("num_thread", None, 2), gains.Ratio.of([1.0, 1.01, 0.99]))
    assert failed.kept and not none.kept
    ab = gains.Ablation("decode_tps", 3, 0, 3, [failed, none])
    assert gains.portable_settings(ab) == ["num_gpu"]
    assert "not measured, kept (did not fit" in failed.text()


def test_a_portable_config_that_could_not_run_is_no_export() -> None:
    """A portable config that failed to load or changed the greedy output keeps every setting."""
    c = gains.Change("num_batch", 512, 256)
    ab = gains.Ablation("decode_tps", 3, 0, 3, [gains.SettingEffect(c, gains.Ratio.of([1.0, 1.01, 0.99]))],
                        portable_error="drafting changed the output: greedy text on prompt 'chat' ...")
    assert not ab.portable_holds
    assert any("not measured (drafting changed the output" in line and "exports keep every setting" in line
               for line in ab.lines("decode tok/s"))
    back = gains.Ablation.from_dict(json.loads(json.dumps(ab.to_dict())))
    assert back is not None and back.portable_error == ab.portable_error and not back.portable_holds
    # An older record without the field reads as none.
    old = ab.to_dict()
    del old["portable_error"]
    assert gains.Ablation.from_dict(old).portable_error is None


def test_prompt_lookup_drafting_never_goes_into_an_ollama_export() -> None:
    """A llama-cpp study's draft_num_predict is llama.cpp's prompt lookup, not Ollama's MTP option."""
    from optuna.trial import create_trial

    from tuner.metrics import RequestSample
    from tuner.record import build_record, stored_attrs

    s = [RequestSample("chat", 0, 60.0, 1000.0, 100, 50.0, 64, 640.0, 0.1, 1100.0, "length")]
    r = build_record("/m/gemma.gguf", {"num_thread": 2, "draft_num_predict": 4, "draft_ngram_size": 2}, {}, s)
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("engine", "llama-cpp")
    study.add_trial(create_trial(value=1.0, user_attrs=json.loads(json.dumps(stored_attrs(r)))))
    text = export.modelfile_text(study.trials[0], study, all_settings=True)
    _, params = parse_modelfile(text)
    assert params == {"num_thread": ["2"]}
    assert "draft_num_predict=4, draft_ngram_size=2 (llama.cpp prompt-lookup drafting" in text
    assert json.loads(export.json_text(study.trials[0], study))["options"] == {"num_thread": 2}


def variant_surface(model: str, o: dict[str, Any]) -> tuple[float, float]:
    """Only the q8_0 variant (+25%) and num_ctx 2048 (+20%) matter."""
    decode = 40.0 * (1.25 if model.endswith("q8_0") else 1.0) * (1.2 if o.get("num_ctx") == 2048 else 1.0)
    return 400.0, decode * math.exp(random.gauss(0.0, 0.005))


def test_a_variant_is_reverted_and_the_portable_config_is_measured_when_new(tmp_path: Any) -> None:
    random.seed(11)
    url = f"sqlite:///{tmp_path}/v.db"
    with FakeOllama(speed_fn=variant_surface) as fake:
        o = TuneOptions(model=["gemma3:1b"], host=fake.url, trials=17, repeats=1, num_predict=16, storage=url,
                        study_name="variants", seed=1, sampler="grid", prune=False, starting_points=False,
                        warm_start=False, roofline=False, validate=2, validate_rounds=5, measure_interference=False,
                        params={"num_batch": [256, 512], "num_ctx": [2048, 4096], "num_thread": [2, 4],
                                "num_gpu": [27], "variant": ["gemma3:1b", "gemma3:1b-it-q8_0"]})
        lines: list[str] = []
        run_study(o, echo=lines.append)
    ab = read_study(optuna.load_study(study_name="variants", storage=url)).ablation
    assert ab is not None
    by = {e.change.setting: e for e in ab.effects}
    assert by["variant"].change.default == "gemma3:1b" and by["variant"].change.value == "gemma3:1b-it-q8_0"
    assert by["variant"].reverted.ratio == pytest.approx(1.25, rel=0.02)
    # Four changes: no applied-alone configs; the portable config is none measured yet, so it
    # is measured against the winner in more rounds.
    assert all(e.alone is None for e in ab.effects)
    assert sorted(ab.portable) == ["num_ctx", "variant"]
    assert any(line.startswith("measuring the portable config") for line in lines), lines
    assert ab.portable_vs_winner is not None and ab.portable_holds
    assert ab.portable_vs_defaults.ratio == pytest.approx(1.5, rel=0.03)
    source, params = parse_modelfile(export.export(url, "variants", "modelfile").text)
    assert source == "gemma3:1b-it-q8_0" and params == {"num_ctx": ["2048"], "num_gpu": ["27"]}


def test_an_objective_where_lower_is_better_reads_as_its_own_change() -> None:
    """TTFT: ratios are stored as 'above 1 is better' but printed as what TTFT did."""
    better = gains.Ratio.of([1.25, 1.25, 1.25])  # reverting made TTFT 25% higher
    e = gains.SettingEffect(gains.Change("num_batch", None, 1024), better)
    assert e.text(lower_is_better=True).startswith("num_batch auto->1024: -20.0%")
    ab = gains.Ablation("ttft_p95", 3, 0, 3, [e], better, maximize=False, combined=better)
    text = "\n".join(ab.lines("p95 TTFT ms"))
    assert "lower is better" in text and "0.80x" in text and "-20.0%" in text


def test_the_run_warnings_reach_every_view_once(summary: Any) -> None:
    """What the run warned about before measuring is stored with the study: tune show and the
    report's first screen carry it, and the run's own --json says it once."""
    from tuner.report.data import build_data
    from tuner.show import show_json

    import shutil

    st = read_study(optuna.load_study(study_name="known", storage=STORAGE))
    assert st.info.run_warnings == summary.warnings
    if shutil.which("nvidia-smi") is None:  # without NVML the run warns that it has no GPU telemetry
        assert any(w.startswith("no NVIDIA GPU telemetry") for w in summary.warnings)
    texts = [w["text"] for w in summary_json(summary)["warnings"]]
    shown = [w["text"] for w in show_json(STORAGE, "known")["warnings"]]
    first = [c.text for c in build_data(optuna.load_study(study_name="known", storage=STORAGE), STORAGE).first.warnings]
    for w in summary.warnings:
        assert texts.count(w) == 1 and shown.count(w) == 1 and first.count(w) == 1
