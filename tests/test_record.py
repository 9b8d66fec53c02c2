"""tuner/record.py: the one trial record, its stored layout, and its place in the package."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from tuner import record
from tuner.metrics import RequestSample
from tuner.record import ServerMemory, TrialRecord, build_record, read_record, stored_attrs

PACKAGE = Path(__file__).resolve().parent.parent / "tuner"


def sample(eval_ms: float, ttft: float, prompt: str = "chat") -> RequestSample:
    return RequestSample(prompt, 0, ttft, 1000.0, 100, 50.0, 64, eval_ms, 0.1, 1100.0, "length")


def _record(**kw: Any) -> TrialRecord:
    base: dict[str, Any] = dict(model="gemma3:1b", options={"num_ctx": 2048}, server={})
    base.update(kw)
    samples = base.pop("samples", [sample(640.0, 60.0), sample(320.0, 80.0, "doc")])
    return build_record(base.pop("model"), base.pop("options"), base.pop("server"), samples, **base)


def _frozen(attrs: dict[str, Any], **kw: Any) -> Any:
    return optuna.trial.create_trial(value=kw.pop("value", 1.0), user_attrs=json.loads(json.dumps(attrs)), **kw)


def test_statistics_are_computed_once_in_the_record() -> None:
    r = _record()
    assert r.stat("decode_tps") == pytest.approx(150.0)
    assert r.stat("ttft_ms", "p95") == pytest.approx(79.0)
    assert r.n_requests == 2 and r.done_reasons == ["length"]
    assert set(r.stats) == set(record.SUMMARISED)


def test_the_stored_layout_keeps_the_documented_names_flat() -> None:
    attrs = stored_attrs(_record(reload_ms=1234.5, server_memory=ServerMemory(800.0, 900.0)))
    for metric in ("decode_tps", "prefill_tps", "e2e_tps"):
        for stat in ("mean", "sd", "p50", "p95"):
            assert f"{metric}_{stat}" in attrs
    for key in ("ttft_ms_p95", "latency_ms_p95", "reload_ms", "server_vram_mib", "config", "samples",
                "violations"):
        assert key in attrs
    # The rest is grouped, so a trial costs a couple of dozen writes, not sixty.
    assert "decode_tps_min" in attrs["detail"] and attrs["detail"]["n_requests"] == 2
    assert len(attrs) <= 24, sorted(attrs)


def test_read_back_equals_what_was_built() -> None:
    r = _record(reload_ms=10.0, baseline=False, worker={"hostname": "h", "pid": 1})
    back = read_record(_frozen(stored_attrs(r)))
    for name in ("model", "options", "server", "reload_ms", "stats", "n_requests", "done_reasons", "samples",
                 "worker", "violations", "tokens_per_joule"):
        assert getattr(back, name) == getattr(r, name), name
    assert back.flat() == r.flat()


def test_studies_written_before_the_grouping_read_the_same() -> None:
    r = _record(reload_ms=10.0)
    new = stored_attrs(r)
    old = {k: v for k, v in new.items() if k != "detail"}
    old.update(new["detail"])  # the old layout: every value a flat attribute
    a, b = read_record(_frozen(new)), read_record(_frozen(old))
    assert a.stats == b.stats and a.flat() == b.flat()


def test_objectives_read_the_record() -> None:
    from tuner import objectives

    r = _record()
    assert objectives.get("decode_tps").value(r) == r.stat("decode_tps")
    assert objectives.get("ttft_p95").value(r) == r.stat("ttft_ms", "p95")
    assert objectives.get("tokens_per_joule").value(r) is None  # no energy measured
    assert all(o.per_request is None or hasattr(sample(1.0, 1.0), o.per_request)
               for o in objectives.OBJECTIVES.values())


def _stored_names() -> set[str]:
    r = _record(reload_ms=1.0, server_memory=ServerMemory(1.0, 1.0))
    r.tokens_per_joule, r.pruned_saved_s = 1.0, 1.0
    r.telemetry = {"gpu_power_mean_w": 1.0, "gpu_mem_used_peak_mib": 1.0, "gpu_energy_j": 1.0,
                   "gpu0_temp_max_c": 1.0, "host_cpu_util_mean_pct": 1.0, "server_rss_peak_mib": 1.0}
    return set(r.flat())


def test_no_stored_metric_name_is_spelled_outside_the_record_module() -> None:
    from tuner.objectives import OBJECTIVES

    # An objective's name is a registry key; where it equals a stored name it is that name.
    names = _stored_names() - set(OBJECTIVES)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "record.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert offenders == []


def test_the_study_record_is_written_once_and_read_back() -> None:
    class Study:
        def __init__(self) -> None:
            self.user_attrs: dict[str, Any] = {}

        def set_user_attr(self, k: str, v: Any) -> None:
            self.user_attrs[k] = v

    info = record.StudyInfo(model="gemma3:1b", engine="ollama", objectives=["decode_tps", "ttft_p95"],
                            space_hash="a", workload_hash="b", host="http://127.0.0.1:11434", server_local=True,
                            server_version="0.12.3", space={"num_ctx": [2048]}, workload={"repeats": 1},
                            environment={"os": "Linux"}, hardware={"cpu": "X"}, gpu_offload_source="ollama-ps",
                            created_at="2026-08-01", context=4096, limits={"max_ttft_ms": 500.0})
    study = Study()
    record.write_study_info(study, info)
    # space_hash last: a worker that sees it sees the whole identity; the names are the stored ones.
    assert list(study.user_attrs)[-2:] == ["space_hash", "limits"]
    assert study.user_attrs["objectives"] == ["decode_tps", "ttft_p95"] and study.user_attrs["context"] == 4096
    assert "memory_model" not in study.user_attrs
    assert record.read_study_info(dict(study.user_attrs)) == info
    record.write_study_info(study, record.StudyInfo(limits={}), new=False)  # a resume writes its limits only
    assert study.user_attrs["limits"] == {} and study.user_attrs["model"] == "gemma3:1b"


def _stored_by_both_paths(url_for: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """The same record written through the one-transaction path and the per-attribute path."""
    import warnings

    from tuner.storage import open_storage

    warnings.filterwarnings("ignore", message="Heartbeat of storage")
    r = _record(reload_ms=12.5, worker={"hostname": "h", "pid": 1})
    r.constraints = {"ttft_ms": -3.0, "load": 0.0}
    out = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(record, "_write_in_one_transaction", lambda *a: False)
        study = optuna.create_study(storage=open_storage(url_for(fast)), study_name="s", direction="maximize")
        trial = study.ask()
        record.write_record(trial, r)
        assert trial.user_attrs == json.loads(json.dumps(stored_attrs(r)))
        study.tell(trial, 1.0)
        out.append(study.trials[0])
    return out[0], out[1]


def test_a_trial_is_stored_in_one_commit_with_the_same_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy

    from tuner.storage import open_storage

    commits: list[int] = []

    def count(conn: Any) -> None:
        commits.append(1)

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/one.db"), study_name="one")
    trial = study.ask()
    r = _record()
    r.constraints = {"load": 0.0}
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", count)
    try:
        record.write_record(trial, r)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "commit", count)
    assert len(commits) == 1  # Optuna alone commits once per attribute: ~25
    fast, slow = _stored_by_both_paths(lambda fast: f"sqlite:///{tmp_path}/{fast}.db", monkeypatch)
    assert fast.user_attrs == slow.user_attrs and fast.system_attrs == slow.system_attrs
    assert record.constraints(fast) == {"ttft_ms": -3.0, "load": 0.0}
    assert read_record(fast).flat() == read_record(slow).flat()


def test_a_journal_storage_takes_the_per_attribute_path(tmp_path: Path) -> None:
    from tuner.storage import open_storage

    study = optuna.create_study(storage=open_storage(f"journal:///{tmp_path}/s.log"), study_name="j")
    trial = study.ask()
    r = _record()
    r.constraints = {"load": 0.0}
    record.write_record(trial, r)
    study.tell(trial, 1.0)
    back = optuna.load_study(study_name="j", storage=open_storage(f"journal:///{tmp_path}/s.log")).trials[0]
    assert back.user_attrs == json.loads(json.dumps(stored_attrs(r)))
    assert record.constraints(back) == {"load": 0.0}


def test_a_finished_trial_is_not_written_by_the_fast_path(tmp_path: Path) -> None:
    from tuner.storage import open_storage

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/f.db"), study_name="f")
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(RuntimeError):
        record.write_record(trial, _record())
