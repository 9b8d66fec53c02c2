"""How long `tune report` takes on a large SQLite study, and whether it grows linearly.

    python benchmarks/report_speed.py            # 100, 300 and 1000 trials
    python benchmarks/report_speed.py --sizes 100,1000 --repeats 5

First a real small study is run (``run_study`` against the fake Ollama server of the tests:
real HTTP, real measurement and storage code, a TTFT limit, a failed load, a re-validation).
Its trials are then copied into N-trial SQLite studies, each copy with every measured number
scaled by a random factor (so values, the ranking and the Pareto front vary), and the report of
each is timed in phases, in this process after a warm-up run: opening the storage and reading
every trial once (load), computing the data (data), drawing the figures (figures), the HTML
(render); then the whole `tune report` command in a fresh process (Python start-up, imports,
plotly's first figure and writing the file included), as wall time and as the CPU time of that
process (user + system: what the command itself costs on a machine other processes share).

The copies keep the source's parameter values (each copy is one of its searched trials), so
every value of a setting is measured many times and the report's parameter effects carry 95%
intervals: the t quantile of those intervals is part of what the command imports and computes
(scipy.special), and the benchmark refuses a study whose effects have none.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, load_average, now_iso, table

sys.path.insert(0, str(ROOT / "tests"))


def small_study(url: str) -> str:
    """Run a real 12-trial study against the fake Ollama server; return its name."""
    from fake_ollama import FakeOllama

    from tuner.study import TuneOptions, run_study

    # At this time scale fp16 misses the 40 ms p95 TTFT on the CPU and does not load at 32k
    # context with every layer on the GPU: the study has feasible, infeasible and failed loads.
    with FakeOllama(time_scale=0.002) as fake:
        summary = run_study(TuneOptions(
            model=["gemma3:1b"], host=fake.url, trials=12, repeats=2, num_predict=16, storage=url, seed=1,
            max_ttft_ms=40.0, validate=2, roofline=False,
            params={"variant": ["gemma3:1b", "gemma3:1b-it-fp16"], "num_gpu": [0, 27], "num_ctx": [2048, 32768],
                    "num_batch": [128, 512], "num_thread": [1, 2, 4]},
        ))
    return summary.study_name


def _scaled(v: Any, f: float) -> Any:
    """``v`` with every float in it multiplied by ``f`` (ints, strings and flags kept)."""
    if isinstance(v, float):
        return v * f
    if isinstance(v, dict):
        return {k: _scaled(x, f) for k, x in v.items()}
    if isinstance(v, list):
        return [_scaled(x, f) for x in v]
    return v


def copy_study(src: Any, url: str, name: str, n: int, seed: int = 0) -> None:
    """An ``n``-trial study at ``url``: the source's trials in order, then copies of its
    non-baseline trials with every measured number scaled by a factor in 0.8 .. 1.2."""
    import optuna
    from optuna.trial import create_trial

    rng = random.Random(seed)
    trials = src.get_trials(deepcopy=False)
    pool = [t for t in trials if not t.user_attrs.get("baseline")]
    dst = optuna.create_study(study_name=name, storage=url, directions=src.directions)
    for k, v in src.user_attrs.items():
        dst.set_user_attr(k, v)
    out = []
    for i in range(n):
        t = trials[i] if i < len(trials) else rng.choice(pool)
        f = 1.0 if i < len(trials) else rng.uniform(0.8, 1.2)
        out.append(create_trial(
            state=t.state, values=[v * f for v in t.values] if t.values else None, params=t.params,
            distributions=t.distributions, user_attrs=_scaled(t.user_attrs, f), system_attrs=t.system_attrs,
            intermediate_values={k: v * f for k, v in t.intermediate_values.items()},
        ))
    dst.add_trials(out)


def time_report(url: str, name: str) -> dict[str, float]:
    """Seconds per phase of one report, in this process (storage opened afresh), the phases of
    ``write_report`` apart."""
    from tuner.report import build_data, paused_gc, read_study, render_html
    from tuner.report.figures import draw
    from tuner.results import load_study
    from tuner.storage import open_storage

    with paused_gc():
        t0 = time.perf_counter()
        study = load_study(open_storage(url, create=False), name)
        stored = read_study(study)
        t1 = time.perf_counter()
        data = build_data(stored)
        t2 = time.perf_counter()
        data.figures = draw(data)
        t3 = time.perf_counter()
        page = render_html(data)
        t4 = time.perf_counter()
    return {"load": t1 - t0, "data": t2 - t1, "figures": t3 - t2, "render": t4 - t3, "in-process": t4 - t0,
            "MB": len(page.encode("utf-8")) / 1e6}


def intervals(url: str, name: str) -> tuple[int, int, int, int]:
    """The report's parameter effects of the study: (values with a 95% interval, values,
    settings with an effect interval, settings)."""
    from tuner.effects import compute
    from tuner.results import load_study, read_study
    from tuner.storage import open_storage

    effects = compute(read_study(load_study(open_storage(url, create=False), name)))
    values = [v for p in effects.params for v in p.values]
    return (sum(v.ci_low is not None for v in values), len(values),
            sum(p.effect_low is not None for p in effects.params), len(effects.params))


def time_command(url: str, name: str, out: Path) -> tuple[float, float]:
    """Seconds of `tune report` in a fresh process: wall, and the process's CPU (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuner.cli", "report", name, "--storage", url, "-o", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,300,1000", help="trial counts to time (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per size (the median is shown)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start, load_start = now_iso(), load_average()
    with tempfile.TemporaryDirectory() as tmp:
        src_url = f"sqlite:///{tmp}/small.db"
        t0 = time.perf_counter()
        src_name = small_study(src_url)
        src = optuna.load_study(study_name=src_name, storage=src_url)
        print(f"source: a real {len(src.trials)}-trial study in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = []
        prev: tuple[int, float] | None = None
        for n in sizes:
            url = f"sqlite:///{tmp}/n{n}.db"
            t0 = time.perf_counter()
            copy_study(src, url, src_name, n)
            print(f"{n} trials written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            ci_values, n_values, ci_effects, n_params = intervals(url, src_name)
            if not ci_values or not ci_effects:
                raise SystemExit(f"the {n}-trial study's parameter effects carry no interval "
                                 f"({ci_values} of {n_values} values, {ci_effects} of {n_params} settings): "
                                 "the benchmark would miss the t quantile's cost")
            time_report(url, src_name)  # warm-up: imports and plotly's first figure are paid once
            runs = [time_report(url, src_name) for _ in range(args.repeats)]
            timed = [time_command(url, src_name, Path(tmp) / f"r{n}.html") for _ in range(args.repeats)]
            cmd, cpu = [w for w, _ in timed], [c for _, c in timed]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            # Linear growth shows as a steady cost per added trial from one size to the next.
            slope = "-" if prev is None else f"{(med['in-process'] - prev[1]) / (n - prev[0]) * 1000:.2f}"
            prev = (n, med["in-process"])
            rows.append([n, f"{med['load']:.3f}", f"{med['data']:.3f}", f"{med['figures']:.3f}",
                         f"{med['render']:.3f}", f"{med['in-process']:.3f}", slope, f"{statistics.median(cmd):.2f}",
                         f"{max(cmd):.2f}", f"{statistics.median(cpu):.2f}", f"{med['MB']:.1f}",
                         f"{ci_values}/{n_values} values, {ci_effects}/{n_params} settings"])
    title = (f"tune report on an N-trial SQLite study ({start}, load average {load_start} -> {load_average()}; "
             f"median of {args.repeats})")
    print(table(["trials", "load s", "data s", "figures s", "render s", "in-process s", "ms per added trial",
                 "tune report s", "tune report max s", "tune report CPU s", "HTML MB", "effects with a 95% CI"],
                rows, title))


if __name__ == "__main__":
    main()
