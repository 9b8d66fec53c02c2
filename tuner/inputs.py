"""Files users hand the tool (prompts, space files): read within a documented bound, as UTF-8,
with every failure one message naming the file."""

from __future__ import annotations

from pathlib import Path

from tuner.errors import TunerError

MIB = 1 << 20
#: The largest prompts file read (far beyond any model's context: 16 MiB is ~4M tokens).
MAX_PROMPTS_BYTES = 16 * MIB
#: The largest space file read (a space is a few lines of TOML).
MAX_SPACE_BYTES = 1 * MIB


def read_text(path: str | Path, what: str, limit: int, error: type[TunerError], option: str) -> str:
    """The text of ``path``, at most ``limit`` bytes of UTF-8; else ``error`` naming the file.

    Reads ``limit + 1`` bytes at most, so ``/dev/zero`` or a huge file costs no more memory
    than the limit. ``what`` names the file in messages ("prompts file"), ``option`` the
    option that gave it.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(limit + 1)
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder: pass a file to {option}") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{what} {p} is larger than the {limit // MIB} MiB limit: pass a smaller file to {option}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{what} {p} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} cannot be read; "
            f"save it as UTF-8 and pass it to {option} again"
        ) from None
