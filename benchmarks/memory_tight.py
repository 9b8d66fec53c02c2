"""Memory-tight GPUs: the search over a sweep of GPU sizes (issue 20).

    python benchmarks/memory_tight.py                      # 10 sizes x staged,tpe,random x 10 seeds, 15 trials
    python benchmarks/memory_tight.py --sizes 3400,4300 --seeds 3 --samplers staged

Each study is the real product: ``run_study`` through the Ollama client against the fake Ollama
serving the GPU box of ``benchmarks/gpu_surface.py`` (four variants of a Gemma 3 4B-like model,
its speed model) with the given GPU memory; the fake's memory model (tests/fake_ollama.py:
per-layer weights with the output layer last, sliding-window KV cache, a compute buffer that
grows with the micro-batch, auto placement that keeps a margin free, failed loads in the three
forms Ollama gives them, chosen per config) decides what loads. No sleeping; product mode (baseline, then the sampler),
no re-validation, no pruning.

Per GPU size: the exhaustive optimum over the study's space (the context floor is the space's
smallest num_ctx, 2048), then per sampler the share of that optimum the exported config (the
best feasible trial: what ``tune export`` writes without re-validation) reaches, scored by the
speed model without noise; how many seeds reach 97%; the failed loads and the configs skipped
as predicted not to fit per study; and the memory model's worst error against the server's
size_vram over every loaded trial whose layer count is known.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_surface  # noqa: E402
from fake_ollama import GpuSettings  # noqa: E402
from _common import load_average, now_iso, table  # noqa: E402

from tuner.options import TuneOptions  # noqa: E402
from tuner.study import run_study  # noqa: E402

TARGET = 0.97
#: From below the smallest variant's full offload at the defaults (Q4_K_M, 4096 ctx, batch 512:
#: 4,078 MiB) to three times the largest variant's file (F16, 8,202 MiB).
SIZES = [3000, 3400, 3800, 4300, 4800, 5400, 6500, 9000, 14000, 24600]


def run(size: float, sampler: str, seed: int, trials: int, prompts: Path, optimum: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    # Failed loads in every form Ollama gives them, with and without numbers.
    with gpu_surface.server(size, GpuSettings(auto_max_layers=None, oom_style="rotate")) as fake:
        o = TuneOptions(model=["gemma3:4b"], host=fake.url, storage="memory", study_name=f"{sampler}-{seed}",
                        trials=trials, seed=seed, sampler=sampler, prune=False, validate=0, roofline=False,
                        repeats=1, prompts_file=str(prompts), num_predict=16, params=dict(gpu_surface.SPACE),
                        measure_interference=False, warm_start=False)
        done = run_study(o).trials
    ok = [t for t in done if t.feasible and t.values]
    best = max(ok, key=lambda t: t.values[0]) if ok else None
    true = (gpu_surface.truth(best.model, best.options, size) or 0.0) if best is not None else 0.0
    # Trial 0 is the baseline; the fake's rates are exact, so its measurement is its true rate.
    defaults = done[0].values[0] if done[0].baseline and done[0].values else 0.0
    errors = [abs(t.memory["error_pct"]) for t in done if t.memory and t.memory.get("error_pct") is not None]
    return {"share": true / optimum, "failed": sum(1 for t in done if t.failed_load),
            "skipped": sum(1 for t in done if t.skipped), "errors": errors,
            "seconds": time.perf_counter() - t0, "below_defaults": true < defaults * 0.999}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="GPU memory sizes (MiB)")
    ap.add_argument("--samplers", default="staged,tpe,random")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--trials", type=int, default=15)
    a = ap.parse_args()
    sizes = [float(x) for x in a.sizes.split(",")]
    samplers = [s.strip() for s in a.samplers.split(",") if s.strip()]
    print(f"{now_iso()}  load average now {load_average()}; {a.trials} trials, {a.seeds} seeds")
    rows: list[list[Any]] = []
    errors_all: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("Say hello in one short sentence.\n", encoding="utf-8")
        for size in sizes:
            optimum, arg, n_load, near = gpu_surface.optimum(size)
            where = " ".join(f"{k}={v}" for k, v in arg.items() if k != "num_thread")
            for sampler in samplers:
                runs = [run(size, sampler, seed, a.trials, prompts, optimum) for seed in range(a.seeds)]
                shares = [r["share"] for r in runs]
                errs = [e for r in runs for e in r["errors"]]
                errors_all += errs
                rows.append([f"{size:,.0f}", f"{optimum:.1f} ({where})", sampler,
                             f"{100 * statistics.median(shares):.1f}% / {100 * min(shares):.1f}%",
                             f"{sum(1 for s in shares if s >= TARGET)}/{len(runs)}",
                             f"{statistics.median(r['failed'] for r in runs):.0f} (max {max(r['failed'] for r in runs)})",
                             f"{statistics.median(r['skipped'] for r in runs):.0f}",
                             sum(1 for r in runs if r["below_defaults"]),
                             f"{max(errs):.1f}%" if errs else "-",
                             f"{statistics.fmean(r['seconds'] for r in runs):.1f}"])
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
    print()
    print(table(["GPU MiB", "optimum tok/s (config)", "sampler", "share median / worst", f">= {TARGET:.0%}",
                 "failed loads median (max)", "skipped median", "below defaults", "memory error max", "s/run"],
                rows, title=f"Exported config's share of the exhaustive optimum, {a.trials} trials, {a.seeds} seeds"))
    if errors_all:
        print(f"\nmemory model vs size_vram over {len(errors_all)} loaded trials with known layers: "
              f"median {statistics.median(errors_all):.1f}%, max {max(errors_all):.1f}%")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
