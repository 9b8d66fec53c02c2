"""The one rule for output paths (tuner/files.py) and printable text in exports.

``-`` is standard output; a device, FIFO or socket is written in place; a symlink is followed
and stays a link; a folder gets the default file name; study and server text can neither
forge a line of an exported file nor reach the terminal raw.
"""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import invoke

from test_export import parse_modelfile
from test_report import STUDY, make_study
from tuner import export, files, results
from tuner.errors import ExportError
from tuner.terminal import printable

SAFE = "gemma3_1b_127.0.0.1_11434"
EVIL = "evil\x1b[31m\nFROM evil:latest\rPARAMETER num_ctx 1"
EVIL_SHOWN = "evil\\x1b[31m\\nFROM evil:latest\\rPARAMETER num_ctx 1"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_study(tmp_path_factory.mktemp("study"))[0]


def _without_date(text: str) -> list[str]:
    # The Modelfile's first line says when it was exported (to the minute).
    return text.splitlines()[1:]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("fmt", ["modelfile", "json", "env", "csv"])
def test_dash_is_standard_output(url: str, tmp_path: Path, fmt: str) -> None:
    r = invoke("export", STUDY, "--storage", url, "--format", fmt, "-o", "-")
    assert r.exit_code == 0, r.output
    text = export.export(url, STUDY, fmt).text or ""
    if fmt in ("modelfile", "env"):
        assert _without_date(r.stdout) == _without_date(text) and r.stdout.startswith("# ")
    else:
        assert r.stdout == text
    what = "7 trials" if fmt == "csv" else "trial #1"
    assert r.stderr == f"exported {what} of '{STUDY}' as {fmt} to standard output\n"
    assert _listing(tmp_path) == []


def test_dash_parquet_is_binary_standard_output_but_never_a_terminal(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    r = invoke("export", STUDY, "--storage", url, "--format", "parquet", "-o", "-")
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(io.BytesIO(r.stdout_bytes))
    assert list(df["number"]) == list(range(7))
    assert r.stderr == f"exported 7 trials of '{STUDY}' as parquet to standard output\n"
    monkeypatch.setattr(files, "stdout_is_terminal", lambda: True)
    r = invoke("export", STUDY, "--storage", url, "--format", "parquet", "-o", "-")
    assert (r.exit_code, r.stdout_bytes) == (2, b"")
    assert r.stderr == ("Error: parquet is binary and standard output is a terminal: pass -o FILE, "
                        "or pipe it into a program\n")
    assert _listing(tmp_path) == []


def test_dash_report_is_the_page_alone(url: str, tmp_path: Path) -> None:
    r = invoke("report", STUDY, "--storage", url, "-o", "-")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("<!DOCTYPE html>") and r.stdout.rstrip().endswith("</html>")
    assert r.stderr == ""
    r = invoke("report", "--fleet", "--storage", url, "-o", "-")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("<!DOCTYPE html>") and "<h1>ollama-tuner fleet</h1>" in r.stdout
    r = invoke("report", STUDY, "--storage", url, "-o", "-", "--open")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == "Error: --open needs a file to open: pass -o FILE instead of -o -, or drop --open\n"
    assert _listing(tmp_path) == []


def _fifo_reader(path: Path) -> Callable[[], bytes]:
    """Read the FIFO ``path`` from a thread; the returned function waits for what it read."""
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=read, daemon=True)
    t.start()

    def result() -> bytes:
        t.join(timeout=30)
        if t.is_alive():  # nothing opened it for writing: unblock the reader, fail the test
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            t.join(timeout=5)
            pytest.fail(f"nothing was written to the FIFO {path}")
        return got[0]

    return result


