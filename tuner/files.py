"""Files the tool writes for users (reports, exports): safe names, atomic writes."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from tuner.errors import TunerError, WriteError


def safe_name(name: str) -> str:
    """A file-name-safe version of a study name (``gemma3:1b@host:11434`` -> ``gemma3_1b_host_11434``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"
    return s[:150]


def write_atomic(path: Path, data: bytes, what: str, error: type[TunerError] = TunerError) -> None:
    """Write ``data`` to ``path`` via a temp file and rename, so no half-written file is left."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"cannot write the {what} to {path}: {parent} is a file, not a folder; pass another --output") from None
    except OSError as e:
        raise error(f"cannot create the folder {parent} for the {what}: {e.strerror or e}; pass a writable --output") from None
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        text = f"cannot write the {what} to {path}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(f"{text}; free some disk space or pass --output on another disk") from None
        if e.errno == errno.EFBIG:
            raise WriteError(f"{text}; raise the file-size limit (`ulimit -f`) or pass --output on another disk") from None
        raise error(f"{text}; pass a writable --output") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
