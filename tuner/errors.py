"""The one exception hierarchy. Every message says what went wrong and how to fix it."""

from __future__ import annotations


class TunerError(Exception):
    """Base class: the CLI prints ``Error: <message>`` and exits with ``exit_code``."""

    #: click's convention: 2 when the input is rejected (before the server or storage is
    #: touched, or an unknown study, trial or model name); 1 for a runtime failure.
    exit_code = 2


class ServerError(TunerError):
    """The inference server is unreachable or answered something unusable."""

    exit_code = 1


class ServerHungError(ServerError):
    """The server answers /api/version but not a generate or load request within --timeout.

    Not the config's fault as far as anyone can tell: the trial is failed, not infeasible.
    """


class ServerSetupError(ServerError):
    """The server cannot be addressed or started as asked (bad --host, --ollama-bin, setting)."""

    exit_code = 2


class ModelNotFoundError(TunerError):
    """The model is not installed on the server (or the GGUF path does not exist)."""


class SpaceError(TunerError):
    """The search space (``--param``, ``--space`` file) is invalid."""


class WorkloadError(TunerError):
    """The prompts, repeats or lengths of the workload are invalid."""


class StudyError(TunerError):
    """The storage or study cannot be used as asked (mismatch, bad URL, missing study)."""


class StorageError(StudyError):
    """The storage cannot be opened or written (database down, disk full, file-size limit)."""

    exit_code = 1


class ExportError(TunerError):
    """The winner cannot be exported as asked."""


class WriteError(TunerError):
    """A report or export file cannot be written for lack of space (disk full, ``ulimit -f``)."""

    exit_code = 1


class MissingDependencyError(TunerError):
    """An optional package is needed for this feature."""


class LoadError(TunerError):
    """A configuration failed to load or run on the server (e.g. out of memory).

    Raised inside a trial; the study records it as an infeasible trial and goes on.
    """

    exit_code = 1


class TrialFailedError(TunerError):
    """A trial could not be measured for a reason unrelated to its configuration."""

    exit_code = 1


class StoppedError(TunerError):
    """The run stopped after consecutive failed trials; the study is intact."""

    exit_code = 1


class CheckUnmeasurable(TunerError):
    """``tune check`` could not measure now (server down, model gone, config no longer loads)."""

    #: Neither "no regression" (0) nor "regression" (1): cron and CI tell it apart.
    exit_code = 3