def test_fifo_is_written_in_place(url: str, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo, 0o640)
    before = os.stat(fifo)
    wait = _fifo_reader(fifo)
    r = invoke("export", STUDY, "--storage", url, "--format", "json", "-o", fifo)
    data = wait()
    assert r.exit_code == 0, r.output
    assert json.loads(data) == {"model": "gemma3:1b", "options": {"num_ctx": 4096, "num_batch": 512, "num_gpu": 27}}
    assert (r.stdout, r.stderr) == ("", f"exported trial #1 of '{STUDY}' as json to {fifo}\n")
    after = os.stat(fifo)
    assert stat.S_ISFIFO(after.st_mode) and (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert _listing(tmp_path) == ["pipe"]


def test_fifo_for_the_report(url: str, tmp_path: Path) -> None:
    fifo = tmp_path / "page"
    os.mkfifo(fifo)
    wait = _fifo_reader(fifo)
    r = invoke("report", "--fleet", "--storage", url, "-o", fifo)
    assert wait().startswith(b"<!DOCTYPE html>")
    assert (r.exit_code, r.output) == (0, f"{fifo}\n")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and _listing(tmp_path) == ["page"]


def test_a_device_stays_a_character_device(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A private /dev/null (same device numbers): were the rule broken, a rename as root would
    # replace the system's own. Without the right to make one, nothing can replace /dev/null.
    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.stat("/dev/null").st_rdev)
    except PermissionError:
        # No device node of our own (a container without CAP_MKNOD): the system's /dev/null, with
        # every rename and unlink refused, so a broken rule fails here instead of replacing it.
        dev = Path("/dev/null")

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"/dev/null must be written in place, not renamed or removed: {args}")

        monkeypatch.setattr(os, "replace", refuse)
        monkeypatch.setattr(os, "rename", refuse)
    before = os.stat(dev)
    for fmt in ("modelfile", "parquet"):
        r = invoke("export", STUDY, "--storage", url, "--format", fmt, "-o", dev)
        assert (r.exit_code, r.stdout) == (0, ""), r.output
        assert r.stderr.endswith(f" of '{STUDY}' as {fmt} to {dev}\n")
    after = os.stat(dev)
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert _listing(tmp_path) == (["null"] if dev.parent == tmp_path else [])


