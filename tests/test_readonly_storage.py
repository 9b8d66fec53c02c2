"""Reading a storage writes nothing: a file that is not a study storage is refused by name and
left byte for byte as it was, with no side file; passwords in storage URLs are never printed."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner.errors import StorageError, StudyError
from tuner.storage import mask, open_storage

RUN = ["--trials", "1", "--repeats", "1", "--num-predict", "4", "--validate", "0", "--no-roofline"]
NOT_A_STUDY = "pass the --storage of a tuner study"
JOURNAL_FIX = "pass journal:///path to a file written by `tune --storage journal:///...`"
URL_HELP = "use sqlite:///path.db, postgresql://user@host/db, mysql://user@host/db or journal:///path.log"


def _reads(out: Path) -> list[list[str]]:
    """Every read-only command, as arguments before ``--storage``."""
    return [["show"], ["studies"], ["studies", "--by-hardware"], ["report", "-o", str(out / "r.html")],
            ["export", "--format", "json"], ["export", "--format", "csv"], ["check", "--dry-run"]]


def _state(folder: Path) -> dict[str, str]:
    """Each file in ``folder`` with the sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _seed(fake: FakeOllama, storage: str, study: str = "s") -> None:
    """A real study in ``storage``, written by a process that has exited (so SQLite has closed
    the file as a finished run leaves it: no -wal, no -shm)."""
    args = ["--model", "gemma3:1b", "--host", fake.url, "--storage", storage, "--study", study, *RUN]
    r = subprocess.run([sys.executable, "-c", "from tuner.cli import cli; cli()", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _foreign(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.execute("INSERT INTO notes VALUES ('keep me')")
    con.commit()
    con.close()


@pytest.mark.parametrize(("kind", "error"), [
    ("foreign", f"Error: sqlite:///data/f.db holds no tuner studies (its tables: notes): {NOT_A_STUDY}"),
    ("empty", f"Error: data/f.db is an empty file, not a study storage: {NOT_A_STUDY}"),
    ("text", f"Error: data/f.db is not a SQLite database: {NOT_A_STUDY}"),
    ("no-tables", f"Error: sqlite:///data/f.db holds no tuner studies (it has no tables): {NOT_A_STUDY}"),
    ("journal-as-sqlite", f"Error: data/f.db is not a SQLite database: {NOT_A_STUDY}"),
])
def test_a_file_that_is_no_sqlite_study_storage_is_refused_and_left_as_it_was(
        tmp_path: Path, kind: str, error: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    f = data / "f.db"
    if kind == "foreign":
        _foreign(f)
    elif kind == "empty":
        f.write_bytes(b"")
    elif kind == "text":
        f.write_text("these are my notes\nnot a database\n")
    elif kind == "no-tables":
        con = sqlite3.connect(f)
        con.execute("PRAGMA user_version = 7")  # a valid SQLite file without a table
        con.close()
    else:
        f.write_text('{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n')
    before = _state(data)
    for args in _reads(tmp_path):
        r = invoke(*args, "--storage", "sqlite:///data/f.db")
        assert (r.exit_code, r.output) == (2, error + "\n"), (args, r.output)
        assert _state(data) == before, args
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(("content", "first"), [
    (b"these are my notes\n", "text"),
    (b"SQLite format 3\x00" + bytes(84), "a SQLite header"),
    (b'{"name": "not a record"}\n', "JSON without op_code"),
    (b"[1, 2]\n", "a JSON list"),
    (b"\xff\xfe\x00garbage\n", "bytes"),
    (b"x" * (2 << 20), "an endless first line"),
])
def test_a_file_that_is_no_journal_is_refused_and_left_as_it_was(tmp_path: Path, content: bytes,
                                                                  first: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_bytes(content)
    before = _state(data)
    for args in _reads(tmp_path):
        r = invoke(*args, "--storage", f"journal://{data}/notes.txt")
        assert r.exit_code == 2, (first, args, r.output)
        assert r.output == (f"Error: {data}/notes.txt is not an Optuna journal (first line is not a journal "
                            f"record): {JOURNAL_FIX}\n"), (first, args)
        assert _state(data) == before, (first, args)


def test_a_missing_journal_is_not_created_by_a_read(tmp_path: Path) -> None:
    r = invoke("studies", "--storage", f"journal://{tmp_path}/none.log")
    assert (r.exit_code, r.output) == (
        2, f"Error: no study storage at {tmp_path}/none.log: run `tune --model ...` first or pass --storage\n")
    assert not (tmp_path / "none.log").exists()


def test_an_empty_journal_is_an_empty_storage(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.log").write_bytes(b"")
    r = invoke("studies", "--storage", f"journal://{tmp_path}/data/empty.log")
    assert r.exit_code == 0, r.output
    assert _state(tmp_path / "data") == {"empty.log": hashlib.sha256(b"").hexdigest()}


def test_every_read_of_a_journal_study_succeeds_and_changes_nothing(fake: FakeOllama, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = f"journal://{data}/study.log"
    _seed(fake, url)
    before = _state(data)
    assert list(before) == ["study.log"]
    for args in _reads(tmp_path):
        r = invoke(*args, "--storage", url)
        assert r.exit_code == 0, (args, r.output)
        assert _state(data) == before, args
    assert (tmp_path / "r.html").stat().st_size > 0


def test_every_read_of_a_sqlite_study_leaves_it_byte_identical(fake: FakeOllama, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _seed(fake, "sqlite:///data/t.db")
    # The tuner keeps its SQLite storage in WAL mode; a finished run leaves no -wal behind.
    assert (data / "t.db").read_bytes()[18:20] == b"\x02\x02"
    before = _state(data)
    assert list(before) == ["t.db"]
    for args in [*_reads(tmp_path), ["export", "s", "--format", "modelfile"], ["show", "s", "--json"]]:
        r = invoke(*args, "--storage", "sqlite:///data/t.db")
        assert r.exit_code == 0, (args, r.output)
        assert _state(data) == before, args
    # Paths a file: URI must encode; the same bytes are read there.
    odd = tmp_path / "a dir?#%20" / "t {x} %41&mode=rwc#.db"
    odd.parent.mkdir()
    shutil.copy(data / "t.db", odd)
    before = _state(odd.parent)
    r = invoke("show", "s", "--storage", f"sqlite:///{odd}")
    assert r.exit_code == 0, r.output
    assert "Trials: 1 in study" in r.output
    assert _state(odd.parent) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a dir?#%20", "data", "r.html"]


def test_a_study_being_written_is_read_with_its_latest_commits(fake: FakeOllama, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _seed(fake, "sqlite:///data/t.db")
    writer = open_storage("sqlite:///data/t.db")  # a run in progress: its commits are in the -wal
    try:
        optuna.create_study(study_name="fresh", storage=writer)
        assert (data / "t.db-wal").exists()
        main = _state(data)["t.db"]
        r = invoke("studies", "--storage", "sqlite:///data/t.db")
        assert r.exit_code == 0, r.output
        assert "fresh" in r.output
        assert _state(data)["t.db"] == main
    finally:
        writer.engine.dispose()


def test_a_read_only_storage_refuses_writes_and_a_writable_one_stores_them(fake: FakeOllama, tmp_path: Path) -> None:
    # `tune check` reads a study, then stores its result with it: it asks for a writable storage.
    _seed(fake, "sqlite:///t.db")
    before = _state(tmp_path)
    storage = open_storage("sqlite:///t.db", create=False)
    study = optuna.load_study(study_name="s", storage=storage)
    with pytest.raises(Exception):  # noqa: B017 (SQLite refuses; Optuna wraps it in its own words)
        study.set_user_attr("checked", True)
    assert _state(tmp_path) == before
    writable = open_storage("sqlite:///t.db", create=False, writable=True)
    optuna.load_study(study_name="s", storage=writable).set_user_attr("checked", True)
    writable.engine.dispose()
    again = optuna.load_study(study_name="s", storage=open_storage("sqlite:///t.db", create=False))
    assert again.user_attrs["checked"] is True


@pytest.mark.parametrize("source", ["foreign", "journal"])
def test_a_foreign_warm_start_storage_is_refused_and_left_as_it_was(fake: FakeOllama, tmp_path: Path,
                                                                     source: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if source == "foreign":
        _foreign(data / "foreign.db")
        url = "sqlite:///data/foreign.db"
        reason = "holds no tuner studies (its tables: notes)"
    else:
        (data / "notes.txt").write_text("these are my notes\n")
        url = f"journal://{data}/notes.txt"
        reason = f"{data}/notes.txt is not an Optuna journal (first line is not a journal record)"
    before = _state(data)
    r = invoke("run", "--model", "gemma3:1b", "--host", fake.url, "--warm-start-storage", url, *RUN)
    assert (r.exit_code, r.output) == (2, f"Error: --warm-start-storage: cannot read the storage {url} ({reason}): "
                                          "give the URL of the storage that holds the earlier study\n")
    assert _state(data) == before
    assert not Path("studies").exists(), "nothing is created for a rejected source"
    assert fake.prompt_requests() == []


def test_an_incomplete_optuna_schema_is_refused_without_stamping_it(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "half.db")
    for table in ("studies", "version_info", "alembic_version"):
        con.execute(f"CREATE TABLE {table} (x)")
    con.commit()
    con.close()
    before = _state(tmp_path)
    with pytest.raises(StudyError, match=r"^sqlite:///half.db is an incomplete study storage \(its version_info "
                                         r"table is empty\): pass the --storage"):
        open_storage("sqlite:///half.db", create=False)
    assert _state(tmp_path) == before


def test_a_database_server_without_optuna_tables_is_refused_by_its_masked_url(tmp_path: Path) -> None:
    from tuner.storage import _check_server_tables

    # SQLAlchemy inspects a SQLite file as it does a PostgreSQL or MySQL database.
    _foreign(tmp_path / "f.db")
    with pytest.raises(StudyError) as e:
        _check_server_tables("sqlite:///f.db", "postgresql://bob:***@db/tuner", None)
    assert str(e.value) == f"postgresql://bob:***@db/tuner holds no tuner studies (its tables: notes): {NOT_A_STUDY}"


@pytest.mark.parametrize(("url", "error", "code"), [
    ("postgresqlx://user@host/db", f"Error: unknown storage scheme 'postgresqlx': {URL_HELP}", 2),
    ("postgresql+nodriver://user@host/db", f"Error: unknown storage scheme 'postgresql+nodriver': {URL_HELP}", 2),
    ("redis://localhost:6379", f"Error: unknown storage scheme 'redis': {URL_HELP}", 2),
    ("sqlite://t.db", f"Error: invalid storage URL 'sqlite://t.db': {URL_HELP}", 2),
    ("postgresql:/user:s3cret@host/db", "Error: invalid storage URL 'postgresql:/user:***@host/db': use "
     "sqlite:///path.db, postgresql://user@host/db or journal:///path.log", 2),
    ("postgresql:user:s3cret@host/db", "Error: invalid storage URL 'postgresql:user:***@host/db': use "
     "sqlite:///path.db, postgresql://user@host/db or journal:///path.log", 2),
])
def test_storage_url_errors(fake: FakeOllama, url: str, error: str, code: int) -> None:
    for args in (["studies"], ["show"], ["--model", "gemma3:1b", "--host", fake.url, *RUN]):
        r = invoke(*args, "--storage", url)
        assert (r.exit_code, r.output) == (code, error + "\n"), (args, r.output)
    assert not Path("studies").exists()


def test_a_password_with_a_space_is_not_printed_when_the_database_is_down() -> None:
    r = invoke("studies", "--storage", "postgresql://bob:pa ss@127.0.0.1:1/db")
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: cannot open storage 'postgresql://bob:***@127.0.0.1:1/db': "), r.output
    assert "pa ss" not in r.output and "ss@" not in r.output


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:pa ss@host/db", "postgresql://u:***@host/db"),
    ("postgresql://u:pa ss@w@host/db", "postgresql://u:***@host/db"),
    ("postgresql://u:a:b/c?d#e%f@host:5432/db", "postgresql://u:***@host:5432/db"),
    ("postgresql://:s3cret@host/db", "postgresql://:***@host/db"),
    ("postgresql:/user:s3cret@host/db", "postgresql:/user:***@host/db"),
    ("postgresql:/user:s3cret@host", "postgresql:/user:***@host"),
    ("postgresql:user:s3cret@host", "postgresql:user:***@host"),
    ("postgresql:user:s3cret@host/db", "postgresql:user:***@host/db"),
    ("postgresql:///user:s3cret@host/db", "postgresql:///user:***@host/db"),
    ("postgresql://bob@db/tuner?sslpassword=s3cret", "postgresql://bob@db/tuner?sslpassword=***"),
    ("postgresql://bob@db/tuner?sslmode=require&SSLPassword=s3cret&x=1",
     "postgresql://bob@db/tuner?sslmode=require&SSLPassword=***&x=1"),
    ("postgresql://bob@db/tuner?password=pa ss#x;y&sslmode=require",
     "postgresql://bob@db/tuner?password=***&sslmode=require"),
    ("mysql://bob@db/tuner?passwd=s3cret", "mysql://bob@db/tuner?passwd=***"),
    ("mysql://bob@db/tuner?db_pwd=s3cret", "mysql://bob@db/tuner?db_pwd=***"),
    ("mysql://bob@db/tuner?pass=s3cret", "mysql://bob@db/tuner?pass=***"),
    ("postgresql://bob@db/tuner?client_secret=s3cret", "postgresql://bob@db/tuner?client_secret=***"),
    ("postgresql://bob@db/tuner?access_token=s3cret", "postgresql://bob@db/tuner?access_token=***"),
    ("cannot open storage 'postgresql://u:pa ss@host/db': refused",
     "cannot open storage 'postgresql://u:***@host/db': refused"),
    # Nothing to hide: left as written.
    ("postgresql://bob@db:5432/tuner?sslmode=require", "postgresql://bob@db:5432/tuner?sslmode=require"),
    ("sqlite:///studies/a@b.db", "sqlite:///studies/a@b.db"),
    ("journal:///shared/tuner.log", "journal:///shared/tuner.log"),
])
def test_mask(url: str, shown: str) -> None:
    assert mask(url) == shown


#: URL shapes a password is typed into; a query value is cut at '&' by every URL parser.
SHAPES = [
    ("postgresql://bob:{}@db:5432/tuner", ""),
    ("postgresql+psycopg://bob:{}@db/tuner?sslmode=require", ""),
    ("mysql+pymysql://bob:{}@db/tuner", ""),
    ("postgresql:/bob:{}@db/tuner", ""),
    ("postgresql:bob:{}@db/tuner", ""),
    ("postgresql://:{}@db/tuner", ""),
    ("cannot open storage 'postgresql://bob:{}@db/tuner': connection refused", ""),
    ("postgresql://bob@db/tuner?password={}", "&"),
    ("postgresql://bob@db/tuner?sslmode=require&sslpassword={}&x=1", "&"),
    ("mysql://bob@db/tuner?pwd={}", "&"),
]


def test_mask_hides_random_passwords() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    printable = st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from(" @:/?#%\t")

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(SHAPES), st.text(printable, min_size=4, max_size=24))
    def check(shape: tuple[str, str], password: str) -> None:
        template, forbidden = shape
        if any(c in password for c in forbidden) or password in template.replace("{}", "\n"):
            return
        url = template.format(password)
        assert password not in mask(url), (url, mask(url))

    check()


def test_read_only_errors_are_one_line_and_typed(tmp_path: Path) -> None:
    # A folder where a file is expected, and a file SQLite cannot read.
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StudyError, match=rf"^dir.db is not a file: {NOT_A_STUDY}$"):
        open_storage("sqlite:///dir.db", create=False)
    (tmp_path / "bad.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    with pytest.raises(StudyError, match=r"^bad.db is not a readable SQLite database \(") as e:
        open_storage("sqlite:///bad.db", create=False)
    assert not isinstance(e.value, StorageError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.db", "dir.db"]


def test_a_study_is_never_written_into_another_programs_database(fake: FakeOllama, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _foreign(data / "foreign.db")
    (data / "text.db").write_text("notes\n")
    before = _state(data)
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--storage", "sqlite:///data/foreign.db", *RUN)
    assert r.exit_code == 2
    assert r.output == ("Error: data/foreign.db holds another program's tables (notes), not tuner studies: "
                        "pass a new file or a tuner storage to --storage\n")
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--storage", "sqlite:///data/text.db", *RUN)
    assert r.exit_code == 2
    assert r.output == "Error: data/text.db is not a SQLite database: pass a new file or a tuner storage to --storage\n"
    assert _state(data) == before
    assert not fake.prompt_requests()


def test_the_plain_read_of_an_rdb_study_equals_optunas(tmp_path: Path) -> None:
    """``rdb_trials`` (the report's read) gives what ``get_all_trials`` gives, attribute order
    included, for every kind of trial: states, several objectives, inf, intermediate values,
    each kind of distribution; through a read-only storage; other storages are left to Optuna."""
    import math

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    from tuner.results import read_study, trials_of
    from tuner.storage import rdb_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize"])
    dists = {"num_ctx": CategoricalDistribution([2048, 32768]), "temperature": FloatDistribution(0.1, 1.0),
             "num_batch": IntDistribution(32, 512, log=True), "variant": CategoricalDistribution(["a", None, 1.5])}
    rng = __import__("random").Random(0)
    for i in range(700):  # more than one IN (...) chunk
        state = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL][i % 3]
        params = {"num_ctx": rng.choice([2048, 32768]), "temperature": rng.uniform(0.1, 1.0),
                  "num_batch": rng.randint(32, 512), "variant": rng.choice(["a", None, 1.5])}
        keep = {k: v for k, v in params.items() if rng.random() < 0.9}
        values = [rng.choice([rng.uniform(1, 99), math.inf]), -math.inf if i % 7 == 0 else 3.0] \
            if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(
            state=state, values=values, params=keep, distributions={k: dists[k] for k in keep},
            user_attrs={"z": i, "a": {"nested": [1.5, None, "x"]}, "m": "é </script>", "n": math.nan},
            system_attrs={"k": [i]} if i % 2 else {},
            intermediate_values={s: rng.choice([float(s), math.inf, -math.inf]) for s in range(i % 4)}))
    ro = optuna.load_study(study_name="s", storage=open_storage(url, create=False))
    mine = rdb_trials(ro._storage, ro._study_id)
    theirs = study._storage.get_all_trials(study._study_id, deepcopy=False)
    assert mine is not None and len(mine) == 700

    def shape(t: optuna.trial.FrozenTrial) -> tuple:
        return (list(t.params), list(t.user_attrs), list(t.system_attrs), list(t.intermediate_values),
                t._trial_id, [type(v) for v in t.values or []], repr(t.user_attrs["n"]))

    assert mine == theirs and [shape(t) for t in mine] == [shape(t) for t in theirs]
    assert trials_of(ro) == theirs and read_study(ro).records == read_study(study).records
    memory = optuna.create_study()
    memory.add_trial(create_trial(value=1.0))
    assert rdb_trials(memory._storage, memory._study_id) is None and len(trials_of(memory)) == 1
