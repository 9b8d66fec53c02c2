"""Hostile and broken inputs that need more than the bad-input matrix: names that look like
options, a malformed $OLLAMA_HOST, a server that streams without end, hints when nothing is
feasible. Each asserts the exact line and exit code."""

from __future__ import annotations

import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner.engines.ollama import _StreamClock, max_stream_chunks
from tuner.errors import ServerError, ServerHungError
from tuner.terminal import tune_command

RUN = ["--repeats", "1", "--num-predict", "4", "--validate", "0", "--no-roofline", "--trials", "1"]


def test_a_malformed_ollama_host_in_the_environment_is_a_usage_error() -> None:
    # A fresh interpreter: the `ollama` package reads $OLLAMA_HOST when it is first imported.
    r = subprocess.run([sys.executable, "-m", "tuner.cli", "--model", "gemma3:1b", "--trials", "1"],
                       env={"OLLAMA_HOST": ":abc", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("Error: invalid Ollama host ':abc' (--host / OLLAMA_HOST): write it as http://HOST:PORT, "
                        "e.g. http://127.0.0.1:11434\n")


def test_hints_keep_a_study_name_that_starts_with_a_dash_an_argument(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study=-rf", *RUN)
    assert r.exit_code == 0, r.output
    nxt = next(line for line in r.output.splitlines() if line.startswith("Next: "))
    assert nxt == "Next: tune report -- -rf   tune export --format modelfile -- -rf"
    # Pasting the hint reaches the study, not an option parser's complaint.
    words = shlex.split(nxt[len("Next: "):].split("   ")[1])
    r = invoke(*words[1:])
    assert r.exit_code == 0, r.output
    assert "# study '-rf', trial #0" in r.output and "\nFROM gemma3:1b\n" in r.output


def test_tune_command_guards_only_names_that_look_like_options() -> None:
    assert tune_command("show", "gemma3:1b@h", "--storage", "sqlite:///a.db") == "tune show gemma3:1b@h --storage sqlite:///a.db"
    assert tune_command("show", "-x", "--storage", "sqlite:///a b.db") == "tune show --storage 'sqlite:///a b.db' -- -x"


def test_no_export_hint_when_nothing_was_feasible(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "strict", "--max-ttft-ms", "0.0001", *RUN)
    assert r.exit_code == 0, r.output
    nxt = [line for line in r.output.splitlines() if line.startswith("Next: ")]
    assert nxt == ["Next: tune report strict; nothing met the limits, so there is nothing to export: relax them "
                   "and run more trials, or export the least-violating config knowingly with "
                   "`tune export strict --allow-infeasible`"]


def test_the_check_hint_without_a_winner_keeps_the_storage(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "strict", "--max-ttft-ms", "0.0001",
               "--storage", "sqlite:///other.db", *RUN)
    assert r.exit_code == 0, r.output
    r = invoke("check", "strict", "--storage", "sqlite:///other.db")
    assert r.exit_code == 2
    assert r.output == ("Error: study 'strict' has no feasible trial to check: run more trials first "
                        "(`tune show strict --storage sqlite:///other.db` says why)\n")


def _chunk(done: bool = False) -> SimpleNamespace:
    return SimpleNamespace(response="x", thinking=None, done=done)


def test_a_stream_that_ignores_num_predict_is_cut_off() -> None:
    clock = _StreamClock("http://h:1", num_predict=4, timeout_s=600)
    with pytest.raises(ServerError) as e:
        for _ in range(10_000):
            clock.see(_chunk())
    assert clock.chunks == max_stream_chunks(4) + 1
    assert str(e.value) == ("Ollama at http://h:1 streamed more than 72 chunks for num_predict 4: it does not "
                            "honour num_predict; check the server")


def test_a_stream_slower_than_the_timeout_is_a_hung_request(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _StreamClock("http://h:1", num_predict=128, timeout_s=5)
    clock.see(_chunk())
    clock.start -= 6  # the request began 6 s ago
    with pytest.raises(ServerHungError) as e:
        clock.see(_chunk())
    assert str(e.value).startswith("server did not finish a generate request in 5 s (--timeout)")


def test_check_dry_run_measures_and_stores_nothing(fake: FakeOllama) -> None:
    import hashlib
    from pathlib import Path

    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "s", *RUN)
    assert r.exit_code == 0, r.output
    before = hashlib.sha256(Path("studies/tuner.db").read_bytes()).hexdigest()
    n = len(fake.prompt_requests())
    r = invoke("check", "s", "--dry-run", "--rounds", "4")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("DRY RUN: would re-measure the winner (#0: ")
    assert r.output.endswith(f"interleaved over 4 rounds on {fake.url}, each round 2 prompt(s) x 1 repeat(s) of "
                             "4 tokens; nothing was measured or stored\n")
    assert len(fake.prompt_requests()) == n
    assert hashlib.sha256(Path("studies/tuner.db").read_bytes()).hexdigest() == before


def test_max_time_stops_sampling_on_time_and_says_so(fake: FakeOllama) -> None:
    import json

    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "t", "--repeats", "1", "--num-predict", "4",
               "--validate", "0", "--no-roofline", "--trials", "500", "--max-time", "2s", "--json",
               "--param", "num_thread=1,2,4,8", "--param", "num_batch=32,64,128,256,512")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["trials_run"] < 500
    assert doc["stopped_on_time"].startswith(f"stopped on time: {doc['trials_run']} of 500 trials in ")
    assert doc["stopped_on_time"].endswith("to finish within --max-time 2s; run the same command again to "
                                           "continue the search")


def test_parse_duration_forms_and_errors() -> None:
    from tuner.errors import TunerError
    from tuner.study import format_duration, parse_duration

    assert [parse_duration(x) for x in ("90", "90s", "10m", "1h30m", "2.5h", " 1m30s ")] == [
        90, 90, 600, 5400, 9000, 90]
    assert [format_duration(x) for x in (90, 600, 5400)] == ["1m30s", "10m", "1h30m"]
    for bad in ("", "x", "10 minutes", "-5m"):
        try:
            parse_duration(bad)
        except TunerError as e:
            assert str(e) == f"invalid --max-time '{bad}': write a duration like 90s, 10m or 1h30m"
        else:
            raise AssertionError(bad)
    r = invoke("--model", "m", "--max-time", "soon")
    assert r.exit_code == 2 and r.output == ("Error: invalid --max-time 'soon': write a duration like 90s, 10m "
                                             "or 1h30m\n")
