"""Where studies live: an Optuna storage from a URL (SQLite by default)."""

from __future__ import annotations

import errno
import os
import random
import re
import time
from pathlib import Path
from typing import Any

from tuner.errors import StorageError, StudyError

DEFAULT_DB = Path("studies") / "tuner.db"
#: Heartbeats let a RUNNING trial of a killed worker be marked FAIL after the grace period.
HEARTBEAT_S = 30
GRACE_S = 90
# What SQLite and PostgreSQL say when another worker created the schema or study first.
_CREATION_RACE = ("already exists", "duplicate key", "UniqueViolation", "UNIQUE constraint failed",
                  "database is locked")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_WORDS = ("database or disk is full", "disk I/O error")


def default_storage_url() -> str:
    return f"sqlite:///{DEFAULT_DB.as_posix()}"


# user:password@ up to the last '@' of the URL, since passwords may hold an unencoded '@'.
_USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*://[^:/@\s]*:)\S*@")
_PASSWORD_PARAM = re.compile(r"([?&;](?:password|passwd|pwd|pass)=)[^&;#\s]*", re.IGNORECASE)


def mask(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every password replaced, safe to print."""
    return _PASSWORD_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def _encode_password(url: str) -> str:
    """``url`` with its password percent-encoded, so that an unencoded '@' in it is read as the
    user meant (else the driver takes its tail for the host name and prints it in errors)."""
    from urllib.parse import quote, unquote

    head, sep, query = url.partition("?")
    m = re.match(r"([A-Za-z][\w+.-]*://[^:/@]*:)(.*)@([^@]*)$", head, re.S)
    if m is None:
        return url
    return f"{m.group(1)}{quote(unquote(m.group(2)), safe='')}@{m.group(3)}{sep}{query}"


def shown_url(url: str | None) -> str:
    """The storage URL as printed: the default when none was given, passwords masked."""
    return mask(url or default_storage_url())


def storage_args(url: str | None) -> tuple[str, ...]:
    """``--storage URL`` for a printed command (password masked); none for the default storage."""
    return () if url is None or url == default_storage_url() else ("--storage", mask(url))


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

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise StorageError(
                f"cannot open storage '{mask(url)}': {e.strerror or e}; pass a writable --storage "
                f"(e.g. journal://{Path.home()}/tuner.log)"
            ) from None
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
    url = _encode_password(url)
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; we ship psycopg (3).
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    callback = LostTrialCallback(grace_s, retry_failed)
    last: Exception | None = None
    # Several workers starting at once race to create the schema; the losers retry.
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=callback,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            )
            if url.startswith("sqlite"):
                _fast_sqlite(storage)
            return storage
        except ImportError as e:
            raise StudyError(
                f"storage '{shown}' needs a database driver ({e.name or 'not installed'}): "
                "for PostgreSQL install `pip install 'ollama-tuner[postgres]'`"
            ) from None
        except Exception as e:  # sqlalchemy errors carry the URL, possibly with a password
            last = e
            if any(w in str(e) for w in _CREATION_RACE):
                time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))
                continue
            break
    full = write_failure(last) if last is not None else None
    if full is not None:
        raise full
    reason = mask(str(last).splitlines()[0]) if last and str(last) else last.__class__.__name__
    raise StorageError(f"cannot open storage '{shown}': {reason}") from None


def write_failure(e: BaseException) -> StorageError | None:
    """A storage write that failed for lack of space, as a StorageError naming the fix; else None.

    SQLite reports a full disk as "database or disk is full" and a write beyond ``ulimit -f``
    as "disk I/O error" (through SQLAlchemy); the journal storage raises OSError itself.
    """
    reason = _full_reason(e)
    if reason is None:
        return None
    return StorageError(
        f"cannot write the study storage ({reason}): free disk space or raise the file-size limit "
        "(`ulimit -f`), then run the same command again to resume"
    )


def _full_reason(e: BaseException) -> str | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return cur.strerror or str(cur)
        if cur.__class__.__name__ == "OperationalError":
            first = str(cur).splitlines()[0] if str(cur) else ""
            for words in _FULL_WORDS:
                if words in first:
                    return words
        cur = getattr(cur, "orig", None) or cur.__cause__ or cur.__context__
    return None


def _fast_sqlite(storage: Any) -> None:
    """WAL with synchronous=NORMAL: a commit is an append, not an fsync (about 3x faster per
    attribute written), and a killed process still loses nothing that was committed; only a
    power cut can take the last commits, never corrupt the file."""
    from sqlalchemy import event

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections made before the listener reconnect with it


def lost_trial_key(number: int) -> str:
    """The study attribute that says why trial ``number`` was failed by the heartbeat check.

    A FAIL trial is finished, so nothing can be written on it any more; the study can.
    """
    return f"lost_trial_{number}"


class LostTrialCallback:
    """Run by Optuna for each RUNNING trial whose worker stopped sending heartbeats."""

    def __init__(self, grace_s: int, retry: bool) -> None:
        import optuna

        self.grace_s = grace_s
        self.retry = optuna.storages.RetryFailedTrialCallback(max_retry=1) if retry else None

    def __call__(self, study: Any, trial: Any) -> None:
        import datetime as dt
        import platform

        w = trial.user_attrs.get("worker") or {}
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        study.set_user_attr(lost_trial_key(trial.number), (
            f"its worker ({w.get('hostname', '?')} pid {w.get('pid', '?')}) sent no heartbeat for "
            f"{self.grace_s} s: it was killed, crashed or hung (marked failed by {platform.node()} "
            f"pid {os.getpid()} at {now})"
            + ("; queued again" if self.retry else "; --retry-failed measures such trials again")
        ))
        if self.retry is not None:
            self.retry(study, trial)


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
