"""What optuna-dashboard, Optuna's samplers and the exports read from a stored study.

Constraints go in the one form all three read (``record.store_constraints``); the real
``optuna-dashboard`` server is started on loopback and asked over its JSON API.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from fake_ollama import FakeOllama

from tuner import export, record, results
from tuner.study import TuneOptions, run_study

pytest.importorskip("optuna_dashboard")

OBJECTIVES = ["decode_tps", "ttft_p95"]


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A finished study with feasible, TTFT-infeasible and failed-load trials."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 't.db'}"
    # At this time scale fp16 on the CPU misses a 40 ms p95 TTFT, the q4 model on the GPU
    # meets it, and fp16 at 32k context with every layer on the GPU does not load on a 2.7 GB GPU.
    with FakeOllama(time_scale=0.01, memory_budget_mib=2700) as fake:
        summary = run_study(TuneOptions(
            model=["gemma3:1b"], host=fake.url, trials=9, repeats=1, num_predict=16, storage=url,
            seed=1, sampler="grid", objectives=OBJECTIVES, max_ttft_ms=40.0, validate=0,
            roofline=False, params={"variant": ["gemma3:1b", "gemma3:1b-it-fp16"], "num_gpu": [0, 27],
                                    "num_ctx": [2048, 32768], "num_thread": [1]},
        ))
    yield url, summary.study_name


def _trials(study_url: tuple[str, str]) -> list[Any]:
    return optuna.load_study(study_name=study_url[1], storage=study_url[0]).get_trials(deepcopy=False)


def test_the_study_has_every_kind_of_trial(study_url: tuple[str, str]) -> None:
    trials = [t for t in _trials(study_url) if t.state.name == "COMPLETE"]
    assert any(results.is_feasible(t) for t in trials)
    assert any(record.constraints(t)["ttft_p95_ms"] > 0 and not t.user_attrs.get("error") for t in trials)
    assert any(record.constraints(t)["load"] == 1.0 for t in trials)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return json.loads(r.read().decode("utf-8"))


@pytest.fixture
def dashboard(study_url: tuple[str, str], tmp_path: Path) -> Iterator[str]:
    """The real ``optuna-dashboard`` command serving the study's storage on 127.0.0.1."""
    port = _free_port()
    log = (tmp_path / "dashboard.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "optuna_dashboard._cli", study_url[0],
         "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text(errors="replace")
            try:
                _get(base, "/api/meta")
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_dashboard_shows_feasibility_and_objective_names(study_url: tuple[str, str], dashboard: str) -> None:
    ids = [s["study_id"] for s in _get(dashboard, "/api/studies")["study_summaries"]
           if s["study_name"] == study_url[1]]
    assert len(ids) == 1
    detail = _get(dashboard, f"/api/studies/{ids[0]}")
    assert detail["objective_names"] == OBJECTIVES
    shown = {t["number"]: t for t in detail["trials"]}
    complete = [t for t in _trials(study_url) if t.state.name == "COMPLETE"]
    assert len(complete) >= 4
    for t in complete:
        d = shown[t.number]
        assert d["constraints"] == list(record.constraints(t).values()), t.number
        # The dashboard's own rule (feasible when every value <= 0) must agree with the tool's.
        assert all(c <= 0 for c in d["constraints"]) == results.is_feasible(t), t.number


def test_samplers_see_each_constraint_once(study_url: tuple[str, str]) -> None:
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score
    from optuna.samplers.nsgaii._constraints_evaluation import _evaluate_penalty

    complete = [t for t in _trials(study_url) if t.state.name == "COMPLETE"]
    for t in complete:
        mine = record.constraints(t)
        assert set(mine) == {"load", "ttft_p95_ms"}
        # What Optuna itself reads (TPE and NSGA-II both go through FrozenTrial.constraints).
        assert sorted(t.constraints.values()) == sorted(mine.values())
        assert _get_infeasible_trial_score(t) == pytest.approx(results.violation(t))
    assert list(_evaluate_penalty(complete)) == pytest.approx([results.violation(t) for t in complete])


def _constraint_columns(columns: Any) -> list[str]:
    return [str(c) for c in columns if str(c).startswith("constraint_")]


def test_exports_have_one_column_per_constraint(study_url: tuple[str, str], tmp_path: Path) -> None:
    import pandas as pd

    csv = pd.read_csv(io.StringIO(export.export(study_url[0], study_url[1], "csv").text or ""))
    out = tmp_path / "t.parquet"
    export.export(study_url[0], study_url[1], "parquet", output=str(out))
    parquet = pd.read_parquet(out)
    for df in (csv, parquet):
        assert len(set(df.columns)) == len(df.columns)
        assert _constraint_columns(df.columns) == ["constraint_load", "constraint_ttft_p95_ms"]


def _study_with(**trial_kw: Any) -> Any:
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0, **trial_kw))
    return study


def test_studies_stored_before_the_change_read_the_same() -> None:
    # Trial.set_constraint's named keys, as the tuner stored them before.
    old = _study_with(constraints={"load": 0.0, "ttft_p95_ms": 0.5}).trials[0]
    assert record.constraints(old) == {"load": 0.0, "ttft_p95_ms": 0.5}
    assert results.violation(old) == 0.5 and not results.is_feasible(old)
    ok = _study_with(constraints={"load": 0.0, "ttft_p95_ms": -0.5}).trials[0]
    assert results.is_feasible(ok)


def test_both_forms_side_by_side_count_once() -> None:
    both = _study_with(
        constraints={"load": 0.0, "ttft_p95_ms": 0.5},
        system_attrs={"constraints": [0.0, 0.5], record.CONSTRAINT_NAMES_KEY: ["load", "ttft_p95_ms"]},
    )
    t = both.trials[0]
    assert len(t.constraints) == 4  # Optuna itself counts such a trial's constraints twice
    assert record.constraints(t) == {"load": 0.0, "ttft_p95_ms": 0.5}
    assert results.violation(t) == 0.5
    assert _constraint_columns(results.trials_frame(both).columns) == ["constraint_load", "constraint_ttft_p95_ms"]
    unnamed = _study_with(constraints={"load": 0.0, "ttft_p95_ms": 0.5}, system_attrs={"constraints": [0.0, 0.5]})
    assert record.constraints(unnamed.trials[0]) == {"load": 0.0, "ttft_p95_ms": 0.5}
