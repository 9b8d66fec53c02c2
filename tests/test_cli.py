"""The CLI: help for every command, exact one-line errors with exit code 2, storage untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner.cli import cli


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
