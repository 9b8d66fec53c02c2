"""ollama-tuner: find the fastest Ollama / llama.cpp runtime settings, measured for real."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "TuneOptions",
    "StudySummary",
    "run_study",
    "TunerError",
]


def __getattr__(name: str) -> object:
    # Lazy so that `import tuner` (and `tune --help`) stays fast.
    if name == "TuneOptions":
        from tuner.options import TuneOptions

        return TuneOptions
    if name == "run_study":
        from tuner.study import run_study

        return run_study
    if name == "StudySummary":
        from tuner.results import StudySummary

        return StudySummary
    if name == "TunerError":
        from tuner.errors import TunerError

        return TunerError
    raise AttributeError(name)
