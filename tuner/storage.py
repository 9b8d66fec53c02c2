"""Where studies live: an Optuna storage from a URL (SQLite by default)."""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Any

from tuner.errors import StudyError

DEFAULT_DB = Path("studies") / "tuner.db"
#: Heartbeats let a RUNNING trial of a killed worker be marked FAIL after the grace period.
HEARTBEAT_S = 30
GRACE_S = 90


def default_storage_url() -> str:
    return f"sqlite:///{DEFAULT_DB.as_posix()}"


def mask(url: str) -> str:
    """The URL with any password replaced, safe to print."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def shown_url(url: str | None) -> str:
    """The storage URL as printed: the default when none was given, passwords masked."""
    return mask(url or default_storage_url())


def open_storage(url: str | None, *, retry_failed: bool = False, create: bool = True,
                 heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> Any:
    """Open (creating when asked) the storage at ``url``.

    ``sqlite:///path``, ``postgresql://...``, ``mysql://...`` become an RDBStorage with
    heartbeats; ``journal:///path/file.log`` a journal-file storage for shared file systems.
    """
    import warnings

    import optuna

    # Heartbeats are marked experimental in Optuna; the warning is noise for users.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = url or default_storage_url()
    if url in ("memory", "memory://", ":memory:"):
        # For benchmarks and scripts: nothing is written anywhere.
        return optuna.storages.InMemoryStorage()
    if url.startswith("journal://"):
        path = Path(url[len("journal://"):])
        _check_dir(path, url, create)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not create and not path.exists():
            raise StudyError(f"no study storage at {path}: run `tune --model ...` first or pass --storage")
        _check_dir(path, url, create)
    elif not re.match(r"^[a-z0-9+]+://", url):
        raise StudyError(
            f"invalid storage URL '{mask(url)}': use sqlite:///path.db, postgresql://user@host/db "
            "or journal:///path.log"
        )
    shown = mask(url)
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; we ship psycopg (3).
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    callback = optuna.storages.RetryFailedTrialCallback(max_retry=1) if retry_failed else None
    last: Exception | None = None
    # Several workers starting at once race to create the schema; the losers retry.
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                failed_trial_callback=callback,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            )
        except ImportError as e:
            raise StudyError(
                f"storage '{shown}' needs a database driver ({e.name or 'not installed'}): "
                "for PostgreSQL install `pip install 'ollama-tuner[postgres]'`"
            ) from None
        except Exception as e:  # sqlalchemy errors carry the URL, possibly with a password
            last = e
            if "already exists" in str(e) or "duplicate key" in str(e) or "UniqueViolation" in str(e):
                time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))
                continue
            break
    reason = mask(str(last).splitlines()[0]) if last and str(last) else last.__class__.__name__
    raise StudyError(f"cannot open storage '{shown}': {reason}") from None


def _check_dir(path: Path, url: str, create: bool) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StudyError(f"cannot create the storage folder {parent}: {e.strerror}; pass a writable --storage") from None
    target = path if path.exists() else parent
    if create and not os.access(target, os.W_OK):
        raise StudyError(f"storage {path} is not writable: pass a writable --storage (e.g. sqlite:///{Path.home()}/tuner.db)")
