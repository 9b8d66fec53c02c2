"""Precision: coefficient of variation of decode tok/s over repeats of one configuration.

    python benchmarks/precision.py

Real llama.cpp, the demo Gemma 3 270M on CPU, the grid's workload (one ~90-token prompt,
32 tokens). For each config and each block, the model is loaded fresh, then (with warm-up)
one discarded 8-token request runs, then ``--max-repeats`` measured requests; the CV over
the first 3, 5 and 10 of them is reported (median and worst over blocks), and the CV of the
block means (how far two trials of the same config land apart: what ranking sees).
It then summarises the CV over the 3 repeats of every config of the recorded grid.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _common import DEFAULT_GRID, SHORT_PROMPT, cv, load_average, now_iso, table

from tuner.engines.llamacpp import LlamaCppEngine
from tuner.measure import measure_config
from tuner.workload import Prompt, Workload

TARGET_CV = 0.02
CONFIGS: dict[str, dict[str, Any]] = {
    "1 thread": {"num_thread": 1, "num_batch": 512, "num_ctx": 2048},
    "2 threads": {"num_thread": 2, "num_batch": 512, "num_ctx": 2048},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--repeats", default="3,5,10")
    ap.add_argument("--num-predict", type=int, default=32)
    ap.add_argument("--grid", default=str(DEFAULT_GRID))
    ap.add_argument("--grid-only", action="store_true", help="only the recorded grid's summary (no inference)")
    a = ap.parse_args()
    if a.grid_only:
        grid_summary(a.grid)
        return
    from tuner.demo import demo_model_path

    model = str(demo_model_path())
    counts = sorted(int(x) for x in a.repeats.split(","))
    workload = Workload(prompts=(Prompt("short", SHORT_PROMPT),), repeats=max(counts), num_predict=a.num_predict)
    engine = LlamaCppEngine([model])
    start_load = load_average()
    rows = []
    try:
        engine.prepare({"flash_attention": "on", "kv_cache_type": "f16"})
        for label, cfg in CONFIGS.items():
            for warm in (False, True):
                blocks: list[list[float]] = []
                for _ in range(a.blocks):
                    engine.close()  # a fresh load each block: a new trial of this config
                    m = measure_config(engine, model, cfg, workload, reload=warm)
                    blocks.append([s.decode_tps for s in m.samples])
                for n in counts:
                    cvs = [cv(b[:n]) for b in blocks]
                    means = [statistics.fmean(b[:n]) for b in blocks]
                    rows.append([label, "yes" if warm else "no", n, f"{100 * statistics.median(cvs):.2f}%",
                                 f"{100 * max(cvs):.2f}%", f"{100 * cv(means):.2f}%",
                                 round(statistics.fmean(means), 2),
                                 "ok" if max(cvs) <= TARGET_CV else "MISS"])
                print(f"{label} warm-up={'yes' if warm else 'no'}: first requests "
                      f"{[round(b[0], 1) for b in blocks]} tok/s, load {load_average()}", flush=True)
    finally:
        engine.close()
    print()
    print(table(["config", "warm-up", "repeats", "CV median", "CV worst", "CV of block means", "tok/s",
                 f"worst <= {100 * TARGET_CV:.0f}%"], rows,
                title=f"Decode tok/s precision, {a.blocks} blocks per row ({now_iso()}, load average "
                      f"{start_load} -> {load_average()})"))
    grid_summary(a.grid)


def grid_summary(path: str) -> None:
    """CV over the repeats of every runnable config of a recorded grid (and of the re-measured ones)."""
    from tuner.engines.replay import read_grid_json
    from tuner.metrics import percentile

    data = read_grid_json(path)
    rows = []
    for label, entries in (
        ("kept", [c for c in data["configs"] if not c.get("error")]),
        ("superseded (re-measured)", [o for c in data["configs"] for o in c.get("superseded", [])]),
    ):
        cvs = [cv([s["decode_tps"] for s in c["samples"]]) for c in entries]
        if not cvs:
            continue
        rows.append([label, len(cvs), f"{100 * statistics.median(cvs):.2f}%", f"{100 * percentile(cvs, 90):.2f}%",
                     f"{100 * max(cvs):.1f}%", f"{sum(1 for x in cvs if x <= TARGET_CV)}/{len(cvs)}"])
    print()
    print(table(["grid configs", "n", "CV median", "CV p90", "CV max", f"CV <= {100 * TARGET_CV:.0f}%"], rows,
                title=f"CV over {data['workload']['repeats']} repeats (warm-up on) in the recorded grid "
                      f"{data['recorded_at']}, load average {data['machine'].get('load_average_start')} -> "
                      f"{data['machine'].get('load_average_end')}"))


if __name__ == "__main__":
    main()
