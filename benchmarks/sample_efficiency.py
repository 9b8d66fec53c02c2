"""Sample efficiency: how close each sampler gets to the grid optimum within a trial budget.

    python benchmarks/sample_efficiency.py
    python benchmarks/sample_efficiency.py --samplers tpe --tpe startup=5,multivariate=0   # a set-up experiment

Each run is the real product: ``run_study`` with ``--engine replay`` over the recorded grid
(baseline trial, starting point, ``tuner.study.make_sampler``, constraints), ``trials`` =
the largest budget. A budget B is scored on the run's first B trials: sampling only ever
looks back, so a run cut after B trials is exactly a ``--trials B`` run (``--separate``
runs every budget on its own to check that).

The GPU surface (``--surfaces gpu``; ``benchmarks/gpu_surface.py`` documents it; ``--warm`` adds
warm-started studies seeded from a study with another context and workload) runs the same
``run_study`` against the fake Ollama serving a synthetic 8 GiB GPU box with four variants of
a 4B model (no sleeping, the fake's memory model decides what loads), in product mode with
no latency limit, scored against the exhaustive optimum of its speed model.

Score: the recorded (true) mean decode tok/s of the configuration the study would report
(best feasible trial) over the best recorded mean of the grid (feasible under the same
latency limit), so a lucky replayed repeat never counts as success. Latency limits
(``--limits``): none; the median p95 TTFT of the runnable configs (about half the grid
infeasible); its 25th percentile (a limit that cuts into the fastest configs).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from _common import DEFAULT_GRID, Truth, load_average, now_iso, table, truths

import tuner.study as study_mod
from tuner.engines.replay import BASELINE_KEY, Grid, config_key, load_grid, write_prompts
from tuner.options import TuneOptions
from tuner.record import TrialRecord
from tuner.study import run_study

TARGET_SHARE = 0.97


def parse_tpe(text: str) -> dict[str, Any]:
    """``startup=5,multivariate=0,group=0,endpoints=1,ei=48`` -> TPESampler keyword overrides."""
    names = {"startup": "n_startup_trials", "multivariate": "multivariate", "group": "group",
             "endpoints": "consider_endpoints", "ei": "n_ei_candidates", "liar": "constant_liar"}
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, v = part.split("=", 1)
        key = names.get(k, k)
        out[key] = int(v) if key in ("n_startup_trials", "n_ei_candidates") else v.lower() in ("1", "true", "on")
    if not out.get("multivariate", True):
        out["group"] = False  # group needs multivariate
    return out


def sampler_factory(tpe_overrides: dict[str, Any]) -> Callable[..., Any]:
    """The product's sampler factory with the TPE keywords overridden."""

    def make(name: str, space: Any, seed: int | None, n_objectives: int) -> Any:
        if name != "tpe" or not tpe_overrides or n_objectives > 1:
            return study_mod.make_sampler(name, space, seed, n_objectives)
        import optuna

        return optuna.samplers.TPESampler(**{**study_mod.tpe_options(space, seed), **tpe_overrides})

    return make


@dataclass
class Run:
    """One study: the true value of the reported winner after each number of trials."""

    sampler: str
    seed: int
    mode: str
    limit: float | None
    shares: dict[int, float] = field(default_factory=dict)
    distinct: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def _key_of(r: TrialRecord) -> Any:
    if r.baseline:
        return BASELINE_KEY
    return config_key({**r.options, **r.server})


def reported_share(trials: list[TrialRecord], truth: dict[Any, Truth], optimum: float) -> float:
    """True value of the best feasible trial among ``trials`` (as results.best_feasible ranks them)."""
    feasible = [t for t in trials if t.feasible and t.values]
    if not feasible:
        return 0.0
    best = max(feasible, key=lambda t: t.values[0])
    return truth[_key_of(best)].decode_tps / optimum


def run_one(grid: Grid, prompts: Path, sampler: str, seed: int, budgets: list[int], max_ttft: float | None,
            truth: dict[Any, Truth], optimum: float, separate: bool, mode: str,
            factory: Callable[..., Any] = study_mod.make_sampler) -> Run:
    run = Run(sampler, seed, mode, max_ttft)
    product = mode == "product"
    t0 = time.perf_counter()
    for trials in (budgets if separate else [max(budgets)]):
        o = TuneOptions(
            model=[grid.path], engine="replay", storage="memory", study_name=f"{sampler}-{seed}-{trials}",
            trials=trials, seed=seed, sampler=sampler.split("[")[0], prune=False, validate=0, roofline=False,
            params=grid.axes, repeats=grid.repeats, num_predict=grid.num_predict, prompts_file=str(prompts),
            max_ttft_ms=max_ttft, baseline=product, starting_points=product,
            # Replayed samples are not measured on this machine: its load cannot touch them.
            measure_interference=False,
        )
        done = run_study(o, sampler_factory=factory).trials
        for b in budgets:
            if b <= trials and (not separate or b == trials):
                run.shares[b] = reported_share(done[:b], truth, optimum)
                run.distinct[b] = len({_key_of(t) for t in done[:b]})
    run.seconds = time.perf_counter() - t0
    return run


