"""Measure the buffers llama.cpp allocates when it creates a context (self-contained).

Usage:
    python measure.py MODEL.gguf [--n-ctx 2048] [--n-batch 512] [--n-ubatch 512]
                      [--type-k f16] [--type-v f16] [--flash-attn on|off] [--n-threads 2]
                      [--swa-full on|off|default] [--no-extra-bufts] [--n-gpu-layers 0]

Prints one JSON object: the settings, the parsed sizes (MiB, as llama.cpp prints them), the
GGUF metadata, n_vocab, and the raw matching log lines.

The load runs in a child process (``python measure.py --child ...``) so that llama.cpp's log
(written to stderr by llama-cpp-python's log callback when verbose=True) is captured whole and a
crash cannot take the caller down. From Python: ``measure(path, n_ctx=..., ...) -> dict``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import Any

#: ggml.h's ggml_type values for the KV-cache types.
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
#: Regular expressions for the log lines (llama.cpp, 2025-2026 format). Matched with re.search.
PATTERNS: dict[str, re.Pattern[str]] = {
    # load_tensors:   CPU_Mapped model buffer size =   241.01 MiB
    "model_buffer": re.compile(r"load_tensors: +(\S+) model buffer size = +" + _NUM + r" MiB"),
    # llama_context: n_ctx = 2048   (also n_ctx_seq, n_batch, n_ubatch, n_seq_max, n_outputs_max)
    "cparam": re.compile(r"llama_context: (n_ctx|n_ctx_seq|n_batch|n_ubatch|n_seq_max|n_outputs_max) += (\d+)"),
    # llama_context: flash_attn = enabled
    "flash_attn": re.compile(r"llama_context: flash_attn += (\w+)"),
    # llama_context:        CPU  output buffer size =     1.00 MiB
    "output_buffer": re.compile(r"llama_context: +(\S+) +output buffer size = +" + _NUM + r" MiB"),
    # llama_kv_cache_iswa: creating non-SWA KV cache, size = 2048 cells
    "iswa_create": re.compile(r"llama_kv_cache_iswa: creating +(non-SWA|SWA) KV cache, size = (\d+) cells"),
    # llama_kv_cache:        CPU KV buffer size =     6.00 MiB
    "kv_buffer": re.compile(r"llama_kv_cache: +(\S+) KV buffer size = +" + _NUM + r" MiB"),
    # llama_kv_cache: size =    6.00 MiB (  2048 cells,   3 layers,  1/1 seqs), K (f16):    3.00 MiB, V (f16):    3.00 MiB
    "kv_size": re.compile(
        r"llama_kv_cache: size = +" + _NUM + r" MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
        r"K \((\w+)\): +" + _NUM + r" MiB, V \((\w+)\): +" + _NUM + r" MiB"),
    # sched_reserve:        CPU compute buffer size =   514.50 MiB   (older llama.cpp: "llama_context:")
    "compute_buffer": re.compile(r"^\w+: +(\S+) compute buffer size = +" + _NUM + r" MiB"),
    # ~llama_context:        CPU compute buffer size is 129.0039 MiB, matches expectation of 129.0039 MiB  (DEBUG, at close)
    "compute_buffer_exact": re.compile(
        r"~llama_context: +(\S+) compute buffer size (?:is|of) +" + _NUM + r" MiB, (?:matches|does not match) expectation of +"
        + _NUM + r" MiB"),
    # sched_reserve: graph: nodes = 817, splits = 1, input objects = 4, input tensors = 9
    "graph": re.compile(r"^\w+: graph.*nodes = ([0-9 /]+), splits = ([0-9 /]+)"),
    # llama_kv_cache_iswa: using full-size SWA cache (ref: ...)
    "swa_full": re.compile(r"llama_kv_cache_iswa: using full-size SWA cache"),
    # llama_init_from_model: quantized V cache requires flash_attn to be enabled   (why a load failed)
    "error": re.compile(r"^(?:llama_init_from_model|llama_context|llama_kv_cache\w*|llama_model_load\w*|"
                        r"ggml_\w+|ValueError|RuntimeError): .*(?:requires|failed|error|unable|not enough)", re.I),
    # print_info: n_swa = 512   (selected hyper-parameters)
    "hparam": re.compile(r"print_info: (n_ctx_train|n_embd|n_layer|n_head|n_head_kv|n_swa|n_embd_head_k|n_embd_head_v|"
                         r"n_embd_k_gqa|n_embd_v_gqa|n_ff|n_vocab|file size) += ([0-9.]+)"),
}


def parse_log(text: str) -> dict[str, Any]:
    """Parse llama.cpp's context-creation log into sizes (MiB) and the raw matching lines."""
    out: dict[str, Any] = {
        "model_buffers_mib": {}, "cparams": {}, "flash_attn": None, "output_buffer_mib": {},
        "kv_caches": [], "kv_buffers_mib": [], "kv_total_mib": 0.0, "kv_k_mib": 0.0, "kv_v_mib": 0.0,
        "compute_buffers_mib": {}, "compute_buffers_exact_mib": {}, "graph": None, "swa_full": False,
        "hparams": {}, "errors": [], "lines": [],
    }
    pending_kind: list[str] = []
    for line in text.splitlines():
        for name, pat in PATTERNS.items():
            m = pat.search(line)
            if not m:
                continue
            out["lines"].append(line.rstrip())
            g = m.groups()
            if name == "model_buffer":
                out["model_buffers_mib"][g[0]] = out["model_buffers_mib"].get(g[0], 0.0) + float(g[1])
            elif name == "cparam":
                out["cparams"][g[0]] = int(g[1])
            elif name == "flash_attn":
                out["flash_attn"] = g[0]
            elif name == "output_buffer":
                out["output_buffer_mib"][g[0]] = float(g[1])
            elif name == "iswa_create":
                pending_kind.append(g[0])
            elif name == "kv_buffer":
                out["kv_buffers_mib"].append({"buffer": g[0], "mib": float(g[1])})
            elif name == "kv_size":
                kind = pending_kind.pop(0) if pending_kind else "single"
                cache = {"kind": kind, "mib": float(g[0]), "cells": int(g[1]), "layers": int(g[2]),
                         "seqs": f"{g[3]}/{g[4]}", "type_k": g[5], "k_mib": float(g[6]),
                         "type_v": g[7], "v_mib": float(g[8])}
                out["kv_caches"].append(cache)
                out["kv_total_mib"] += cache["mib"]
                out["kv_k_mib"] += cache["k_mib"]
                out["kv_v_mib"] += cache["v_mib"]
            elif name == "compute_buffer":
                out["compute_buffers_mib"][g[0]] = float(g[1])
            elif name == "compute_buffer_exact":
                out["compute_buffers_exact_mib"][g[0]] = float(g[1])
            elif name == "graph":
                out["graph"] = {"nodes": g[0].strip(), "splits": g[1].strip()}
            elif name == "error":
                out["errors"].append(line.strip())
            elif name == "swa_full":
                out["swa_full"] = True
            elif name == "hparam":
                out["hparams"][g[0].replace(" ", "_")] = float(g[1]) if "." in g[1] else int(g[1])
            break
    for key in ("kv_total_mib", "kv_k_mib", "kv_v_mib"):
        out[key] = round(out[key], 4)
    return out