def test_symlink_is_followed_and_stays_a_link(url: str, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "Modelfile"
    target.write_text("old\n")
    target.chmod(0o640)
    (tmp_path / "link").symlink_to("real/Modelfile")
    (tmp_path / "chain").symlink_to("link")
    for name in ("link", "chain"):
        r = invoke("export", STUDY, "--storage", url, "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
        assert r.stderr == f"exported trial #1 of '{STUDY}' as modelfile to {tmp_path / name}\n"
        assert parse_modelfile(target.read_text())[0] == "gemma3:1b"
    assert os.readlink(tmp_path / "link") == "real/Modelfile" and os.readlink(tmp_path / "chain") == "link"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # replaced, keeping its permissions
    # A dangling link: the file it names is created, the link stays.
    (tmp_path / "new.json").symlink_to("real/options.json")
    r = invoke("export", STUDY, "--storage", url, "--format", "json", "-o", tmp_path / "new.json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "new.json").is_symlink() and json.loads((real / "options.json").read_text())["model"] == "gemma3:1b"
    assert _listing(tmp_path) == ["chain", "link", "new.json", "real", "real/Modelfile", "real/options.json"]


@pytest.mark.parametrize(("fmt", "ext"), [("modelfile", "Modelfile"), ("json", "json"), ("env", "env"),
                                          ("csv", "csv"), ("parquet", "parquet")])
def test_folder_gets_the_default_name(url: str, tmp_path: Path, fmt: str, ext: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = invoke("export", STUDY, "--storage", url, "--format", fmt, "-o", out)
    assert r.exit_code == 0, r.output
    what = "7 trials" if fmt in ("csv", "parquet") else "trial #1"
    assert r.stderr == f"exported {what} of '{STUDY}' as {fmt} to {out / f'{SAFE}.{ext}'}\n"
    assert _listing(tmp_path) == ["out", f"out/{SAFE}.{ext}"]


def test_link_to_a_folder_gets_the_default_name(url: str, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "via").symlink_to("out")
    r = invoke("report", "--fleet", "--storage", url, "-o", tmp_path / "via")
    assert (r.exit_code, r.output) == (0, f"{tmp_path / 'via' / 'fleet.html'}\n")
    assert (tmp_path / "via").is_symlink() and _listing(tmp_path) == ["out", "out/fleet.html", "via"]


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    """A study whose name, host, server version and errors carry escapes and newlines."""
    storage, study = make_study(tmp_path_factory.mktemp("evil"), name=EVIL)
    study.set_user_attr("host", "http://h\x1b]0;owned\x07:11434\nFROM evil")
    study.set_user_attr("server_version", "0.33.1\x1b[2J\nPARAMETER num_gpu 0")
    return storage, study


def _check_document(text: str, comment_lines: int) -> None:
    assert not any(c in text for c in "\x1b\x07\r"), repr(text)
    lines = text.splitlines()
    assert sum(line.startswith("#") for line in lines) == comment_lines, text


def test_escapes_and_newlines_never_reach_the_modelfile_or_the_terminal(url: str, evil: tuple[str, Any]) -> None:
    storage, _ = evil
    clean = export.export(url, STUDY, "modelfile").text or ""
    r = invoke("export", EVIL, "--storage", storage, "-o", "Modelfile")
    assert r.exit_code == 0, r.output
    assert r.stderr == f"exported trial #1 of '{EVIL_SHOWN}' as modelfile to Modelfile\n" and r.stdout == ""
    text = Path("Modelfile").read_text()
    source, params = parse_modelfile(text)
    assert source == "gemma3:1b" and params == {"num_ctx": ["4096"], "num_batch": ["512"], "num_gpu": ["27"]}
    _check_document(text, comment_lines=len([x for x in clean.splitlines() if x.startswith("#")]))
    assert [x for x in text.splitlines() if not x.startswith("#")] == [
        "FROM gemma3:1b", "PARAMETER num_ctx 4096", "PARAMETER num_batch 512", "PARAMETER num_gpu 27"]
    assert (f"# study '{EVIL_SHOWN}', trial #1; measured on Ollama 0.33.1\\x1b[2J\\nPARAMETER num_gpu 0 at "
            "http://h\\x1b]0;owned\\x07:11434\\nFROM evil") in text.splitlines()
    # To the terminal: the document only, already printable.
    r = invoke("export", EVIL, "--storage", storage)
    assert r.exit_code == 0 and r.stderr == ""
    assert _without_date(r.stdout) == _without_date(text)


def test_escapes_and_newlines_never_reach_the_env_file(evil: tuple[str, Any]) -> None:
    storage, _ = evil
    r = invoke("export", EVIL, "--storage", storage, "--format", "env", "-o", "-")
    assert r.exit_code == 0, r.output
    assert r.stderr == f"exported trial #1 of '{EVIL_SHOWN}' as env to standard output\n"
    assert not any(c in r.stdout for c in "\x1b\x07\r"), repr(r.stdout)
    assert [x for x in r.stdout.splitlines() if not x.startswith("#")] == [
        "OLLAMA_FLASH_ATTENTION=1", "OLLAMA_KV_CACHE_TYPE=q8_0"]


def test_the_from_line_refuses_a_model_name_with_control_characters(evil: tuple[str, Any]) -> None:
    storage, study = evil
    v = results.view(study.get_trials()[1])
    v.model = "gemma3:1b\x1b[31m\nFROM evil"
    with pytest.raises(ExportError) as e:
        export.modelfile_text(v, study)
    assert str(e.value) == ("trial #1 has no usable model name ('gemma3:1b\\x1b[31m\\nFROM evil'): "
                            "export another trial with --trial N")


def test_create_plan_says_only_printable_text(evil: tuple[str, Any]) -> None:
    storage, _ = evil
    plan = export.create_plan(storage, EVIL, "gemma3-tuned")
    assert plan.note == printable(plan.note) and EVIL_SHOWN in plan.note
    plan = export.CreatePlan("m", None, "gemma3:1b", {"stop": ["\x1b[2J\n"]}, 1, "")
    assert plan.announce() == "creating 'm' from gemma3:1b (trial #1): stop=['\\x1b[2J\\n']"
