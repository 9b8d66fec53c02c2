"""The live status line of a running trial: redrawn in place on a terminal, absent elsewhere."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner.metrics import RequestSample

#: One redraw of the status line, as `tune run` writes it on a terminal.
STATUS = re.compile(r"\rtrial #(\d+) \[([#-]{20})\] request (\d+)/(\d+)(?:  decode (\d+\.\d) tok/s)?  0m\d\ds")


def _screen(text: str) -> list[str]:
    """What a terminal shows for ``text``: a carriage return moves back to the line's start."""
    lines = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        pos = 0
        for ch in raw:
            if ch == "\r":
                pos = 0
                continue
            if pos < len(cells):
                cells[pos] = ch
            else:
                cells.append(ch)
            pos += 1
        lines.append("".join(cells).rstrip())
    return lines


def _updates(text: str, number: str) -> list[tuple[str, str, bool]]:
    """Trial ``number``'s redraws as (bar, request, tok/s shown), each state once (the ticker
    redraws the same state every second)."""
    states = [(m.group(2), m.group(3), m.group(5) is not None) for m in STATUS.finditer(text) if m.group(1) == number]
    return [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]


#: A trial of 4 requests: nothing measured at its start, then one redraw per measured request.
FOUR = [("-" * 20, "1", False), ("#" * 5 + "-" * 15, "2", True), ("#" * 10 + "-" * 10, "3", True),
        ("#" * 15 + "-" * 5, "4", True), ("#" * 20, "4", True)]


def _args(fake: FakeOllama, *extra: str) -> list[str]:
    # Two built-in prompts x 2 repeats: 4 requests a trial.
    return [sys.executable, "-m", "tuner.cli", "run", "--model", "gemma3:1b", "--host", fake.url,
            "--trials", "2", "--repeats", "2", "--num-predict", "8", "--validate", "0", "--no-roofline",
            "--remeasure-contended", "0", *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "TUNER_DEBUG")}
    env["COLUMNS"] = "120"
    return env


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its end of the terminal
            return out
        if not chunk:
            return out
        out += chunk


