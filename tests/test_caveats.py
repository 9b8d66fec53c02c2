"""tuner/caveats.py: one list of caveats, built once from the stored study, in every view."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
from conftest import invoke

from tuner import caveats, record, results
from tuner.caveats import Caveat
from tuner.storage import open_storage


def _contended_study(url: str, *, repeats: int = 1, contended: bool = True, validation: dict[str, Any] | None = None,
                     baseline_ctx: int = 4096) -> None:
    """The baseline (the server ran num_ctx ``baseline_ctx``), #1 at num_ctx 2048 (the winner),
    #2 faster but measured while other processes competed; workload ``repeats``."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from tuner.metrics import RequestSample
    from tuner.workload import Workload, builtin_prompts

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize"])
    record.write_study_info(study, record.StudyInfo(
        model="gemma3:1b", engine="ollama", objectives=[record.DEFAULT_OBJECTIVE], space_hash="a", workload_hash="b",
        host="http://127.0.0.1:11434", server_version="0.12.3", space={"num_ctx": [2048, 4096], "num_thread": [1, 2]},
        workload=Workload(prompts=builtin_prompts()[:1], repeats=repeats, num_predict=64).to_dict(),
        environment={"engine": "ollama", "server_version": "0.12.3", "gpus": [], "host": {"cpu_model": "X"}},
        hardware={"cpu": "X", "cores": 4, "ram_gib": 16, "gpus": []}, created_at="2026-08-01T10:00:00+00:00"))
    dists = {"num_ctx": CategoricalDistribution([2048, 4096]), "num_thread": CategoricalDistribution([1, 2])}
    for options, eval_ms, busy in (({}, 640.0, False), ({"num_ctx": 2048, "num_thread": 2}, 400.0, False),
                                   ({"num_ctx": 4096, "num_thread": 2}, 320.0, contended)):
        samples = [RequestSample(builtin_prompts()[0].name, 0, 60.0, 1000.0, 100, 50.0, 64, eval_ms, 0.1, 1100.0,
                                 "length")]
        rec = record.build_record("gemma3:1b", options, {}, samples, baseline=not options)
        rec = dataclasses.replace(rec, contended=busy, interference_pct=90.0 if busy else 1.0,
                                  ran={"num_ctx": options.get("num_ctx", baseline_ctx)})
        attrs = {**record.stored_attrs(rec), **({record.BASELINE: True} if not options else {})}
        study.add_trial(create_trial(
            values=[rec.stat(record.DECODE_TPS)], params=options, distributions={k: dists[k] for k in options},
            user_attrs=json.loads(json.dumps(attrs)), system_attrs={record.CONSTRAINTS_KEY: [0.0]}))
    if validation is not None:
        study.set_user_attr(record.VALIDATION, validation)


def _stored(url: str) -> results.StoredStudy:
    return results.read_study(optuna.load_study(study_name="s", storage=open_storage(url)))


def _codes(items: list[Any]) -> list[str]:
    return [c["code"] if isinstance(c, dict) else c.code for c in items]


def test_a_contended_study_warns_in_show_json_and_on_the_reports_first_screen(tmp_path: Path) -> None:
    from tuner.report.data import build_data
    from tuner.report.html import render_html as render

    url = f"sqlite:///{tmp_path / 't.db'}"
    _contended_study(url)
    st = _stored(url)
    best = st.best()
    assert best is not None and best.number == 1  # the faster #2 was contended: left out
    found = caveats.study_caveats(st, best)
    assert _codes(found) == [caveats.CONTENDED, caveats.NO_INTERVAL, caveats.CONTEXT_LOWERED,
                             caveats.SINGLE_MEASUREMENT]
    by = {c.code: c for c in found}
    assert by["contended"].text.startswith("1 trial measured while other processes competed for the machine")
    assert by["no_interval"].detail == {"reason": results.NOT_REVALIDATED}
    assert by["context_lowered"].detail == {"num_ctx": 2048, "default_num_ctx": 4096}
    assert "`--context 4096`" in by["context_lowered"].text
    # tune show --json: the same list, each with its code and text.
    r = invoke("show", "s", "--storage", url, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert _codes(doc["warnings"]) == _codes(found)
    assert doc["warnings"][0] == {"code": "contended", "text": by["contended"].text,
                                  "detail": {"trials": 1, "redone": 0, "lost_s": 0.0, "only_contended": False}}
    # The terminal summary prints each one.
    text = invoke("show", "s", "--storage", url).output
    assert f"WARNING: {by['context_lowered'].text}" in text, text
    # The report's first screen holds the same list, and draws it under the winner.
    data = build_data(_stored(url), url)
    assert data.first is not None and data.first.warnings == found
    page = render(data)
    first = page[page.index("id=\"what-to-run\""):page.index("</section>", page.index("id=\"what-to-run\""))]
    assert "<li data-code=\"contended\">1 trial measured while other processes competed" in first, first


def test_a_quiet_revalidated_study_at_the_default_context_has_no_caveat(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    rounds = [1.5, 1.52, 1.49]
    val = results.Validation(
        objective="decode_tps", rounds=3, entries=[results.Validated(2, [160.0, 161.0, 159.0], 160.0, 1.0,
                                                                     (157.5, 162.5))],
        winner=2, overlap=False, trials_at=3, interval="log-t",
        baseline=results.Validated(0, [100.0, 100.5, 99.5], 100.0, 0.5, (99.0, 101.0)),
        speedup=results.Speedup(2, 0, 1.5, (1.45, 1.55), rounds))
    _contended_study(url, repeats=3, contended=False, validation=val.to_dict(), baseline_ctx=2048)
    st = _stored(url)
    assert caveats.study_caveats(st, st.best()) == []
    doc = json.loads(invoke("show", "s", "--storage", url, "--json").output)
    assert doc["warnings"] == []


def test_run_warnings_get_a_code() -> None:
    assert caveats.run_caveat("no NVIDIA GPU telemetry: NVML library not found").code == caveats.NO_GPU_TELEMETRY
    assert caveats.run_caveat("pruning needs at least 5 requests per trial").code == caveats.PRUNING_WEAK
    assert caveats.run_caveat("something else").code == caveats.RUN
    assert Caveat("x", "y").to_dict() == {"code": "x", "text": "y"}
    s = results.StudySummary("s", "", ["decode_tps"], 0, {}, None, False, None, None,
                             warnings=["no NVIDIA GPU telemetry: none"], caveats=[Caveat("contended", "busy")])
    assert _codes(s.all_warnings) == ["no_gpu_telemetry", "contended"]
