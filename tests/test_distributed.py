"""Many workers on one PostgreSQL study, crash recovery, and a server dying mid-study.

Uses a real PostgreSQL: $TUNER_TEST_PG_URL, or a throwaway cluster that
scripts/pg-throwaway.sh starts (PostgreSQL installed from Debian packages, as .ci/run does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from fake_ollama import FakeOllama

from tuner import record, results
from tuner.storage import open_storage
from tuner.study import TuneOptions, run_study

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pg-throwaway.sh"


def _pg_available() -> bool:
    return bool(
        os.environ.get("TUNER_TEST_PG_URL")
        or (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))
    )


pytestmark = pytest.mark.skipif(
    not _pg_available(),
    reason="no PostgreSQL here: set TUNER_TEST_PG_URL or install it (`apt-get install postgresql`; .ci/run does)",
)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    url = os.environ.get("TUNER_TEST_PG_URL")
    if url:
        yield url
        return
    env = {**os.environ, "TUNER_PG_DIR": "/tmp/tuner-pg-pytest", "TUNER_PG_PORT": "54339"}
    out = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        # PostgreSQL is installed (the module's skipif checked): not starting is a failure to see.
        pytest.fail(f"could not start a throwaway PostgreSQL: {out.stderr.strip()[-300:]}")
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture
def pg(pg_server: str) -> str:
    """A fresh database URL per test (a new schema would also do; a new DB is simplest)."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:10]
    admin = pg_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server.rsplit("/", 1)[0] + "/" + name


def worker_cmd(url: str, storage: str, trials: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tuner.cli", "run", "--model", "gemma3:1b", "--host", url,
        "--trials", str(trials), "--repeats", "1", "--num-predict", "4", "--storage", storage,
        "--study", "shared", "--no-prune", "--validate", "0", "--no-roofline",
        "--param", "num_thread=1,2,4", "--param", "num_batch=128,256,512,1024", *extra,
    ]


def test_three_workers_share_one_study(pg: str, tmp_path: Path) -> None:
    fakes = [FakeOllama().start() for _ in range(3)]
    try:
        procs = [subprocess.Popen(worker_cmd(f.url, pg, 10), cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for f in fakes]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for f in fakes:
            f.stop()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    study = optuna.load_study(study_name="shared", storage=open_storage(pg))
    trials = study.trials
    assert len(trials) == 30
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.number for t in trials) == list(range(30))
    assert sum(1 for t in trials if t.user_attrs.get("baseline")) == 1
    for t in trials:
        assert t.user_attrs["decode_tps_mean"] > 0 and t.user_attrs["samples"]
        assert t.user_attrs["worker"]["server"] in {f.url for f in fakes}
    # every worker's server took part
    assert len({t.user_attrs["worker"]["server"] for t in trials}) == 3
    # studies / show work unchanged on PostgreSQL
    from conftest import invoke

    r = invoke("studies", "--storage", pg)
    assert r.exit_code == 0 and "shared" in r.output and "30" in r.output
    r = invoke("show", "shared", "--storage", pg)
    assert r.exit_code == 0 and "Best feasible configuration" in r.output


