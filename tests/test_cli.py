"""The CLI: help for every command, exact one-line errors with click's exit codes, storage untouched."""

from __future__ import annotations

from pathlib import Path

import click
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
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"`tune {name}` option {param.name} lacks help"
            elif isinstance(param, click.Argument):
                # Arguments have no help of their own in click (before 8.5 not even the attribute):
                # the command's docstring explains them by their metavar.
                assert param.human_readable_name in cmd.help, f"`tune {name}` does not explain {param.name}"


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
    assert r.exit_code == 1
    assert "s3cret" not in r.output
    assert r.output.startswith(("Error: cannot open storage 'postgresql://bob:***@",
                                "Error: storage 'postgresql://bob:***@"))


def test_show_without_storage_names_the_fix() -> None:
    r = invoke("show")
    assert r.exit_code == 2
    assert r.output == "Error: no study storage at studies/tuner.db: run `tune --model ...` first or pass --storage\n"


def test_unknown_command_is_named_not_run() -> None:
    r = invoke("shwo")
    assert r.exit_code == 2
    assert r.output == "Error: No such command 'shwo'. Did you mean 'show'?\n"
    r = invoke("frobnicate", "x")
    assert r.exit_code == 2
    assert r.output == ("Error: No such command 'frobnicate': the commands are run, studies, show, demo, "
                        "report, export (see `tune --help`)\n")


def test_exit_codes_are_documented_in_help() -> None:
    r = invoke("--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "Exit codes: 0 done; 2 rejected input" in text and "1 runtime failure" in text and "130 interrupted" in text


def test_each_error_class_carries_its_exit_code() -> None:
    from tuner import errors

    expected = {
        "TunerError": 2, "ServerError": 1, "ServerSetupError": 2, "ModelNotFoundError": 2, "SpaceError": 2,
        "WorkloadError": 2, "StudyError": 2, "StorageError": 1, "ExportError": 2, "WriteError": 1,
        "MissingDependencyError": 2, "LoadError": 1, "TrialFailedError": 1, "StoppedError": 1,
    }
    found = {n: c.exit_code for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.TunerError)}
    assert found == expected


def test_rejected_input_exits_2_runtime_failure_exits_1() -> None:
    import socket

    r = invoke("--model", "gemma3:1b", "--host", "http://:abc")
    assert (r.exit_code, r.output) == (
        2, "Error: invalid Ollama host 'http://:abc': write it as http://HOST:PORT, e.g. http://127.0.0.1:11434\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = invoke("--model", "gemma3:1b", "--host", f"http://127.0.0.1:{port}")
    assert (r.exit_code, r.output) == (
        1, f"Error: cannot reach Ollama at http://127.0.0.1:{port}: is it running? Start it with `ollama serve` "
           "or point --host / OLLAMA_HOST at it\n")


def test_run_now_counts_only_this_process(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from tuner import study as study_mod

    real = study_mod._Runner.__call__
    added: list[int] = []

    def with_other_worker(self: object, trial: optuna.Trial) -> object:
        if not added:
            # Another worker finishes a trial in the same study while this one runs.
            trial.study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                            user_attrs={"error": "another worker"}))
            added.append(1)
        return real(self, trial)  # type: ignore[arg-type]

    monkeypatch.setattr(study_mod._Runner, "__call__", with_other_worker)
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "2", "--repeats", "1", "--num-predict", "4",
               "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("Trials: "))
    assert line.endswith("; 2 run now"), line
    assert "1 fail" in line


def test_study_names_complete_from_the_storage(fake: FakeOllama) -> None:
    from click.shell_completion import ShellComplete

    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "1", "--repeats", "1",
               "--num-predict", "4", "--study", "gemma-fast", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    comp = ShellComplete(cli, {}, "tune", "_TUNE_COMPLETE")
    assert [c.value for c in comp.get_completions(["show"], "gem")] == ["gemma-fast"]
    assert [c.value for c in comp.get_completions(["report", "--storage", "sqlite:///nowhere/x.db"], "")] == []


def test_tuner_storage_is_documented_in_help() -> None:
    r = invoke("studies", "--help")
    assert "var: TUNER_STORAGE" in " ".join(r.output.split())
