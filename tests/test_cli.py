"""The CLI: help for every command, exact one-line errors with click's exit codes, storage untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
                        "report, export, import, check (see `tune --help`)\n")


def test_exit_codes_are_documented_in_help() -> None:
    r = invoke("--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "Exit codes: 0 done; 2 rejected input" in text and "1 runtime failure" in text and "130 interrupted" in text


def test_each_error_class_carries_its_exit_code() -> None:
    from tuner import errors

    expected = {
        "TunerError": 2, "ServerError": 1, "ServerSetupError": 2, "ServerHungError": 1, "ModelNotFoundError": 2, "SpaceError": 2,
        "WorkloadError": 2, "StudyError": 2, "StorageError": 1, "ExportError": 2, "WriteError": 1,
        "MissingDependencyError": 2, "LoadError": 1, "TrialFailedError": 1, "StoppedError": 1,
        "CheckUnmeasurable": 3,
    }
    found = {n: c.exit_code for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.TunerError)}
    assert found == expected


def test_rejected_input_exits_2_runtime_failure_exits_1() -> None:
    import socket

    r = invoke("--model", "gemma3:1b", "--host", "http://:abc")
    assert (r.exit_code, r.output) == (
        2, "Error: invalid Ollama host 'http://:abc' (--host / OLLAMA_HOST): write it as http://HOST:PORT, e.g. http://127.0.0.1:11434\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = invoke("--model", "gemma3:1b", "--host", f"http://127.0.0.1:{port}")
    assert (r.exit_code, r.output) == (
        1, f"Error: cannot reach Ollama at http://127.0.0.1:{port}: is it running? Start it with `ollama serve` "
           "or point --host / OLLAMA_HOST at it\n")


def test_run_now_counts_only_this_process(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from tuner import runner as runner_mod

    real = runner_mod._Runner.__call__
    added: list[int] = []

    def with_other_worker(self: object, trial: optuna.Trial) -> object:
        if not added:
            # Another worker finishes a trial in the same study while this one runs.
            trial.study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                            user_attrs={"error": "another worker"}))
            added.append(1)
        return real(self, trial)  # type: ignore[arg-type]

    monkeypatch.setattr(runner_mod._Runner, "__call__", with_other_worker)
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
    assert [c.value for c in comp.get_completions(["run", "--warm-start-from"], "gem")] == ["gemma-fast"]
    assert [c.value for c in comp.get_completions(
        ["run", "--warm-start-storage", "sqlite:///nowhere/x.db", "--warm-start-from"], "gem")] == []


def test_tuner_storage_is_documented_in_help() -> None:
    r = invoke("studies", "--help")
    assert "var: TUNER_STORAGE" in " ".join(r.output.split())


def _run(fake: FakeOllama, *extra: str) -> Any:
    return invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "3", "--repeats", "1",
                  "--num-predict", "8", *extra)


def test_run_json_is_one_document_on_stdout_and_progress_on_stderr(fake: FakeOllama) -> None:
    r = _run(fake, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # nothing else on stdout
    best = doc["best"]
    assert doc["best_is_feasible"] is True and isinstance(best["number"], int)
    assert best["options"] and best["config"].startswith("gemma3:1b ")
    assert isinstance(best["metrics"]["decode_tps_mean"], float)
    assert best["values"][0] == pytest.approx(best["metrics"]["decode_tps_mean"])
    assert best["datetime_start"].endswith("+00:00")  # UTC with its offset, as every JSON time
    assert doc["baseline"]["number"] == 0 and doc["baseline"]["baseline"] is True
    assert isinstance(doc["speedup"]["ratio"], float) and doc["speedup"]["ratio"] > 1
    assert doc["speedup"]["source"] == "revalidation" and len(doc["speedup"]["ci95"]) == 2
    assert doc["counts"] == {"feasible": 3} and doc["trials_run"] == 3
    assert "[1/3] #0" in r.stderr and "Best feasible configuration" not in r.output


def test_show_and_studies_json_parse_and_match_the_run(fake: FakeOllama) -> None:
    run = json.loads(_run(fake, "--json").stdout)
    r = invoke("show", "--json", "--top", "2")
    assert r.exit_code == 0 and r.stderr == ""
    shown = json.loads(r.stdout)
    assert shown["best"]["number"] == run["best"]["number"]
    assert shown["speedup"]["ratio"] == pytest.approx(run["speedup"]["ratio"])
    assert [t["number"] for t in shown["top"]][0] == run["best"]["number"] and len(shown["top"]) == 2
    assert shown["failed"] == []
    r = invoke("studies", "--json")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert rows == [{"study": run["study"], "model": "gemma3:1b", "trials": sum(run["counts"].values()), "objective": "decode_tps",
                     "best_value": pytest.approx(run["best"]["values"][0]),
                     "best_trial": run["best"]["number"], "last_update": rows[0]["last_update"]}]


def test_studies_json_on_an_empty_storage_is_an_empty_list(fake: FakeOllama) -> None:
    _run(fake)
    import optuna

    optuna.delete_study(study_name=json.loads(invoke("show", "--json").stdout)["study"],
                        storage="sqlite:///studies/tuner.db")
    r = invoke("studies", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == []


def test_quiet_prints_only_the_verdict(fake: FakeOllama) -> None:
    r = _run(fake, "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Best: #") and " num_ctx=" in lines[0] and "x decode tok/s vs Ollama defaults" in lines[0]


def test_a_speedup_from_single_search_measurements_says_so(fake: FakeOllama) -> None:
    def short(doc: dict[str, Any]) -> str:
        return f"{doc['speedup']['ratio']:.2f}x decode tok/s vs Ollama defaults (single search measurements, no interval)"

    quiet = _run(fake, "--validate", "0", "-q")
    shown = json.loads(invoke("show", "--json").stdout)
    assert shown["speedup"]["source"] == "search" and shown["verdict"] == quiet.stdout.strip()
    assert shown["verdict"].endswith("; " + short(shown))
    doc = json.loads(_run(fake, "--validate", "0", "--json").stdout)
    assert doc["speedup"]["source"] == "search" and doc["verdict"].endswith("; " + short(doc))
    r = _run(fake, "--validate", "0")  # the same study, three trials more
    doc = json.loads(invoke("show", "--json").stdout)
    base, best = doc["baseline"], doc["best"]
    assert (f"\n{doc['speedup']['ratio']:.2f}x decode tok/s vs Ollama defaults (baseline trial #{base['number']}: "
            f"{base['values'][0]:.2f}, best: {best['values'][0]:.2f}; each measured once in the search; no "
            "interval: --validate 2 gives one)\n") in r.output


def test_verbose_prints_a_line_per_request(fake: FakeOllama) -> None:
    r = _run(fake, "-v")
    assert r.exit_code == 0, r.output
    # 3 trials x 2 built-in prompts x 1 repeat, each line before its trial's progress line.
    requests = [line for line in r.stdout.splitlines() if " request " in line and "tok/s" in line]
    assert len(requests) == 6
    assert requests[0].startswith("  #0 request 1 (chat, repeat 1): decode ")
    assert r.stdout.index("  #0 request 2") < r.stdout.index("[1/3] #0")


def test_quiet_and_verbose_together_are_refused() -> None:
    r = invoke("--model", "gemma3:1b", "-q", "-v")
    assert r.exit_code == 2
    assert r.output == "Error: --quiet and --verbose contradict each other: pass one of them\n"


def test_when_the_defaults_win_no_speedup_of_one_is_printed(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "1", "--repeats", "1", "--num-predict", "4",
               "--validate", "0", "--no-roofline", "-q")
    assert r.exit_code == 0, r.output
    assert r.output.endswith("; the Ollama defaults are the best configuration found: nothing to change\n"), r.output
    assert "1.00x" not in r.output
    r = invoke("show")
    assert "\nThe Ollama defaults are the best configuration found: nothing to change\n" in r.output, r.output
    doc = json.loads(invoke("show", "--json").output)
    assert doc["best"]["baseline"] and doc["speedup"] is None
