"""The live status line of a running trial, for ``tune run`` and ``tune demo``.

Only tuner/cli.py imports this module (it uses click); the core feeds it through
``run_study``'s ``on_trial_start`` and ``on_sample`` hooks.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from types import TracebackType
from typing import Any, Callable

import click

from tuner.terminal import printable


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class StatusLine:
    """One line redrawn in place while a trial runs: the trial, request k of n, decode tok/s
    so far and the time since it started, e.g.
    ``trial #3 [##########          ] request 3/6  decode 88.1 tok/s  0m12s``.

    It is drawn only when its stream is a terminal: in a CI log or a pipe a carriage return
    does not redraw, so there the study prints only its line per finished trial. Every other
    line must go through :meth:`wrap`'s echo, which clears the status line first so the two
    never share a line; the status line comes back with the next request (or tick).
    """

    def __init__(self, err: bool = False, enabled: bool = True, tick_s: float = 1.0) -> None:
        self.err = err
        self.live = enabled and _isatty(sys.stderr if err else sys.stdout)
        self.tick_s = tick_s
        self._lock = threading.RLock()
        self._bar: Any = None
        self._number = -1
        self._started = 0.0
        self._decode_tps: list[float] = []
        #: Whether the status line is on the screen now (or should be redrawn by the ticker).
        self._shown = False
        #: Characters the drawn line covers, to blank it out.
        self._drawn = 0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self, number: int, requests: int) -> None:
        """Trial ``number`` starts measuring (again, for a re-measurement) ``requests`` requests."""
        if not self.live:
            return
        with self._lock:
            # click's bar is the model and formatter; the drawing is ours (hidden=True) because
            # other lines are printed between its updates.
            self._bar = click.progressbar(length=max(1, requests), label=f"trial #{number}", hidden=True,
                                          bar_template="%(label)s [%(bar)s] %(info)s", width=20,
                                          show_eta=False, show_percent=False, item_show_func=self._info)
            self._number, self._started, self._decode_tps = number, time.monotonic(), []
            self._shown = True
            self._draw()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="tune-status-line", daemon=True)
            self._ticker.start()

    def sample(self, number: int, step: int, sample: Any) -> None:
        """Request ``step`` (0-based) of trial ``number`` was measured."""
        if not self.live:
            return
        with self._lock:
            if self._bar is None or number != self._number:
                return
            self._decode_tps.append(float(sample.decode_tps))
            self._bar.update(step + 1 - self._bar.pos)
            self._shown = True
            self._draw()

    def wrap(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """``echo`` that first clears the status line."""
        if not self.live:
            return echo

        def cleared_echo(msg: str) -> None:
            with self._lock:
                self._clear()
                self._shown = False
                echo(msg)

        return cleared_echo

    def close(self) -> None:
        """Stop redrawing and clear the line (before the summary, an error or Ctrl-C's message)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2 * self.tick_s)
            self._ticker = None
        with self._lock:
            self._clear()
            self._shown = False
            self._bar = None

    def _info(self, _item: Any) -> str:
        bar = self._bar
        parts = [f"request {min(bar.pos + 1, bar.length)}/{bar.length}"]
        if self._decode_tps:
            parts.append(f"decode {sum(self._decode_tps) / len(self._decode_tps):.1f} tok/s")
        elapsed = int(time.monotonic() - self._started)
        parts.append(f"{elapsed // 60}m{elapsed % 60:02d}s")
        return "  ".join(parts)

    def _draw(self) -> None:
        # A line wider than the terminal wraps, and a carriage return then redraws only its tail.
        columns = shutil.get_terminal_size().columns
        line = printable(self._bar.format_progress_line())[: max(1, columns - 1)]
        click.echo("\r" + line + " " * (self._drawn - len(line)), err=self.err, nl=False)
        self._drawn = max(self._drawn, len(line))

    def _clear(self) -> None:
        if self._drawn:
            click.echo("\r" + " " * self._drawn + "\r", err=self.err, nl=False)
            self._drawn = 0

    def _tick(self) -> None:
        # Elapsed time moves even while a long request or a model load runs.
        while not self._stop.wait(self.tick_s):
            with self._lock:
                if self._shown and self._bar is not None:
                    self._draw()