def _type_id(t: str | int) -> int:
    return t if isinstance(t, int) else GGML_TYPES[t.lower()]


def _child(args: argparse.Namespace) -> None:
    import inspect

    import llama_cpp

    kw: dict[str, Any] = dict(n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                              type_k=_type_id(args.type_k), type_v=_type_id(args.type_v),
                              n_threads=args.n_threads, n_gpu_layers=args.n_gpu_layers, verbose=True)
    if args.swa_full != "default":
        kw["swa_full"] = args.swa_full == "on"
    if args.no_extra_bufts:  # no CPU repack (AMX / REPACK) copies of the weights
        import llama_cpp.llama_cpp as low
        default_params = low.llama_model_default_params

        def _params():  # type: ignore[no-untyped-def]
            p = default_params()
            p.use_extra_bufts = False
            return p
        low.llama_model_default_params = _params
    params = inspect.signature(llama_cpp.Llama.__init__).parameters
    if "flash_attn_type" in params:  # newer bindings: llama.h's enum (-1 auto, 0 off, 1 on)
        kw["flash_attn_type"] = {"auto": -1, "off": 0, "on": 1}[args.flash_attn]
    elif args.flash_attn != "auto":  # 0.3.x: a bool (True -> ENABLED, False -> DISABLED)
        kw["flash_attn"] = args.flash_attn == "on"
    llm = llama_cpp.Llama(model_path=args.model, **kw)
    info = {"n_vocab": llm.n_vocab(), "n_ctx": llm.n_ctx(),
            "metadata": dict(llm.metadata), "llama_cpp_python": getattr(llama_cpp, "__version__", None)}
    llm.close()  # the context destructor logs the exact compute buffer sizes (DEBUG)
    sys.stderr.flush()
    sys.stdout.write("@@MEASURE@@" + json.dumps(info) + "\n")
    sys.stdout.flush()


