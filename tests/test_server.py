"""Tests of tuner/server.py, with tests/bin/ollama standing in for the real executable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import psutil
import pytest

from tuner.errors import LoadError, ServerError
from tuner.server import (
    KEEP_ALIVE,
    NEWEST,
    ManagedServer,
    binary_version,
    effective_settings,
    find_ollama,
    kv_needs_flash_attention,
    models_dir_for,
    parse_version,
    server_env,
)

BIN = Path(__file__).resolve().parent / "bin"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put tests/bin first on PATH; return the record file the stand-in appends to."""
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_OLLAMA_RECORD", str(record))
    for var in ("FAKE_OLLAMA_VERSION", "FAKE_OLLAMA_FAIL_START", "FAKE_OLLAMA_CRASH_AFTER",
                "FAKE_OLLAMA_START_DELAY", "OLLAMA_MODELS", "OLLAMA_FLASH_ATTENTION",
                "OLLAMA_KV_CACHE_TYPE", "OLLAMA_NUM_PARALLEL"):
        monkeypatch.delenv(var, raising=False)
    return record


@pytest.fixture
def server(stand_in: Path, tmp_path: Path) -> Iterator[ManagedServer]:
    with ManagedServer(models_dir=tmp_path / "models", log_dir=tmp_path / "logs", ready_timeout_s=15) as s:
        yield s


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (an unreaped zombie counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout_s: float = 8.0) -> list[int]:
    """The pids still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if not gone(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


def tree(pid: int) -> list[int]:
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.33.1", (0, 33, 1)),
        ("0.6.5-rc1", (0, 6, 5)),
        ("v0.12.5", (0, 12, 5)),
        ("0.30", (0, 30, 0)),
        ("0.0.0", NEWEST),
        ("unknown", NEWEST),
        (None, NEWEST),
    ],
)
def test_parse_version(text: str | None, expected: tuple[int, int, int]) -> None:
    assert parse_version(text) == expected


def test_kv_needs_flash_attention() -> None:
    assert kv_needs_flash_attention("0.29.9")
    assert kv_needs_flash_attention("0.6.5-rc1")
    assert not kv_needs_flash_attention("0.30.0")
    assert not kv_needs_flash_attention("0.33.1")
    assert not kv_needs_flash_attention("0.0.0")


def test_server_env_maps_settings() -> None:
    base = {"PATH": "/bin", "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_KEEP_ALIVE": "5m"}
    env = server_env({"flash_attention": "off", "kv_cache_type": "q4_0", "num_parallel": 2}, "0.33.1", base)
    assert env["PATH"] == "/bin"
    assert env["OLLAMA_FLASH_ATTENTION"] == "0"
    assert env["OLLAMA_KV_CACHE_TYPE"] == "q4_0"
    assert env["OLLAMA_NUM_PARALLEL"] == "2"
    assert env["OLLAMA_KEEP_ALIVE"] == KEEP_ALIVE
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    assert server_env({"flash_attention": "on"}, "0.33.1", {})["OLLAMA_FLASH_ATTENTION"] == "1"
    # auto = unset; an inherited value must not leak into the run.
    auto = server_env({"flash_attention": "auto"}, "0.33.1", base)
    assert "OLLAMA_FLASH_ATTENTION" not in auto
    assert "OLLAMA_KV_CACHE_TYPE" not in server_env({}, None, {"OLLAMA_KV_CACHE_TYPE": "q8_0"})


def test_effective_old_versions() -> None:
    q8 = {"kv_cache_type": "q8_0"}
    assert effective_settings({**q8, "flash_attention": "off"}, "0.29.0")["kv_cache_type"] == "f16"
    assert effective_settings({**q8, "flash_attention": "auto"}, "0.29.0")["kv_cache_type"] == "f16"
    assert effective_settings(q8, "0.29.0") == {"kv_cache_type": "f16"}
    assert effective_settings({**q8, "flash_attention": "on"}, "0.29.0")["kv_cache_type"] == "q8_0"
    assert effective_settings(q8, "0.30.0") == q8
    assert effective_settings({"flash_attention": "auto"}, "0.12.4") == {"flash_attention": "off"}
    assert effective_settings({"flash_attention": "auto"}, "0.12.5") == {"flash_attention": "auto"}
    # The server is told the effective value, so the record can never be wrong.
    assert server_env({**q8, "flash_attention": "auto"}, "0.29.0", {})["OLLAMA_KV_CACHE_TYPE"] == "f16"


def test_effective_rejects_bad_settings() -> None:
    with pytest.raises(ServerError, match="unknown server setting 'num_ctx'"):
        effective_settings({"num_ctx": 2048}, None)
    with pytest.raises(ServerError, match="invalid kv_cache_type"):
        effective_settings({"kv_cache_type": "q5_1"}, None)
    with pytest.raises(ServerError, match="invalid num_parallel"):
        effective_settings({"num_parallel": 0}, None)


def test_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models_dir_for(tmp_path / "m", {"OLLAMA_MODELS": "/x"}) == tmp_path / "m"
    assert models_dir_for(None, {"OLLAMA_MODELS": "/x"}) == Path("/x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models_dir_for(None, {}) in (tmp_path / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models"))
    (tmp_path / ".ollama" / "models").mkdir(parents=True)
    assert models_dir_for(None, {}) == tmp_path / ".ollama" / "models"


def test_find_ollama(stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_ollama(None) == str(BIN / "ollama")
    assert find_ollama(str(BIN / "ollama")) == str(BIN / "ollama")
    with pytest.raises(ServerError, match=r"--ollama-bin /nope/ollama is not an executable file"):
        find_ollama("/nope/ollama")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError) as e:
        find_ollama(None)
    assert str(e.value) == "no `ollama` executable found: install Ollama or pass --ollama-bin PATH"


def test_binary_version(stand_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_VERSION", "0.6.5-rc1")
    assert binary_version(str(BIN / "ollama")) == "0.6.5-rc1"


# ----------------------------------------------------------------------------- the server


def test_ensure_starts_with_the_right_env(server: ManagedServer, stand_in: Path, tmp_path: Path) -> None:
    settings = {"flash_attention": "on", "kv_cache_type": "q8_0", "num_parallel": 2}
    assert server.ensure(settings) is True
    assert server.pid is not None
    assert server.version == "0.33.1"
    assert server.current == settings
    [rec] = records(stand_in)
    assert rec["pid"] == server.pid
    assert rec["argv"] == ["serve"]
    env = rec["env"]
    assert env["OLLAMA_HOST"] == f"127.0.0.1:{server.port}"
    assert env["OLLAMA_MODELS"] == str(tmp_path / "models")
    assert env["OLLAMA_FLASH_ATTENTION"] == "1"
    assert env["OLLAMA_KV_CACHE_TYPE"] == "q8_0"
    assert env["OLLAMA_NUM_PARALLEL"] == "2"
    assert env["OLLAMA_KEEP_ALIVE"] == KEEP_ALIVE
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    # It is a working Ollama API at server.url.
    client = ollama.Client(host=server.url)
    r = client.generate(model="gemma3:1b", prompt="hello there", options={"num_predict": 4})
    assert r.eval_count == 4
    assert "Listening on" in server.log_tail()


def test_same_settings_no_restart_changed_kv_restarts(server: ManagedServer, stand_in: Path) -> None:
    assert server.ensure({"kv_cache_type": "f16"}) is True
    first = server.pid
    assert server.ensure({"kv_cache_type": "f16"}) is False
    assert server.pid == first
    url = server.url
    assert server.ensure({"kv_cache_type": "q8_0"}) is True
    assert server.pid != first and first is not None and gone(first)
    assert server.url == url  # the same port across restarts: clients stay valid
    recs = records(stand_in)
    assert [r["env"]["OLLAMA_KV_CACHE_TYPE"] for r in recs] == ["f16", "q8_0"]
    assert httpx.get(server.url + "/api/version").json() == {"version": "0.33.1"}


def test_models_dir_defaults_to_env(stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "store"))
    with ManagedServer(log_dir=tmp_path) as s:
        s.ensure({})
    assert records(stand_in)[0]["env"]["OLLAMA_MODELS"] == str(tmp_path / "store")


def test_start_failure_is_a_load_error(server: ManagedServer) -> None:
    server.base_env["FAKE_OLLAMA_FAIL_START"] = "1"
    with pytest.raises(LoadError) as e:
        server.ensure({"num_parallel": 1})
    msg = str(e.value)
    assert msg.startswith("ollama serve failed to start (exited with code 1): ")
    assert f"Error: listen tcp 127.0.0.1:{server.port}: bind: address already in use" in msg
    assert "\n" not in msg
    assert server.pid is None


def test_ready_timeout(stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_START_DELAY", "30")
    with ManagedServer(log_dir=tmp_path, ready_timeout_s=0.5) as s:
        s._version()  # the --version call is not part of the readiness wait
        t0 = time.monotonic()
        with pytest.raises(LoadError, match=r"not ready after 0.5 s"):
            s.ensure({})
        assert time.monotonic() - t0 < 5
    pid = records(stand_in)[0]["pid"]
    assert wait_gone([pid]) == []


@pytest.mark.parametrize(
    ("version", "fa", "expected"),
    [("0.29.0", "off", "f16"), ("0.29.0", "auto", "f16"), ("0.29.0", "on", "q8_0"),
     ("0.30.0", "off", "q8_0"), ("0.33.1", "auto", "q8_0")],
)
def test_old_version_kv_rule(
    version: str, fa: str, expected: str, stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_VERSION", version)
    with ManagedServer(log_dir=tmp_path) as s:
        settings = {"kv_cache_type": "q8_0", "flash_attention": fa}
        assert s.effective(settings)["kv_cache_type"] == expected
        s.ensure(settings)
        assert s.version == version
        assert s.current is not None and s.current["kv_cache_type"] == expected
    assert records(stand_in)[0]["env"]["OLLAMA_KV_CACHE_TYPE"] == expected


def test_old_version_equivalent_settings_do_not_restart(server: ManagedServer) -> None:
    assert server.ensure({"kv_cache_type": "q8_0", "flash_attention": "off"}, version="0.29.0") is True
    assert server.ensure({"kv_cache_type": "f16", "flash_attention": "off"}, version="0.29.0") is False


def test_stop_leaves_no_process(server: ManagedServer) -> None:
    server.ensure({})
    assert server.pid is not None
    pids = tree(server.pid)
    assert len(pids) >= 2  # ollama serve and its runner
    server.stop()
    assert server.pid is None
    assert wait_gone(pids, 2.0) == []
    server.stop()  # idempotent


def test_crash_is_restarted_and_reported(server: ManagedServer) -> None:
    server.base_env["FAKE_OLLAMA_CRASH_AFTER"] = "1"
    server.ensure({})
    client = ollama.Client(host=server.url)
    client.generate(model="gemma3:1b", prompt="one", options={"num_predict": 2})
    with pytest.raises((httpx.HTTPError, ConnectionError, ollama.ResponseError)):
        client.generate(model="gemma3:1b", prompt="two", options={"num_predict": 2})
    with pytest.raises(LoadError, match=r"ollama serve exited with code 2: .*SIGSEGV"):
        server.check_alive()
    assert server.ensure({}) is True  # a dead server is started again
    assert server.pid is not None


# ----------------------------------------------------------------------------- no orphans

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from tuner.server import ManagedServer

    mode = sys.argv[1]
    if mode == "chain":
        def previous(signum, frame):
            print("previous handler ran", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, previous)
    with ManagedServer(log_dir=sys.argv[2]) as s:
        s.ensure({"num_parallel": 2})
        print(s.pid, flush=True)
        if mode == "raise":
            raise RuntimeError("boom")
        time.sleep(30)
    """
)
SCRIPT_NO_WITH = textwrap.dedent(
    """
    import sys, time
    from tuner.server import ManagedServer

    s = ManagedServer(log_dir=sys.argv[2])
    s.ensure({})
    print(s.pid, flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    time.sleep(30)
    """
)


