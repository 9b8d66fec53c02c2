"""Sample efficiency: how close each sampler gets to the grid optimum within a trial budget.

    python benchmarks/sample_efficiency.py
    python benchmarks/sample_efficiency.py --samplers tpe --tpe startup=5,multivariate=0   # a set-up experiment

Each run is the real product: ``run_study`` with ``--engine replay`` over the recorded grid
(baseline trial, starting point, ``tuner.study.make_sampler``, constraints), ``trials`` =
the largest budget. A budget B is scored on the run's first B trials: sampling only ever
looks back, so a run cut after B trials is exactly a ``--trials B`` run (``--separate``
runs every budget on its own to check that).

Score: the recorded (true) mean decode tok/s of the configuration the study would report
(best feasible trial) over the best recorded mean of the grid (feasible under the same
latency limit), so a lucky replayed repeat never counts as success. Latency limits
(``--limits``): none; the median p95 TTFT of the runnable configs (about half the grid
infeasible); its 25th percentile (a limit that cuts into the fastest configs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from _common import DEFAULT_GRID, Truth, load_average, now_iso, table, truths

import tuner.study as study_mod
from tuner import results
from tuner.engines.replay import BASELINE_KEY, Grid, config_key, load_grid, write_prompts
from tuner.study import TuneOptions, run_study

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
    """``make_sampler`` with the TPE keywords overridden (the product's otherwise)."""
    original = study_mod.make_sampler

    def make(name: str, space: Any, seed: int | None, n_objectives: int) -> Any:
        sampler = original(name, space, seed, n_objectives)
        if name != "tpe" or not tpe_overrides:
            return sampler
        import optuna

        kw = {"seed": seed, "n_startup_trials": sampler._n_startup_trials, "multivariate": sampler._multivariate,
              "group": sampler._group, "constant_liar": sampler._constant_liar, **tpe_overrides}
        return optuna.samplers.TPESampler(**kw)

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


def _captured_study(o: TuneOptions, starting_points: bool) -> Any:
    """Run the study and return the Optuna study object (in-memory storage is not reachable otherwise)."""
    holder: dict[str, Any] = {}
    original, original_points = study_mod.open_study, study_mod.starting_points

    def capture(o2: TuneOptions, p: Any) -> Any:
        holder["study"] = original(o2, p)
        return holder["study"]

    study_mod.open_study = capture
    if not starting_points:
        study_mod.starting_points = lambda *args, **kw: []
    try:
        run_study(o)
    finally:
        study_mod.open_study, study_mod.starting_points = original, original_points
    return holder["study"]


def _key_of(t: Any) -> Any:
    if t.user_attrs.get("baseline"):
        return BASELINE_KEY
    cfg = t.user_attrs["config"]
    return config_key({**cfg.get("options", {}), **cfg.get("server", {})})


def reported_share(trials: list[Any], truth: dict[Any, Truth], optimum: float) -> float:
    """True value of the best feasible trial among ``trials`` (as results.best_feasible ranks them)."""
    feasible = [t for t in trials if results.is_feasible(t) and t.values]
    if not feasible:
        return 0.0
    best = max(feasible, key=lambda t: t.values[0])
    return truth[_key_of(best)].decode_tps / optimum


def run_one(grid: Grid, prompts: Path, sampler: str, seed: int, budgets: list[int], max_ttft: float | None,
            truth: dict[Any, Truth], optimum: float, separate: bool, mode: str) -> Run:
    run = Run(sampler, seed, mode, max_ttft)
    product = mode == "product"
    t0 = time.perf_counter()
    for trials in (budgets if separate else [max(budgets)]):
        o = TuneOptions(
            model=[grid.path], engine="replay", storage="memory", study_name=f"{sampler}-{seed}-{trials}",
            trials=trials, seed=seed, sampler=sampler.split("[")[0], prune=False, validate=0, roofline=False,
            params=grid.axes, repeats=grid.repeats, num_predict=grid.num_predict, prompts_file=str(prompts),
            max_ttft_ms=max_ttft, baseline=product,
        )
        done = sorted(_captured_study(o, starting_points=product).get_trials(deepcopy=False), key=lambda t: t.number)
        for b in budgets:
            if b <= trials and (not separate or b == trials):
                run.shares[b] = reported_share(done[:b], truth, optimum)
                run.distinct[b] = len({_key_of(t) for t in done[:b]})
    run.seconds = time.perf_counter() - t0
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default=str(DEFAULT_GRID))
    ap.add_argument("--samplers", default="tpe,random,grid")
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
    original = study_mod.make_sampler
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = write_prompts(grid, Path(tmp) / "prompts.jsonl")
        for max_ttft in limits:
            ok = [t for k, t in truth.items() if t.ok and (max_ttft is None or t.ttft_p95_ms <= max_ttft)
                  and k != BASELINE_KEY]
            optimum = max(t.decode_tps for t in ok)
            near = sum(1 for t in ok if t.decode_tps >= TARGET_SHARE * optimum)
            for mode in modes:
                for name, overrides in setups:
                    study_mod.make_sampler = sampler_factory(overrides)
                    try:
                        for seed in range(a.seeds):
                            runs.append(run_one(grid, prompts, name, seed, budgets, max_ttft, truth, optimum,
                                                a.separate, mode))
                    finally:
                        study_mod.make_sampler = original
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
           max_ttft: float | None) -> None:
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
    limit = f"p95 TTFT <= {max_ttft:.0f} ms" if max_ttft is not None else "no latency limit"
    print()
    print(table(["mode", "sampler"] + [f"{b} trials" for b in budgets]
                + [f"distinct configs in {budgets[-1]}", "s/run"], rows,
                title=f"{limit}: share of the grid optimum ({optimum:.2f} tok/s; {n_feasible} of {n_configs} "
                      f"configs feasible, {near} within {100 * TARGET_SHARE:.0f}%), median / worst over "
                      f"{len({r.seed for r in runs})} seeds (seeds reaching >= {100 * TARGET_SHARE:.0f}%)"), flush=True)


if __name__ == "__main__":
    main()
