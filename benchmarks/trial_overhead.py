"""The tuner's own time per trial as a study grows: flat from trial 10 to trial 2,000?

    python benchmarks/trial_overhead.py                      # 2,000 trials, staged sampler
    python benchmarks/trial_overhead.py --trials 300 --sampler tpe

One study of ``--trials`` trials runs through the real ``run_study`` against the fake Ollama
server of the tests (real HTTP, the real client, measurement, memory model, staged sampler,
progress line and record writes) with no simulated time (``time_scale=0``), on a fresh SQLite
file: one 3-word prompt, 1 repeat, 4 tokens, no re-validation, no roofline, no warm start,
no interference measurement. The space is the default one (variant screen, num_gpu, num_ctx,
num_batch, num_thread) on a 6 GiB fake GPU, so the memory model plans and repairs trials.

The tuner's own time of a trial is the wall time from one trial's progress line to the next
less the time spent inside ``measure_config`` (the trial's requests, their warm-up and the
telemetry sampler around them): everything the tuner and Optuna do around a measurement.
It is split into the sampler's calls (TPE, the stages, the memory model's repairs), storing
the records (``tuner.record.write_record``: the config when the trial starts, the measurement
when it ends) and the rest (Optuna's trial creation, suggest and tell, the memory prediction,
the progress line, and the few engine calls around a measurement: /api/ps for the memory the
server reports). Each figure is the median over the 10 trials around the mark (the last 10
for the last mark). Goal: flat within 2x from trial 10 to trial 2,000.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _common import ROOT, load_average, now_iso, table

sys.path.insert(0, str(ROOT / "tests"))

#: The marks: each is shown over the 10 trials around it (the last 10 for the last trial).
MARKS = (10, 100, 1000, 2000)
WINDOW = 10
#: The sampler's calls Optuna makes (their time is the sampler's: TPE, the stages, the repairs).
SAMPLER_CALLS = ("before_trial", "infer_relative_search_space", "sample_relative", "sample_independent",
                 "after_trial")


class Clock:
    """Seconds spent inside the wrapped calls, by label."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, label: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t0

        return timed


def run(trials: int, sampler: str, url: str) -> tuple[list[dict[str, float]], float]:
    """Run the study; per trial (in order of completion) the milliseconds of its own time,
    of the sampler, of storing its record and inside measure_config; and the run's wall time."""
    from fake_ollama import FakeOllama

    from tuner import record
    from tuner import runner as runner_mod
    from tuner.study import TuneOptions, make_sampler, run_study

    clock = Clock()

    def timed_sampler(*args: Any) -> Any:
        s = make_sampler(*args)
        for name in SAMPLER_CALLS:
            setattr(s, name, clock.wrap("sampler", getattr(s, name)))
        return s

    marks: list[tuple[float, dict[str, float]]] = []

    def echo(line: str) -> None:
        if line.startswith("["):  # a trial's progress line: the trial is stored
            marks.append((time.perf_counter(), dict(clock.spent)))

    prompts = Path(url.removeprefix("sqlite:///")).with_suffix(".txt")
    prompts.write_text("hello there friend\n", encoding="utf-8")
    real = runner_mod.measure_config, record.write_record
    runner_mod.measure_config = clock.wrap("measure", runner_mod.measure_config)
    record.write_record = clock.wrap("store", record.write_record)
    try:
        with FakeOllama(time_scale=0) as fake:
            t0 = time.perf_counter()
            marks.append((t0, {}))
            run_study(TuneOptions(
                model=["gemma3:1b"], host=fake.url, trials=trials, repeats=1, num_predict=4,
                prompts_file=str(prompts), storage=url, seed=0, sampler=sampler, validate=0, roofline=False,
                warm_start=False, measure_interference=False), echo=echo, sampler_factory=timed_sampler)
            wall = time.perf_counter() - t0
    finally:
        runner_mod.measure_config, record.write_record = real
    out = []
    for (t_a, a), (t_b, b) in zip(marks, marks[1:]):
        d = {k: (b.get(k, 0.0) - a.get(k, 0.0)) * 1e3 for k in ("measure", "sampler", "store")}
        d["own"] = (t_b - t_a) * 1e3 - d["measure"]
        d["rest"] = d["own"] - d["sampler"] - d["store"]
        out.append(d)
    return out, wall


def window(values: list[dict[str, float]], mark: int) -> list[dict[str, float]]:
    """The trials around ``mark`` (1-based): ``WINDOW`` of them, ending at the last trial."""
    lo = max(1, min(mark - WINDOW // 2, len(values) - WINDOW + 1))
    return values[lo - 1:lo - 1 + WINDOW]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--sampler", default="staged", choices=("staged", "tpe", "random"))
    a = ap.parse_args()
    print(f"{now_iso()}  {a.trials} trials, sampler {a.sampler}; load average {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        per_trial, wall = run(a.trials, a.sampler, f"sqlite:///{Path(tmp) / 'overhead.db'}")
    rows = []
    first: dict[str, float] = {}
    for mark in (m for m in MARKS if m <= len(per_trial)):
        w = window(per_trial, mark)
        med = {k: statistics.median(d[k] for d in w) for k in ("own", "sampler", "store", "rest", "measure")}
        first = first or med
        lo = per_trial.index(w[0]) + 1
        rows.append([mark, f"{lo}-{lo + len(w) - 1}", round(med["own"], 1), f"{med['own'] / first['own']:.2f}x",
                     round(med["sampler"], 1), round(med["store"], 1), round(med["rest"], 1),
                     f"{med['rest'] / first['rest']:.2f}x", round(med["measure"], 1)])
    print(table(["trial", "window", "own ms", "vs trial 10", "sampler ms", "storing records ms", "rest ms",
                 "rest vs trial 10", "in measure_config ms"], rows,
                f"the tuner's own time per trial (medians), {len(per_trial)} trials, SQLite, fake Ollama"))
    print(f"whole run {wall:.0f} s ({wall / max(1, len(per_trial)) * 1e3:.0f} ms per trial); "
          f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