def _run_on_terminal(args: list[str], stdout_too: bool = True) -> tuple[str, str, int]:
    """Run ``args`` with stderr (and stdout when ``stdout_too``) on a pseudo-terminal.

    Returns (what the terminal received, stdout when it went to a pipe, exit code)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave if stdout_too else subprocess.PIPE,
                            stderr=slave, env=_env())
    os.close(slave)
    try:
        terminal = _read_all(master)
        piped = proc.stdout.read() if proc.stdout is not None else b""
        rc = proc.wait(timeout=300)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return terminal.decode(), piped.decode(), rc


def test_terminal_gets_a_status_line_redrawn_in_place_and_cleared(fake: FakeOllama) -> None:
    out, _, rc = _run_on_terminal(_args(fake))
    assert rc == 0, out
    assert _updates(out, "0") == FOUR and _updates(out, "1") == FOUR
    assert {m.group(4) for m in STATUS.finditer(out)} == {"4"}
    assert all(float(m.group(5)) > 0 for m in STATUS.finditer(out) if m.group(5))
    # Cleared before each per-trial line and before the summary: on the screen no status is left,
    # and the per-trial lines start at the line's start.
    screen = _screen(out)
    assert not [line for line in screen if "request " in line]
    assert [line[:8] for line in screen if line.startswith("[")] == ["[1/2] #0", "[2/2] #1"]
    assert any(line.startswith("Best feasible configuration (trial #") for line in screen)


def test_json_puts_the_status_line_on_stderr_and_only_the_document_on_stdout(fake: FakeOllama) -> None:
    err, out, rc = _run_on_terminal(_args(fake, "--json"), stdout_too=False)
    assert rc == 0, err
    assert json.loads(out)["trials_run"] == 2 and "\r" not in out
    assert _updates(err, "0") == FOUR and _updates(err, "1") == FOUR
    assert [line[:8] for line in _screen(err) if line.startswith("[")] == ["[1/2] #0", "[2/2] #1"]


def test_quiet_on_a_terminal_prints_only_the_verdict(fake: FakeOllama) -> None:
    out, _, rc = _run_on_terminal(_args(fake, "-q"))
    assert rc == 0, out
    assert "\r" not in out.replace("\r\n", "\n")
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Best: #"), out


def test_not_a_terminal_gets_no_carriage_returns(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "2", "--repeats", "2",
               "--num-predict", "8", "--validate", "0", "--no-roofline", "--remeasure-contended", "0", "-v")
    assert r.exit_code == 0, r.output
    assert "\r" not in r.stdout and "\r" not in r.stderr
    # The log keeps its plain lines: a line per request (-v) and a line per finished trial.
    assert sum(1 for line in r.stdout.splitlines() if line.startswith("  #1 request ")) == 4
    assert [line[:8] for line in r.stdout.splitlines() if line.startswith("[")] == ["[1/2] #0", "[2/2] #1"]


def _sample(eval_ms: float) -> RequestSample:
    return RequestSample(prompt="chat", repeat=0, ttft_ms=10.0, latency_ms=100.0, prompt_tokens=10,
                         prompt_eval_ms=10.0, eval_tokens=8, eval_ms=eval_ms, load_ms=0.0, total_ms=100.0,
                         done_reason="length")


@pytest.fixture
def on_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.statusline

    monkeypatch.setattr(tuner.statusline, "_isatty", lambda stream: True)


def test_an_echoed_line_clears_the_status_and_it_comes_back_with_the_next_request(
        on_terminal: None, capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.statusline import StatusLine

    lines: list[str] = []
    with StatusLine(tick_s=60) as live:
        echo = live.wrap(lambda msg: (lines.append(msg), print(msg)))
        live.start(3, 2)
        live.sample(3, 0, _sample(eval_ms=100.0))  # 80 tok/s
        echo("  #3 request 1 (chat, repeat 1): ...")
        live.sample(3, 1, _sample(eval_ms=50.0))  # 160 tok/s: 120 on average
    out = capsys.readouterr().out
    assert lines == ["  #3 request 1 (chat, repeat 1): ..."]
    first = "trial #3 [" + "-" * 20 + "] request 1/2  0m00s"
    second = "trial #3 [" + "#" * 10 + "-" * 10 + "] request 2/2  decode 80.0 tok/s  0m00s"
    third = "trial #3 [" + "#" * 20 + "] request 2/2  decode 120.0 tok/s  0m00s"
    blank = "\r" + " " * len(third) + "\r"
    assert out == ("\r" + first + "\r" + second + "\r" + " " * len(second) + "\r"
                   + "  #3 request 1 (chat, repeat 1): ...\n" + "\r" + third + blank)


def test_the_ticker_redraws_only_a_shown_status_line(on_terminal: None, capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.statusline import StatusLine

    with StatusLine(tick_s=0.05) as live:
        live.start(1, 4)
        time.sleep(0.3)
        ticked = capsys.readouterr().out.count("\rtrial #1 [")
        live.wrap(print)("[1/1] #1 ...")  # the trial's line: the status line is gone until the next trial
        capsys.readouterr()
        time.sleep(0.3)
        assert capsys.readouterr().out == ""
    assert ticked >= 3


def test_a_line_wider_than_the_terminal_is_cut(on_terminal: None, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.statusline import StatusLine

    monkeypatch.setenv("COLUMNS", "30")
    with StatusLine(tick_s=60) as live:
        live.start(12, 6)
    out = capsys.readouterr().out
    assert out == "\rtrial #12 [" + "-" * 18 + "\r" + " " * 29 + "\r"


def test_demo_quiet_prints_only_the_verdict(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import tuner.demo
    from tuner.demo import DemoResult

    calls: list[dict[str, Any]] = []

    def fake_demo(**kw: Any) -> DemoResult:
        calls.append(kw)
        kw["echo"]("model: Gemma 3 270M Q4_K_M ...")  # progress: silenced by -q
        return DemoResult("Best feasible configuration (trial #6): ...", "Best: #6 model num_thread=2 (decode tok/s 86.70)",
                          tmp_path / "r.html", tmp_path / "r.Modelfile", tmp_path / "r.json")

    monkeypatch.setattr(tuner.demo, "run_demo", fake_demo)
    r = invoke("demo", "-q", "--trials", "3")
    assert r.exit_code == 0, r.output
    assert r.output == "Best: #6 model num_thread=2 (decode tok/s 86.70)\n"
    assert calls[0]["trials"] == 3
    r = invoke("demo", "--trials", "3")
    assert r.exit_code == 0, r.output
    assert r.output == (f"model: Gemma 3 270M Q4_K_M ...\nBest feasible configuration (trial #6): ...\n"
                        f"report:    {tmp_path / 'r.html'}\nModelfile: {tmp_path / 'r.Modelfile'}\n"
                        f"options:   {tmp_path / 'r.json'}\n")
