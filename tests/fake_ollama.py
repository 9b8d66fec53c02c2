"""A fake Ollama server for tests: real HTTP on 127.0.0.1, standard library only.

It speaks the wire protocol of Ollama ~v0.33 (docs/api.md in Ollama's repository) well enough for
the official ``ollama`` Python client, and replaces the model with a deterministic
*speed model* so a tuner has a known optimum to find.

Usage::

    with FakeOllama() as fake:
        client = ollama.Client(host=fake.url)
        client.generate(model="gemma3:1b", prompt="hi", options={"num_gpu": 27})

Run standalone: ``python tests/fake_ollama.py --port 11434``.

Behaviour (all durations reported are synthetic integer nanoseconds; the server really sleeps
``duration * time_scale`` so client-side wall clocks are proportional):

* Runner options (num_ctx, num_batch, num_gpu, main_gpu, use_mmap, num_thread) are fixed at
  load. Resolved options = defaults < model Modelfile parameters < request ``options``.
  Models sharing a weights blob share a runner (like the real scheduler, keyed by blob).
  Any runner-option change reloads: the load is appended to ``loads`` and reported as
  ``load_duration = 1.2 s + 0.8 s/GiB of weights (+0.4 s when use_mmap is false)``.
  A warm request reports ``load_duration = 50 µs``. At most ``max_loaded_models`` runners.
* Tokens: :func:`tokenize` splits on whitespace. A prompt is templated gemma-style:
  ``<bos>`` + per message ``<start_of_turn> role <words> <end_of_turn>`` + ``<start_of_turn>
  model``; so a plain generate prompt costs ``count_tokens(prompt) + TEMPLATE_TOKENS``
  (use :func:`prompt_token_count`). A templated prompt of >= num_ctx tokens is truncated
  llama.cpp-style (keep num_keep head tokens + a tail).
* GPU: ``memory_budget_mib`` is the GPU's memory; 0 makes a CPU-only server (every layer on
  the CPU whatever num_gpu asks; /api/ps reports ``size_vram`` 0).
* Hangs: :meth:`FakeOllama.hang` holds requests for a while (a frozen or overloaded server).
* Drift: ``speed_factor`` (default 1) multiplies every config's rates and ``version`` is what
  /api/version answers; both can be changed while it runs (an upgrade that made it slower).
* Prompt cache: per runner, the previous prompt + output tokens are remembered; the common
  prefix with the new prompt is cached (at least one token is always evaluated).
  ``prompt_eval_count`` counts every prompt token, ``prompt_eval_duration`` only the uncached
  ones. A reload clears the cache. Note that the template head (3 tokens) is always shared.
* Generation: ``eval_count = num_predict`` (``done_reason "length"``) when num_predict > 0
  (capped at ``max_predict``), else ``default_predict`` tokens with ``done_reason "stop"``.
  ``prompt_eval_duration = uncached / prefill_tps``, ``eval_duration = eval_count /
  decode_tps``, ``total = load + prefill + eval + 1.5 ms``. First chunk after
  ``(load + prefill) * time_scale``, then tokens spread over ``eval * time_scale``.

* Drafting (Ollama >= 0.31, speculative decoding with a model's MTP heads): a model with
  ``nextn_predict_layers`` > 0 advertises ``<arch>.nextn_predict_layers`` in /api/show and drafts
  ``draft_num_predict`` tokens per step (default 4; 0 = off). Its decode rate is multiplied by
  :func:`draft_speedup`: tokens gained per verification step ``(1 - a^(k+1)) / (1 - a)`` over its cost
  ``1 + 0.12 k``, with acceptance ``a`` = 0.85 on a prompt that asks to copy (holds "copy" or a
  code fence) and 0.35 otherwise. Older versions (``version`` < 0.31) and models without MTP
  ignore the option. ``draft_changes_output=True`` makes drafting change the generated text (from
  the ninth word on), to test the output-identity check; an int N does so only for prompts of more
  than N tokens (batched verification that differs from one token at a time only past some
  context length, as llama.cpp's CPU kernels do: docs/drafting.md); a callable ``f(options)`` only
  where it returns True for the request's options (output kept only with some setting, as
  llama.cpp's flash attention keeps it for short batches).

Speed model (:func:`default_speed`), for a model with P parameters and quantization q::

    L      = GPU layers: num_gpu clamped to [0, block_count+1]; -1 (auto) = min(20, what fits)
    f      = L / (block_count + 1)                  (full offload: num_gpu >= block_count+1)
    eff(t) = 1 / (1 + 0.35 * log2(t/4)^2)           (t = num_thread; 0/auto -> 2; peak at 4)
    ctx    = 1 / (1 + 0.04 * log2(num_ctx/2048))    (mildly decreasing in num_ctx)
    decode = DECODE_BASE[q] * 1e9/P * 1.05 / ((1-f+0.05)/eff + f/3.5)  * ctx * bdec(num_batch)
    prefill= PREFILL_BASE[q] * 1e9/P * 1.05 / ((1-f+0.05)/eff + f/12) * ctx * bpre(num_batch)
    bdec(b)= 1 - 0.015*|log2(b/512)|;  bpre(b) = (min(b,512)/512)^0.4 * (1 - 0.01*log2(max(b,512)/512))
    DECODE_BASE  = Q4_K_M 100, Q4_0 (qat) 95, Q8_0 80, F16 50   (tok/s, CPU only, 4 threads)
    PREFILL_BASE = Q4_K_M 400, Q4_0 390, Q8_0 360, F16 300

Unique optimum under the default models (decode and prefill agree): quantization Q4_K_M
(``gemma3:1b`` == ``gemma3:1b-it-q4_K_M``, same digest), num_gpu = 27 (any value >= 27 is
the same), num_thread = 4, num_batch = 512, and the smallest num_ctx allowed; at num_ctx 2048
that is decode ~312.8 tok/s and prefill ~3150 tok/s (:meth:`FakeOllama.optimum`).

Memory model (:func:`memory_usage`, :func:`memory_parts`; llama.cpp's allocations, which every
GGUF model runs on in current Ollama): the token embedding stays on the CPU and a copy of it is
the output layer, the last offloaded; the blocks share the rest of the file. KV cache per block:
a global layer keeps ``num_ctx x num_parallel`` cells padded to 256, a sliding-window layer (every
layer but each ``swa_period``-th) the window plus one micro-batch; bytes per element by
``GpuSettings.kv_cache_type`` (f16 2, q8_0 34/32, q4_0 18/32). Compute buffer: the larger of the
logits (``num_batch x vocab x 4``, when the output layer is on the GPU) and one layer's attention
(scores ``heads x cells x 4`` per token without flash attention, masks, feed-forward). Plus a
fixed overhead. ``size_vram`` is the GPU part; fully offloaded, ``size == size_vram``.
Unset ``num_ctx``: ``default_num_ctx`` (None: Ollama's VRAM tiers); unset ``num_batch``: 512 up to
8k context, 1024 to 32k, else 2048. ``num_gpu`` -1 (auto): as many layers as fit in the GPU less
``fit_margin_mib`` (capped at ``auto_max_layers``, 20 by default: older Ollama's conservative
estimate; ``GpuSettings(auto_max_layers=None)`` is current Ollama). An explicit ``num_gpu`` that
does not fit fails the load with 500 in the form ``oom_style`` picks ("memory layout cannot be
allocated with num_gpu = N", llama-server's cudaMalloc log with the buffer size, or a bare
"llama-server process has terminated"); a CPU part over ``system_memory_mib`` fails with "model
requires more system memory (X GiB) than is available (Y GiB)".
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MIB = 1024 * 1024
GIB = 1024 * MIB

TEMPLATE_TOKENS = 6
"""Template tokens added around a single-turn prompt: <bos>, 2 opening, 1 closing, 2 model."""

DECODE_BASE = {"Q4_K_M": 100.0, "Q4_0": 95.0, "Q8_0": 80.0, "F16": 50.0}
PREFILL_BASE = {"Q4_K_M": 400.0, "Q4_0": 390.0, "Q8_0": 360.0, "F16": 300.0}
GPU_DECODE_SPEEDUP = 3.5
GPU_PREFILL_SPEEDUP = 12.0
HOST_OVERHEAD = 0.05
AUTO_GPU_LAYERS = 20
AUTO_THREADS = 2
BEST_THREADS = 4

RUNNER_DEFAULTS: dict[str, Any] = {
    "num_ctx": 4096,
    "num_batch": 512,
    "num_gpu": -1,
    "main_gpu": 0,
    "use_mmap": None,
    "num_thread": 0,
}
RUNNER_KEYS = tuple(RUNNER_DEFAULTS)
PREDICT_DEFAULTS: dict[str, Any] = {
    "num_keep": 4,
    "seed": -1,
    "num_predict": -1,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "temperature": 0.8,
    "repeat_penalty": 1.1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "stop": None,
    "draft_num_predict": None,
}
OPTION_TYPES: dict[str, str] = {
    "num_ctx": "integer",
    "num_batch": "integer",
    "num_gpu": "integer",
    "main_gpu": "integer",
    "use_mmap": "boolean",
    "num_thread": "integer",
    "num_keep": "integer",
    "seed": "integer",
    "num_predict": "integer",
    "top_k": "integer",
    "top_p": "float32",
    "min_p": "float32",
    "typical_p": "float32",
    "repeat_last_n": "integer",
    "temperature": "float32",
    "repeat_penalty": "float32",
    "presence_penalty": "float32",
    "frequency_penalty": "float32",
    "stop": "array",
    "draft_num_predict": "integer",
}
#: The first version that drafts (draft_num_predict), and its draft length when none is sent.
DRAFT_MIN_VERSION = (0, 31)
DRAFT_DEFAULT = 4

DEFAULT_FAIL_ERROR = "llama-server process has terminated: exit status 2"
PULL_MISSING_ERROR = "pull model manifest: file does not exist"
GEMMA_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    "{{- if or (eq .Role \"user\") (eq .Role \"system\") }}<start_of_turn>user\n"
    "{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}\n"
    "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n"
    "{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}\n{{- end }}\n{{- end }}"
)
LLAMA_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_VOCAB = (
    "the model runs fast on small hardware when every layer fits in memory and the "
    "batch is tuned so tokens flow quickly through cache while threads stay busy"
).split()
_FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


def tokenize(text: str) -> list[str]:
    """Split text into fake tokens: one per whitespace-separated word."""
    return text.split()


def count_tokens(text: str) -> int:
    """Number of fake tokens in ``text`` (no template tokens)."""
    return len(tokenize(text))


def render_tokens(messages: Iterable[dict[str, Any]]) -> list[str]:
    """Templated prompt tokens for chat-style messages (gemma-like template)."""
    toks = ["<bos>"]
    for msg in messages:
        toks += ["<start_of_turn>", str(msg.get("role") or "user")]
        toks += tokenize(str(msg.get("content") or ""))
        toks.append("<end_of_turn>")
    return toks + ["<start_of_turn>", "model"]


def generate_messages(prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    """Messages that /api/generate renders for a prompt (and optional system prompt)."""
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    return msgs


def prompt_token_count(
    prompt: str | None = None,
    *,
    system: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    raw: bool = False,
) -> int:
    """Expected ``prompt_eval_count`` for a generate prompt or chat messages (untruncated)."""
    if messages is not None:
        return len(render_tokens(messages))
    if raw:
        return count_tokens(prompt or "")
    return len(render_tokens(generate_messages(prompt or "", system)))


def _hex(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


@dataclass
class FakeModel:
    """A model the fake knows about (installed or pullable)."""

    name: str
    digest: str = ""
    size: int = 815_319_791
    family: str = "gemma3"
    parameter_size: str = "999.89M"
    quantization_level: str = "Q4_K_M"
    block_count: int = 26
    context_length: int = 32768
    architecture: str = "gemma3"
    parameter_count: int = 999_885_952
    embedding_length: int = 1152
    #: Attention shape (/api/show model_info): KV heads, key/value length, query heads, FFN
    #: width, vocabulary; sliding-window layers keep ``sliding_window`` tokens, every
    #: ``swa_period``-th layer is global (0: no sliding window).
    head_count: int = 4
    head_count_kv: int = 1
    key_length: int = 256
    feed_forward_length: int = 6912
    vocab_size: int = 262144
    sliding_window: int = 512
    swa_period: int = 6
    #: Bytes per weight of the output layer (the token embedding, tied): None = size / params.
    output_bytes_per_weight: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str = GEMMA_TEMPLATE
    system: str = ""
    license: str = "Gemma Terms of Use"
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    #: Multi-token-prediction layers (GGUF ``<arch>.nextn_predict_layers``): > 0 drafts.
    nextn_predict_layers: int = 0
    modified_at: datetime | None = None
    blob: str = ""

    def __post_init__(self) -> None:
        self.name = normalize_name(self.name)
        if not self.digest:
            self.digest = _hex("manifest", self.name)
        if not self.blob:
            self.blob = _hex("weights", self.digest)

    @property
    def gpu_layers_total(self) -> int:
        """Layers for a full offload: repeating blocks plus the output layer."""
        return self.block_count + 1

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K+V bytes per token over all layers, as if every layer were global."""
        return self.block_count * 2 * self.head_count_kv * self.key_length * 2

    def details(self) -> dict[str, Any]:
        """The ``details`` object of /api/tags, /api/show and /api/ps."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def normalize_name(name: str) -> str:
    """Add ``:latest`` when a name has no tag (as Ollama does)."""
    name = name.strip()
    if name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def default_models() -> list[FakeModel]:
    """The default installed models: five gemma3:1b tags plus llama3.2:3b."""
    base = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)
    gemma_params = {"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95}
    q4_digest = "8648f39daa8fbf5b18c7b4e6a8fb4990c692751d49917417b8842ca5758e7ffc"
    q4_blob = _hex("weights", q4_digest)

    def gemma(name: str, quant: str, size: int, minutes: int, **kw: Any) -> FakeModel:
        return FakeModel(
            name=name,
            size=size,
            quantization_level=quant,
            parameters=dict(gemma_params),
            modified_at=base + timedelta(minutes=minutes),
            **kw,
        )

    return [
        gemma("gemma3:1b", "Q4_K_M", 815_319_791, 50, digest=q4_digest, blob=q4_blob),
        gemma("gemma3:1b-it-q4_K_M", "Q4_K_M", 815_319_791, 40, digest=q4_digest, blob=q4_blob),
        gemma("gemma3:1b-it-qat", "Q4_0", 1_000_305_357, 30),
        gemma("gemma3:1b-it-q8_0", "Q8_0", 1_069_711_651, 20),
        gemma("gemma3:1b-it-fp16", "F16", 2_004_566_435, 10),
        FakeModel(
            name="llama3.2:3b",
            size=2_019_393_189,
            family="llama",
            parameter_size="3.2B",
            quantization_level="Q4_K_M",
            block_count=28,
            context_length=131072,
            architecture="llama",
            parameter_count=3_212_749_888,
            embedding_length=3072,
            head_count=24,
            head_count_kv=8,
            key_length=128,
            feed_forward_length=8192,
            vocab_size=128256,
            sliding_window=0,
            swa_period=0,
            parameters={"stop": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
            template=LLAMA_TEMPLATE,
            license="LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
            capabilities=["completion", "tools"],
            modified_at=base,
        ),
    ]


def mtp_model(name: str = "qwen3.6:27b-mtp") -> FakeModel:
    """A model with one MTP layer (drafts on Ollama >= 0.31), of its own family."""
    return FakeModel(name=name, family="qwen35", architecture="qwen35", parameter_size="1.0B",
                     nextn_predict_layers=1, sliding_window=0, swa_period=0,
                     modified_at=datetime(2026, 7, 2, 12, 0, tzinfo=timezone.utc))


def draft_acceptance(prompt: str) -> float:
    """The share of drafted tokens accepted for a prompt: high where the answer copies it."""
    return 0.85 if ("copy" in prompt.lower() or "```" in prompt) else 0.35


def draft_speedup(k: int, acceptance: float) -> float:
    """Decode speed-up of drafting ``k`` tokens per step at ``acceptance`` (1 when k is 0)."""
    if k <= 0:
        return 1.0
    gained = (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return gained / (1 + 0.12 * k)


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split("-")[0].split("."))
    except ValueError:
        return (0,)


# ----------------------------------------------------------------------------- speed & memory


def _int_opt(opts: dict[str, Any], key: str) -> int:
    value = opts.get(key, RUNNER_DEFAULTS.get(key))
    return int(value) if value is not None else 0


@dataclass(frozen=True)
class GpuSettings:
    """Server-level settings that change memory (``ollama serve`` environment), and how the
    fake places layers and words a failed load."""

    kv_cache_type: str = "f16"
    num_parallel: int = 1
    flash_attention: bool = False
    #: Auto placement (num_gpu unset or -1) keeps this much of the GPU free (llama.cpp's fit target).
    fit_margin_mib: float = 512.0
    #: Auto placement puts at most this many layers on the GPU: older Ollama's conservative
    #: estimate, kept as the default so the defaults leave room to tune. None: as many as fit
    #: (current Ollama, v0.30+: llama.cpp's fit logic), as the memory-tight tests and benchmark use.
    auto_max_layers: int | None = AUTO_GPU_LAYERS
    #: CUDA context and small buffers, counted in size_vram.
    overhead_mib: float = 150.0
    #: How a load that does not fit on the GPU fails: "layout" (Ollama's scheduler: "memory
    #: layout cannot be allocated with num_gpu = N"), "cuda" (llama-server's log with the
    #: buffer it could not allocate), "terminated" (no numbers), "rotate" (by config).
    oom_style: str = "layout"


#: Bytes per element of the KV cache types (ggml blocks: q8_0 34 bytes per 32, q4_0 18 per 32).
KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def _pad256(n: int) -> int:
    return (max(1, n) + 255) // 256 * 256


def memory_parts(model: FakeModel, opts: dict[str, Any], layers: int,
                 gpu: GpuSettings | None = None) -> dict[str, float]:
    """GPU and CPU MiB of ``model`` with ``layers`` offloaded, by part (llama.cpp's allocations).

    Weights: the token embedding stays on the CPU and a copy of it is the output layer, the
    last one offloaded; the blocks share the rest. KV cache: per block, a global layer keeps
    ``num_ctx x num_parallel`` cells (padded to 256), a sliding-window layer the window per
    sequence plus one micro-batch. Compute buffer (on the GPU when any layer is): the largest
    stage of one micro-batch (``num_batch``): attention scores over the cache (none with flash
    attention), the feed-forward activations, the logits (when the output layer is on the GPU).
    """
    g = gpu or GpuSettings()
    total = model.gpu_layers_total
    blocks = model.block_count
    layers = max(0, min(layers, total))
    num_ctx = max(1, min(_int_opt(opts, "num_ctx"), model.context_length))
    ub = max(1, _int_opt(opts, "num_batch"))
    par = max(1, g.num_parallel)
    bpw = model.output_bytes_per_weight or model.size / max(1, model.parameter_count)
    emb = model.vocab_size * model.embedding_length * bpw / MIB
    block_w = (model.size / MIB - emb) / blocks
    gpu_blocks = min(layers, blocks)
    width = KV_TYPE_BYTES.get(g.kv_cache_type, 2.0)
    per_cell = 2 * model.head_count_kv * model.key_length * width / MIB
    full_cells = _pad256(num_ctx * par)
    swa_cells = min(full_cells, _pad256(model.sliding_window * par + ub)) if model.sliding_window else full_cells
    kv_layers = [(swa_cells if model.swa_period and (i + 1) % model.swa_period else full_cells) * per_cell
                 for i in range(blocks)]
    # The last blocks are offloaded first.
    kv_gpu = sum(kv_layers[blocks - gpu_blocks:]) if gpu_blocks else 0.0
    kv_cpu = sum(kv_layers) - kv_gpu
    # The peak of the graph's stages (llama.cpp's allocator reuses memory between them).
    ff, embd = model.feed_forward_length, model.embedding_length
    if g.flash_attention:
        attn = ub * (2 * (full_cells + swa_cells) + 16 * ff + 4 * embd + 1100) / MIB
    else:
        attn = ub * (4 * model.head_count * full_cells + 4 * (full_cells + swa_cells) + 8 * ff + 4 * embd + 1100) / MIB
    logits = ub * (model.vocab_size * 4 + 8 * embd) / MIB if layers >= total else 0.0
    compute = max(attn, logits) if layers > 0 else 0.0
    cpu_compute = ub * model.embedding_length * 4 * 4 / MIB + (ub * model.vocab_size * 4 / MIB if layers < total else 0.0)
    weights_gpu = block_w * gpu_blocks + (emb if layers >= total else 0.0)
    gpu_mib = weights_gpu + kv_gpu + compute + (g.overhead_mib if layers > 0 else 0.0)
    # Fully offloaded, Ollama counts everything on the GPU (size == size_vram, "100% GPU").
    cpu_mib = 0.0 if layers >= total else emb + block_w * (blocks - gpu_blocks) + kv_cpu + cpu_compute
    return {"gpu_mib": gpu_mib, "cpu_mib": cpu_mib, "weights_gpu_mib": weights_gpu, "kv_gpu_mib": kv_gpu,
            "compute_gpu_mib": compute, "kv_mib": sum(kv_layers)}


def memory_usage(
    model: FakeModel,
    opts: dict[str, Any],
    memory_budget_mib: float = 6000,
    system_memory_mib: float = 16000,
    gpu: GpuSettings | None = None,
) -> dict[str, Any]:
    """Memory needed for ``opts``: gpu/cpu MiB, GPU layers used and the OOM error (or None).

    num_gpu unset or -1: the server places as many layers as fit in the GPU less the fit margin
    (current Ollama hands placement to llama.cpp's fit logic); an explicit num_gpu that does
    not fit fails the load instead of spilling.
    """
    g = gpu or GpuSettings()
    total_layers = model.gpu_layers_total
    num_gpu = _int_opt(opts, "num_gpu")

    def split(layers: int) -> tuple[float, float]:
        parts = memory_parts(model, opts, layers, g)
        return parts["gpu_mib"], parts["cpu_mib"]

    if memory_budget_mib <= 0:
        # No GPU: Ollama runs every layer on the CPU whatever num_gpu asks.
        layers = 0
    elif num_gpu < 0:
        layers = total_layers if g.auto_max_layers is None else min(g.auto_max_layers, total_layers)
        while layers > 0 and split(layers)[0] > memory_budget_mib - g.fit_margin_mib:
            layers -= 1
    else:
        layers = min(num_gpu, total_layers)
    gpu_mib, cpu = split(layers)
    error: str | None = None
    if num_gpu >= 0 and layers > 0 and gpu_mib > memory_budget_mib:
        error = _gpu_oom(g.oom_style, num_gpu, gpu_mib, memory_budget_mib, opts)
    elif cpu > system_memory_mib:
        error = (
            f"model requires more system memory ({_human_bytes(cpu * MIB)}) "
            f"than is available ({_human_bytes(system_memory_mib * MIB)})"
        )
    return {"gpu_mib": gpu_mib, "cpu_mib": cpu, "gpu_layers": layers, "error": error}


def _gpu_oom(style: str, num_gpu: int, need_mib: float, budget_mib: float, opts: dict[str, Any]) -> str:
    """The text of a load that did not fit on the GPU, in one of the forms Ollama gives."""
    forms = ("layout", "cuda", "terminated")
    if style == "rotate":
        style = forms[zlib.crc32(json.dumps(opts, sort_keys=True, default=str).encode()) % len(forms)]
    if style == "cuda":
        # llama.cpp names the buffer it failed to allocate: what was left, not the whole need.
        short = max(1.0, need_mib - budget_mib)
        return ("llama-server process has terminated: ggml_backend_cuda_buffer_type_alloc_buffer: allocating "
                f"{short + 64:.2f} MiB on device 0: cudaMalloc failed: out of memory")
    if style == "terminated":
        return "llama-server process has terminated: error loading model: unable to allocate CUDA0 buffer"
    return f"memory layout cannot be allocated with num_gpu = {num_gpu}"


def _human_bytes(b: float) -> str:
    """Go's format.HumanBytes2."""
    if b >= GIB:
        return f"{b / GIB:.1f} GiB"
    if b >= MIB:
        return f"{b / MIB:.1f} MiB"
    if b >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{int(b)} B"


def thread_efficiency(num_thread: int) -> float:
    """CPU efficiency of a thread count: peaks at 4, auto (<= 0) behaves like 2."""
    t = num_thread if num_thread > 0 else AUTO_THREADS
    return 1.0 / (1.0 + 0.35 * math.log2(t / BEST_THREADS) ** 2)


def default_speed(
    model: FakeModel,
    opts: dict[str, Any],
    memory_budget_mib: float = 6000,
    system_memory_mib: float = 16000,
    gpu: GpuSettings | None = None,
) -> tuple[float, float]:
    """(prefill_tps, decode_tps) of the documented speed model for resolved runner options."""
    layers = memory_usage(model, opts, memory_budget_mib, system_memory_mib, gpu)["gpu_layers"]
    frac = layers / model.gpu_layers_total
    eff = thread_efficiency(_int_opt(opts, "num_thread"))
    num_ctx = max(1, min(_int_opt(opts, "num_ctx"), model.context_length))
    num_batch = max(1, _int_opt(opts, "num_batch"))
    ctx = 1.0 / (1.0 + 0.04 * math.log2(num_ctx / 2048))
    scale = 1e9 / model.parameter_count
    cpu_time = (1 - frac + HOST_OVERHEAD) / eff
    decode = DECODE_BASE.get(model.quantization_level, 60.0) * scale
    decode *= (1 + HOST_OVERHEAD) / (cpu_time + frac / GPU_DECODE_SPEEDUP)
    decode *= ctx * (1 - 0.015 * abs(math.log2(num_batch / 512)))
    prefill = PREFILL_BASE.get(model.quantization_level, 250.0) * scale
    prefill *= (1 + HOST_OVERHEAD) / (cpu_time + frac / GPU_PREFILL_SPEEDUP)
    prefill *= ctx * (min(num_batch, 512) / 512) ** 0.4
    prefill *= 1 - 0.01 * math.log2(max(num_batch, 512) / 512)
    return prefill, decode


# ----------------------------------------------------------------------------- helpers


def _rfc3339(ns: int | None = None, *, utc: bool = True) -> str:
    """Go's RFC3339Nano time format (trailing zeros of the fraction trimmed)."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    dt = datetime.fromtimestamp(secs, timezone.utc)
    if not utc:
        dt = dt.astimezone()
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    offset = dt.utcoffset() or timedelta(0)
    if offset == timedelta(0):
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _dt_ns(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """keep_alive in seconds (negative = forever, None = default); ValueError if invalid."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("json: cannot unmarshal bool into Go value of type api.Duration")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value)
    body = text.lstrip("+-")
    sign = -1.0 if text.startswith("-") else 1.0
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def check_options(opts: Any) -> tuple[dict[str, Any], str | None]:
    """Validate options like Go's Options.FromMap: known keys coerced, unknown ignored."""
    out: dict[str, Any] = {}
    if opts is None:
        return out, None
    if not isinstance(opts, dict):
        return out, "json: cannot unmarshal options into Go value of type map[string]interface {}"
    for key, val in opts.items():
        kind = OPTION_TYPES.get(key)
        if kind is None or val is None:
            continue
        number = isinstance(val, (int, float)) and not isinstance(val, bool)
        if kind == "integer":
            if not number:
                return out, f'option "{key}" must be of type integer'
            out[key] = int(val)
        elif kind == "float32":
            if not number:
                return out, f'option "{key}" must be of type float32'
            out[key] = float(val)
        elif kind == "boolean":
            if not isinstance(val, bool):
                return out, f'option "{key}" must be of type boolean'
            out[key] = val
        else:
            if not isinstance(val, list):
                return out, f'option "{key}" must be of type array'
            if not all(isinstance(item, str) for item in val):
                return out, f'option "{key}" must be of an array of strings'
            out[key] = list(val)
    return out, None


def _go_value(value: Any) -> str:
    """Go's %#v for JSON-decoded values (numbers are float64 in Go)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(int(value)) if float(value).is_integer() else repr(float(value))
    return json.dumps(value)


def format_parameters(params: dict[str, Any]) -> str:
    """The ``parameters`` string of /api/show: ``%-30s %#v`` lines, lists one line per item."""
    lines = []
    for key in sorted(params):
        values = params[key] if isinstance(params[key], list) else [params[key]]
        lines += [f"{key:<30} {_go_value(v)}" for v in values]
    return "\n".join(lines)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class _Runner:
    """A loaded model runner (one per weights blob)."""

    model: FakeModel
    options: dict[str, Any]
    expires_ns: int
    cache: list[str] = field(default_factory=list)
    last_used: float = 0.0


@dataclass
class _Injection:
    """Pending failure injections."""

    fail: list[tuple[int, str]] = field(default_factory=list)
    truncate: list[tuple[int, bool]] = field(default_factory=list)
    malformed: int = 0


class _Exchange:
    """Response helpers around one request handler."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.h = handler
        self.started = False

    def send(self, status: int, body: bytes, content_type: str, head: bool = False) -> None:
        """Send a complete response with Content-Length."""
        self.h.send_response(status)
        self.h.send_header("Content-Type", content_type)
        self.h.send_header("Content-Length", str(len(body)))
        self.h.end_headers()
        if not head:
            self.h.wfile.write(body)

    def json(self, status: int, obj: Any, head: bool = False) -> None:
        """Send a JSON response."""
        self.send(status, _dumps(obj), "application/json; charset=utf-8", head)

    def error(self, status: int, message: str) -> None:
        """Send ``{"error": message}``."""
        self.json(status, {"error": message})

    def start_stream(self) -> None:
        """Start a chunked NDJSON response."""
        self.h.send_response(200)
        self.h.send_header("Content-Type", "application/x-ndjson")
        self.h.send_header("Transfer-Encoding", "chunked")
        self.h.end_headers()
        self.started = True

    def line(self, obj: Any) -> None:
        """Write one NDJSON line as a chunk (``obj`` may be raw bytes)."""
        data = obj if isinstance(obj, bytes) else _dumps(obj) + b"\n"
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        """Terminate the chunked body."""
        self.h.wfile.write(b"0\r\n\r\n")

    def abort(self) -> None:
        """Drop the connection without terminating the body."""
        self.h.close_connection = True
        try:
            self.h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Handler(BaseHTTPRequestHandler):
    """Routes HTTP requests to the FakeOllama instance."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeOllama"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence request logging."""

    def _go(self) -> None:
        try:
            self.server.fake._dispatch(self)  # type: ignore[attr-defined]
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _go


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up (a killed stream, a stopped test) are normal here, not errors."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class FakeOllama:
    """A fake Ollama server with a deterministic speed model and failure injection."""

    def __init__(
        self,
        *,
        version: str = "0.33.1",
        models: list[FakeModel] | None = None,
        pullable: list[FakeModel] | None = None,
        time_scale: float = 0.002,
        memory_budget_mib: float = 6000,
        system_memory_mib: float = 16000,
        default_num_ctx: int | None = 4096,
        gpu: GpuSettings | None = None,
        max_loaded_models: int = 1,
        default_predict: int = 128,
        max_predict: int = 4096,
        prompt_cache: bool = True,
        speed_fn: Callable[[str, dict[str, Any]], tuple[float, float]] | None = None,
        fits_fn: Callable[[str, dict[str, Any]], bool] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        speed_factor: float = 1.0,
        draft_changes_output: bool | int | Callable[[dict[str, Any]], bool] = False,
    ) -> None:
        #: Both settable while the server runs: ``/api/version`` answers ``version``, and every
        #: config's decode and prefill rates are multiplied by ``speed_factor`` (0.8: 20% slower).
        self.version = version
        self.speed_factor = speed_factor
        self.draft_changes_output = draft_changes_output
        self.time_scale = time_scale
        self.memory_budget_mib = memory_budget_mib
        self.system_memory_mib = system_memory_mib
        #: None: current Ollama's VRAM tiers (4096 below 24 GiB, 32768 below 48 GiB, else 262144).
        self.default_num_ctx = default_num_ctx
        self.gpu = gpu or GpuSettings()
        self.max_loaded_models = max_loaded_models
        self.default_predict = default_predict
        self.max_predict = max_predict
        self.prompt_cache = prompt_cache
        self.speed_fn = speed_fn
        self.fits_fn = fits_fn
        self.host = host
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.loads: list[dict[str, Any]] = []
        self.failed_loads: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._models: dict[str, FakeModel] = {}
        for m in default_models() if models is None else models:
            self.add_model(m)
        source = default_models() if pullable is None else pullable
        self._pullable = {m.name: m for m in source}
        self._runners: dict[str, _Runner] = {}
        self._inject = _Injection()
        self._hang_until = 0.0
        self._hang_seconds = 0.0
        self._hang_after = 0
        self._hang_paths: set[str] | None = None
        self._released = threading.Event()
        self._sched = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (valid after start)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeOllama:
        """Start serving in a daemon thread (reuses the previous port after a stop)."""
        if self._server is not None:
            return self
        self._released = threading.Event()
        server = _QuietServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections; loaded runners are forgotten."""
        server, self._server = self._server, None
        if server is None:
            return
        self._released.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
            self._runners.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # ------------------------------------------------------------------ inspection helpers

    def generate_requests(self) -> list[dict[str, Any]]:
        """Bodies of every /api/generate and /api/chat request received."""
        with self._lock:
            return [
                r["body"] for r in self.requests if r["path"] in ("/api/generate", "/api/chat")
            ]

    def prompt_requests(self) -> list[dict[str, Any]]:
        """Bodies of generate/chat requests that carried a prompt (not load or unload calls)."""
        return [b for b in self.generate_requests() if (b or {}).get("prompt") or (b or {}).get("messages")]

    def loaded_models(self) -> list[dict[str, Any]]:
        """Currently loaded runners: model name, runner options, expiry (ns since epoch)."""
        with self._lock:
            self._expire()
            return [
                {"model": r.model.name, "options": dict(r.options), "expires_ns": r.expires_ns}
                for r in self._runners.values()
            ]

    def unload_all(self) -> None:
        """Unload every runner (prompt caches are lost)."""
        with self._lock:
            self._runners.clear()

    def clear_history(self) -> None:
        """Forget recorded requests and loads."""
        with self._lock:
            self.requests.clear()
            self.loads.clear()
            self.failed_loads.clear()

    def add_model(self, model: FakeModel) -> None:
        """Install (or replace) a model."""
        with self._lock:
            if model.modified_at is None:
                model.modified_at = datetime.now(timezone.utc)
            self._models[model.name.lower()] = model

    def get_model(self, name: str) -> FakeModel | None:
        """The installed model called ``name`` (tag defaults to latest), or None."""
        with self._lock:
            return self._models.get(normalize_name(name).lower())

    def model_names(self) -> list[str]:
        """Names of installed models."""
        with self._lock:
            return [m.name for m in self._models.values()]

    # ------------------------------------------------------------------ failure injection

    def fail_next(self, n: int = 1, status: int = 500, error: str = DEFAULT_FAIL_ERROR) -> None:
        """Make the next ``n`` generate/chat requests fail with ``status`` and ``{"error"}``.

        Applied after the model lookup; a 500 also unloads the model (runner crash).
        """
        with self._lock:
            self._inject.fail += [(status, error)] * n

    def truncate_next_stream(self, after_chunks: int = 2, *, clean: bool = False) -> None:
        """Make the next streaming generate/chat stop after ``after_chunks`` token chunks.

        The connection is dropped mid-body (httpx raises RemoteProtocolError); with
        ``clean=True`` the body ends properly but without the ``done: true`` object.
        """
        with self._lock:
            self._inject.truncate.append((after_chunks, clean))

    def hang(self, seconds: float, paths: Iterable[str] | None = None, after_generates: int = 0) -> None:
        """Stop answering for ``seconds``, like a frozen or overloaded server.

        Requests to ``paths`` (every path when None) that arrive in that time are held until it
        ends (or the server stops) and only then handled. The hang starts now, or once
        ``after_generates`` more generate/chat requests have arrived. ``hang(0)`` ends a hang.
        """
        with self._lock:
            self._hang_seconds = seconds
            self._hang_after = after_generates
            self._hang_until = time.monotonic() + seconds if after_generates <= 0 else 0.0
            self._hang_paths = None if paths is None else set(paths)

    def malformed_next(self) -> None:
        """Make the next generate/chat response (stream or not) start with invalid JSON."""
        with self._lock:
            self._inject.malformed += 1

    # ------------------------------------------------------------------ speed model

    def resolve_options(
        self, model: str | FakeModel, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Full options: defaults < Modelfile parameters < ``options`` (raises ValueError)."""
        m = model if isinstance(model, FakeModel) else self._require(model)
        merged: dict[str, Any] = {**RUNNER_DEFAULTS, "num_ctx": self.context_default(m)}
        merged.update(PREDICT_DEFAULTS)
        batch_given = False
        for source in (m.parameters, options):
            checked, err = check_options(source)
            if err:
                raise ValueError(err)
            merged.update(checked)
            batch_given = batch_given or "num_batch" in checked
        if not batch_given:
            # v0.30+: an unset num_batch grows with the context.
            ctx = int(merged["num_ctx"])
            merged["num_batch"] = 512 if ctx <= 8192 else 1024 if ctx <= 32768 else 2048
        return merged

    def context_default(self, m: FakeModel) -> int:
        """num_ctx when nothing sets it: the server's, else the VRAM tier (capped at the model's)."""
        if self.default_num_ctx is not None:
            return self.default_num_ctx
        gib = self.memory_budget_mib / 1024
        tier = 4096 if gib < 24 else 32768 if gib < 48 else 262144
        return min(tier, m.context_length)

    def runner_options(self, model: str | FakeModel, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Only the runner (load-time) part of :meth:`resolve_options`."""
        full = self.resolve_options(model, options)
        return {k: full[k] for k in RUNNER_KEYS}

    def speed(self, model: str, options: dict[str, Any] | None = None) -> tuple[float, float]:
        """(prefill_tps, decode_tps) for a model and (partial) options."""
        m = self._require(model)
        opts = self.runner_options(m, options)
        if self.speed_fn is not None:
            prefill, decode = self.speed_fn(m.name, opts)
        else:
            prefill, decode = default_speed(m, opts, self.memory_budget_mib, self.system_memory_mib, self.gpu)
        return prefill * self.speed_factor, decode * self.speed_factor

    def draft_length(self, m: FakeModel, opts: dict[str, Any]) -> int:
        """Tokens drafted per step for resolved options: 0 on old versions and models without MTP."""
        if _version(self.version) < DRAFT_MIN_VERSION or m.nextn_predict_layers <= 0:
            return 0
        value = opts.get("draft_num_predict")
        return DRAFT_DEFAULT if value is None else max(0, int(value))

    def fits(self, model: str, options: dict[str, Any] | None = None) -> bool:
        """Whether the model loads with these options under the memory budgets."""
        return self._oom_error(self._require(model), self.runner_options(model, options)) is None

    def memory(self, model: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Memory usage of the default memory model (see :func:`memory_usage`)."""
        m = self._require(model)
        return memory_usage(
            m, self.runner_options(m, options), self.memory_budget_mib, self.system_memory_mib, self.gpu
        )

    @staticmethod
    def optimum(
        *,
        models: list[FakeModel] | None = None,
        num_ctx: Iterable[int] = (2048, 4096, 8192, 16384, 32768),
        num_batch: Iterable[int] = (64, 128, 256, 512, 1024, 2048),
        num_gpu: Iterable[int] = (-1, 0, 8, 16, 20, 24, 27),
        num_thread: Iterable[int] = (0, 1, 2, 4, 6, 8),
        objective: str = "decode",
        memory_budget_mib: float = 6000,
        system_memory_mib: float = 16000,
    ) -> dict[str, Any]:
        """Best fitting config of the default speed model over a grid (default: gemma3 tags).

        ``objective`` is "decode" or "prefill". With the defaults the answer is
        gemma3:1b (Q4_K_M), num_gpu 27, num_thread 4, num_batch 512, num_ctx 2048.
        """
        pool = models if models is not None else [m for m in default_models() if m.family == "gemma3"]
        index = 1 if objective == "decode" else 0
        best: dict[str, Any] | None = None
        best_key: tuple[float, float] = (-1.0, -1.0)
        for m, ctx, batch, gpu, thr in itertools.product(
            pool, list(num_ctx), list(num_batch), list(num_gpu), list(num_thread)
        ):
            opts = {**RUNNER_DEFAULTS, "num_ctx": ctx, "num_batch": batch, "num_gpu": gpu, "num_thread": thr}
            if memory_usage(m, opts, memory_budget_mib, system_memory_mib)["error"]:
                continue
            speeds = default_speed(m, opts, memory_budget_mib, system_memory_mib)
            key = (speeds[index], speeds[1 - index])
            if key > best_key:
                best_key = key
                best = {
                    "model": m.name,
                    "quantization_level": m.quantization_level,
                    "num_ctx": ctx,
                    "num_batch": batch,
                    "num_gpu": gpu,
                    "num_thread": thr,
                    "prefill_tps": speeds[0],
                    "decode_tps": speeds[1],
                }
        if best is None:
            raise ValueError("no configuration fits")
        return best

    # ------------------------------------------------------------------ internals

    def _require(self, name: str) -> FakeModel:
        model = self.get_model(name)
        if model is None:
            raise KeyError(f"model '{name}' not found")
        return model

    def _oom_error(self, model: FakeModel, opts: dict[str, Any]) -> str | None:
        usage = memory_usage(model, opts, self.memory_budget_mib, self.system_memory_mib, self.gpu)
        error: str | None = usage["error"]
        if self.fits_fn is None:
            return error
        if self.fits_fn(model.name, opts):
            return None
        if error:
            return error
        if opts.get("num_gpu", -1) >= 0:
            return f"memory layout cannot be allocated with num_gpu = {opts['num_gpu']}"
        return (
            f"model requires more system memory ({_human_bytes(usage['cpu_mib'] * MIB)}) "
            f"than is available ({_human_bytes(self.system_memory_mib * MIB)})"
        )

    def _expire(self) -> None:
        now = time.time_ns()
        for key in [k for k, r in self._runners.items() if r.expires_ns <= now]:
            del self._runners[key]

    def _sleep_until(self, start: float, synthetic_ns: float) -> None:
        if self.time_scale <= 0:
            return
        delay = start + synthetic_ns * 1e-9 * self.time_scale - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path.split("?", 1)[0]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body: Any = None
        bad_json: str | None = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as exc:
                bad_json = f"invalid character in JSON: {exc}"
        with self._lock:
            self.requests.append({"method": method, "path": path, "body": body, "time": time.time()})
            until, hang_paths = self._hang_until, self._hang_paths
            if self._hang_after > 0 and path in ("/api/generate", "/api/chat"):
                self._hang_after -= 1
                if self._hang_after == 0:
                    # This request is the last one answered; everything after it hangs.
                    self._hang_until = time.monotonic() + self._hang_seconds
        if time.monotonic() < until and (hang_paths is None or path in hang_paths):
            self._released.wait(until - time.monotonic())
        ex = _Exchange(h)
        routes: dict[str, dict[str, Callable[..., None]]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/generate": {"POST": self._generate},
            "/api/chat": {"POST": self._chat},
            "/api/pull": {"POST": self._pull},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
        }
        route = routes.get(path)
        if route is None:
            ex.send(404, b"404 page not found", "text/plain")
            return
        handler = route.get(method)
        if handler is None:
            ex.send(405, b"405 method not allowed", "text/plain")
            return
        if method in ("POST", "DELETE"):
            if bad_json is not None:
                ex.error(400, bad_json)
                return
            if body is None:
                ex.error(400, "missing request body")
                return
            if not isinstance(body, dict):
                ex.error(400, "json: cannot unmarshal into Go value of type api.Request")
                return
        handler(ex, body if isinstance(body, dict) else {}, method == "HEAD")

    # ------------------------------------------------------------------ simple endpoints

    def _root(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        ex.send(200, b"Ollama is running", "text/plain; charset=utf-8", head)

    def _version(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        ex.json(200, {"version": self.version}, head)

    def _tags(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        with self._lock:
            models = sorted(self._models.values(), key=lambda m: m.modified_at or datetime.min, reverse=True)
            out = [
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": _rfc3339(_dt_ns(m.modified_at or datetime.now(timezone.utc)), utc=False),
                    "size": m.size,
                    "digest": m.digest,
                    "details": m.details(),
                }
                for m in models
            ]
        ex.json(200, {"models": out}, head)

    def _ps(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        with self._lock:
            self._expire()
            runners = sorted(self._runners.values(), key=lambda r: r.expires_ns, reverse=True)
            out = []
            for r in runners:
                usage = memory_usage(r.model, r.options, self.memory_budget_mib, self.system_memory_mib, self.gpu)
                gpu = int(usage["gpu_mib"] * MIB)
                out.append(
                    {
                        "name": r.model.name,
                        "model": r.model.name,
                        "size": gpu + int(usage["cpu_mib"] * MIB),
                        "digest": r.model.digest,
                        "details": r.model.details(),
                        "expires_at": _rfc3339(r.expires_ns, utc=False),
                        "size_vram": gpu,
                        "context_length": max(1, min(int(r.options["num_ctx"]), r.model.context_length)),
                    }
                )
        ex.json(200, {"models": out})

    def _not_found(self, name: str) -> str:
        return f"model '{name}' not found"

    def _show(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        name = body.get("model") or body.get("name")
        if not name:
            ex.error(400, "model is required")
            return
        m = self.get_model(str(name))
        if m is None:
            ex.error(404, self._not_found(str(name)))
            return
        arch = m.architecture
        info: dict[str, Any] = {
            "general.architecture": arch,
            "general.file_type": _FILE_TYPES.get(m.quantization_level, 0),
            "general.parameter_count": m.parameter_count,
            "general.quantization_version": 2,
            f"{arch}.block_count": m.block_count,
            f"{arch}.context_length": m.context_length,
            f"{arch}.embedding_length": m.embedding_length,
            f"{arch}.attention.head_count": m.head_count,
            f"{arch}.attention.head_count_kv": m.head_count_kv,
            f"{arch}.attention.key_length": m.key_length,
            f"{arch}.attention.value_length": m.key_length,
            f"{arch}.feed_forward_length": m.feed_forward_length,
            "tokenizer.ggml.model": "llama" if arch == "gemma3" else "gpt2",
            # Like Ollama: the token list only with "verbose": true (else null).
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(m.vocab_size)] if body.get("verbose") else None,
        }
        if m.sliding_window:
            info[f"{arch}.attention.sliding_window"] = m.sliding_window
        if m.nextn_predict_layers:
            info[f"{arch}.nextn_predict_layers"] = m.nextn_predict_layers
        params = format_parameters(m.parameters)
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {m.name}\n\n"
            f"FROM /root/.ollama/models/blobs/sha256-{m.blob}\n"
            f'TEMPLATE """{m.template}"""\n'
            + "".join(
                f"PARAMETER {k} {_go_value(v)}\n"
                for k in sorted(m.parameters)
                for v in (m.parameters[k] if isinstance(m.parameters[k], list) else [m.parameters[k]])
            )
            + f'LICENSE """{m.license}"""\n'
        )
        out: dict[str, Any] = {"license": m.license, "modelfile": modelfile}
        if params:
            out["parameters"] = params
        out["template"] = m.template
        if m.system:
            out["system"] = m.system
        out["details"] = m.details()
        out["model_info"] = info
        out["capabilities"] = list(m.capabilities)
        out["modified_at"] = _rfc3339(_dt_ns(m.modified_at or datetime.now(timezone.utc)), utc=False)
        ex.json(200, out)

    def _copy(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        src = self.get_model(str(body.get("source") or ""))
        dst = str(body.get("destination") or "")
        if src is None:
            ex.error(404, f'model "{body.get("source")}" not found')
            return
        if not dst:
            ex.error(400, f'destination "{dst}" is invalid')
            return
        self.add_model(replace(src, name=normalize_name(dst), modified_at=datetime.now(timezone.utc)))
        ex.send(200, b"", "text/plain")

    def _delete(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        name = str(body.get("model") or body.get("name") or "")
        with self._lock:
            m = self._models.pop(normalize_name(name).lower(), None)
        if m is None:
            ex.error(404, self._not_found(name))
            return
        ex.send(200, b"", "text/plain")

    # ------------------------------------------------------------------ pull & create

    def _progress(self, ex: _Exchange, events: list[dict[str, Any]], error: str | None, stream: bool,
                  status: int = 500) -> None:
        if not stream:
            if error is not None:
                ex.error(status, error)
            else:
                ex.json(200, events[-1] if events else {"status": "success"})
            return
        if error is not None and not events:
            ex.error(status, error)
            return
        ex.start_stream()
        for event in events:
            ex.line(event)
        if error is not None:
            ex.line({"error": error})
        ex.end_stream()

    def _pull_events(self, m: FakeModel) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        layers = [(m.blob, m.size), (_hex("template", m.template), len(m.template)),
                  (_hex("license", m.license), len(m.license)),
                  (_hex("params", json.dumps(m.parameters, sort_keys=True)), 100)]
        for digest, total in layers:
            steps = (0, total // 2, total) if total > 1_000_000 else (total,)
            for done in steps:
                event: dict[str, Any] = {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                                         "total": total}
                if done:
                    event["completed"] = done
                events.append(event)
        return events

    def _pull(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        name = normalize_name(str(body.get("model") or body.get("name") or ""))
        stream = body.get("stream") is not False
        if not name:
            ex.error(400, "invalid model name")
            return
        events: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        src = self._pullable.get(name)
        if src is None:
            self._progress(ex, events, PULL_MISSING_ERROR, stream)
            return
        events += self._pull_events(src)
        events += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        self.add_model(replace(src, name=name, parameters=dict(src.parameters),
                               modified_at=datetime.now(timezone.utc)))
        self._progress(ex, events, None, stream)

    def _create(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        name = normalize_name(str(body.get("model") or body.get("name") or ""))
        stream = body.get("stream") is not False
        if not name:
            ex.error(400, "invalid model name")
            return
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            ex.error(400, "json: cannot unmarshal parameters into Go struct field CreateRequest.parameters")
            return
        if params.get("typical_p") is not None:
            ex.error(400, "typical_p is deprecated and cannot be set as a model parameter; "
                          "pass it as a request option instead")
            return
        for key in params:
            if key not in OPTION_TYPES:
                ex.error(400, f"unknown parameter '{key}'")
                return
        checked, err = check_options(params)
        if err:
            ex.error(400, err)
            return
        if body.get("quantize") or body.get("quantization"):
            ex.error(400, "create-time quantization is only supported for safetensors imports; "
                          "quantize GGUF models with llama.cpp tools before importing")
            return
        source = body.get("from")
        if not source:
            ex.error(400, "neither 'from' or 'files' was specified")
            return
        events: list[dict[str, Any]] = []
        base = self.get_model(str(source))
        if base is None:
            pullable = self._pullable.get(normalize_name(str(source)))
            if pullable is None:
                self._progress(ex, [{"status": "pulling manifest"}], PULL_MISSING_ERROR, stream)
                return
            events += [{"status": "pulling manifest"}] + self._pull_events(pullable)
            events += [{"status": "verifying sha256 digest"}]
            base = pullable
        merged = {**base.parameters, **checked}
        new = replace(
            base,
            name=name,
            digest=_hex("manifest", name, base.blob, json.dumps(merged, sort_keys=True), str(time.time_ns())),
            parameters=merged,
            system=str(body.get("system") or base.system),
            template=str(body.get("template") or base.template),
            license=str(body.get("license") or base.license),
            modified_at=datetime.now(timezone.utc),
        )
        events.append({"status": f"using existing layer sha256:{base.blob}"})
        events.append({"status": f"using existing layer sha256:{_hex('template', new.template)}"})
        if checked or body.get("system"):
            events.append({"status": f"creating new layer sha256:{_hex('params', json.dumps(merged, sort_keys=True))}"})
        events += [{"status": "writing manifest"}, {"status": "success"}]
        self.add_model(new)
        self._progress(ex, events, None, stream)

    # ------------------------------------------------------------------ inference

    def _generate(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        self._inference(ex, body, chat=False)

    def _chat(self, ex: _Exchange, body: dict[str, Any], head: bool) -> None:
        self._inference(ex, body, chat=True)

    def _ensure_runner(self, m: FakeModel, runner_opts: dict[str, Any]) -> tuple[_Runner | None, int, str | None]:
        """Return (runner, load_ns, error); loads or reloads as needed."""
        with self._lock:
            self._expire()
            runner = self._runners.get(m.blob)
            if runner is not None and runner.options == runner_opts:
                runner.last_used = time.monotonic()
                return runner, 50_000, None
            self._runners.pop(m.blob, None)
            while len(self._runners) >= max(1, self.max_loaded_models):
                lru = min(self._runners, key=lambda k: self._runners[k].last_used)
                del self._runners[lru]
            load_ns = int(1.2e9 + m.size / GIB * 0.8e9 + (0.4e9 if runner_opts.get("use_mmap") is False else 0))
            error = self._oom_error(m, runner_opts)
            if error is not None:
                self.failed_loads.append({"model": m.name, "options": dict(runner_opts), "error": error})
                return None, load_ns // 3, error
            runner = _Runner(model=m, options=dict(runner_opts), expires_ns=0, last_used=time.monotonic())
            self._runners[m.blob] = runner
            self.loads.append({"model": m.name, "options": dict(runner_opts)})
            return runner, load_ns, None

    def _inference(self, ex: _Exchange, body: dict[str, Any], *, chat: bool) -> None:
        name = str(body.get("model") or "")
        if not name:
            ex.error(400, "model is required")
            return
        m = self.get_model(name)
        if m is None:
            ex.error(404, self._not_found(name))
            return
        if body.get("think") is True and "thinking" not in m.capabilities:
            ex.error(400, f'"{name}" does not support thinking')
            return
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            ex.error(400, str(exc))
            return
        stream = body.get("stream") is not False
        messages: list[dict[str, Any]]
        if chat:
            raw_msgs = body.get("messages") or []
            messages = [msg for msg in raw_msgs if isinstance(msg, dict)]
            empty = not messages
        else:
            prompt = str(body.get("prompt") or "")
            messages = generate_messages(prompt, body.get("system") or m.system or None)
            empty = prompt == ""
        base_reply: dict[str, Any] = {"model": name, "created_at": ""}
        if empty and keep_alive == 0:
            with self._lock:
                self._runners.pop(m.blob, None)
            ex.json(200, self._final(base_reply, chat, "", "unload", {}))
            return
        try:
            opts = self.resolve_options(m, body.get("options"))
        except ValueError as exc:
            ex.error(500, str(exc))
            return
        runner_opts = {k: opts[k] for k in RUNNER_KEYS}

        waited_ns = 0
        if not self._sched.acquire(blocking=False):
            t_wait = time.monotonic()
            self._sched.acquire()
            if self.time_scale > 0:
                waited_ns = int((time.monotonic() - t_wait) / self.time_scale * 1e9)
        try:
            with self._lock:
                fail = self._inject.fail.pop(0) if self._inject.fail else None
            if fail is not None:
                if fail[0] == 500:
                    with self._lock:
                        self._runners.pop(m.blob, None)
                ex.error(fail[0], fail[1])
                return
            t0 = time.monotonic()
            runner, load_ns, error = self._ensure_runner(m, runner_opts)
            if runner is None:
                self._sleep_until(t0, load_ns)
                ex.error(500, error or "unknown error")
                return
            load_ns += waited_ns
            if empty:
                self._sleep_until(t0, load_ns - waited_ns)
                self._set_expiry(runner, keep_alive)
                ex.json(200, self._final(base_reply, chat, "", "load", {}))
                return
            self._run_completion(ex, body, m, runner, opts, messages, chat, stream, t0, load_ns, waited_ns)
            self._set_expiry(runner, keep_alive)
        finally:
            self._sched.release()

    def _set_expiry(self, runner: _Runner, keep_alive: float | None) -> None:
        with self._lock:
            if keep_alive == 0:
                if self._runners.get(runner.model.blob) is runner:
                    del self._runners[runner.model.blob]
                return
            seconds = 300.0 if keep_alive is None else keep_alive
            if seconds < 0:
                seconds = 292 * 365 * 86400.0
            runner.expires_ns = time.time_ns() + int(seconds * 1e9)

    def _final(self, base: dict[str, Any], chat: bool, text: str, reason: str,
               metrics: dict[str, int]) -> dict[str, Any]:
        out = {"model": base["model"], "created_at": _rfc3339()}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out["done"] = True
        out["done_reason"] = reason
        out.update({k: v for k, v in metrics.items() if v})
        return out

    def _run_completion(self, ex: _Exchange, body: dict[str, Any], m: FakeModel, runner: _Runner,
                        opts: dict[str, Any], messages: list[dict[str, Any]], chat: bool, stream: bool,
                        t0: float, load_ns: int, waited_ns: int) -> None:
        if not chat and body.get("raw"):
            tokens = tokenize(str(body.get("prompt") or ""))
        else:
            tokens = render_tokens(messages)
        num_ctx = max(1, min(int(opts["num_ctx"]), m.context_length))
        if len(tokens) >= num_ctx:
            keep = max(0, min(int(opts["num_keep"]), num_ctx // 2))
            block = max(1, (num_ctx - keep) // 2)
            erased = (len(tokens) - keep - block) // block
            tokens = tokens[:keep] + tokens[keep + erased * block:]
        cached = 0
        if self.prompt_cache:
            for a, b in zip(runner.cache, tokens):
                if a != b:
                    break
                cached += 1
        cached = min(cached, len(tokens) - 1) if tokens else 0
        uncached = len(tokens) - cached
        prefill_tps, decode_tps = self.speed(m.name, runner.options)
        draft = self.draft_length(m, opts)
        decode_tps *= draft_speedup(draft, draft_acceptance(" ".join(tokens)))
        predict = int(opts["num_predict"])
        if predict > 0:
            count, reason = min(predict, self.max_predict), "length"
        else:
            count, reason = self.default_predict, "stop"
        seed = int(opts["seed"])
        start = zlib.crc32(" ".join(tokens).encode()) ^ (seed if seed >= 0 else 0)
        words = [_VOCAB[zlib.crc32(b"%d:%d" % (start, i)) % len(_VOCAB)] for i in range(count)]
        changes = self.draft_changes_output
        if callable(changes):
            changes = bool(changes(opts))
        if draft and changes is not False and (changes is True or len(tokens) > changes):
            words = words[:8] + [_VOCAB[zlib.crc32(b"draft:%d:%d" % (start, i)) % len(_VOCAB)] for i in range(8, count)]
        pieces = [f" {w}" if i else w for i, w in enumerate(words)]
        prefill_ns = max(1, round(uncached / prefill_tps * 1e9)) if tokens else 0
        eval_ns = max(1, round(count / decode_tps * 1e9)) if count else 0
        load_sleep = load_ns - waited_ns
        metrics = {
            "total_duration": load_ns + prefill_ns + eval_ns + 1_500_000,
            "load_duration": load_ns,
            "prompt_eval_count": len(tokens),
            "prompt_eval_duration": prefill_ns,
            "eval_count": count,
            "eval_duration": eval_ns,
        }
        with self._lock:
            runner.cache = tokens + words
            malformed = self._inject.malformed > 0
            if malformed:
                self._inject.malformed -= 1
            truncate = self._inject.truncate.pop(0) if stream and self._inject.truncate else None
        text_key = "message" if chat else "response"
        if not stream:
            self._sleep_until(t0, load_sleep + prefill_ns + eval_ns)
            if malformed:
                ex.send(200, b'{"model": "' + m.name.encode() + b'", "respo', "application/json; charset=utf-8")
                return
            ex.json(200, self._final({"model": body["model"]}, chat, "".join(pieces), reason, metrics))
            return
        self._sleep_until(t0, load_sleep + prefill_ns)
        ex.start_stream()
        if malformed:
            ex.line(b'{"model":"' + m.name.encode() + b'","created_at":\n')
        for i, piece in enumerate(pieces):
            if truncate is not None and i >= truncate[0]:
                if truncate[1]:
                    ex.end_stream()
                else:
                    ex.abort()
                return
            self._sleep_until(t0, load_sleep + prefill_ns + eval_ns * i / max(1, count))
            chunk: dict[str, Any] = {"model": body["model"], "created_at": _rfc3339()}
            chunk[text_key] = {"role": "assistant", "content": piece} if chat else piece
            chunk["done"] = False
            ex.line(chunk)
        if truncate is not None:
            if truncate[1]:
                ex.end_stream()
            else:
                ex.abort()
            return
        self._sleep_until(t0, load_sleep + prefill_ns + eval_ns)
        ex.line(self._final({"model": body["model"]}, chat, "", reason, metrics))
        ex.end_stream()


def main(argv: list[str] | None = None) -> None:
    """Run the fake in the foreground: ``python tests/fake_ollama.py --port 11434``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--time-scale", type=float, default=0.002)
    parser.add_argument("--memory-budget-mib", type=float, default=6000)
    parser.add_argument("--version", default="0.33.1")
    args = parser.parse_args(argv)
    fake = FakeOllama(host=args.host, port=args.port, time_scale=args.time_scale,
                      memory_budget_mib=args.memory_budget_mib, version=args.version)
    fake.start()
    print(fake.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
