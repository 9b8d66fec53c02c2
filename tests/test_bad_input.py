"""The bad-input matrix: each case gives one line `Error: ...` naming the fix, its exit code (2 for
rejected input, 1 for a runtime failure), no traceback, and leaves the storage as it was."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from conftest import invoke, static_server
from fake_ollama import FakeOllama

DB = "sqlite:///studies/tuner.db"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def garbage_url() -> Iterator[str]:
    with static_server(200, b'{"models": [ this is not json', "application/json") as url:
        yield url


def _files(tmp: Path) -> None:
    (tmp / "bad.toml").write_text("[params\nnum_ctx = ")
    (tmp / "unknown.toml").write_text("[params]\nnum_cores = [1, 2]\n")
    (tmp / "emptylist.toml").write_text("[params]\nnum_batch = []\n")
    (tmp / "empty.txt").write_text("   \n---\n")
    (tmp / "long.txt").write_text("word " * 200_000)
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp / "afile").write_text("not a folder")
    (tmp / "huge.toml").write_text(f"[params]\nnum_batch = {list(range(1, 5001))}\n")
    (tmp / "noparams.toml").write_text("# num_ctx = [2048]\n")
    (tmp / "extratable.toml").write_text("[params]\nnum_ctx = [2048]\n\n[limits]\nmax_ttft_ms = 500\n")
    (tmp / "latin1.toml").write_bytes("# caf\u00e9\n[params]\nnum_ctx = [2048]\n".encode("latin-1"))
    (tmp / "big.toml").write_bytes(b"#" * (2 << 20))
    (tmp / "adir").mkdir(exist_ok=True)


def _seed_study(url: str) -> None:
    r = invoke("--model", "gemma3:1b", "--host", url, "--trials", "1", "--repeats", "1", "--num-predict", "4",
               "--study", "taken", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output


M = ["--model", "gemma3:1b", "--host", "{fake}"]
# (id, args, expected start of the one-line error, setup needing an existing study)
CASES: list[tuple[str, list[str], str, bool, int]] = [
    ("unreachable-host", ["--model", "gemma3:1b", "--host", "{closed}"],
     "Error: cannot reach Ollama at {closed}: is it running? Start it with `ollama serve` or point --host / OLLAMA_HOST at it", False, 1),
    ("model-typo", ["--model", "gemma3:4b", "--host", "{fake}"],
     "Error: model 'gemma3:4b' is not installed on {fake}: did you mean 'gemma3:1b'? Or pull it with `ollama pull gemma3:4b`", False, 2),
    ("unknown-model", ["--model", "mistral:7b", "--host", "{fake}"],
     "Error: model 'mistral:7b' is not installed on {fake}: pull it with `ollama pull mistral:7b`", False, 2),
    ("malformed-host", ["--model", "gemma3:1b", "--host", "http://:abc"],
     "Error: invalid Ollama host 'http://:abc' (--host / OLLAMA_HOST): write it as http://HOST:PORT, e.g. http://127.0.0.1:11434", False, 2),
    ("malformed-json-server", ["--model", "gemma3:1b", "--host", "{garbage}"],
     "Error: Ollama at {garbage} sent a malformed response to /api/version", False, 1),
    ("trials-zero", [*M, "--trials", "0"], "Error: --trials must be at least 1 (got 0)", False, 2),
    ("repeats-zero", [*M, "--repeats", "0"], "Error: --repeats must be at least 1 (got 0)", False, 2),
    ("num-predict-negative", [*M, "--num-predict", "-1"], "Error: --num-predict must be at least 1 (got -1)", False, 2),
    ("unknown-param", [*M, "--param", "num_cores=2"],
     "Error: unknown parameter 'num_cores': known parameters are variant, num_ctx, num_batch, num_gpu, "
     "num_thread, flash_attention, kv_cache_type, num_parallel", False, 2),
    ("empty-value-list", [*M, "--param", "num_ctx="],
     "Error: --param num_ctx has no values: give at least one, e.g. num_ctx=2048,4096", False, 2),
    ("param-without-equals", [*M, "--param", "num_ctx"],
     "Error: invalid --param 'num_ctx': write it as name=value or name=v1,v2 (e.g. num_ctx=2048,4096)", False, 2),
    ("param-not-a-number", [*M, "--param", "num_ctx=big"], "Error: invalid value 'big' for num_ctx: expected an integer", False, 2),
    ("num-ctx-zero", [*M, "--param", "num_ctx=0"], "Error: num_ctx=0 is invalid: it must be a positive number of tokens", False, 2),
    ("num-ctx-above-model", [*M, "--param", "num_ctx=65536"],
     "Error: num_ctx=65536 is above the model's trained context of 32768: use at most 32768", False, 2),
    ("num-gpu-above-layers", [*M, "--param", "num_gpu=40"],
     "Error: num_gpu=40 is above the model's 27 offloadable layers (26 blocks + output): use at most 27", False, 2),
    ("context-above-model", [*M, "--context", "100000"],
     "Error: --context 100000 is above the model's trained context of 32768: use at most 32768", False, 2),
    ("space-not-toml", [*M, "--space", "bad.toml"], "Error: space file bad.toml is not valid TOML: ", False, 2),
    ("space-unknown-param", [*M, "--space", "unknown.toml"], "Error: unknown parameter 'num_cores': known parameters are ", False, 2),
    ("space-empty-list", [*M, "--space", "emptylist.toml"], "Error: space file emptylist.toml: 'num_batch' has an empty value list", False, 2),
    ("space-missing", [*M, "--space", "missing.toml"], "Error: cannot read space file missing.toml: No such file or directory", False, 2),
    ("prompts-empty", [*M, "--prompts", "empty.txt"],
     "Error: prompts file empty.txt holds no prompt: write prompts separated by '---' lines", False, 2),
    ("prompts-missing", [*M, "--prompts", "nope.txt"], "Error: cannot read prompts file nope.txt: No such file or directory", False, 2),
    ("prompts-unreadable", [*M, "--prompts", "binary.txt"], "Error: prompts file binary.txt is not UTF-8 text: byte 0xff at offset 0 cannot be read; save it as UTF-8 and pass it to --prompts again", False, 2),
    ("prompts-endless", [*M, "--prompts", "/dev/zero"],
     "Error: prompts file /dev/zero is larger than the 16 MiB limit: pass a smaller file to --prompts", False, 2),
    ("space-not-utf8", [*M, "--space", "latin1.toml"],
     "Error: space file latin1.toml is not UTF-8 text: byte 0xe9 at offset 5 cannot be read; save it as UTF-8 "
     "and pass it to --space again", False, 2),
    ("space-too-large", [*M, "--space", "big.toml"],
     "Error: space file big.toml is larger than the 1 MiB limit: pass a smaller file to --space", False, 2),
    ("variant-no-values", [*M, "--param", "variant="],
     "Error: --param variant has no values: give at least one, e.g. variant=gemma3:1b-it-q4_K_M,gemma3:1b-it-q8_0",
     False, 2),
    ("prompt-longer-than-every-ctx", [*M, "--prompts", "long.txt"],
     "Error: the longest prompt plus --num-predict needs about ", False, 2),
    ("contradictory-limits", [*M, "--max-ttft-ms", "500", "--max-latency-ms", "100"],
     "Error: --max-latency-ms 100 is below --max-ttft-ms 500: a request's latency includes its time to first "
     "token; raise --max-latency-ms", False, 2),
    ("negative-limit", [*M, "--max-ttft-ms", "-5"],
     "Error: --max-ttft-ms must be a positive number (got -5): give a limit, or leave it out for none", False, 2),
    ("infinite-limit", [*M, "--max-ttft-ms", "inf"],
     "Error: --max-ttft-ms must be a positive number (got inf): give a limit, or leave it out for none", False, 2),
    ("nan-limit", [*M, "--max-latency-ms", "nan"],
     "Error: --max-latency-ms must be a positive number (got nan): give a limit, or leave it out for none", False, 2),
    ("seed-too-large", [*M, "--seed", str(2**32)], "Error: --seed must be between 0 and 4294967295 (got 4294967296)", False, 2),
    ("seed-negative", [*M, "--seed", "-1"], "Error: --seed must be between 0 and 4294967295 (got -1)", False, 2),
    ("timeout-zero", [*M, "--timeout", "0"],
     "Error: --timeout must be a positive number of seconds (got 0): e.g. --timeout 600", False, 2),
    ("timeout-negative", [*M, "--timeout", "-1"],
     "Error: --timeout must be a positive number of seconds (got -1): e.g. --timeout 600", False, 2),
    ("timeout-nan", [*M, "--timeout", "nan"],
     "Error: --timeout must be a positive number of seconds (got nan): e.g. --timeout 600", False, 2),
    ("validate-one", [*M, "--validate", "1"],
     "Error: --validate must be 0 (off) or at least 2 (got 1): it re-measures the top K configs to compare them; "
     "use --validate 2 or more, or --validate 0", False, 2),
    ("validate-negative", [*M, "--validate", "-1"], "Error: --validate must be 0 (off) or at least 2 (got -1)", False, 2),
    ("validate-rounds-one", [*M, "--validate-rounds", "1"],
     "Error: --validate-rounds must be at least 2 (got 1): one round gives no confidence interval; "
     "use --validate-rounds 2 or more (--validate 0 turns it off)", False, 2),
    ("validate-rounds-zero", [*M, "--validate", "0", "--validate-rounds", "0"],
     "Error: --validate-rounds must be at least 2 (got 0)", False, 2),
    ("model-empty", ["--model", "", "--host", "{fake}"],
     "Error: --model is empty: pass a model tag or GGUF path, e.g. --model gemma3:1b", False, 2),
    ("param-range-too-large", [*M, "--param", "num_thread=1..100000000"],
     "Error: num_thread has 100,000,000 values, more than the 4,096 one parameter may take: "
     "narrow the range or list the values to try", False, 2),
    ("space-list-too-large", [*M, "--space", "huge.toml"],
     "Error: num_batch has 5,000 values, more than the 4,096 one parameter may take: ", False, 2),
    ("space-without-params", [*M, "--space", "noparams.toml"],
     "Error: space file noparams.toml has no [params] table: put the parameters under [params], "
     "e.g. [params] then num_ctx = [2048, 4096]", False, 2),
    ("space-unknown-table", [*M, "--space", "extratable.toml"],
     "Error: space file extratable.toml: unknown table or key 'limits': a space file holds only a [params] "
     "table (see studies/quick.toml)", False, 2),
    ("unknown-subcommand", ["shwo"], "Error: No such command 'shwo'. Did you mean 'show'?", False, 2),
    ("journal-storage-unwritable", [*M, "--storage", "journal:///proc/x.log"],
     "Error: cannot open storage 'journal:///proc/x.log': ", False, 1),
    ("wrong-storage-url", [*M, "--storage", "nonsense"],
     "Error: invalid storage URL 'nonsense': use sqlite:///path.db, postgresql://user@host/db or journal:///path.log", False, 2),
    ("storage-password-hidden", [*M, "--storage", "postgresql://bob:s3cret@127.0.0.1:1/db"],
     "Error: cannot open storage 'postgresql://bob:***@127.0.0.1:1/db': ", False, 1),
    ("storage-password-with-at-hidden", [*M, "--storage", "postgresql://bob:p@s3cret@127.0.0.1:1/db"],
     "Error: cannot open storage 'postgresql://bob:***@127.0.0.1:1/db': ", False, 1),
    ("storage-password-param-hidden", [*M, "--storage", "postgresql://bob@127.0.0.1:1/db?password=s3cret"],
     "Error: cannot open storage 'postgresql://bob@127.0.0.1:1/db?password=***': ", False, 1),
    ("storage-path-not-writable", [*M, "--storage", "sqlite:///afile/t.db"],
     "Error: cannot create the storage folder afile: ", False, 2),
    ("study-reused-other-model", ["--model", "llama3.2:3b", "--host", "{fake}", "--study", "taken"],
     "Error: study 'taken' was created with a different model (gemma3:1b): pass --study NEW_NAME", True, 2),
    ("study-reused-other-space", [*M, "--study", "taken", "--param", "num_batch=64"],
     "Error: study 'taken' was created with a different search space: pass --study NEW_NAME", True, 2),
    ("export-no-feasible", ["export", "taken", "--trial", "999"], "Error: study 'taken' has no trial 999", True, 2),
    ("export-unknown-study", ["export", "nope"], "Error: no study named 'nope' in this storage: known studies are taken", True, 2),
    ("gpu-not-an-index", [*M, "--gpu", "x"], "Error: invalid --gpu 'x': give GPU indices like 0 or 0,1", False, 2),
    ("tokens-per-joule-without-gpu", [*M, "--objective", "tokens_per_joule"],
     "Error: objective 'tokens_per_joule' needs GPU energy telemetry, and there is none (", False, 2),
    ("show-no-storage", ["show", "--storage", "sqlite:///none/t.db"],
     "Error: no study storage at none/t.db: run `tune --model ...` first or pass --storage", False, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: tuple[str, list[str], str, bool, int], fake: FakeOllama, garbage_url: str,
                   tmp_path: Path) -> None:
    name, args, expected, needs_study, code = case
    _files(tmp_path)
    subs = {"{fake}": fake.url, "{closed}": f"http://127.0.0.1:{_free_port()}", "{garbage}": garbage_url}
    if needs_study:
        _seed_study(fake.url)
    before = _snapshot()
    n_generate = len(fake.prompt_requests())

    def fill(text: str) -> str:
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    argv = [fill(a) for a in args]
    if argv[0] not in ("export", "show", "studies", "report"):
        argv += ["--trials", "1"] if "--trials" not in argv else []
    r = invoke(*argv)
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert lines[0].startswith(fill(expected)), lines[0]
    assert "Traceback" not in r.output and "s3cret" not in r.output
    assert len(fake.prompt_requests()) == n_generate, "nothing may be measured"
    assert _snapshot() == before, "the storage must be left as it was"


def _snapshot() -> list[tuple[str, int, str]] | None:
    if not Path("studies/tuner.db").exists():
        return None
    storage = optuna.storages.RDBStorage(DB)
    return [
        (s.study_name, t.number, t.state.name)
        for s in optuna.get_all_study_summaries(storage)
        for t in optuna.load_study(study_name=s.study_name, storage=storage).trials
    ]


@pytest.mark.parametrize("err,hint", [
    (OSError(errno.ENOSPC, "No space left on device"), "free some disk space or pass --output on another disk"),
    (OSError(errno.EFBIG, "File too large"),
     "raise the file-size limit (`ulimit -f`) or pass --output on another disk"),
], ids=["disk-full", "file-size-limit"])
def test_no_room_while_writing_the_report(err: OSError, hint: str, fake: FakeOllama,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.files as files

    _seed_study(fake.url)

    def fail(fd: int) -> None:
        raise err

    monkeypatch.setattr(files.os, "fsync", fail)
    r = invoke("report", "taken")
    assert r.exit_code == 1
    assert r.output == f"Error: cannot write the report to reports/taken.html: {err.strerror}; {hint}\n"
    assert not list(Path("reports").glob("*.html")) if Path("reports").exists() else True


def test_export_refuses_a_study_without_feasible_trial(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "1", "--repeats", "1", "--num-predict", "4",
               "--study", "strict", "--max-ttft-ms", "0.0001", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    assert "No feasible configuration" in r.output
    r = invoke("export", "strict")
    assert r.exit_code == 2
    assert r.output == ("Error: study 'strict' has no feasible trial: relax the limits and run more trials, "
                        "or pass --allow-infeasible to use the least-violating one\n")
    r = invoke("export", "strict", "--allow-infeasible", "--format", "json")
    assert r.exit_code == 0 and '"model": "gemma3:1b"' in r.output


def test_server_returning_truncated_streams_stops_with_the_study_intact(fake: FakeOllama) -> None:
    r0 = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "1", "--repeats", "1",
                "--num-predict", "4", "--study", "s", "--validate", "0", "--no-roofline")
    assert r0.exit_code == 0
    for _ in range(20):
        fake.truncate_next_stream(after_chunks=1)
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--trials", "5", "--repeats", "1",
               "--num-predict", "4", "--study", "s", "--validate", "0", "--no-roofline")
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: stopped after 3 consecutive failed trials (last: Ollama at ")
    assert last.endswith("the study is intact: fix the cause and re-run to resume")
    states = [t[2] for t in _snapshot() or []]
    assert states[0] == "COMPLETE" and states.count("FAIL") == 3


def _open_at_barrier(barrier: Any, url: str, out: Any) -> None:
    from tuner.storage import open_storage

    barrier.wait()
    try:
        open_storage(url)
        out.put("ok")
    except Exception as e:  # reported to the parent, which shows it
        out.put(f"{e.__class__.__name__}: {e}")


def test_tuners_starting_at_once_on_a_new_sqlite_file(tmp_path: Path) -> None:
    # Real processes racing to create the schema: SQLite's loser says "UNIQUE constraint failed:
    # alembic_version.version_num", which the retry must know as well as PostgreSQL's wording.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(6):
        url = f"sqlite:///{tmp_path}/race{attempt}.db"
        barrier, out = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_at_barrier, args=(barrier, url, out)) for _ in range(8)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        assert results == ["ok"] * 8, results


def test_sqlite_schema_race_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import sqlalchemy.exc

    from tuner.storage import open_storage

    real = optuna.storages.RDBStorage
    calls = []

    def racing(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError(
                "INSERT INTO alembic_version", {},
                sqlite3.IntegrityError("UNIQUE constraint failed: alembic_version.version_num"))
        return real(*a, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    assert open_storage(f"sqlite:///{tmp_path}/t.db") is not None
    assert len(calls) == 2


def test_file_size_limit_while_writing_the_sqlite_storage(fake: FakeOllama) -> None:
    import os
    import resource
    import subprocess
    import sys

    _seed_study(fake.url)
    size = Path("studies/tuner.db").stat().st_size

    def limit() -> None:
        # `ulimit -f`: the database cannot grow, so the next trial's writes fail.
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "TUNER_DEBUG")}
    r = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "--model", "gemma3:1b", "--host", fake.url, "--trials", "3",
         "--repeats", "1", "--num-predict", "4", "--study", "taken", "--validate", "0", "--no-roofline"],
        capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        "Error: cannot write the study storage (disk I/O error): free disk space or raise the file-size "
        "limit (`ulimit -f`), then run the same command again to resume"
    ]


def test_disk_full_is_named_for_every_storage() -> None:
    import sqlite3

    import sqlalchemy.exc

    from tuner.storage import write_failure

    full = sqlalchemy.exc.OperationalError("INSERT INTO trials", {}, sqlite3.OperationalError("database or disk is full"))
    assert str(write_failure(full)) == (
        "cannot write the study storage (database or disk is full): free disk space or raise the "
        "file-size limit (`ulimit -f`), then run the same command again to resume")
    # The journal storage writes the file itself.
    journal = OSError(errno.ENOSPC, "No space left on device")
    assert str(write_failure(journal)).startswith("cannot write the study storage (No space left on device): ")
    assert write_failure(sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table"))) is None
    assert write_failure(ValueError("database or disk is full")) is None


