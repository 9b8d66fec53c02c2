"""Overhead: tuner wall time per trial over the generation time it measured; the pruning saving.

    python benchmarks/overhead.py
    python benchmarks/overhead.py --replay-only     # part 2 alone: no llama.cpp, ~1 min

Part 1 runs a short real study (llama.cpp, demo Gemma 3 270M, SQLite storage as by default,
the grid's workload) and reports per trial:

* ratio = trial wall time (Optuna start to complete: sampling, reload, warm-up, telemetry,
  storage) / generation time (sum of the latencies of the trial's measured requests);
* the same with the warm-up request counted as generation (what a reload costs on top).

Part 2 runs the study over the recorded grid (``--engine replay``: no inference) with
in-memory and SQLite storage: the trial wall time is then the tuner's own cost (sampling,
telemetry thread, storage writes).

Part 3 runs the same real study twice, pruning off and on, with a workload long enough for
the pruner (``--prune-repeats`` requests; it needs >= 4 reported requests, and the last
request of a trial is never reported) and reports the pruned trials, the seconds the tuner
estimates they saved, and the measured difference in total wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_GRID, SHORT_PROMPT, load_average, now_iso, table

from tuner.options import TuneOptions
from tuner.record import read_record
from tuner.study import run_study

TARGET_RATIO = 1.15
SPACE: dict[str, list[Any]] = {
    "num_thread": [1, 2],
    "num_batch": [32, 512],
    "num_ctx": [1024, 4096],
    "flash_attention": ["on", "off"],
}


def _study(storage: str, name: str) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def _options(storage: str, name: str, prompts: Path | None, trials: int, repeats: int, prune: bool) -> TuneOptions:
    """The grid's short workload, or (``prompts=None``) the product's default: built-in prompts, 128 tokens."""
    from tuner.demo import demo_model_path

    return TuneOptions(
        model=[str(demo_model_path())], engine="llama-cpp", storage=storage, study_name=name, trials=trials,
        repeats=repeats, num_predict=32 if prompts else 128, prompts_file=str(prompts) if prompts else None,
        # The built-in document prompt needs ~1.9k tokens of context.
        params=SPACE if prompts else {**SPACE, "num_ctx": [2048, 4096]}, seed=0, prune=prune, validate=0,
        roofline=False,
    )


def per_trial(study: Any) -> list[list[Any]]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        r = read_record(t)
        if r.duration_s is None or not r.samples:
            continue
        gen = sum(s.latency_ms for s in r.request_samples()) / 1e3
        warm = (r.warmup or {}).get("latency_ms", 0.0) / 1e3
        label = "baseline" if r.baseline else " ".join(f"{k}={v}" for k, v in r.params.items())
        rows.append([r.number, label, r.state.lower(), round(r.duration_s, 2), round(gen, 2), round(warm, 2),
                     round(r.duration_s / gen, 3), round(r.duration_s / (gen + warm), 3)])
    return rows


def tuner_cost(tmp: str, trials: int) -> str:
    """Per-trial wall time of a study whose engine answers instantly (the recorded grid)."""
    from tuner.engines.replay import load_grid, write_prompts

    grid = load_grid(DEFAULT_GRID)
    prompts = write_prompts(grid, Path(tmp) / "grid-prompts.jsonl")
    rows = []
    for storage in ("memory", f"sqlite:///{tmp}/replay.db"):
        for sampler in ("tpe", "random"):
            name = f"replay-{sampler}"
            holder: dict[str, Any] = {}
            import tuner.study as study_mod

            original = study_mod.open_study

            def capture(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)  # (study, created)
                holder["study"] = out[0] if isinstance(out, tuple) else out
                return out

            study_mod.open_study = capture
            t0 = time.perf_counter()
            try:
                run_study(TuneOptions(
                    model=[str(DEFAULT_GRID)], engine="replay", storage=storage, study_name=name, trials=trials,
                    seed=0, sampler=sampler, prune=False, validate=0, roofline=False, params=grid.axes,
                    repeats=grid.repeats, num_predict=grid.num_predict, prompts_file=str(prompts),
                ))
            finally:
                study_mod.open_study = original
            total = time.perf_counter() - t0
            walls = sorted((t.datetime_complete - t.datetime_start).total_seconds() * 1e3
                           for t in holder["study"].get_trials(deepcopy=False) if t.datetime_complete)
            rows.append([storage.split(":")[0], sampler, trials, round(statistics.median(walls), 1),
                         round(walls[-1], 1), round(total / trials * 1e3, 1)])
    return table(["storage", "sampler", "trials", "median ms/trial", "max ms/trial", "run_study ms/trial"], rows,
                 title="The tuner's own cost per trial: replayed grid, no inference (4 requests per trial)")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--prune-trials", type=int, default=10)
    ap.add_argument("--prune-repeats", type=int, default=6)
    ap.add_argument("--workload", choices=("short", "builtin"), default="short",
                    help="short: the grid's (1 prompt, 32 tokens); builtin: the product default (chat + "
                         "document prompts, 128 tokens)")
    ap.add_argument("--replay-trials", type=int, default=50)
    ap.add_argument("--skip-pruning", action="store_true")
    ap.add_argument("--replay-only", action="store_true", help="only part 2: the tuner's own cost over the "
                    "recorded grid (no inference)")
    a = ap.parse_args()
    start_load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        if a.replay_only:
            print(tuner_cost(tmp, a.replay_trials))
            print(f"\n{now_iso()}, load average {start_load} -> {load_average()}")
            return
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text(SHORT_PROMPT, encoding="utf-8")
        storage = f"sqlite:///{tmp}/overhead.db"
        t0 = time.perf_counter()
        workload = prompts if a.workload == "short" else None
        run_study(_options(storage, "overhead", workload, a.trials, 3, prune=False), echo=_progress)
        total = time.perf_counter() - t0
        rows = per_trial(_study(storage, "overhead"))
        gen_all = sum(r[4] for r in rows)
        ratios = [r[6] for r in rows]
        print(table(["#", "config", "state", "wall s", "generation s", "warm-up s", "wall/gen", "wall/(gen+warm-up)"],
                    rows, title=f"Per-trial overhead, {a.trials} real trials, {a.workload} workload x 3 repeats "
                                f"({now_iso()}, load average {start_load} -> {load_average()})"))
        print()
        print(table(["measure", "value", f"target <= {TARGET_RATIO}"], [
            ["median wall/gen per trial", round(statistics.median(ratios), 3),
             "ok" if statistics.median(ratios) <= TARGET_RATIO else "MISS"],
            ["worst wall/gen per trial", round(max(ratios), 3), "ok" if max(ratios) <= TARGET_RATIO else "MISS"],
            ["median wall/(gen + warm-up) per trial: the tuner's own cost", round(statistics.median(r[7] for r in rows), 3),
             ""],
            ["whole run_study (set-up included) / all generation", round(total / gen_all, 3),
             "ok" if total / gen_all <= TARGET_RATIO else "MISS"],
        ], title="Overhead summary"))
        print()
        print(tuner_cost(tmp, a.replay_trials))
        if a.skip_pruning:
            return
        out = []
        for prune in (False, True):
            name = f"prune-{prune}"
            t0 = time.perf_counter()
            summary = run_study(_options(storage, name, prompts, a.prune_trials, a.prune_repeats, prune=prune),
                                echo=_progress)
            wall = time.perf_counter() - t0
            pruned = [r for r in summary.trials if r.state == "PRUNED"]
            requests = sum(r.n_requests for r in summary.trials)
            best = summary.best
            out.append(["on" if prune else "off", a.prune_trials, len(pruned), requests,
                        round(summary.pruned_saved_s, 1), round(wall, 1),
                        f"{best.value:.2f}" if best and best.value else "-",
                        best.config_text().split(" ", 1)[-1] if best else "-"])
        saved = out[0][5] - out[1][5]
        print()
        print(table(["pruning", "trials", "pruned", "requests run", "saved s (tuner's estimate)", "study wall s",
                     "best tok/s", "best config"], out,
                    title=f"Pruning, real, {a.prune_repeats} requests per trial (wall time saved: {saved:.1f} s, "
                          f"{100 * saved / out[0][5]:.0f}%; load average now {load_average()})"))


if __name__ == "__main__":
    main()
