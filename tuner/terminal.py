"""What the tool prints for a terminal: names neutralised, commands to paste shell-quoted."""

from __future__ import annotations

import shlex
from typing import Any


def printable(text: Any) -> str:
    """``text`` with every control character shown as its escape (``\\x1b``, ``\\n``, ``\\u202e``).

    Study, model and error texts come from users and servers: printed raw, an escape sequence
    could rewrite the terminal and a newline could forge a line of output.
    """
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def command(*words: Any) -> str:
    """A command line for the user to paste: each word shell-quoted, then made printable."""
    return printable(" ".join(shlex.quote(str(w)) for w in words))


def tune_command(sub: str, study: str, *options: Any) -> str:
    """``tune SUB STUDY [OPTIONS]`` to paste. A study name that starts with '-' would be read as
    an option: then the options come first and ``--`` before the name."""
    if str(study).startswith("-"):
        return command("tune", sub, *options, "--", study)
    return command("tune", sub, study, *options)