@pytest.mark.parametrize(
    ("script", "mode", "sig", "rc"),
    [
        (SCRIPT, "raise", None, 1),  # an exception unwinds through `with`
        (SCRIPT_NO_WITH, "raise", None, 1),  # no `with`: the atexit hook
        (SCRIPT, "sleep", signal.SIGINT, -signal.SIGINT),  # Ctrl-C: KeyboardInterrupt through `with`
        (SCRIPT_NO_WITH, "sleep", signal.SIGTERM, -signal.SIGTERM),  # the SIGTERM handler
        (SCRIPT, "chain", signal.SIGTERM, 3),  # ... which chains to the previous handler
        (SCRIPT_NO_WITH, "sleep", signal.SIGKILL, -signal.SIGKILL),  # PR_SET_PDEATHSIG
    ],
    ids=["exception", "exception-atexit", "ctrl-c", "sigterm", "sigterm-chained", "sigkill"],
)
def test_server_never_outlives_the_tuner(
    script: str, mode: str, sig: signal.Signals | None, rc: int, stand_in: Path, tmp_path: Path
) -> None:
    assert sig != signal.SIGKILL or sys.platform.startswith("linux"), "PR_SET_PDEATHSIG is Linux-only"
    path = tmp_path / "tuner_script.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(path), mode, str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else ""
        pid = int(line)
        pids = tree(pid) if sig is not None else [pid]
        if sig is not None:
            assert len(pids) >= 2
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        assert wait_gone(pids, 5.0) == [], f"orphaned server processes: {pids}"
        assert proc.returncode == rc, err
        if mode == "chain":
            assert "previous handler ran" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- through the study loop


