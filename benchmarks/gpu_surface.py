"""A synthetic GPU box for the sample-efficiency benchmark, served by the fake Ollama.

The studies run the real product (``run_study`` through the Ollama client) against
``tests/fake_ollama.py`` with ``time_scale=0`` (no sleeping) and this module's speed model
(``speed_fn``); the fake's documented memory model decides what loads and what /api/ps
reports. Every number below is an assumption, chosen to be typical, with the reason:

**The box.** An 8 GiB consumer GPU (RTX 4060 Ti 8 GB class: 288 GB/s) with about 600 MiB
taken by the CUDA context and the desktop, so ``MEMORY_BUDGET_MIB = 7600`` is what a model
may use; 8 physical CPU cores on dual-channel DDR5, about 40 GB/s reachable by llama.cpp's
CPU decode; 32 GiB of RAM.

**The model.** A Gemma 3 4B-like model: 34 blocks (35 offloadable layers with the output),
trained context capped at 32768, K+V cache 136 KiB per token (34 layers x 2 x 4 KV heads x
256 x f16). Four local variants, with Ollama's file sizes (the vision tower included, which is
loaded but not read per token) and the bytes read per generated token (the text weights):

    variant               quant   file MiB   read/token GB   full-offload decode tok/s
    gemma3:4b             Q4_K_M  3147       2.49            81   (288 GB/s x 0.70 / 2.49 GB)
    gemma3:4b-it-qat      Q4_0    3815       2.53            91   (x 0.80: Q4_0 kernels are simpler)
    gemma3:4b-it-q8_0     Q8_0    4768       4.13            57   (x 0.82)
    gemma3:4b-it-fp16     F16     8202       7.77            31.5 (x 0.85; never fits fully)

The kernel efficiencies (share of peak bandwidth a decode step reaches) are typical of
llama.cpp CUDA decode; they make the qat variant the fastest at full offload although it is
not the default tag, as in the issue that asked for this benchmark.

**Decode time per token** (ms), with f the share of the 35 layers on the GPU (the fake's rule
for ``num_gpu``; -1 = auto = at most 20 layers that fit, a conservative estimate):

    gpu   = f x 1000 / FULL_RATE[variant]
    cpu   = (1 - f) x read/token GB / (40 GB/s x eff(threads)) x 1000
    split = 1.5 ms when 0 < f < 1 (graph split: activations cross PCIe every token)
    host  = 0.4 x (1 + 0.5 / threads) ms (sampling, scheduling; threads 0 = auto = 8)
    eff(t)= min(1, t / 6) ** 0.8, x 0.85 above 8 threads (bandwidth saturates near 6 threads)

So one layer left on the CPU costs Q4_0 about 1.8 ms on an 11 ms token (16%): the cliff.
Then decode tok/s = 1000 / (gpu + cpu + split + host), times 1 / (1 + 0.02 log2(num_ctx /
2048)) (a padded KV cache read: 2% per doubling) and 1 - 0.01 |log2(num_batch / 512)|
(batch size hardly moves decode). Prefill is 20x decode, scaled by (min(batch, 512) / 512)**0.4.

**Memory** (the fake's model): VRAM = (file + num_ctx x 136 KiB) x f + num_batch x 0.25 MiB x
(1 + num_ctx / 16384); a config over 7600 MiB fails to load with Ollama's error. So fp16 never
fits fully, q8_0 and qat stop fitting fully at 32k context, q4_K_M at 32k with large batches.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_ollama import FakeModel, FakeOllama, GpuSettings, memory_usage  # noqa: E402

MEMORY_BUDGET_MIB = 7600.0
SYSTEM_MEMORY_MIB = 32768.0
BLOCKS = 34
CPU_GBPS = 40.0
SPLIT_MS = 1.5
HOST_MS = 0.4
AUTO_THREADS = 8
MIB = 1024 * 1024

#: variant -> (quantization, file MiB, GB read per token, full-offload decode tok/s)
VARIANTS: dict[str, tuple[str, int, float, float]] = {
    "gemma3:4b": ("Q4_K_M", 3147, 2.49, 81.0),
    "gemma3:4b-it-qat": ("Q4_0", 3815, 2.53, 91.0),
    "gemma3:4b-it-q8_0": ("Q8_0", 4768, 4.13, 57.0),
    "gemma3:4b-it-fp16": ("F16", 8202, 7.77, 31.5),
}
#: The searched space: the default space for this model and box (tuner.space.default_values)
#: with 8 cores; num_ctx from 2048 (the benchmark prompt needs less, real use more).
SPACE: dict[str, list[Any]] = {
    "num_ctx": [2048, 4096, 8192, 16384, 32768],
    "num_batch": [32, 64, 128, 256, 512, 1024, 2048],
    "num_gpu": list(range(-1, BLOCKS + 2)),
    "num_thread": list(range(0, 9)),
}


def models() -> list[FakeModel]:
    """The four variants as the fake serves them (one weights blob each)."""
    return [FakeModel(name=name, size=mib * MIB, quantization_level=quant, parameter_size="4.3B",
                      parameter_count=4_300_079_472, block_count=BLOCKS, context_length=32768,
                      embedding_length=2560, head_count=8, head_count_kv=4, key_length=256,
                      feed_forward_length=10240, vocab_size=262144, sliding_window=1024, swa_period=6)
            for name, (quant, mib, _, _) in VARIANTS.items()]


_BY_NAME = {m.name: m for m in models()}


def _eff(threads: int) -> float:
    t = threads if threads > 0 else AUTO_THREADS
    e = min(1.0, t / 6) ** 0.8
    return e * 0.85 if t > 8 else e


def speed(name: str, opts: dict[str, Any], budget_mib: float = MEMORY_BUDGET_MIB) -> tuple[float, float]:
    """(prefill, decode) tok/s of ``name`` with resolved runner options ``opts``."""
    m = _BY_NAME[name]
    _, _, read_gb, full_rate = VARIANTS[name]
    layers = memory_usage(m, opts, budget_mib, SYSTEM_MEMORY_MIB, CURRENT)["gpu_layers"]
    f = layers / m.gpu_layers_total
    threads = int(opts.get("num_thread") or 0)
    t_ms = f * 1000 / full_rate + (1 - f) * read_gb / (CPU_GBPS * _eff(threads)) * 1000
    t_ms += SPLIT_MS if 0 < f < 1 else 0.0
    t_ms += HOST_MS * (1 + 0.5 / (threads if threads > 0 else AUTO_THREADS))
    ctx, batch = int(opts["num_ctx"]), int(opts["num_batch"])
    decode = 1000 / t_ms / (1 + 0.02 * math.log2(ctx / 2048)) * (1 - 0.01 * abs(math.log2(batch / 512)))
    return 20 * decode * (min(batch, 512) / 512) ** 0.4, decode


#: Current Ollama's placement: num_gpu unset fits as many layers as memory allows.
CURRENT = GpuSettings(auto_max_layers=None)


def server(budget_mib: float = MEMORY_BUDGET_MIB, gpu: GpuSettings | None = CURRENT) -> FakeOllama:
    """A fake Ollama serving the GPU box with ``budget_mib`` of GPU memory (start it with ``with``)."""
    return FakeOllama(models=models(), pullable=[], time_scale=0, memory_budget_mib=budget_mib,
                      system_memory_mib=SYSTEM_MEMORY_MIB, default_num_ctx=None, gpu=gpu,
                      speed_fn=lambda name, opts: speed(name, opts, budget_mib))


def truth(variant: str, config: dict[str, Any], budget_mib: float = MEMORY_BUDGET_MIB,
          gpu: GpuSettings | None = CURRENT) -> float | None:
    """True decode tok/s of a config, None when it does not load: the server's own resolution
    of what the config leaves unset (the fake's, not started) and its memory model."""
    box = server(budget_mib, gpu)
    if not box.fits(variant, config):
        return None
    return speed(variant, box.runner_options(variant, config), budget_mib)[1]


def optimum(budget_mib: float = MEMORY_BUDGET_MIB, space: dict[str, list[Any]] | None = None,
            gpu: GpuSettings | None = CURRENT) -> tuple[float, dict[str, Any], int, int]:
    """(best decode tok/s, its config, configs that load, configs within 97%) over the space.

    Threads do not change memory: each (variant, ctx, batch, gpu) is checked once."""
    sp = space or SPACE
    box = server(budget_mib, gpu)
    best, arg, loads = -1.0, {}, []
    mem_axes = {k: v for k, v in sp.items() if k != "num_thread"}
    for variant, *values in itertools.product(VARIANTS, *mem_axes.values()):
        cfg = dict(zip(mem_axes, values))
        if not box.fits(variant, cfg):
            continue
        for t in sp.get("num_thread", [0]):
            v = speed(variant, box.runner_options(variant, {**cfg, "num_thread": t}), budget_mib)[1]
            loads.append(v)
            if v > best:
                best, arg = v, {"variant": variant, **cfg, "num_thread": t}
    return best, arg, len(loads), sum(1 for v in loads if v >= 0.97 * best)
