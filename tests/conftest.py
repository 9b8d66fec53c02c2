"""Shared fixtures: every test runs in its own folder, against a fresh fake Ollama."""

from __future__ import annotations

import contextlib
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_ollama import FakeOllama  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every path at tmp and clear the environment the CLI reads."""
    monkeypatch.chdir(tmp_path)
    for var in ("OLLAMA_HOST", "TUNER_STORAGE", "TUNER_DEBUG"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the offload probe and say the server offloads to a GPU, so num_gpu is searched."""
    from tuner.engines import GpuOffload
    from tuner.engines.ollama import OllamaEngine

    monkeypatch.setattr(OllamaEngine, "gpu_offload",
                        lambda self, model, options: GpuOffload(True, "test", "the test says so"))


def invoke(*args: Any) -> Any:
    """Run the CLI in-process; return click's Result (its output is kept for the password check)."""
    from click.testing import CliRunner

    from tuner.cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    OUTPUTS.append(r.output)
    return r


#: Every password a test hands the tool; none may appear in any output of the suite.
PASSWORDS = ("s3cret", "pa ss#x;y")
#: Every CLI output of the session (see :func:`invoke`), checked with pytest's captured output.
OUTPUTS: list[str] = []
_LEAKS: list[str] = []


def leaks(text: str, quoted_source: bool = False) -> list[str]:
    """The lines of ``text`` holding a password; ``quoted_source`` skips a failure report's
    lines of test source and assertion text (a test's own arguments, not printed output)."""
    return [line.strip()[:200] for line in text.splitlines()
            if any(pw in line for pw in PASSWORDS)
            and not (quoted_source and line.lstrip().startswith((">", "E ")))]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    found = [x for _, content in report.sections for x in leaks(content)]
    if report.longrepr is not None:
        found += leaks(str(report.longrepr), quoted_source=True)
    found += [x for out in OUTPUTS for x in leaks(out)]
    OUTPUTS.clear()
    _LEAKS.extend(f"{report.nodeid}: {x}" for x in found)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _LEAKS:
        print("\npassword text in test output:\n  " + "\n  ".join(_LEAKS[:20]), file=sys.stderr)
        session.exitstatus = 1


@contextlib.contextmanager
def static_server(status: int, body: bytes, content_type: str = "text/plain") -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers every GET and POST with the same reply; yields its URL."""

    class Reply(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Reply)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()

