"""Files the tool writes for users (reports, exports): safe names and the one rule for output paths."""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, cast

from tuner.errors import TunerError, WriteError

#: The ``--output`` that means standard output.
STDOUT = "-"


def safe_name(name: str) -> str:
    """A file-name-safe version of a study name (``gemma3:1b@host:11434`` -> ``gemma3_1b_host_11434``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"
    return s[:150]


def output_path(output: str | os.PathLike[str] | None, default: Path) -> Path | None:
    """Where ``--output`` sends a document: None for ``-`` (standard output), ``default``
    without ``output``, ``default``'s file name inside ``output`` when that is a folder (or a
    link to one), else ``output`` itself. :func:`write_output` then writes it."""
    if output is None:
        return default
    if os.fspath(output) == STDOUT:
        return None
    path = Path(output)
    return path / default.name if path.is_dir() else path


def _stdout() -> BinaryIO:
    # What click.get_binary_stream("stdout") gave (deprecated in click 8.5).
    out: Any = sys.stdout
    return cast(BinaryIO, getattr(out, "buffer", out))


def stdout_is_terminal() -> bool:
    """Whether standard output is a terminal (binary data there would garble it)."""
    return _stdout().isatty()


def write_output(path: Path | None, data: bytes, what: str, error: type[TunerError] = TunerError) -> None:
    """Write ``data`` (the ``what``, for messages) by the one rule for output paths.

    - None (``-o -``): standard output;
    - an existing device, FIFO or socket: written in place, never replaced nor chmod'ed;
    - a symlink: followed, its target written by these rules; the link stays a link;
    - a regular file or a new path: replaced atomically (temp file in its folder, then rename),
      keeping an existing file's permissions; missing folders are created.

    Folders are resolved before, by :func:`output_path`. Raises WriteError when the disk is
    full or a file-size limit is hit, ``error`` for any other failure.
    """
    if path is None:
        _write_stdout(data, what, error)
        return
    # realpath follows a whole chain of links; an unresolvable one is left for stat to report.
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        st: os.stat_result | None = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # a new path: its folders are checked below
        st = None
    except OSError as e:
        raise _write_error(e, what, path, error) from None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        _write_in_place(target, data, what, path, error)
    else:
        _replace(target, data, what, path, st, error)


def _write_error(e: OSError, what: str, where: Path | str, error: type[TunerError]) -> TunerError:
    text = f"cannot write the {what} to {where}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(f"{text}; free some disk space or pass --output on another disk")
    if e.errno == errno.EFBIG:
        return WriteError(f"{text}; raise the file-size limit (`ulimit -f`) or pass --output on another disk")
    return error(f"{text}; pass a writable --output")


def _write_stdout(data: bytes, what: str, error: type[TunerError]) -> None:
    try:
        sys.stdout.flush()  # text printed before must come first
        out = _stdout()
        out.write(data)
        out.flush()
    except OSError as e:
        raise _write_error(e, what, "standard output", error) from None


def _write_in_place(target: Path, data: bytes, what: str, path: Path, error: type[TunerError]) -> None:
    # Replacing /dev/null or a FIFO would turn it into a regular file (for everyone, as root).
    try:
        with open(target, "wb") as f:
            f.write(data)
    except OSError as e:
        raise _write_error(e, what, path, error) from None


def _replace(target: Path, data: bytes, what: str, path: Path, st: os.stat_result | None,
             error: type[TunerError]) -> None:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"cannot write the {what} to {path}: {parent} is a file, not a folder; pass another --output") from None
    except OSError as e:
        raise error(f"cannot create the folder {parent} for the {what}: {e.strerror or e}; pass a writable --output") from None
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
        if st is not None:
            mode = stat.S_IMODE(st.st_mode)
        else:
            # mkstemp makes the file 0600; give it the mode a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise _write_error(e, what, path, error) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