def _study_opts(**kw: Any) -> Any:
    from tuner.study import TuneOptions

    base: dict[str, Any] = dict(model=["gemma3:1b"], trials=6, repeats=1, num_predict=4, storage="sqlite:///s.db",
                                seed=3, prune=False, validate=0, roofline=False,
                                params={"kv_cache_type": ["f16", "q8_0"], "flash_attention": ["on", "off"],
                                        "num_thread": [2], "num_ctx": [2048], "num_batch": [512],
                                        "variant": ["gemma3:1b"]})
    base.update(kw)
    return TuneOptions(**base)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_study_searches_server_settings_on_a_managed_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    from tuner.study import run_study

    record = tmp_path / "starts.jsonl"
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_OLLAMA_RECORD", str(record))
    lines: list[str] = []
    run_study(_study_opts(), echo=lines.append)
    assert any("managed `ollama serve`" in line for line in lines)
    study = optuna.load_study(study_name=optuna.get_all_study_names("sqlite:///s.db")[0], storage="sqlite:///s.db")
    starts = _records(record)
    # one start per distinct run of server settings, in trial order
    seen: list[tuple[Any, Any]] = []
    for t in study.trials:
        srv = t.user_attrs["config"]["server"]
        key = (srv.get("flash_attention"), srv.get("kv_cache_type"))
        if not seen or seen[-1] != key:
            seen.append(key)
    assert len(starts) == len(seen)  # the baseline (no server settings) runs on the first, default start
    last_env = starts[-1]["env"]
    last = study.trials[-1].user_attrs["config"]["server"]
    assert last_env.get("OLLAMA_KV_CACHE_TYPE") == last["kv_cache_type"]
    assert last_env.get("OLLAMA_FLASH_ATTENTION") == ("1" if last["flash_attention"] == "on" else "0")
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    # the managed server is gone after the run
    for s in starts:
        assert not psutil.pid_exists(s["pid"]) or psutil.Process(s["pid"]).status() == psutil.STATUS_ZOMBIE


