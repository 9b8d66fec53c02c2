"""The bad-input matrix: each case gives one line `Error: ...` naming the fix, exit code 2,
no traceback, and leaves the storage as it was."""

from __future__ import annotations

import errno
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama

DB = "sqlite:///studies/tuner.db"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Garbage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self._reply()

    def do_POST(self) -> None:  # noqa: N802
        self._reply()

    def _reply(self) -> None:
        body = b'{"models": [ this is not json'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture(scope="module")
def garbage_url() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _files(tmp: Path) -> None:
    (tmp / "bad.toml").write_text("[params\nnum_ctx = ")
    (tmp / "unknown.toml").write_text("[params]\nnum_cores = [1, 2]\n")
    (tmp / "emptylist.toml").write_text("[params]\nnum_batch = []\n")
    (tmp / "empty.txt").write_text("   \n---\n")
    (tmp / "long.txt").write_text("word " * 200_000)
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp / "afile").write_text("not a folder")


def _seed_study(url: str) -> None:
    r = invoke("--model", "gemma3:1b", "--host", url, "--trials", "1", "--repeats", "1", "--num-predict", "4",
               "--study", "taken", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output


M = ["--model", "gemma3:1b", "--host", "{fake}"]
# (id, args, expected start of the one-line error, setup needing an existing study)
CASES: list[tuple[str, list[str], str, bool]] = [
    ("unreachable-host", ["--model", "gemma3:1b", "--host", "{closed}"],
     "Error: cannot reach Ollama at {closed}: is it running? Start it with `ollama serve` or point --host / OLLAMA_HOST at it", False),
    ("model-typo", ["--model", "gemma3:4b", "--host", "{fake}"],
     "Error: model 'gemma3:4b' is not installed on {fake}: did you mean 'gemma3:1b'? Or pull it with `ollama pull gemma3:4b`", False),
    ("unknown-model", ["--model", "mistral:7b", "--host", "{fake}"],
     "Error: model 'mistral:7b' is not installed on {fake}: pull it with `ollama pull mistral:7b`", False),
    ("malformed-host", ["--model", "gemma3:1b", "--host", "http://:abc"],
     "Error: invalid Ollama host 'http://:abc': write it as http://HOST:PORT, e.g. http://127.0.0.1:11434", False),
    ("malformed-json-server", ["--model", "gemma3:1b", "--host", "{garbage}"],
     "Error: Ollama at {garbage} sent a malformed response to /api/version", False),
    ("trials-zero", [*M, "--trials", "0"], "Error: --trials must be at least 1 (got 0)", False),
    ("repeats-zero", [*M, "--repeats", "0"], "Error: --repeats must be at least 1 (got 0)", False),
    ("num-predict-negative", [*M, "--num-predict", "-1"], "Error: --num-predict must be at least 1 (got -1)", False),
    ("unknown-param", [*M, "--param", "num_cores=2"],
     "Error: unknown parameter 'num_cores': known parameters are variant, num_ctx, num_batch, num_gpu, "
     "num_thread, flash_attention, kv_cache_type, num_parallel", False),
    ("empty-value-list", [*M, "--param", "num_ctx="],
     "Error: --param num_ctx has no values: give at least one, e.g. num_ctx=512", False),
    ("param-without-equals", [*M, "--param", "num_ctx"],
     "Error: invalid --param 'num_ctx': write it as name=value or name=v1,v2 (e.g. num_ctx=2048,4096)", False),
    ("param-not-a-number", [*M, "--param", "num_ctx=big"], "Error: invalid value 'big' for num_ctx: expected an integer", False),
    ("num-ctx-zero", [*M, "--param", "num_ctx=0"], "Error: num_ctx=0 is invalid: it must be a positive number of tokens", False),
    ("num-ctx-above-model", [*M, "--param", "num_ctx=65536"],
     "Error: num_ctx=65536 is above the model's trained context of 32768: use at most 32768", False),
    ("num-gpu-above-layers", [*M, "--param", "num_gpu=40"],
     "Error: num_gpu=40 is above the model's 27 offloadable layers (26 blocks + output): use at most 27", False),
    ("context-above-model", [*M, "--context", "100000"],
     "Error: --context 100000 is above the model's trained context of 32768: use at most 32768", False),
    ("space-not-toml", [*M, "--space", "bad.toml"], "Error: space file bad.toml is not valid TOML: ", False),
    ("space-unknown-param", [*M, "--space", "unknown.toml"], "Error: unknown parameter 'num_cores': known parameters are ", False),
    ("space-empty-list", [*M, "--space", "emptylist.toml"], "Error: space file emptylist.toml: 'num_batch' has an empty value list", False),
    ("space-missing", [*M, "--space", "missing.toml"], "Error: cannot read space file missing.toml: No such file or directory", False),
    ("prompts-empty", [*M, "--prompts", "empty.txt"],
     "Error: prompts file empty.txt holds no prompt: write prompts separated by '---' lines", False),
    ("prompts-missing", [*M, "--prompts", "nope.txt"], "Error: cannot read prompts file nope.txt: No such file or directory", False),
    ("prompts-unreadable", [*M, "--prompts", "binary.txt"], "Error: cannot read prompts file binary.txt: ", False),
    ("prompt-longer-than-every-ctx", [*M, "--prompts", "long.txt"],
     "Error: the longest prompt plus --num-predict needs about ", False),
    ("contradictory-limits", [*M, "--max-ttft-ms", "500", "--max-latency-ms", "100"],
     "Error: --max-latency-ms 100 is below --max-ttft-ms 500: a request's latency includes its time to first "
     "token; raise --max-latency-ms", False),
    ("negative-limit", [*M, "--max-ttft-ms", "-5"], "Error: --max-ttft-ms must be positive (got -5)", False),
    ("wrong-storage-url", [*M, "--storage", "nonsense"],
     "Error: invalid storage URL 'nonsense': use sqlite:///path.db, postgresql://user@host/db or journal:///path.log", False),
    ("storage-password-hidden", [*M, "--storage", "postgresql://bob:s3cret@127.0.0.1:1/db"],
     "Error: cannot open storage 'postgresql://bob:***@127.0.0.1:1/db': ", False),
    ("storage-path-not-writable", [*M, "--storage", "sqlite:///afile/t.db"],
     "Error: cannot create the storage folder afile: ", False),
    ("study-reused-other-model", ["--model", "llama3.2:3b", "--host", "{fake}", "--study", "taken"],
     "Error: study 'taken' was created with a different model (gemma3:1b): pass --study NEW_NAME", True),
    ("study-reused-other-space", [*M, "--study", "taken", "--param", "num_batch=64"],
     "Error: study 'taken' was created with a different search space: pass --study NEW_NAME", True),
    ("export-no-feasible", ["export", "taken", "--trial", "999"], "Error: study 'taken' has no trial 999", True),
    ("export-unknown-study", ["export", "nope"], "Error: no study named 'nope' in this storage: known studies are taken", True),
    ("gpu-not-an-index", [*M, "--gpu", "x"], "Error: invalid --gpu 'x': give GPU indices like 0 or 0,1", False),
    ("tokens-per-joule-without-gpu", [*M, "--objective", "tokens_per_joule"],
     "Error: objective 'tokens_per_joule' needs GPU energy telemetry, and there is none (", False),
    ("show-no-storage", ["show", "--storage", "sqlite:///none/t.db"],
     "Error: no study storage at none/t.db: run `tune --model ...` first or pass --storage", False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: tuple[str, list[str], str, bool], fake: FakeOllama, garbage_url: str, tmp_path: Path) -> None:
    name, args, expected, needs_study = case
    _files(tmp_path)
    subs = {"{fake}": fake.url, "{closed}": f"http://127.0.0.1:{_free_port()}", "{garbage}": garbage_url}
    if needs_study:
        _seed_study(fake.url)
    before = _snapshot()
    n_generate = len(fake.generate_requests())

    def fill(text: str) -> str:
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    argv = [fill(a) for a in args]
    if argv[0] not in ("export", "show", "studies", "report"):
        argv += ["--trials", "1"] if "--trials" not in argv else []
    r = invoke(*argv)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert lines[0].startswith(fill(expected)), lines[0]
    assert "Traceback" not in r.output and "s3cret" not in r.output
    assert len(fake.generate_requests()) == n_generate, "nothing may be measured"
    assert _snapshot() == before, "the storage must be left as it was"


def _snapshot() -> list[tuple[str, int, str]] | None:
    if not Path("studies/tuner.db").exists():
        return None
    storage = optuna.storages.RDBStorage(DB)
    return [
        (s.study_name, t.number, t.state.name)
        for s in optuna.get_all_study_summaries(storage)
        for t in optuna.load_study(study_name=s.study_name, storage=storage).trials
    ]


def test_disk_full_while_writing_the_report(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.report as report

    _seed_study(fake.url)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "fsync", full)
    r = invoke("report", "taken")
    assert r.exit_code == 2
    assert r.output.startswith("Error: ") and "No space left on device" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not list(Path("reports").glob("*.html")) if Path("reports").exists() else True


def test_export_refuses_a_study_without_feasible_trial(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "1", "--repeats", "1", "--num-predict", "4",
               "--study", "strict", "--max-ttft-ms", "0.0001", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    assert "No feasible configuration" in r.output
    r = invoke("export", "strict")
    assert r.exit_code == 2
    assert r.output == ("Error: study 'strict' has no feasible trial: relax the limits and run more trials, "
                        "or pass --allow-infeasible to use the least-violating one\n")
    r = invoke("export", "strict", "--allow-infeasible", "--format", "json")
    assert r.exit_code == 0 and '"model": "gemma3:1b"' in r.output


def test_server_returning_truncated_streams_stops_with_the_study_intact(fake: FakeOllama) -> None:
    r0 = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "1", "--repeats", "1",
                "--num-predict", "4", "--study", "s", "--validate", "0", "--no-roofline")
    assert r0.exit_code == 0
    for _ in range(20):
        fake.truncate_next_stream(after_chunks=1)
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "5", "--repeats", "1",
               "--num-predict", "4", "--study", "s", "--validate", "0", "--no-roofline")
    assert r.exit_code == 2
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: stopped after 3 consecutive failed trials (last: Ollama at ")
    assert last.endswith("the study is intact: fix the cause and re-run to resume")
    states = [t[2] for t in _snapshot() or []]
    assert states[0] == "COMPLETE" and states.count("FAIL") == 3
