"""The CLI: help for every command, exact one-line errors with exit code 2, storage untouched."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner.cli import cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_command_is_documented() -> None:
    for name, cmd in cli.commands.items():
        assert cmd.help and "Example" in cmd.help, f"`tune {name}` lacks help with an example"
        r = invoke(name, "--help")
        assert r.exit_code == 0, r.output
        for param in cmd.params:
            if param.name != "help" and hasattr(param, "help"):
                assert param.help, f"`tune {name}` option {param.name} lacks help"


def test_default_command_is_run() -> None:
    r = invoke("--model", "gemma3:1b", "--help")
    assert r.exit_code == 0 and "--trials" in r.output


def test_run_prints_best_config_and_where_it_is_stored(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "3", "--repeats", "1",
               "--num-predict", "8")
    assert r.exit_code == 0, r.output
    assert "Best feasible configuration (trial #" in r.output
    assert "vs Ollama defaults" in r.output
    assert "Stored in sqlite:///studies/tuner.db as study 'gemma3:1b@127.0.0.1:" in r.output
    assert Path("studies/tuner.db").exists()
    assert r.output.count("[") >= 3  # one progress line per trial
    r2 = invoke("studies")
    assert r2.exit_code == 0 and "gemma3:1b@127.0.0.1" in r2.output
    r3 = invoke("show")
    assert r3.exit_code == 0 and "Top" in r3.output


def test_ollama_host_env_is_honoured(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", fake.url.replace("http://", ""))
    r = invoke("--model", "gemma3:1b", "--trials", "1", "--repeats", "1", "--num-predict", "4")
    assert r.exit_code == 0, r.output


def _errors(fake_url: str, tmp: Path) -> list[tuple[list[str], str]]:
    unreachable = f"http://127.0.0.1:{_free_port()}"
    (tmp / "bad.toml").write_text("[params\nnum_ctx = ")
    (tmp / "unknown.toml").write_text("[params]\nnum_cores = [1, 2]\n")
    (tmp / "empty.txt").write_text("   \n---\n")
    (tmp / "long.txt").write_text("word " * 200_000)
    m = ["--model", "gemma3:1b", "--host", fake_url]
    return [
        (["--model", "gemma3:1b", "--host", unreachable],
         f"Error: cannot reach Ollama at {unreachable}: is it running? Start it with `ollama serve` "
         "or point --host / OLLAMA_HOST at it"),
        (["--model", "gemma3:4b", "--host", fake_url],
         f"Error: model 'gemma3:4b' is not installed on {fake_url}: did you mean 'gemma3:1b'? "
         "Or pull it with `ollama pull gemma3:4b`"),
        (["--model", "mistral:7b", "--host", fake_url],
         f"Error: model 'mistral:7b' is not installed on {fake_url}: pull it with `ollama pull mistral:7b`"),
        (["--model", "gemma3:1b", "--host", "http://:abc"],
         "Error: invalid Ollama host 'http://:abc': write it as http://HOST:PORT, e.g. http://127.0.0.1:11434"),
        ([*m, "--trials", "0"], "Error: --trials must be at least 1 (got 0)"),
        ([*m, "--repeats", "0"], "Error: --repeats must be at least 1 (got 0)"),
        ([*m, "--num-predict", "-1"], "Error: --num-predict must be at least 1 (got -1)"),
        ([*m, "--param", "num_cores=2"],
         "Error: unknown parameter 'num_cores': known parameters are variant, num_ctx, num_batch, "
         "num_gpu, num_thread, flash_attention, kv_cache_type, num_parallel"),
        ([*m, "--param", "num_ctx="], "Error: --param num_ctx has no values: give at least one, e.g. num_ctx=512"),
        ([*m, "--param", "num_ctx"],
         "Error: invalid --param 'num_ctx': write it as name=value or name=v1,v2 (e.g. num_ctx=2048,4096)"),
        ([*m, "--param", "num_ctx=big"], "Error: invalid value 'big' for num_ctx: expected an integer"),
        ([*m, "--param", "num_ctx=0"], "Error: num_ctx=0 is invalid: it must be a positive number of tokens"),
        ([*m, "--param", "num_ctx=65536"],
         "Error: num_ctx=65536 is above the model's trained context of 32768: use at most 32768"),
        ([*m, "--param", "num_gpu=40"],
         "Error: num_gpu=40 is above the model's 27 offloadable layers (26 blocks + output): use at most 27"),
        ([*m, "--context", "100000"],
         "Error: --context 100000 is above the model's trained context of 32768: use at most 32768"),
        ([*m, "--space", "bad.toml"], "Error: space file bad.toml is not valid TOML: "),
        ([*m, "--space", "unknown.toml"], "Error: unknown parameter 'num_cores': known parameters are "),
        ([*m, "--space", "missing.toml"], "Error: cannot read space file missing.toml: No such file or directory"),
        ([*m, "--prompts", "empty.txt"],
         "Error: prompts file empty.txt holds no prompt: write prompts separated by '---' lines"),
        ([*m, "--prompts", "nope.txt"], "Error: cannot read prompts file nope.txt: No such file or directory"),
        ([*m, "--prompts", "long.txt"], "Error: the longest prompt plus --num-predict needs about "),
        ([*m, "--max-ttft-ms", "500", "--max-latency-ms", "100"],
         "Error: --max-latency-ms 100 is below --max-ttft-ms 500: a request's latency includes its time "
         "to first token; raise --max-latency-ms"),
        ([*m, "--max-ttft-ms", "-5"], "Error: --max-ttft-ms must be positive (got -5)"),
        ([*m, "--storage", "nonsense"],
         "Error: invalid storage URL 'nonsense': use sqlite:///path.db, postgresql://user@host/db or journal:///path.log"),
    ]


def test_bad_input_gives_one_line_errors(fake: FakeOllama, tmp_path: Path) -> None:
    for args, expected in _errors(fake.url, tmp_path):
        r = invoke(*args, "--trials" if "--trials" not in args else "--seed", "1" if "--trials" not in args else "1")
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1, (args, r.output)
        assert lines[0].startswith(expected), (args, lines[0])
        assert "Traceback" not in r.output
    # nothing was measured, and no storage was written by any failing run
    assert not fake.generate_requests()
    assert not Path("studies/tuner.db").exists()


def test_storage_password_is_never_echoed() -> None:
    r = invoke("studies", "--storage", "postgresql://bob:s3cret@127.0.0.1:1/db")
    assert r.exit_code == 2
    assert "s3cret" not in r.output
    assert r.output.startswith(("Error: cannot open storage 'postgresql://bob:***@",
                                "Error: storage 'postgresql://bob:***@"))


def test_show_without_storage_names_the_fix() -> None:
    r = invoke("show")
    assert r.exit_code == 2
    assert r.output == "Error: no study storage at studies/tuner.db: run `tune --model ...` first or pass --storage\n"
