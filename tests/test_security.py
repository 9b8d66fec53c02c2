"""What the tool prints is safe: passwords masked, pasted commands quoted, names neutralised."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner.show import format_summary
from tuner.storage import mask, shown_url
from tuner.results import StudySummary
from tuner.terminal import command, printable

RUN = ["--trials", "1", "--repeats", "1", "--num-predict", "4", "--validate", "0", "--no-roofline"]


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://bob:s3cret@db/tuner", "postgresql://bob:***@db/tuner"),
    ("postgresql://bob:p@s3cret@db:5432/tuner", "postgresql://bob:***@db:5432/tuner"),
    ("postgresql://bob:a/s3cret@db/tuner", "postgresql://bob:***@db/tuner"),
    ("postgresql://bob@db/tuner?password=s3cret", "postgresql://bob@db/tuner?password=***"),
    ("postgresql://bob@db/tuner?sslmode=require&PASSWORD=s3cret&x=1",
     "postgresql://bob@db/tuner?sslmode=require&PASSWORD=***&x=1"),
    ("mysql+pymysql://bob:s3cret@db/tuner?password=s3cret", "mysql+pymysql://bob:***@db/tuner?password=***"),
    ("sqlite:///studies/a@b.db", "sqlite:///studies/a@b.db"),
    ("postgresql://db:5432/tuner", "postgresql://db:5432/tuner"),
])
def test_passwords_are_masked_in_every_form(url: str, shown: str) -> None:
    assert mask(url) == shown == shown_url(url)
    # In a message (a driver's error) the mask may take more than the password, never less.
    assert "s3cret" not in mask(f"(psycopg.OperationalError) at '{url}': refused")


@pytest.mark.parametrize("url", ["postgresql://bob@127.0.0.1:1/db?password=s3cret",
                                 "postgresql://bob:p@s3cret@127.0.0.1:1/db"])
def test_storage_errors_hide_the_password(url: str) -> None:
    r = invoke("studies", "--storage", url)
    assert r.exit_code == 1
    assert "s3cret" not in r.output
    assert r.output.startswith(f"Error: cannot open storage '{mask(url)}': (psycopg.OperationalError) connection")
    assert len(r.output.splitlines()) == 1


def _summary(storage: str, name: str) -> StudySummary:
    return StudySummary(study_name=name, storage=storage, objectives=["decode_tps"], trials_run=0, counts={},
                        best=None, best_is_feasible=False, baseline=None, speedup=None)


def test_stored_in_and_next_lines_mask_the_password() -> None:
    for url in ("postgresql://bob@db/t?password=s3cret", "postgresql://bob:p@s3cret@db/t"):
        text = format_summary(_summary(shown_url(url), "s"))
        assert "s3cret" not in text
        assert f"Stored in {mask(url)} as study 's'" in text
        assert f"Next: `tune show s --storage '{mask(url)}'` says why" in text


def _paste(cmd: str, tmp_path: Path) -> list[str]:
    """Run a printed command in bash with `tune` replaced by a function that prints its arguments."""
    r = subprocess.run(["bash", "-c", f'tune() {{ printf "%s\\n" "$@"; }}; {cmd}'], capture_output=True,
                       text=True, cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_printed_commands_are_shell_quoted(fake: FakeOllama, tmp_path: Path) -> None:
    name = f"q'; touch {tmp_path}/pwned; echo '"
    storage = "sqlite:///my studies/t $HOME.db"
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", name, "--storage", storage, *RUN)
    assert r.exit_code == 0, r.output
    nxt = next(x for x in r.output.splitlines() if x.startswith("Next: "))
    report, export = nxt[len("Next: "):].split("   ")
    assert _paste(report, tmp_path) == ["report", name, "--storage", storage]
    assert _paste(export, tmp_path) == ["export", name, "--storage", storage, "--format", "modelfile"]
    assert not (tmp_path / "pwned").exists()
    r = invoke("export", name, "--storage", storage, "--trial", "99")
    assert r.exit_code == 2
    assert r.output == f"Error: study '{name}' has no trial 99: see `{command('tune', 'show', name)}`\n"
    assert _paste(command("tune", "show", name), tmp_path) == ["show", name]


ESC = "evil\x1b]0;owned\x07\x1b[2J\nFAKE\x9b31m\u202e"
SHOWN = "evil\\x1b]0;owned\\x07\\x1b[2J\\nFAKE\\x9b31m\\u202e"


def _clean(text: str) -> None:
    assert not any(c in text for c in "\x1b\x07\x9b\u202e"), repr(text)


def test_control_characters_in_names_are_escaped(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", ESC, *RUN)
    assert r.exit_code == 0, r.output
    _clean(r.output)
    assert f"study '{SHOWN}' in sqlite:///studies/tuner.db" in r.output.splitlines()
    assert f"Stored in sqlite:///studies/tuner.db as study '{SHOWN}'" in r.output
    # A model name as another tool (or a crafted storage) may have stored it.
    study = optuna.load_study(study_name=ESC, storage="sqlite:///studies/tuner.db")
    study.set_user_attr("model", "m\x1b[31mred")
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL,
        user_attrs={"config": {"model": "m\x1b[31mred", "options": {}, "server": {}}, "error": "boom\x1b[2J"}))
    r = invoke("studies")
    assert r.exit_code == 0
    _clean(r.output)
    assert SHOWN in r.output and "m\\x1b[31mred" in r.output
    r = invoke("show", ESC)
    assert r.exit_code == 0, r.output
    _clean(r.output)
    assert "m\\x1b[31mred" in r.output and "boom\\x1b[2J" in r.output
    r = invoke("show", "nope\x1b[2J")
    assert r.exit_code == 2
    _clean(r.output)
    assert r.output == f"Error: no study named 'nope\\x1b[2J' in this storage: known studies are {SHOWN}\n"


def test_printable_and_command() -> None:
    assert printable("gemma3:1b@127.0.0.1:11434 é 日本") == "gemma3:1b@127.0.0.1:11434 é 日本"
    assert printable("a\tb\x00\x7f") == "a\\tb\\x00\\x7f"
    assert command("tune", "report", "gemma3:1b@127.0.0.1:11434") == "tune report gemma3:1b@127.0.0.1:11434"
    assert shlex.split(command("tune", "show", "a b'c")) == ["tune", "show", "a b'c"]


def test_the_suite_checks_every_output_for_the_passwords_it_uses() -> None:
    from conftest import PASSWORDS, leaks

    # The session fails when any CLI output or captured output of any test holds one (conftest).
    assert leaks(f"Error: cannot open storage 'postgresql://bob:{PASSWORDS[0]}@h/db'") != []
    assert leaks("Error: cannot open storage 'postgresql://bob:***@h/db'") == []
    assert leaks(f"E   assert url == 'postgresql://bob:{PASSWORDS[0]}@h'", quoted_source=True) == []
