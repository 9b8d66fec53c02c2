"""Where studies live: an Optuna storage from a URL (SQLite by default)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from tuner.errors import StorageError, StudyError, TunerError

DEFAULT_DB = Path("studies") / "tuner.db"
#: Heartbeats let a RUNNING trial of a killed worker be marked FAIL after the grace period.
HEARTBEAT_S = 30
GRACE_S = 90
# What SQLite and PostgreSQL say when another worker created the schema or study first.
_CREATION_RACE = ("already exists", "duplicate key", "UniqueViolation", "UNIQUE constraint failed",
                  "database is locked")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_WORDS = ("database or disk is full", "disk I/O error")
#: The SQLAlchemy dialects Optuna's RDBStorage is used with (the part before any '+driver').
_DIALECTS = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
_URL_HELP = "use sqlite:///path.db, postgresql://user@host/db, mysql://user@host/db or journal:///path.log"
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Every Optuna RDB storage has them: RDBStorage creates them and stamps the last two.
_OPTUNA_TABLES = ("studies", "version_info", "alembic_version")
_NOT_A_STUDY = "pass the --storage of a tuner study"
#: A journal's first line is one small record; a longer one is not a journal.
_JOURNAL_PROBE = 1 << 20


def default_storage_url() -> str:
    return f"sqlite:///{DEFAULT_DB.as_posix()}"


# user:password@ up to the last '@' of the line, since passwords may hold an unencoded '@' or a
# space; also the malformed scheme:/user:pw@ and scheme:user:pw@ forms, which the user meant as URLs.
_USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*:/*[^:/@\s]*:)[^\r\n]*@")
# A query value runs to the next '&' only: drivers read '#', ';' and spaces as part of it.
_PASSWORD_PARAM = re.compile(
    r"([?&;][\w.-]*(?:password|passwd|pwd|pass|secret|token)=)[^&\r\n]*", re.IGNORECASE)


def mask(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every password replaced, safe to print.

    In a message the mask may take more than the password (up to the line's last '@'), never less.
    """
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
                 writable: bool | None = None, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> Any:
    """Open (creating when asked) the storage at ``url``.

    ``sqlite:///path``, ``postgresql://...``, ``mysql://...`` become an RDBStorage with
    heartbeats; ``journal:///path/file.log`` a journal-file storage for shared file systems.
    With ``create=False`` a file or database that is not a study storage is refused by name
    and nothing is created in it; unless ``writable`` (``tune check`` stores its result), it
    is read-only too: a SQLite file is read through a connection that writes nothing, not
    even a side file, and any write fails.
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
        return _open_journal(Path(url[len("journal://"):]), url, create)
    read_only: str | None = None
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not create and not path.exists():
            raise StudyError(f"no study storage at {path}: run `tune --model ...` first or pass --storage")
        _check_dir(path, url, create)
        if create and path.is_file() and path.stat().st_size > 0:
            _refuse_foreign(path, url)
        if not create:
            read_only = _read_only_sqlite(path, url)  # checks it is a tuner storage
            if writable:
                read_only = None
    elif not re.match(r"^[a-z0-9+]+://", url):
        raise StudyError(
            f"invalid storage URL '{mask(url)}': use sqlite:///path.db, postgresql://user@host/db "
            "or journal:///path.log"
        )
    scheme = url.split("://", 1)[0]
    if scheme.split("+")[0] not in _DIALECTS:
        raise StudyError(f"unknown storage scheme '{scheme}': {_URL_HELP}")
    if scheme.startswith("sqlite") and not url.startswith("sqlite:///"):
        raise StudyError(f"invalid storage URL '{mask(url)}': {_URL_HELP}")
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
            engine_kwargs = {"pool_pre_ping": True} if not url.startswith("sqlite") else None
            if not create and not url.startswith("sqlite"):
                _check_server_tables(url, shown, engine_kwargs)
            storage = optuna.storages.RDBStorage(
                # Optuna fills {SCHEMA_VERSION} in with str.format: other braces are kept as typed.
                (read_only or url).replace("{", "{{").replace("}", "}}"),
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=callback,
                engine_kwargs=_null_pool() if read_only is not None else engine_kwargs,
                skip_table_creation=not create,
            )
            if read_only is None and url.startswith("sqlite"):
                _fast_sqlite(storage)
            return storage
        except TunerError:
            raise
        except ImportError as e:
            raise StudyError(
                f"storage '{shown}' needs a database driver ({e.name or 'not installed'}): "
                "for PostgreSQL install `pip install 'ollama-tuner[postgres]'`"
            ) from None
        except Exception as e:  # sqlalchemy errors carry the URL, possibly with a password
            if e.__class__.__name__ == "NoSuchModuleError":
                raise StudyError(f"unknown storage scheme '{scheme}': {_URL_HELP}") from None
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


def _open_journal(path: Path, url: str, create: bool) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if create:
        _check_dir(path, url, create)
    else:
        # Optuna's backend creates a missing file: refused first, as a foreign file is.
        _check_journal(path)
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise StorageError(
            f"cannot open storage '{mask(url)}': {e.strerror or e}; pass a writable --storage "
            f"(e.g. journal://{Path.home()}/tuner.log)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:  # a record Optuna cannot replay
        raise StudyError(f"{path} is not a readable Optuna journal ({e.__class__.__name__}: {e}): "
                         f"pass journal:///path to a file written by `tune --storage journal:///...`") from None


def _check_journal(path: Path) -> None:
    """StudyError unless ``path`` is a journal file (an empty one holds no studies yet)."""
    if not path.exists():
        raise StudyError(f"no study storage at {path}: run `tune --model ...` first or pass --storage")
    first = _read_head(path, lambda f: f.readline(_JOURNAL_PROBE))
    if not first:
        return
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise StudyError(f"{path} is not an Optuna journal (first line is not a journal record): pass "
                         "journal:///path to a file written by `tune --storage journal:///...`")


def _read_head(path: Path, read: Callable[[Any], bytes]) -> bytes:
    if not path.is_file():
        raise StudyError(f"{path} is not a file: {_NOT_A_STUDY}")
    try:
        with path.open("rb") as f:
            return read(f)
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e.strerror or e}; pass a readable --storage") from None


def _read_only_sqlite(path: Path, url: str) -> str:
    """The SQLAlchemy URL that reads the tuner storage at ``path`` writing nothing, not even a
    side file; StudyError naming the file when it is not a tuner storage."""
    import sqlite3

    head = _read_head(path, lambda f: f.read(100))
    if not head:
        raise StudyError(f"{path} is an empty file, not a study storage: {_NOT_A_STUDY}")
    if not head.startswith(_SQLITE_MAGIC):
        raise StudyError(f"{path} is not a SQLite database: {_NOT_A_STUDY}")
    # mode=ro on a WAL database creates -wal and -shm files and leaves them. With no -wal, no
    # writer has it open: immutable=1 reads it creating and locking nothing. A running study
    # has a -wal holding its latest commits, which only mode=ro reads.
    wal = head[18:20] == b"\x02\x02"
    flag = "immutable=1" if wal and not os.path.exists(f"{path}-wal") else "mode=ro"
    target = "file:" + quote(os.fsencode(os.path.abspath(path)))
    try:
        con = sqlite3.connect(f"{target}?{flag}", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            _check_tables(tables, mask(url), lambda sql: con.execute(sql).fetchone()[0])
        finally:
            con.close()
    except sqlite3.OperationalError as e:  # locked, or cannot be opened: a runtime failure
        raise StorageError(f"cannot open storage '{mask(url)}': {e}") from None
    except sqlite3.DatabaseError as e:
        raise StudyError(f"{path} is not a readable SQLite database ({e}): {_NOT_A_STUDY}") from None
    # SQLAlchemy decodes the database part of its URL once: the path's '%' are encoded again.
    database = f"sqlite:///{target.replace('%', '%25')}"
    return f"{database}?{flag}&uri=true"


def _refuse_foreign(path: Path, url: str) -> None:
    """StudyError when the existing file at ``path`` is not SQLite, or holds only another
    program's tables: a study is never written into someone else's database. A file with some
    of Optuna's tables is a storage another worker is creating now: left to Optuna."""
    import sqlite3

    head = _read_head(path, lambda f: f.read(100))
    fix = "pass a new file or a tuner storage to --storage"
    if head and not head.startswith(_SQLITE_MAGIC):
        raise StudyError(f"{path} is not a SQLite database: {fix}")
    try:
        con = sqlite3.connect(f"file:{quote(os.fsencode(os.path.abspath(path)))}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error:
        return  # locked or mid-write: RDBStorage says what is wrong, if anything
    names = sorted(t for t in tables if not t.startswith("sqlite_"))
    if names and not set(_OPTUNA_TABLES) & tables:
        listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise StudyError(f"{path} holds another program's tables ({listed}), not tuner studies: {fix}")


def _check_server_tables(url: str, shown: str, engine_kwargs: dict[str, Any] | None) -> None:
    """StudyError unless the database at ``url`` (PostgreSQL, MySQL) holds Optuna's tables."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, **(engine_kwargs or {}))

    def count(sql: str) -> Any:
        with engine.connect() as conn:
            return conn.exec_driver_sql(sql).scalar()

    try:
        _check_tables(set(sqlalchemy.inspect(engine).get_table_names()), shown, count)
    finally:
        engine.dispose()


def _check_tables(tables: set[str], shown: str, count: Callable[[str], Any]) -> None:
    """StudyError unless Optuna's tables are there and stamped, so that opening writes nothing
    (RDBStorage creates missing tables and stamps missing versions)."""
    if not set(_OPTUNA_TABLES) <= tables:
        names = sorted(t for t in tables if not t.startswith("sqlite_"))
        listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        its = f"its tables: {listed}" if names else "it has no tables"
        raise StudyError(f"{shown} holds no tuner studies ({its}): {_NOT_A_STUDY}")
    for table in _OPTUNA_TABLES[1:]:
        if not count(f"SELECT COUNT(*) FROM {table}"):
            raise StudyError(f"{shown} is an incomplete study storage (its {table} table is empty): "
                             f"{_NOT_A_STUDY}")


def _null_pool() -> dict[str, Any]:
    from sqlalchemy.pool import NullPool

    # A fresh connection per read: an immutable one must not keep pages a writer has since changed.
    return {"poolclass": NullPool}


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


def close_storage(storage: Any) -> None:
    """Close the database connections an RDB storage holds (nothing to do for other storages);
    the storage opens new ones if it is used again."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


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


#: Trial ids per ``IN (...)`` of :func:`rdb_trials`: the chunk SQLAlchemy's selectin loading uses,
#: so each backend plans (and orders) the rows as it does for Optuna's own read.
_IN_CHUNK = 500


def rdb_trials(storage: Any, study_id: int) -> list[Any] | None:
    """Every trial of a study in an RDB storage (or Optuna's cache in front of one), as
    ``storage.get_all_trials(study_id, deepcopy=False)`` returns them (equal FrozenTrials, in
    trial order, attributes in the same order); None for another kind of storage.

    One plain query per table: Optuna's ORM read builds and then expires an object per stored
    attribute, most of the read of a 1,000-trial study (0.5-1 s).
    """
    try:
        from optuna.storages import RDBStorage
        from optuna.storages._rdb import models
    except ImportError:  # pragma: no cover - a future Optuna that moved them
        return None
    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, RDBStorage):
        return None
    return _rdb_trials(rdb.engine, models, study_id)