#: The warm start's source study (``--warm``): another application's context (8k and up) and
#: another workload (32 tokens per request), tuned cold for this many trials.
SOURCE_CTX = [8192, 16384, 32768]
SOURCE_TRIALS = 15


def run_gpu(sampler: str, seed: int, budgets: list[int], prompts: Path, optimum: float,
            factory: Callable[..., Any] = study_mod.make_sampler, warm_dir: Path | None = None) -> Run:
    """One product-mode study on the synthetic GPU box; shares by budget. With ``warm_dir``,
    a source study with another context and workload is tuned first in a SQLite storage
    there, and the measured study warm-starts from it (mode "warm")."""
    import gpu_surface

    run = Run(sampler, seed, "warm" if warm_dir else "cold", None)
    t0 = time.perf_counter()
    storage = f"sqlite:///{warm_dir / f'warm-{sampler}-{seed}.db'}" if warm_dir else "memory"
    with gpu_surface.server() as fake:
        common = dict(model=["gemma3:4b"], host=fake.url, storage=storage, sampler=sampler.split("[")[0],
                      prune=False, validate=0, roofline=False, repeats=1, prompts_file=str(prompts),
                      measure_interference=False)
        if warm_dir:
            run_study(TuneOptions(**common, study_name=f"source-{seed}", trials=SOURCE_TRIALS, seed=1000 + seed,
                                  params={**gpu_surface.SPACE, "num_ctx": SOURCE_CTX}, num_predict=32,
                                  warm_start=False), sampler_factory=factory)
            t0 = time.perf_counter()  # the source's time is not the warm study's
        o = TuneOptions(**common, study_name=f"{sampler}-{seed}", trials=max(budgets), seed=seed,
                        params=dict(gpu_surface.SPACE), num_predict=16, warm_start=bool(warm_dir))
        done = sorted(run_study(o, sampler_factory=factory).trials, key=lambda t: t.number)
    for b in budgets:
        ok = [t for t in done[:b] if t.feasible and t.values]
        best = max(ok, key=lambda t: t.values[0]) if ok else None
        true = gpu_surface.truth(best.model, best.options) if best is not None and not best.baseline else None
        if best is not None and best.baseline:
            true = best.values[0]  # deterministic: the measured value is the true one
        run.shares[b] = (true or 0.0) / optimum
        run.distinct[b] = len({(t.model, tuple(sorted(t.options.items()))) for t in done[:b]})
    run.seconds = time.perf_counter() - t0
    return run


