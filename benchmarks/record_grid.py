"""Record a grid: measure every configuration of a space for real, keeping every request.

    python benchmarks/record_grid.py                  # the committed CPU grid (~10-15 min, 2 cores)
    python benchmarks/record_grid.py --engine ollama --model gemma3:270m --param num_gpu=0,-1 ...

Each configuration is loaded (the warm-up request pays and records the reload), then the
workload runs ``--repeats`` times; the per-request samples, the warm-up, the reload cost and
the load average go into a grid file that ``--engine replay`` serves. Configurations run in
a shuffled (seeded) order so that a drift in machine load does not line up with one axis.
The file is rewritten after every configuration; ``--resume`` continues a cut-off recording.
Configurations whose repeats disagree (decode CV > ``--redo-noisy``, e.g. measured while
another process took a core) are measured once more at the end; the first measurement is
kept in the file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import time
from itertools import product
from pathlib import Path
from typing import Any

from _common import DEFAULT_GRID, SHORT_PROMPT, cv, load_average, now_iso, table

from tuner.engines import get_engine
from tuner.engines.replay import FORMAT, config_key
from tuner.errors import LoadError
from tuner.measure import measure_config
from tuner.space import RUNNER_PARAMS, SERVER_PARAMS, parse_param_option
from tuner.workload import Prompt, Workload, load_prompts

#: The CPU grid recorded here: 2 x 5 x 3 x 2 x 2 = 120 configurations.
CPU_GRID: dict[str, list[Any]] = {
    "num_thread": [1, 2],
    "num_batch": [32, 64, 128, 256, 512],
    "num_ctx": [1024, 2048, 4096],
    "flash_attention": ["on", "off"],
    "kv_cache_type": ["f16", "q8_0"],
}


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="llama-cpp")
    ap.add_argument("--model", default=None, help="GGUF path / Ollama tag (default: the demo Gemma 3 270M)")
    ap.add_argument("--host", default=None)
    ap.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2",
                    help="an axis (repeatable); any given replaces the whole default CPU grid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-predict", type=int, default=32)
    ap.add_argument("--prompts", default=None, help="prompts file (default: one built-in ~90-token prompt)")
    ap.add_argument("--no-baseline", action="store_true", help="do not record the engine defaults")
    ap.add_argument("--order-seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="record only the first N configs (a smoke test)")
    ap.add_argument("--resume", action="store_true", help="keep configs already in --out")
    ap.add_argument("--redo-noisy", type=float, default=0.05, metavar="CV",
                    help="at the end, measure once more every config whose decode tok/s CV is above CV "
                         "(default 0.05; 0 = never); the first measurement stays in the entry as 'superseded'")
    ap.add_argument("--out", default=str(DEFAULT_GRID))
    ap.add_argument("--show", action="store_true", help="only print the summary of the grid in --out")
    return ap.parse_args()


def write_grid(data: dict[str, Any], path: Path) -> None:
    """Write atomically; ``.gz`` compresses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(data, separators=(",", ":"), sort_keys=False).encode()
    if path.suffix == ".gz":
        blob = gzip.compress(blob, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def _existing(path: Path) -> dict[str, Any] | None:
    from tuner.engines.replay import read_grid_json

    return read_grid_json(path) if path.exists() else None


def main() -> None:
    a = _args()
    if a.show:
        show(a.out)
        return
    axes = dict(parse_param_option(p) for p in a.param) if a.param else dict(CPU_GRID)
    model = a.model
    if model is None:
        from tuner.demo import demo_model_path

        model = str(demo_model_path())
    prompts = load_prompts(a.prompts) if a.prompts else (Prompt("short", SHORT_PROMPT),)
    workload = Workload(prompts=prompts, repeats=a.repeats, num_predict=a.num_predict, source="record_grid")
    manage = a.engine == "ollama" and any(k in SERVER_PARAMS for k in axes)
    engine = get_engine(a.engine, models=[model], host=a.host, manage_server=manage)
    out = Path(a.out)
    names = list(axes)
    configs: list[dict[str, Any] | None] = [dict(zip(names, vals)) for vals in product(*axes.values())]
    random.Random(a.order_seed).shuffle(configs)
    if not a.no_baseline:
        configs.insert(0, None)
    if a.limit:
        configs = configs[: a.limit]
    try:
        server = engine.server_info()
        info = engine.model_info(model)
        from tuner.telemetry import host_environment

        previous = _existing(out) if a.resume else None
        done = {(None if c["config"] is None else config_key(c["config"])): c for c in (previous or {}).get("configs", [])}
        data: dict[str, Any] = {
            "format": FORMAT,
            "recorded_at": now_iso(),
            "source": {"engine": server.get("engine"), "version": server.get("version"),
                       "model": Path(model).name, "system_info": server.get("system_info", "")},
            "model": {"name": Path(model).name, "architecture": info.architecture, "block_count": info.block_count,
                      "context_length": info.context_length, "family": info.family,
                      "parameter_size": info.parameter_size, "quantization": info.quantization,
                      "digest": info.digest, "size_bytes": info.size_bytes},
            "machine": {**host_environment(), "load_average_start": load_average()},
            "workload": {"prompts": [{"name": p.name, "text": p.text} for p in prompts], "repeats": a.repeats,
                         "num_predict": a.num_predict, "warmup_predict": workload.warmup_predict,
                         "temperature": workload.temperature, "seed": workload.seed},
            "axes": axes,
            "order_seed": a.order_seed,
            "configs": [],
        }
        started = time.monotonic()
        if previous:
            data["recorded_at"] = previous["recorded_at"]
            data["machine"]["load_average_start"] = previous["machine"].get("load_average_start")
            data["resumed_at"] = previous.get("resumed_at", []) + [now_iso()]
        earlier = float((previous or {}).get("duration_s", 0.0))

        def record(n: int, cfg: dict[str, Any] | None) -> dict[str, Any]:
            entry = _measure(engine, model, cfg, workload)
            data["machine"]["load_average_end"] = load_average()
            data["duration_s"] = round(earlier + time.monotonic() - started, 1)
            m = entry.get("metrics", {})
            print(f"[{n}/{len(configs)}] {_label(cfg)}: decode {m.get('decode_tps_mean', 0):.1f} tok/s "
                  f"p95 TTFT {m.get('ttft_ms_p95', 0):.0f} ms reload {entry['reload_ms'] or 0:.0f} ms "
                  f"load {entry['load_average'][0]} {entry.get('error') or ''}", flush=True)
            return entry

        for n, cfg in enumerate(configs, 1):
            old = done.get(None if cfg is None else config_key(cfg))
            data["configs"].append(old if old is not None else record(n, cfg))
            if old is None:
                write_grid(data, out)
        # A config measured while something else hogged the CPU is measured once more at the
        # end; the first measurement stays in the file, under "superseded".
        for n, old in enumerate(list(data["configs"]), 1):
            if a.redo_noisy and _noisy(old, a.redo_noisy) and not old.get("superseded"):
                entry = record(n, old["config"])
                entry["superseded"] = [old]
                data["configs"][n - 1] = entry
                write_grid(data, out)
        write_grid(data, out)
    finally:
        engine.close()
    _summary(data, out)


def _noisy(entry: dict[str, Any], limit: float) -> bool:
    return not entry.get("error") and cv([s["decode_tps"] for s in entry.get("samples", [])]) > limit


def _label(cfg: dict[str, Any] | None) -> str:
    return "baseline (engine defaults)" if cfg is None else " ".join(f"{k}={v}" for k, v in cfg.items())


def _measure(engine: Any, model: str, cfg: dict[str, Any] | None, workload: Workload) -> dict[str, Any]:
    """Load ``cfg`` and run the workload; a failure is recorded (replay re-raises it)."""
    if cfg is None:
        runner, server, use_model = None, {}, model
    else:
        use_model = str(cfg.get("variant", model))
        runner = {k: v for k, v in cfg.items() if k in RUNNER_PARAMS}
        server = {k: v for k, v in cfg.items() if k in SERVER_PARAMS}
    load = load_average()
    t0 = time.monotonic()
    entry: dict[str, Any] = {"config": cfg, "load_average": load}
    try:
        engine.prepare(server)
        m = measure_config(engine, use_model, runner, workload, reload=True)
    except LoadError as e:
        entry.update(error=str(e), reload_ms=None, warmup=None, samples=[], wall_s=round(time.monotonic() - t0, 2))
        return entry
    entry.update(
        reload_ms=m.reload_ms,
        warmup=m.warmup.to_dict() if m.warmup else None,
        samples=[s.to_dict() for s in m.samples],
        metrics={k: m.metrics[k] for k in ("decode_tps_mean", "decode_tps_sd", "ttft_ms_p95", "latency_ms_mean")},
        wall_s=round(time.monotonic() - t0, 2),
    )
    return entry


def _summary(data: dict[str, Any], out: Path, top: int = 12) -> None:
    """The fastest configs, the slowest runnable ones, and the failed loads by reason."""
    ok = [c for c in data["configs"] if not c.get("error")]
    ok.sort(key=lambda c: -c["metrics"]["decode_tps_mean"])
    shown = ok if len(ok) <= 2 * top else ok[:top] + ok[-3:]
    rows = []
    for c in shown:
        m = c["metrics"]
        tps = [s["decode_tps"] for s in c["samples"]]
        rows.append([1 + ok.index(c), _label(c["config"]), round(m["decode_tps_mean"], 2), f"{100 * cv(tps):.1f}%",
                     round(m["ttft_ms_p95"]), round(c.get("reload_ms") or 0), c["load_average"][0]])
    machine = data["machine"]
    print()
    print(table(["rank", "config", "decode tok/s", "CV", "p95 TTFT ms", "reload ms", "load1"], rows,
                title=f"Recorded grid {out.name} ({data['recorded_at']}): {len(data['configs'])} configs x "
                      f"{data['workload']['repeats']} repeats in {data.get('duration_s', 0):.0f} s, load average "
                      f"{machine.get('load_average_start')} -> {machine.get('load_average_end')}"
                      + (f"; fastest {top} and slowest 3 of {len(ok)} runnable" if shown is not ok else "")))
    failed: dict[str, int] = {}
    for c in data["configs"]:
        if c.get("error"):
            reason = c["error"].rsplit(": ", 1)[-1].rstrip(")")
            failed[reason] = failed.get(reason, 0) + 1
    for reason, n in failed.items():
        print(f"\n{n} configs failed to load: {reason}")
    for c in data["configs"]:
        for old in c.get("superseded", []):
            tps = [x["decode_tps"] for x in old.get("samples", [])]
            print(f"\nmeasured again: {_label(c['config'])} (first: {[round(t, 1) for t in tps]} tok/s "
                  f"at load {old['load_average'][0]}, CV {100 * cv(tps):.0f}%)")
    print(f"\n{out}: {out.stat().st_size / 1e3:.0f} kB")


def show(path: str) -> None:
    """Print the summary of an existing grid file."""
    from tuner.engines.replay import read_grid_json

    _summary(read_grid_json(path), Path(path))


if __name__ == "__main__":
    main()
