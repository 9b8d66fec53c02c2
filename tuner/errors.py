"""The one exception hierarchy. Every message says what went wrong and how to fix it."""

from __future__ import annotations


class TunerError(Exception):
    """Base class: the CLI prints ``Error: <message>`` and exits with code 2."""


class ServerError(TunerError):
    """The inference server is unreachable or answered something unusable."""


class ModelNotFoundError(TunerError):
    """The model is not installed on the server (or the GGUF path does not exist)."""


class SpaceError(TunerError):
    """The search space (``--param``, ``--space`` file) is invalid."""


class WorkloadError(TunerError):
    """The prompts, repeats or lengths of the workload are invalid."""


class StudyError(TunerError):
    """The storage or study cannot be used as asked (mismatch, bad URL, missing study)."""


class ExportError(TunerError):
    """The winner cannot be exported as asked."""


class MissingDependencyError(TunerError):
    """An optional package is needed for this feature."""


class LoadError(TunerError):
    """A configuration failed to load or run on the server (e.g. out of memory).

    Raised inside a trial; the study records it as an infeasible trial and goes on.
    """


class TrialFailedError(TunerError):
    """A trial could not be measured for a reason unrelated to its configuration."""
