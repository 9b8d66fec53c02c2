"""The progress line: one line per finished trial, with the best feasible so far and an ETA."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tuner import objectives, record, results
from tuner.leaderboard import Leaderboard, TrialCache
from tuner.options import TuneOptions
from tuner.record import TrialRecord
from tuner.terminal import printable

if TYPE_CHECKING:
    from tuner.study import Echo


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _contended_text(v: TrialRecord) -> str:
    """' | CONTENDED: other processes used 81% of a core, GPU 30%' for a trial's line."""
    return (f" | CONTENDED: other processes used {v.interference_pct or 0:.0f}% of a core"
            + (f", GPU {v.gpu_interference_pct:.0f}%" if v.gpu_interference_pct else ""))


class _Progress:
    """One line per finished trial, with the best feasible so far and an ETA."""

    def __init__(self, o: TuneOptions, echo: Echo, total: int) -> None:
        self.o, self.echo, self.total = o, echo, total
        self.done = 0
        self.started = time.monotonic()
        self.consecutive_failures = 0
        self.last_error = ""
        self.stopped_for_failures = False
        # Every worker's complete trials, each read once: the best is kept as they arrive.
        self.board = Leaderboard(objectives.get(o.objectives[0]).direction)
        self._complete = TrialCache(("COMPLETE",), self.board)

    def __call__(self, study: Any, trial: Any) -> None:
        self.done += 1
        v = results.view(trial)
        self._complete.put(trial, v)
        self._complete.update(study)
        obj = self.o.objectives[0]
        if trial.state.name == "PRUNED":
            self.consecutive_failures = 0
            status = f"pruned (clearly worse; saved {v.pruned_saved_s or 0.0:.1f} s)"
            if v.contended:
                status += _contended_text(v)
            metric = f"decode {v.stat(record.DECODE_TPS) or 0:.1f} tok/s so far  "
        elif trial.state.name == "FAIL":
            self.consecutive_failures += 1
            self.last_error = v.error or "unknown error"
            status = f"FAILED: {self.last_error}"
            metric = ""
        else:
            self.consecutive_failures = 0
            metric = (
                f"decode {v.stat(record.DECODE_TPS) or 0:.1f} tok/s  "
                f"prefill {v.stat(record.PREFILL_TPS) or 0:.0f} tok/s  "
                f"p95 TTFT {v.stat(record.TTFT_MS, 'p95') or 0:.0f} ms  "
                if not v.error else ""
            )
            status = "feasible" if v.feasible else "infeasible: " + "; ".join(v.violations)
            if v.contended:
                status += _contended_text(v) + " (not used for the winner)"
            elif v.remeasured:
                status += f" | re-measured on a quiet machine ({v.contention_lost_s or 0:.0f} s lost to contention)"
            if v.reused_from is not None:
                status += f" | proposed again: #{v.reused_from}'s measurement reused (clearly behind the best)"
        best = self.board.best(results.StoredStudy(study.study_name, study.user_attrs, [], []).validation)
        best_txt = f"best {best.values[0]:.2f} ({obj})" if best is not None and best.values else "no feasible yet"
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        stage = f"[{v.stage}] " if v.stage else ""
        self.echo(printable(
            f"[{self.done}/{self.total}] #{trial.number} {stage}{v.config_text()} | {metric}{status} | "
            f"{best_txt} | ETA {_fmt_eta(eta)}"
        ))
        if self.consecutive_failures >= self.o.max_consecutive_failures:
            self.stopped_for_failures = True
            study.stop()