def test_killed_worker_trial_fails_after_grace_and_is_retried(pg: str, tmp_path: Path) -> None:
    slow = FakeOllama(time_scale=0.2).start()  # a trial takes seconds: time to kill it mid-trial
    try:
        beat = ["--heartbeat-interval", "1", "--grace-period", "3", "--retry-failed"]
        p = subprocess.Popen(worker_cmd(slow.url, pg, 20, *beat), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        storage = open_storage(pg)
        deadline = time.monotonic() + 120
        killed_number = None
        while time.monotonic() < deadline:
            try:
                study = optuna.load_study(study_name="shared", storage=storage)
                trials = study.get_trials(deepcopy=False)
            except KeyError:
                trials = []
            done = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING"]
            full = max((len(t.params) for t in done), default=0)
            # Killed once its config is chosen (every parameter suggested) and its record says so
            # (written before measuring), mid-measurement.
            if (len(done) >= 2 and running and full and len(running[0].params) == full
                    and record.WORKER in running[0].user_attrs):
                killed_number = running[0].number
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        p.wait(timeout=30)
        assert killed_number is not None, "the worker never got to a running trial"
        completed_before = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
        time.sleep(4.5)  # past the grace period
        fast = FakeOllama().start()
        try:
            r = subprocess.run(worker_cmd(fast.url, pg, 3, *beat), cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
        finally:
            fast.stop()
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        slow.stop()
    study = optuna.load_study(study_name="shared", storage=open_storage(pg))
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed_number].state.name == "FAIL"
    # no completed trial was lost, and the new run added its trials
    assert completed_before <= {n for n, t in by_number.items() if t.state.name == "COMPLETE"}
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == by_number[killed_number].params
    from tuner.show import format_show

    shown = format_show(pg, "shared")
    line = next(x for x in shown.splitlines() if x.startswith(f"  #{killed_number} "))
    assert f"pid {p.pid}) sent no heartbeat for 3 s: it was killed, crashed or hung" in line


def test_server_dying_mid_study_is_waited_for(pg: str) -> None:
    fake = FakeOllama(time_scale=0.01).start()
    lines: list[str] = []

    def outage() -> None:
        while len(fake.generate_requests()) < 8:
            time.sleep(0.01)
        fake.stop()
        time.sleep(2.0)
        fake.start()

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    try:
        run_study(TuneOptions(model=["gemma3:1b"], host=fake.url, trials=6, repeats=1, num_predict=4,
                              storage=pg, study_name="outage", prune=False, validate=0, roofline=False,
                              server_wait_s=20, params={"num_thread": [1, 2, 4]}), echo=lines.append)
    finally:
        t.join(timeout=10)
        fake.stop()
    study = optuna.load_study(study_name="outage", storage=open_storage(pg))
    states = [tr.state.name for tr in study.trials]
    assert "FAIL" in states and states.count("COMPLETE") >= 4
    failed = next(tr for tr in study.trials if tr.state.name == "FAIL")
    assert "cannot reach Ollama" in failed.user_attrs["error"] or "broke off" in failed.user_attrs["error"]
    assert any("waiting up to 20 s" in line for line in lines)
    assert results.best_feasible(study) is not None


def test_a_worker_on_other_hardware_is_refused(pg: str, fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.errors import StudyError
    import tuner.study as st

    o = TuneOptions(model=["gemma3:1b"], host=fake.url, trials=1, repeats=1, num_predict=4, storage=pg,
                    study_name="hw", validate=0, roofline=False)
    run_study(o)
    real = st.hardware_fingerprint

    def other(env: dict[str, Any]) -> dict[str, Any]:
        return {**real(env), "gpus": ["NVIDIA H200"]}

    import tuner.runner as runner

    # The study's identity check and the worker record each read the machine's fingerprint.
    monkeypatch.setattr(st, "hardware_fingerprint", other)
    monkeypatch.setattr(runner, "hardware_fingerprint", other)
    with pytest.raises(StudyError, match="measured on different hardware .* pass --allow-mixed-hardware"):
        run_study(o)
    o.allow_mixed_hardware = True
    run_study(o)
    study = optuna.load_study(study_name="hw", storage=open_storage(pg))
    assert [t.user_attrs["worker"]["gpus"] for t in study.trials if t.state.name == "COMPLETE"][-1] == ["NVIDIA H200"]


def test_fleet_of_two_machines_in_one_storage(pg: str, fake: FakeOllama, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from conftest import invoke
    from test_fleet import run_on

    from tuner import fleet

    run_on(fake, monkeypatch, "box", storage=pg)
    run_on(fake, monkeypatch, "h200", storage=pg, gpus=["NVIDIA H200"])
    calls: dict[str, int] = {}
    for method in ("get_all_studies", "get_all_trials", "get_trial", "get_study_user_attrs"):
        real = getattr(optuna.storages.RDBStorage, method)

        def counted(self: Any, *a: Any, _real: Any = real, _name: str = method, **kw: Any) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(optuna.storages.RDBStorage, method, counted)
    rows = fleet.read_fleet(pg).rows
    # The studies with their attributes in one call, then each study's trials once.
    assert calls == {"get_all_studies": 1, "get_all_trials": 2}
    assert [r.study for r in rows] == ["box", "h200"]  # by hardware label
    assert rows[0].hardware.startswith("GPU (server-reported): ") and rows[1].hardware == "NVIDIA H200"

    r = invoke("studies", "--by-hardware", "--storage", pg)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"2 studies in {pg}: 2 model x hardware pairs" and lines[2] == "gemma3:1b"
    assert lines[3].startswith(f"  {rows[0].hardware} ") and " box " in lines[3]
    assert lines[4].startswith("  NVIDIA H200 ") and " h200 " in lines[4]
    r = invoke("studies", "--by-hardware", "--json", "--storage", pg)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [(d["study"], d["hardware"]["label"], d["value"]) for d in doc["rows"]] == \
        [(x.study, x.hardware, x.value) for x in rows]
    r = invoke("report", "--fleet", "--storage", pg, "-o", "fleet.html")
    assert (r.exit_code, r.output) == (0, "fleet.html\n")
    page = (tmp_path / "fleet.html").read_text()
    assert "<code>h200</code>" in page and "<code>box</code>" in page and "NVIDIA H200" in page


def test_a_trial_record_is_one_upsert_on_postgresql(pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-transaction write stores what Optuna's per-attribute writes store, on PostgreSQL."""
    import json

    import optuna

    from tuner.metrics import RequestSample

    s = [RequestSample("chat", 0, 60.0, 1000.0, 100, 50.0, 64, 640.0, 0.1, 1100.0, "length")]
    r = record.build_record("gemma3:1b", {"num_ctx": 2048}, {}, s, reload_ms=3.0)
    r.constraints = {"load": 0.0}
    got = []
    for name, fast in (("fast", True), ("slow", False)):
        if not fast:
            monkeypatch.setattr(record, "_write_in_one_transaction", lambda *a: False)
        study = optuna.create_study(storage=open_storage(pg), study_name=name)
        trial = study.ask()
        record.write_record(trial, r)
        record.write_record(trial, r)  # a second write of the same values changes nothing
        study.tell(trial, 1.0)
        got.append(optuna.load_study(study_name=name, storage=open_storage(pg)).trials[0])
    assert got[0].user_attrs == got[1].user_attrs == json.loads(json.dumps(record.stored_attrs(r)))
    assert got[0].system_attrs == got[1].system_attrs
