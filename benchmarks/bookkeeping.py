"""Bookkeeping per trial on SQLite: the time to store one trial's record.

The trials are real: the records of the recorded CPU grid (Gemma 3 270M on 2 cores), cycled
to make a 1,000-trial study. Three layouts are timed on a fresh SQLite file each:

- ``flat, rollback journal``: the layout before the trial record, every value one attribute
  (about 60 ``set_user_attr`` commits), on SQLite's default journal: what a trial cost before.
- ``flat, WAL``: the same writes with the storage the tuner opens now (WAL, synchronous=NORMAL).
- ``record, WAL``: ``tuner.record.write_record``, the layout the tuner writes now (one transaction
  per write on SQLite and PostgreSQL).

Goal: <= 15 ms per trial for the tuner's layout, with no loss on kill -9 (WAL keeps every
committed transaction when a process dies; only a power cut can drop the last commits).

    python benchmarks/bookkeeping.py [--trials 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _common import DEFAULT_GRID, load_average, now_iso, table

from tuner.engines.replay import load_grid, true_metrics
from tuner.record import TrialRecord, stored_attrs, write_record
from tuner.storage import open_storage


def grid_records() -> list[TrialRecord]:
    """One record per measured configuration of the recorded grid, with its real samples."""
    grid = load_grid(str(DEFAULT_GRID))
    out = []
    for e in grid.entries.values():
        if e.error or not e.samples:
            continue
        r = true_metrics(e)
        r.reload_ms, r.worker, r.violations = e.reload_ms, {"hostname": "bench", "pid": 1}, []
        r.constraints = {"load": 0.0}
        out.append(r)
    return out


def flat_attrs(r: TrialRecord) -> dict[str, Any]:
    """The layout before the record: every value its own attribute."""
    attrs = {k: v for k, v in stored_attrs(r).items() if k not in ("detail", "telemetry")}
    attrs.update(r.flat())
    return attrs


def flat_layout(trial: Any, r: TrialRecord) -> None:
    for k, v in flat_attrs(r).items():
        trial.set_user_attr(k, v)
    trial.set_constraint("load", 0.0)


def run(records: list[TrialRecord], trials: int, url: str, write: Callable[[Any, TrialRecord], None]) -> list[float]:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # ask/tell on a storage with heartbeats warns that heartbeats are meant for optimize().
    warnings.filterwarnings("ignore", message="Heartbeat of storage")
    storage = open_storage(url) if "wal" in url else optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name="bookkeeping", direction="maximize")
    times = []
    for i in range(trials):
        trial = study.ask()
        r = records[i % len(records)]
        t0 = time.perf_counter()
        write(trial, r)
        times.append((time.perf_counter() - t0) * 1e3)
        study.tell(trial, r.stat("decode_tps"))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    a = ap.parse_args()
    records = grid_records()
    print(f"{now_iso()}  {a.trials} trials from {len(records)} real grid records; load average {load_average()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, write in (("flat, rollback journal", "journal", flat_layout),
                                   ("flat, WAL", "wal-flat", flat_layout),
                                   ("record, WAL (the tuner)", "wal-record", write_record)):
            url = f"sqlite:///{Path(tmp) / name}.db"
            ms = run(records, a.trials, url, write)
            writes = len(stored_attrs(records[0]) if write is write_record else flat_attrs(records[0]))
            rows.append([label, writes, round(statistics.median(ms), 1), round(statistics.fmean(ms), 1),
                         round(sorted(ms)[int(0.95 * (len(ms) - 1))], 1)])
    print(table(["layout", "attributes", "median ms/trial", "mean ms/trial", "p95 ms/trial"], rows,
                f"storing one trial, {a.trials} trials on SQLite"))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
