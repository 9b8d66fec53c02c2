"""Property: whatever a user (or an attacker) types, `tune` answers with no traceback, exit 0, 1
or 2 with an `Error: ...` line last, prints no password it was given, and leaves any SQLite
storage it touched intact."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import invoke
from fake_ollama import FakeOllama
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

QUICK = ["--repeats", "1", "--num-predict", "2", "--validate", "0", "--no-roofline", "--no-warm-start"]
# Text a shell can pass as one argument: anything but NUL.
ARG = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
NAME = st.one_of(ARG, st.sampled_from(["-rf", "--help", "a b", "x\x1b[2Jy", "é", "../../etc", "gemma3:1b@h"]))
# Passwords long enough that finding one in the output is a leak, not a coincidence.
PASSWORD = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="\x00"),
                   min_size=8, max_size=16).map(lambda s: "Pw" + s)
NUMBER = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["nan", "inf", "-0", "1e9", "x", "", " 2", "0x10"]))


@st.composite
def storage_url(draw: Any) -> tuple[str, str | None]:
    pw = draw(PASSWORD)
    shape = draw(st.sampled_from([
        "sqlite:///s.db", "sqlite:///{name}.db", "journal:///j.log", "postgresql://bob:{pw}@127.0.0.1:1/db",
        "postgresql://bob@127.0.0.1:1/db?password={pw}", "postgresql:/bob:{pw}@127.0.0.1:1/db",
        "mysql://bob:{pw}@127.0.0.1:1/db", "postgresqlx://bob:{pw}@h/db", "{name}",
    ]))
    url = shape.format(pw=pw, name=draw(ARG))
    return url, (pw if "{pw}" in shape else None)


@st.composite
def command_line(draw: Any, host: str) -> tuple[list[str], list[str]]:
    url, pw = draw(storage_url())
    storage = ["--storage", url] if draw(st.booleans()) else []
    sub = draw(st.sampled_from(["run", "show", "studies", "report", "export", "check"]))
    study = draw(st.one_of(st.just("taken"), NAME))
    if sub == "run":
        args = ["--model", draw(st.one_of(st.just("gemma3:1b"), NAME)), "--host",
                draw(st.one_of(st.just(host), st.sampled_from([":abc", "http://[::1", "ftp://x", "h:99999"]))),
                "--trials", draw(st.sampled_from(["1", "0", "-1", "x"])), *QUICK, *storage]
        if draw(st.booleans()):
            args += ["--study", study]
        for opt in draw(st.lists(st.sampled_from(["--param", "--max-ttft-ms", "--timeout", "--repeats",
                                                  "--context", "--gpu", "--seed", "--objectives"]), max_size=2)):
            value = draw(st.one_of(NUMBER, ARG, st.sampled_from(["num_ctx=", "variant=", "num_batch=1..9999999",
                                                                    "num_thread=a", "num_gpu=-2"])))
            args += [opt, value]
        if draw(st.booleans()):
            args += [draw(st.sampled_from(["--prompts", "--space"])), "input.txt"]
    else:
        args = [sub, *storage]
        if draw(st.booleans()):
            args += ["--", study] if study.startswith("-") else [study]
        if sub == "export":
            args += ["--format", draw(st.sampled_from(["modelfile", "json", "env", "csv", "yaml"]))]
            if draw(st.booleans()):
                args += ["--trial", draw(NUMBER)]
        if sub == "check":
            args += ["--host", host, "--rounds", draw(st.sampled_from(["2", "0", "-1"]))]
        if sub == "report":
            args += ["-o", "out.html"]
    return args, [pw] if pw else []


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(scope="module")
def seeded(server: FakeOllama) -> bytes:
    """A storage holding one measured study ('taken'), copied into every example's folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            r = invoke("--model", "gemma3:1b", "--host", server.url, "--trials", "2", "--study", "taken", *QUICK,
                       "--storage", "sqlite:///s.db")
            assert r.exit_code == 0, r.output
            return Path("s.db").read_bytes()
        finally:
            os.chdir(cwd)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data(), content=st.binary(max_size=300))
def test_any_command_line_fails_cleanly(server: FakeOllama, seeded: bytes, data: Any, content: bytes) -> None:
    args, passwords = data.draw(command_line(server.url))
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            Path("input.txt").write_bytes(content)
            Path("studies").mkdir()
            for db in ("s.db", "studies/tuner.db"):
                Path(db).write_bytes(seeded)
            r = invoke(*args)
            if args[0] in ("show", "studies", "report", "export"):  # read-only: not a byte changed
                assert [Path(db).read_bytes() == seeded for db in ("s.db", "studies/tuner.db")] == [True, True]
            dbs = list(Path(tmp).rglob("*.db"))
            for db in dbs:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                    assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",), db
        finally:
            os.chdir(cwd)
    out = r.output
    event(f"{args[0] if args[0] in ('show', 'studies', 'report', 'export', 'check') else 'run'} exit {r.exit_code}")
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert "Traceback" not in out and "internal error" not in out, (args, out)
    assert r.exit_code in (0, 1, 2), (args, r.exit_code, out)
    if r.exit_code:
        last = out.strip().splitlines()[-1] if out.strip() else ""
        assert last.startswith("Error: "), (args, out)
    for pw in passwords:
        assert pw not in out, (args, out)