def gpu_tables(samplers: list[tuple[str, dict[str, Any]]], seeds: int, budgets: list[int], tmp: Path,
               warm: bool = False) -> None:
    import gpu_surface

    optimum, arg, n_load, near = gpu_surface.optimum()
    n_configs = len(gpu_surface.VARIANTS) * len(list(itertools.product(*gpu_surface.SPACE.values())))
    prompts = tmp / "gpu-prompts.txt"
    prompts.write_text("Say hello in one short sentence.\n", encoding="utf-8")
    print(f"\nGPU surface (benchmarks/gpu_surface.py): optimum {optimum:.2f} tok/s at "
          + " ".join(f"{k}={v}" for k, v in arg.items()) + f"; load average now {load_average()}")
    runs = [run_gpu(name, seed, budgets, prompts, optimum, sampler_factory(overrides))
            for name, overrides in samplers for seed in range(seeds)]
    if warm:
        runs += [run_gpu(name, seed, budgets, prompts, optimum, sampler_factory(overrides), warm_dir=tmp)
                 for name, overrides in samplers for seed in range(seeds)]
    _print(runs, budgets, optimum, n_load, near, n_configs, None, surface="GPU surface, no latency limit",
           optimum_label="optimum", feasible_label="load")
    print(f"load average at the end: {load_average()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default=str(DEFAULT_GRID))
    ap.add_argument("--samplers", default="staged,tpe,random,grid")
    ap.add_argument("--surfaces", default="cpu,gpu", help="cpu: the recorded CPU grid; gpu: the synthetic GPU box")
    ap.add_argument("--gpu-budgets", default="10,15,30")
    ap.add_argument("--warm", action="store_true",
                    help="GPU surface: also warm-started studies (seeded from a study with another context "
                         f"{SOURCE_CTX[0]}+ and workload, {SOURCE_TRIALS} cold trials)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", default="10,20,30,50")
    ap.add_argument("--tpe", action="append", default=[], metavar="K=V,...",
                    help="an extra TPE set-up to compare (repeatable), e.g. startup=5,multivariate=0")
    ap.add_argument("--limits", default="none,p50,p25",
                    help="latency limits to run: none, pNN (that percentile of the runnable configs' p95 "
                         "TTFT: p50 leaves about half the grid infeasible) or a number of ms")
    ap.add_argument("--separate", action="store_true", help="one study per budget instead of prefixes")
    ap.add_argument("--modes", default="product,sampler-only",
                    help="product: baseline + starting point + sampler, as `tune` runs; "
                         "sampler-only: neither, every trial chosen by the sampler")
    a = ap.parse_args()
    grid = load_grid(a.grid)
    budgets = sorted(int(b) for b in a.budgets.split(","))
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    truth = truths(grid)
    runnable = [t for k, t in truth.items() if k != BASELINE_KEY and t.ok]
    ttfts = [t.ttft_p95_ms for t in runnable]
    limits = [_limit(x.strip(), ttfts) for x in a.limits.split(",") if x.strip()]
    samplers = [s.strip() for s in a.samplers.split(",") if s.strip()]
    setups: list[tuple[str, dict[str, Any]]] = [(s, {}) for s in samplers]
    setups += [(f"tpe[{t}]", parse_tpe(t)) for t in a.tpe]
    try:
        import torch  # noqa: F401
        gp_note = "GPSampler: not compared (make_sampler has no 'gp'; add it to compare)"
    except ImportError:
        gp_note = "GPSampler: skipped (needs torch, not installed here)"
    print(f"{now_iso()}  grid {Path(a.grid).name}: {len(grid.configs())} configs ({len(runnable)} runnable), "
          f"recorded {grid.raw.get('recorded_at')}; load average now {load_average()}")
    print(gp_note)
    runs: list[Run] = []
    surfaces = {x.strip() for x in a.surfaces.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = write_prompts(grid, Path(tmp) / "prompts.jsonl")
        if "gpu" in surfaces:
            gpu_tables(setups, a.seeds, sorted(int(b) for b in a.gpu_budgets.split(",")), Path(tmp), a.warm)
        for max_ttft in limits if "cpu" in surfaces else []:
            ok = [t for k, t in truth.items() if t.ok and (max_ttft is None or t.ttft_p95_ms <= max_ttft)
                  and k != BASELINE_KEY]
            optimum = max(t.decode_tps for t in ok)
            near = sum(1 for t in ok if t.decode_tps >= TARGET_SHARE * optimum)
            for mode in modes:
                for name, overrides in setups:
                    for seed in range(a.seeds):
                        runs.append(run_one(grid, prompts, name, seed, budgets, max_ttft, truth, optimum,
                                            a.separate, mode, sampler_factory(overrides)))
            _print([r for r in runs if r.limit == max_ttft], budgets, optimum, len(ok), near, len(grid.configs()),
                   max_ttft)


def _limit(text: str, ttfts: list[float]) -> float | None:
    if text == "none":
        return None
    if text.startswith("p"):
        from tuner.metrics import percentile

        return round(percentile(ttfts, float(text[1:])), 1)
    return float(text)


def _print(runs: list[Run], budgets: list[int], optimum: float, n_feasible: int, near: int, n_configs: int,
           max_ttft: float | None, surface: str = "", optimum_label: str = "grid optimum",
           feasible_label: str = "feasible") -> None:
    rows = []
    for mode, name in dict.fromkeys((r.mode, r.sampler) for r in runs):
        mine = [r for r in runs if r.sampler == name and r.mode == mode]
        row: list[Any] = [mode, name]
        for b in budgets:
            s = [r.shares[b] for r in mine]
            hits = sum(1 for x in s if x >= TARGET_SHARE)
            row.append(f"{100 * statistics.median(s):.1f}% / {100 * min(s):.1f}% ({hits}/{len(s)})")
        row.append(f"{statistics.median(r.distinct[budgets[-1]] for r in mine):.0f}")
        row.append(f"{statistics.fmean(r.seconds for r in mine):.1f}")
        rows.append(row)
    limit = surface or (f"p95 TTFT <= {max_ttft:.0f} ms" if max_ttft is not None else "no latency limit")
    print()
    print(table(["mode", "sampler"] + [f"{b} trials" for b in budgets]
                + [f"distinct configs in {budgets[-1]}", "s/run"], rows,
                title=f"{limit}: share of the {optimum_label} ({optimum:.2f} tok/s; {n_feasible} of {n_configs} "
                      f"configs {feasible_label}, {near} within {100 * TARGET_SHARE:.0f}%), median / worst over "
                      f"{len({r.seed for r in runs})} seeds (seeds reaching >= {100 * TARGET_SHARE:.0f}%)"), flush=True)


if __name__ == "__main__":
    main()