def test_old_server_records_quantized_kv_without_fa_as_f16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from tuner.study import run_study

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_OLLAMA_VERSION", "0.29.0")
    run_study(_study_opts(trials=4, params={"kv_cache_type": ["q8_0"], "flash_attention": ["on", "off"],
                                            "num_thread": [2], "num_ctx": [2048], "num_batch": [512],
                                            "variant": ["gemma3:1b"]}))
    study = optuna.load_study(study_name=optuna.get_all_study_names("sqlite:///s.db")[0], storage="sqlite:///s.db")
    for t in study.trials:
        srv = t.user_attrs["config"]["server"]
        if not srv:
            continue
        eff = t.user_attrs["server_effective"]
        assert eff["kv_cache_type"] == ("q8_0" if srv["flash_attention"] == "on" else "f16")


def test_failed_server_start_is_a_failed_trial_with_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.errors import LoadError
    from tuner.study import run_study

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_OLLAMA_FAIL_START", "1")
    with pytest.raises(LoadError, match="address already in use"):
        run_study(_study_opts(trials=2))


def test_config_whose_server_fails_to_start_is_infeasible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from tuner import results
    from tuner.study import run_study

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_OLLAMA_FAIL_START", "OLLAMA_KV_CACHE_TYPE=q4_0")
    run_study(_study_opts(trials=6, params={"kv_cache_type": ["f16", "q4_0"], "num_thread": [2],
                                            "num_ctx": [2048], "num_batch": [512], "variant": ["gemma3:1b"]}))
    study = optuna.load_study(study_name=optuna.get_all_study_names("sqlite:///s.db")[0], storage="sqlite:///s.db")
    bad = [t for t in study.trials if t.user_attrs["config"]["server"].get("kv_cache_type") == "q4_0"]
    good = [t for t in study.trials if t.user_attrs["config"]["server"].get("kv_cache_type") == "f16"]
    assert bad and good
    for t in bad:
        assert t.state.name == "COMPLETE" and not results.is_feasible(t)
        assert "failed to start" in t.user_attrs["error"] and "address already in use" in t.user_attrs["error"]
    assert all(results.is_feasible(t) for t in good)


def test_managed_study_resumes_under_the_same_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from tuner.study import run_study

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    run_study(_study_opts(trials=2))
    run_study(_study_opts(trials=2))  # a new server on a new port: still the same study
    names = optuna.get_all_study_names("sqlite:///s.db")
    assert names == ["gemma3:1b@managed-ollama"]
    study = optuna.load_study(study_name=names[0], storage="sqlite:///s.db")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 4
    assert study.user_attrs["managed_server"] is True
