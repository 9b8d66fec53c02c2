"""Inference engines behind one interface: ``ollama`` (HTTP, default) and ``llama-cpp``."""

from __future__ import annotations

from typing import Any

from tuner.engines.base import Drafting, Engine, GpuOffload, ModelInfo
from tuner.errors import TunerError

ENGINES = ("ollama", "llama-cpp", "replay")


def get_engine(name: str, **kwargs: Any) -> Engine:
    """Construct the engine called ``name``."""
    if name == "ollama":
        from tuner.engines.ollama import OllamaEngine

        server = None
        if kwargs.get("manage_server"):
            from tuner.server import ManagedServer, find_ollama

            server = ManagedServer(find_ollama(kwargs.get("ollama_bin")), kwargs.get("models_dir"))
            server.ensure({})
        try:
            return OllamaEngine(host=kwargs.get("host"), timeout_s=kwargs.get("timeout_s", 600.0), server=server,
                                **({"host_hint": kwargs["host_hint"]} if kwargs.get("host_hint") else {}))
        except BaseException:
            if server is not None:
                server.stop()
            raise
    if name == "llama-cpp":
        from tuner.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(models=kwargs.get("models") or [])
    if name == "replay":
        from tuner.engines.replay import ReplayEngine

        return ReplayEngine(models=kwargs.get("models") or [])
    raise TunerError(f"unknown engine '{name}': choose one of {', '.join(ENGINES)}")


__all__ = ["Drafting", "Engine", "GpuOffload", "ModelInfo", "ENGINES", "get_engine"]