def measure(model: str, n_ctx: int = 2048, n_batch: int = 512, n_ubatch: int | None = None,
            type_k: str | int = "f16", type_v: str | int = "f16", flash_attn: str = "off",
            n_threads: int = 2, n_gpu_layers: int = 0, swa_full: str = "default",
            no_extra_bufts: bool = False, python: str | None = None,
            timeout: float = 600) -> dict[str, Any]:
    """Load ``model`` once with these settings in a child process; return the parsed sizes."""
    n_ubatch = n_batch if n_ubatch is None else n_ubatch
    cmd = [python or sys.executable, os.path.abspath(__file__), "--child", model,
           "--n-ctx", str(n_ctx), "--n-batch", str(n_batch), "--n-ubatch", str(n_ubatch),
           "--type-k", str(type_k), "--type-v", str(type_v), "--flash-attn", flash_attn,
           "--n-threads", str(n_threads), "--n-gpu-layers", str(n_gpu_layers), "--swa-full", swa_full]
    if no_extra_bufts:
        cmd.append("--no-extra-bufts")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    settings = {"n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "type_k": str(type_k),
                "type_v": str(type_v), "flash_attn": flash_attn, "n_threads": n_threads,
                "n_gpu_layers": n_gpu_layers, "swa_full": swa_full, "no_extra_bufts": no_extra_bufts}
    result: dict[str, Any] = {"settings": settings, "ok": proc.returncode == 0, "returncode": proc.returncode}
    info = None
    for line in proc.stdout.splitlines():
        if line.startswith("@@MEASURE@@"):
            info = json.loads(line[len("@@MEASURE@@"):])
    if info:
        result.update(n_vocab=info["n_vocab"], metadata=info["metadata"],
                      llama_cpp_python=info["llama_cpp_python"])
    result.update(parse_log(proc.stderr))
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-3000:]
    return result


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--n-ubatch", type=int, default=None)
    p.add_argument("--type-k", default="f16")
    p.add_argument("--type-v", default="f16")
    p.add_argument("--flash-attn", choices=("on", "off", "auto"), default="off")
    p.add_argument("--n-threads", type=int, default=2)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--swa-full", choices=("on", "off", "default"), default="default",
                   help="full-size SWA cache (llama.cpp's default is on)")
    p.add_argument("--no-extra-bufts", action="store_true", help="no CPU repacked weight buffers")
    a = p.parse_args(argv)
    if a.n_ubatch is None:
        a.n_ubatch = a.n_batch
    for t in ("type_k", "type_v"):
        v = getattr(a, t)
        setattr(a, t, int(v) if v.isdigit() else v)
    return a


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    if a.child:
        _child(a)
        return
    r = measure(a.model, a.n_ctx, a.n_batch, a.n_ubatch, a.type_k, a.type_v, a.flash_attn,
                a.n_threads, a.n_gpu_layers, a.swa_full, a.no_extra_bufts)
    json.dump(r, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
