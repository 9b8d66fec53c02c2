"""Reads that scale while a study runs: each finished trial read once, the best kept up to date.

A running study used to re-read every trial's record and re-rank them all before each trial:
O(n) per trial, O(n^2) over a study. :class:`TrialCache` keeps the records it has read, by
trial number and state, and reads only the trials new or changed since the last call (other
workers' trials arrive too); :class:`Leaderboard` keeps the best feasible trial as records
arrive, with the answer :meth:`tuner.results.StoredStudy.best` gives over the same records.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from tuner import record
from tuner.record import TrialRecord

if TYPE_CHECKING:
    from tuner.results import Validation


def _eligible(r: TrialRecord) -> bool:
    """Ranked at all: feasible with a value, and no copy of an earlier trial's measurement."""
    return r.feasible and bool(r.values) and r.reused_from is None


class Leaderboard:
    """The best feasible trial of the records added so far (first objective); trials measured
    while other processes competed count only while no quiet trial is feasible. Ties go to
    the lower trial number, as in the stable sort of :meth:`tuner.results.StoredStudy.ranked`."""

    def __init__(self, direction: str = "maximize") -> None:
        self.sign = 1.0 if direction == "maximize" else -1.0
        self._records: dict[int, TrialRecord] = {}
        self._quiet: TrialRecord | None = None
        self._any: TrialRecord | None = None
        self._baseline: TrialRecord | None = None

    def _key(self, r: TrialRecord) -> tuple[float, int]:
        return self.sign * (r.values[0] if r.values else -math.inf), -r.number

    def _better(self, r: TrialRecord, than: TrialRecord | None) -> bool:
        return than is None or self._key(r) > self._key(than)

    def add(self, r: TrialRecord) -> None:
        """Take in a trial's record (a later record of the same trial replaces the earlier)."""
        if r.number in self._records:
            self._records[r.number] = r
            self._rebuild()
            return
        self._records[r.number] = r
        self._take(r)

    def _take(self, r: TrialRecord) -> None:
        if r.baseline and r.measured and (self._baseline is None or r.number < self._baseline.number):
            self._baseline = r
        if not _eligible(r):
            return
        if self._better(r, self._any):
            self._any = r
        if not r.contended and self._better(r, self._quiet):
            self._quiet = r

    def _rebuild(self) -> None:
        self._quiet = self._any = self._baseline = None
        for r in self._records.values():
            self._take(r)

    def _ranked(self, r: TrialRecord) -> bool:
        """Whether ``r`` is among the trials ranked now (quiet ones only, while there are any)."""
        return _eligible(r) and (self._quiet is None or not r.contended)

    def best(self, validation: Validation | None = None) -> TrialRecord | None:
        """The best feasible trial: the re-validated winner while ``validation`` covers the
        current leader, else the leader (see :meth:`tuner.results.StoredStudy.best`)."""
        top = self._quiet or self._any
        if top is None:
            return None
        val = validation
        if val is not None and val.winner is not None and top.number in {e.number for e in val.entries}:
            winner = self._records.get(val.winner)
            if winner is not None and self._ranked(winner):
                return winner
            if val.defaults_won:
                base = self._baseline
                if base is not None and base.number == val.winner and base.feasible:
                    return base
        return top


class TrialCache:
    """A study's trials in some states as records, each read once: a trial is read again only
    when its state changed. ``board``, when given, takes in every record read."""

    def __init__(self, states: Sequence[Any], board: Leaderboard | None = None) -> None:
        #: Optuna TrialStates (or their names).
        self.states = tuple(states)
        self.board = board
        self._seen: dict[int, tuple[Any, TrialRecord]] = {}
        # The last list of trials and its records: Optuna hands the same objects for finished
        # trials, so a list that starts with the last one needs only its new trials read.
        self._trials: list[Any] = []
        self._out: list[TrialRecord] = []

    def _states(self) -> tuple[Any, ...]:
        from optuna.trial import TrialState

        return tuple(TrialState[s] if isinstance(s, str) else s for s in self.states)

    def put(self, t: Any, r: TrialRecord) -> None:
        """Keep ``r``, read by the caller from the finished trial ``t``."""
        self._seen[t.number] = (t.state, r)
        if self.board is not None:
            self.board.add(r)

    def _record(self, t: Any) -> TrialRecord:
        hit = self._seen.get(t.number)
        if hit is None or hit[0] != t.state:
            hit = (t.state, record.read_record(t))
            self._seen[t.number] = hit
            if self.board is not None:
                self.board.add(hit[1])
        return hit[1]

    def records(self, trials: Sequence[Any]) -> list[TrialRecord]:
        """The records of ``trials`` (stored trials, as Optuna lists them), in their order."""
        trials = list(trials)
        n = len(self._trials)
        if n and len(trials) >= n and trials[:n] == self._trials:
            out = self._out + [self._record(t) for t in trials[n:]]
        else:
            out = [self._record(t) for t in trials]
        self._trials, self._out = trials, out
        return list(out)

    def update(self, study: Any) -> list[TrialRecord]:
        """The records of every trial of ``study`` in the cache's states, in trial order."""
        return self.records(study.get_trials(deepcopy=False, states=self._states()))
