"""Shared fixtures: every test runs in its own folder, against a fresh fake Ollama."""

from __future__ import annotations

import sys
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
    """Run the CLI in-process; return click's Result."""
    from click.testing import CliRunner

    from tuner.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