def _rdb_trials(engine: Any, models: Any, study_id: int) -> list[Any]:
    """:func:`rdb_trials`: the queries of Optuna's own read, without the ORM,
    turned into FrozenTrials as ``RDBStorage._build_frozen_trial_from_trial_model`` does."""
    from optuna.distributions import json_to_distribution
    from optuna.trial import FrozenTrial
    from sqlalchemy import select

    t = models.TrialModel.__table__
    tables = {name: model.__table__ for name, model in (
        ("user", models.TrialUserAttributeModel), ("system", models.TrialSystemAttributeModel),
        ("values", models.TrialValueModel), ("params", models.TrialParamModel),
        ("steps", models.TrialIntermediateValueModel))}
    cols = {"user": ("key", "value_json"), "system": ("key", "value_json"),
            "values": ("objective", "value", "value_type"),
            "params": ("param_id", "param_name", "param_value", "distribution_json"),
            "steps": ("step", "intermediate_value", "intermediate_value_type")}
    rows: dict[str, list[Any]] = {name: [] for name in tables}
    with engine.connect() as conn:
        trials = conn.execute(select(t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete)
                              .where(t.c.study_id == study_id).order_by(t.c.trial_id)).all()
        ids = [row[0] for row in trials]
        for name, table in tables.items():
            picked = [table.c.trial_id, *(table.c[c] for c in cols[name])]
            for i in range(0, len(ids), _IN_CHUNK):
                rows[name].extend(conn.execute(select(*picked).where(
                    table.c.trial_id.in_(ids[i:i + _IN_CHUNK]))).all())
    user: dict[int, dict[str, Any]] = {i: {} for i in ids}
    system: dict[int, dict[str, Any]] = {i: {} for i in ids}
    values: dict[int, list[Any]] = {i: [] for i in ids}
    params: dict[int, list[Any]] = {i: [] for i in ids}
    steps: dict[int, dict[int, float]] = {i: {} for i in ids}
    # Each attribute is one JSON text; decoded as one array, not 30,000 json.loads calls.
    for name, into in (("user", user), ("system", system)):
        decoded = json.loads("[" + ",".join(row[2] for row in rows[name]) + "]")
        for (tid, key, _), value in zip(rows[name], decoded):
            into[tid][key] = value
    for row in rows["values"]:
        values[row[0]].append(row)
    for row in rows["params"]:
        params[row[0]].append(row)
    to_step = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
    for tid, step, value, kind in rows["steps"]:
        steps[tid][step] = to_step(value, kind)
    # A study's trials share a few distributions: each parsed once (they are not changed).
    dists: dict[str, Any] = {}

    def dist(text: str) -> Any:
        d = dists.get(text)
        if d is None:
            d = dists[text] = json_to_distribution(text)
        return d

    to_value = models.TrialValueModel.stored_repr_to_value
    out = []
    for tid, number, state, start, complete in trials:
        vals: list[float] | None = None
        if values[tid]:
            vals = [0.0] * len(values[tid])
            for _, objective, value, kind in values[tid]:
                vals[objective] = to_value(value, kind)
        ps = sorted(params[tid], key=lambda p: p[1])
        out.append(FrozenTrial(
            number=number, state=state, value=None, values=vals, datetime_start=start, datetime_complete=complete,
            params={p[2]: dist(p[4]).to_external_repr(p[3]) for p in ps},
            distributions={p[2]: dist(p[4]) for p in ps}, user_attrs=user[tid], system_attrs=system[tid],
            intermediate_values=steps[tid], trial_id=tid))
    return out


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
