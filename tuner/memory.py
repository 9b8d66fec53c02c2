"""GPU memory of a config: predicted from the model's architecture, calibrated per study from
what the server reported, and the verdict the search acts on (fits / not known / does not fit).

The prediction (llama.cpp's allocations, which every GGUF model runs on; docs/memory.md):

* weights: the offloaded share of the file, ``file bytes x layers / (blocks + 1)`` (the output
  layer is the last one offloaded);
* KV cache: per offloaded block, ``cells x (heads_kv x key_length x width(type_k) + heads_kv x
  value_length x width(type_v))`` with ``cells = num_ctx x num_parallel`` (padded to 256) for
  a global layer and the sliding window (plus one micro-batch) for a sliding-window layer;
  widths f16 2 bytes, q8_0 34/32, q4_0 18/32;
* compute buffer: grows with the micro-batch (``num_batch``) and the context (the attention
  scores, unless flash attention is on) and holds the logits when the output layer is offloaded;
* a fixed overhead.

No formula knows a server's exact allocations (its version, backend, margins), so each study
calibrates it: every loaded trial's ``size_vram`` is a point ``observed = a x predicted + b``
(fitted, ``a`` kept near 1), the largest ``size_vram`` seen is memory that fits, and every
failed load is a config that needed more than there is (its calibrated need is an upper bound
of the capacity; a failure that is about system RAM says nothing of the GPU). NVML's total,
when this machine sees the server's GPU, is another upper bound.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from tuner.record import MEMORY_MODEL as MEMORY_MODEL

MIB = 1024 * 1024
#: Bytes per element of each KV cache type (ggml block sizes: q8_0 34 bytes per 32, q4_0 18 per 32).
KV_WIDTH = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
            "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
#: llama.cpp pads the cache's cells to a multiple of this.
CELL_PAD = 256
#: Architectures whose sliding-window layers follow a fixed period when the GGUF stores none
#: (llama.cpp's model loader: Gemma 3 keeps every 6th layer global, Gemma 2 every 2nd).
SWA_PERIOD = {"gemma3": 6, "gemma3n": 5, "gemma2": 2, "cohere2": 4}
#: Fixed memory beside weights, KV and compute (CUDA context share, small buffers), MiB.
OVERHEAD_MIB = 64.0
#: The calibrated slope stays within these bounds: a few points cannot be trusted further.
SLOPE_RANGE = (0.8, 1.25)

FITS, UNKNOWN, NO = "fits", "unknown", "no"
#: A config is skipped (not loaded) when predicted to need this share more than the capacity's
#: upper bound: clearly out, beyond the model's error.
SKIP_MARGIN = 0.02


@dataclass(frozen=True)
class Architecture:
    """The architecture numbers the memory model needs (GGUF keys, /api/show model_info)."""

    name: str = ""
    block_count: int = 0
    head_count: int = 0
    head_count_kv: int = 0
    key_length: int = 0
    value_length: int = 0
    embedding_length: int = 0
    feed_forward_length: int = 0
    vocab_size: int = 0
    context_length: int = 0
    parameter_count: int = 0
    #: Tokens a sliding-window layer keeps (0: no sliding-window layers).
    sliding_window: int = 0
    #: Per block, whether it is a sliding-window layer (empty: none).
    swa_layers: tuple[bool, ...] = ()

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> Architecture:
        """From GGUF metadata (llama.cpp) or /api/show ``model_info`` (Ollama)."""
        arch = str(info.get("general.architecture") or "")

        def num(key: str, default: int = 0) -> int:
            v = info.get(f"{arch}.{key}")
            if isinstance(v, (list, tuple)):
                v = max((x for x in v if isinstance(x, (int, float))), default=default)
            try:
                return int(v) if v is not None and str(v).strip() != "" else default
            except (TypeError, ValueError):
                return default

        blocks = num("block_count")
        heads = num("attention.head_count")
        embd = num("embedding_length")
        kv_heads = num("attention.head_count_kv", heads)
        key = num("attention.key_length", embd // heads if heads else 0)
        value = num("attention.value_length", key)
        window = num("attention.sliding_window")
        vocab = num("vocab_size")
        if not vocab:
            tokens = info.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, (list, tuple)) and tokens else 0
        layers: tuple[bool, ...] = ()
        pattern = info.get(f"{arch}.attention.sliding_window_pattern")
        if window and isinstance(pattern, (list, tuple)) and len(pattern) >= blocks:
            layers = tuple(bool(x) for x in pattern[:blocks])
        else:
            period = int(pattern) if isinstance(pattern, int) and pattern > 0 else SWA_PERIOD.get(arch, 0)
            if window and period:
                layers = tuple((i + 1) % period != 0 for i in range(blocks))
        return cls(name=arch, block_count=blocks, head_count=heads, head_count_kv=kv_heads, key_length=key,
                   value_length=value, embedding_length=embd, feed_forward_length=num("feed_forward_length"),
                   vocab_size=vocab, context_length=num("context_length"),
                   parameter_count=int(info.get("general.parameter_count") or 0),
                   sliding_window=window if layers else 0, swa_layers=layers)

    @property
    def known(self) -> bool:
        """Whether the KV cache can be computed (else only weights and the calibration count)."""
        return self.block_count > 0 and self.head_count_kv > 0 and self.key_length > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["swa_layers"] = [i for i, s in enumerate(self.swa_layers) if s]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Architecture:
        blocks = int(d.get("block_count") or 0)
        swa = set(d.get("swa_layers") or [])
        kw = {k: d[k] for k in ("name", "block_count", "head_count", "head_count_kv", "key_length", "value_length",
                                "embedding_length", "feed_forward_length", "vocab_size", "context_length",
                                "parameter_count", "sliding_window") if k in d}
        return cls(**kw, swa_layers=tuple(i in swa for i in range(blocks)) if swa else ())


@dataclass(frozen=True)
class Setting:
    """The settings that decide memory (the server's defaults where a trial sent none)."""

    num_ctx: int
    num_batch: int
    #: Layers offloaded; None: the server places them itself (num_gpu unset or -1).
    num_gpu: int | None
    num_parallel: int = 1
    kv_cache_type: str = "f16"
    #: A quantized V cache needs flash attention; K may be quantized alone (llama.cpp).
    kv_cache_type_v: str | None = None
    flash_attention: bool = False
    #: Sliding-window layers keep the whole context (llama-cpp-python's default; llama-server's is off).
    swa_full: bool = False


@dataclass(frozen=True)
class Prediction:
    """Predicted GPU memory of one config, by part (MiB), before calibration."""

    weights_mib: float
    kv_mib: float
    compute_mib: float
    overhead_mib: float
    layers: int

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.kv_mib + self.compute_mib + self.overhead_mib


def kv_bytes_per_block(arch: Architecture, setting: Setting, block: int) -> float:
    """KV cache bytes of one block (layer) for ``setting``."""
    cells = _pad(setting.num_ctx) * max(1, setting.num_parallel)
    if arch.swa_layers and block < len(arch.swa_layers) and arch.swa_layers[block]:
        # llama.cpp's sliding-window cache keeps the window per sequence plus one micro-batch
        # (unless the full-size SWA cache is asked for, llama-cpp-python's default).
        cells = _swa_cells(arch, setting, max(1, min(setting.num_batch, setting.num_ctx)))
    # A quantized V cache needs flash attention: llama.cpp refuses it otherwise, Ollama falls back to f16.
    k = KV_WIDTH.get(setting.kv_cache_type, 2.0)
    v = KV_WIDTH.get(setting.kv_cache_type_v or setting.kv_cache_type, 2.0)
    return cells * arch.head_count_kv * (arch.key_length * k + arch.value_length * v)


def kv_mib(arch: Architecture, setting: Setting, blocks: int | None = None) -> float:
    """KV cache MiB of the first ``blocks`` offloaded blocks (all when None)."""
    if not arch.known:
        return 0.0
    n = arch.block_count if blocks is None else max(0, min(blocks, arch.block_count))
    # llama.cpp offloads the last blocks first; the sliding/global mix is the same on average.
    # A block's bytes depend only on whether it slides: worked out once per kind, summed in
    # block order as before (the same float), not once per block (a report calibrates on
    # every trial: 26,000 calls at 1,000 trials).
    per_kind: dict[bool, float] = {}
    total = 0.0
    for i in range(arch.block_count):
        swa = bool(arch.swa_layers and i < len(arch.swa_layers) and arch.swa_layers[i])
        if swa not in per_kind:
            per_kind[swa] = kv_bytes_per_block(arch, setting, i)
        total += per_kind[swa]
    return total * n / arch.block_count / MIB


def compute_mib(arch: Architecture, setting: Setting, output_on_gpu: bool = True) -> float:
    """The compute buffer: the peak of the graph's stages for one micro-batch, the larger of the
    logits (when the output layer is on this device) and one layer's attention (the scores
    ``heads x cells`` in f32 without flash attention, the masks and the feed-forward activations).

    Fitted on real llama.cpp allocations (Gemma 3 270M, 147 loads across context, batch, cache
    type and flash attention: exact to 0.24%; docs/memory.md)."""
    ub = max(1, min(setting.num_batch, setting.num_ctx))
    embd = arch.embedding_length or 2048
    ff = arch.feed_forward_length or 4 * embd
    heads = arch.head_count or 8
    cells = _pad(setting.num_ctx) * max(1, setting.num_parallel)
    swa = _swa_cells(arch, setting, ub) if arch.swa_layers else cells
    logits = ub * (4.0 * arch.vocab_size + 8.0 * embd + 4) if output_on_gpu and arch.vocab_size else 0.0
    if setting.flash_attention:
        attention = ub * (2.0 * (cells + swa) + 16.0 * ff + 4.0 * embd + 1068)
    else:
        attention = ub * (4.0 * heads * cells + 4.0 * (cells + swa) + 8.0 * ff + 4.0 * embd + 1052)
    return max(logits, attention) / MIB


def _swa_cells(arch: Architecture, setting: Setting, ub: int) -> int:
    cells = _pad(setting.num_ctx) * max(1, setting.num_parallel)
    if setting.swa_full or not arch.sliding_window:
        return cells
    return min(cells, _pad(arch.sliding_window * max(1, setting.num_parallel) + ub))


def predict(arch: Architecture, file_bytes: int, setting: Setting, layers: int | None = None) -> Prediction:
    """Predicted GPU memory of ``setting`` with ``layers`` offloaded (default: the setting's)."""
    total = arch.block_count + 1
    n = setting.num_gpu if layers is None else layers
    n = total if n is None else max(0, min(int(n), total))
    if n == 0:
        return Prediction(0.0, 0.0, 0.0, 0.0, 0)
    weights = weights_mib(arch, file_bytes, n)
    return Prediction(weights, kv_mib(arch, setting, n), compute_mib(arch, setting, output_on_gpu=n >= total),
                      OVERHEAD_MIB, n)


def weights_mib(arch: Architecture, file_bytes: int, layers: int) -> float:
    """Weights on the GPU with ``layers`` offloaded. The token embedding stays on the CPU and
    the output layer (the embedding's size, tied or not) is the last one offloaded; the blocks
    share the rest. Without the vocabulary and parameter count, an even share per layer."""
    total = arch.block_count + 1
    size = file_bytes / MIB
    if not (arch.vocab_size and arch.embedding_length and arch.parameter_count):
        return size * layers / total
    emb = min(size / 2, arch.vocab_size * arch.embedding_length * file_bytes / arch.parameter_count / MIB)
    block = (size - emb) / max(1, arch.block_count)
    return block * min(layers, arch.block_count) + (emb if layers >= total else 0.0)


def _pad(n: int) -> int:
    return int(math.ceil(max(1, n) / CELL_PAD) * CELL_PAD)


# ----------------------------------------------------------------------------- evidence


#: Failure texts that are about system RAM, not the GPU.
_SYSTEM = re.compile(r"system memory|\bRAM\b|host memory", re.I)
_AVAILABLE = re.compile(
    r"requires more (?:gpu |vram |video )?memory \(([\d.]+)\s*([KMG]i?B)\) than is available \(([\d.]+)\s*([KMG]i?B)\)",
    re.I)
_OOM = re.compile(r"out of memory|cudaMalloc|cannot be allocated|(?:failed|unable) to allocate|insufficient|"
                  r"memory layout|ErrorOutOfDeviceMemory|hipMalloc|MTLBuffer|requires more", re.I)
_UNITS = {"KB": 1 / 1024, "KIB": 1 / 1024, "MB": 1.0, "MIB": 1.0, "GB": 1024.0, "GIB": 1024.0}


def is_memory_failure(error: str | None) -> bool:
    """Whether a failed load's text says it ran out of (GPU or system) memory."""
    return bool(error) and bool(_OOM.search(error or ""))


def is_gpu_failure(error: str | None) -> bool:
    """A failed load that ran out of memory and says nothing about system RAM did not fit on the
    GPU (a server that failed to start, or a bare exit status, is no evidence of memory)."""
    return is_memory_failure(error) and not _SYSTEM.search(error or "")


def available_mib(error: str | None) -> float | None:
    """The GPU memory a failure message says is available, when it gives the number."""
    m = _AVAILABLE.search(error or "")
    if not m or _SYSTEM.search(error or ""):
        return None
    return float(m.group(3)) * _UNITS.get(m.group(4).upper(), 1.0)


@dataclass(frozen=True)
class Point:
    """One trial as memory evidence."""

    prior_mib: float
    #: The server's size_vram of the loaded config (MiB); None when it did not load.
    observed_mib: float | None
    failed: bool
    #: Known layer count (explicit num_gpu, or the auto placement that offloaded everything).
    explicit: bool = True
    available_mib: float | None = None
    number: int = -1


@dataclass
class Calibration:
    """The study's memory evidence: ``need = slope x predicted + offset`` and the capacity bounds."""

    slope: float = 1.0
    offset: float = 0.0
    #: The most GPU memory a loaded config held (MiB): at least this much fits.
    fits_mib: float = 0.0
    fits_trial: int | None = None
    #: The least calibrated need of a config that did not load: less than this is available.
    fails_mib: float = math.inf
    fails_trial: int | None = None
    #: The GPU's total memory (NVML) or the capacity a failure message gave.
    total_mib: float = math.inf
    points: int = 0
    #: Configs already tried: config_key -> True (loaded) or False (did not fit on the GPU).
    outcomes: dict[tuple[Any, ...], bool] = field(default_factory=dict)

    def need(self, prior_mib: float) -> float:
        return self.slope * prior_mib + self.offset if prior_mib > 0 else 0.0

    @property
    def upper_mib(self) -> float:
        return min(self.fails_mib, self.total_mib)

    def between(self, prior_mib: float) -> bool:
        """In the lower half of the ground between what loaded and what did not (a bisection step)."""
        if not math.isfinite(self.upper_mib):
            return False
        return self.need(prior_mib) <= (self.fits_mib + self.upper_mib) / 2

    def verdict(self, prior_mib: float) -> str:
        """fits (no more than a config that loaded), no (at least what did not load), or unknown."""
        need = self.need(prior_mib)
        if need <= self.fits_mib or prior_mib <= 0:
            return FITS
        if need >= self.upper_mib:
            return NO
        return UNKNOWN

    def skip(self, prior_mib: float) -> bool:
        """Clearly does not fit: predicted to need more than the capacity's upper bound plus a margin."""
        return prior_mib > 0 and self.need(prior_mib) >= self.upper_mib * (1 + SKIP_MARGIN)

    def to_dict(self) -> dict[str, Any]:
        fin = (lambda v: None if not math.isfinite(v) else round(v, 1))
        return {"slope": round(self.slope, 4), "offset_mib": round(self.offset, 1),
                "fits_mib": round(self.fits_mib, 1), "fits_trial": self.fits_trial,
                "fails_mib": fin(self.fails_mib), "fails_trial": self.fails_trial,
                "total_mib": fin(self.total_mib), "points": self.points}


def config_key(model: str, options: Mapping[str, Any], server: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
    """One config's identity for the evidence: the model and every setting sent."""
    return (model, tuple(sorted({**options, **(server or {})}.items())))


def calibrate(points: Iterable[Point], total_mib: float | None = None) -> Calibration:
    """Fit the prediction to what the server reported, and bound the capacity."""
    folded = Points()
    for p in points:
        folded.add(p)
    return folded.calibration(total_mib)


class Points:
    """Evidence points folded in one at a time into what :func:`calibrate` needs of them."""

    def __init__(self) -> None:
        #: The loaded points whose layer count is known: predicted and observed MiB.
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.first: Point | None = None
        #: The most a loaded config held, and the first trial that held it.
        self.fits_mib: float = 0.0
        self.fits_trial: int | None = None
        self.failed: list[Point] = []

    def add(self, p: Point) -> None:
        if p.failed:
            self.failed.append(p)
            return
        if p.observed_mib is None or not p.observed_mib > 0:
            return
        if float(p.observed_mib) > self.fits_mib:
            self.fits_mib, self.fits_trial = float(p.observed_mib), p.number
        if p.explicit and p.prior_mib > 0:
            if self.first is None:
                self.first = p
            self.xs.append(p.prior_mib)
            self.ys.append(float(p.observed_mib))

    def calibration(self, total_mib: float | None = None) -> Calibration:
        xs, ys = self.xs, self.ys
        slope, offset = 1.0, 0.0
        if len(xs) == 1 and self.first is not None:
            offset = self.first.observed_mib - self.first.prior_mib  # type: ignore[operator]
        elif len(xs) >= 2:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            sxx = sum((x - mx) ** 2 for x in xs)
            # A slope only from points far apart (a partial offload beside a full one): close
            # together, their noise would tilt it and extrapolate badly; else a fixed offset.
            if len(xs) >= 3 and max(xs) >= 1.5 * min(xs) and sxx > 1.0:
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
                slope = min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])
            offset = my - slope * mx
        cal = Calibration(slope=slope, offset=offset, points=len(xs))
        if total_mib:
            cal.total_mib = float(total_mib)
        cal.fits_mib, cal.fits_trial = self.fits_mib, self.fits_trial
        for p in self.failed:
            if p.available_mib is not None:
                cal.total_mib = min(cal.total_mib, p.available_mib)
            if p.explicit and p.prior_mib > 0:
                need = cal.need(p.prior_mib)
                if need < cal.fails_mib:
                    cal.fails_mib, cal.fails_trial = need, p.number
        if cal.fails_mib <= cal.fits_mib:
            # The model is off by more than the gap between them: trust the evidence, keep a sliver.
            cal.fails_mib = cal.fits_mib + 1.0
        return cal


@dataclass
class StudyMemory:
    """What the study knows to predict memory: each variant's architecture and file size, the
    server's defaults, and the GPU's total memory when NVML sees it."""

    archs: dict[str, Architecture] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)
    default_ctx: int = 4096
    #: None: the server's adaptive default (512 up to 8k context, 1024 to 32k, else 2048).
    default_batch: int | None = None
    total_mib: float | None = None
    #: The micro-batch is num_batch (Ollama sets both) or at most this (llama-cpp-python's n_ubatch).
    ubatch_cap: int | None = None
    swa_full: bool = False

    def setting(self, options: Mapping[str, Any], server: Mapping[str, Any] | None = None,
                effective: Mapping[str, Any] | None = None) -> Setting:
        srv = {**(server or {}), **(effective or {})}
        gpu = options.get("num_gpu")
        fa = str(srv.get("flash_attention", "auto")).lower() in ("on", "true", "1")
        kv = str(srv.get("kv_cache_type") or "f16")
        ctx = int(options.get("num_ctx") or self.default_ctx)
        batch = int(options.get("num_batch") or self.default_batch or (512 if ctx <= 8192 else 1024 if ctx <= 32768 else 2048))
        if self.ubatch_cap:
            batch = min(batch, self.ubatch_cap)
        return Setting(num_ctx=ctx, num_batch=batch, num_gpu=None if gpu is None or int(gpu) < 0 else int(gpu),
                       num_parallel=int(srv.get("num_parallel") or 1), kv_cache_type=kv, flash_attention=fa,
                       swa_full=self.swa_full)

    def predict(self, model: str, options: Mapping[str, Any], server: Mapping[str, Any] | None = None,
                effective: Mapping[str, Any] | None = None, layers: int | None = None) -> Prediction | None:
        arch = self.archs.get(model)
        if arch is None or not arch.block_count:
            return None
        return predict(arch, self.file_bytes.get(model, 0), self.setting(options, server, effective), layers)

    def verdict(self, cal: Calibration, model: str, options: Mapping[str, Any],
                server: Mapping[str, Any] | None = None) -> str:
        """fits / unknown / no for a config: the server's own placement (num_gpu unset or -1)
        always fits, a config already tried is what it did, else the calibrated prediction."""
        gpu = options.get("num_gpu")
        if gpu is None or int(gpu) < 0:
            return FITS
        known = cal.outcomes.get(config_key(model, options, server))
        if known is not None:
            return FITS if known else NO
        pred = self.predict(model, options, server)
        return cal.verdict(pred.total_mib if pred is not None else 0.0)

    def full_layers(self, model: str) -> int | None:
        arch = self.archs.get(model)
        return arch.block_count + 1 if arch and arch.block_count else None

    def point(self, r: Any) -> Point | None:
        """A trial record (tuner.record.TrialRecord) as evidence; None when it is none."""
        if r.state not in ("COMPLETE", "PRUNED") or r.reused_from is not None:
            return None
        failed = r.error is not None
        if failed and (r.skipped or not is_gpu_failure(r.error)):
            return None
        # What the engine reported it ran (the defaults' context from /api/ps) under what was sent.
        options = {**{k: v for k, v in r.ran.items() if k in ("num_ctx", "num_batch")}, **r.options}
        pred = self.predict(r.model, options, r.server, r.server_effective)
        if pred is None:
            return None
        gpu = options.get("num_gpu")
        full = self.full_layers(r.model) or 0
        auto = gpu is None or int(gpu) < 0
        observed = r.server_vram_mib if not failed else None
        # Auto placement offloaded everything when the server says so (size_vram == size).
        explicit = not auto or (observed is not None and r.server_size_mib is not None
                                and abs(r.server_size_mib - observed) < 1.0)
        if auto and not explicit:
            pred = self.predict(r.model, options, r.server, r.server_effective, layers=full)
        return Point(prior_mib=pred.total_mib if pred else 0.0, observed_mib=observed, failed=failed,
                     explicit=explicit, available_mib=available_mib(r.error) if failed else None, number=r.number)

    def outcome(self, r: Any) -> tuple[tuple[Any, ...], bool] | None:
        """A record's config and whether it loaded (False: it did not fit on the GPU); None
        when it says neither."""
        if r.baseline or r.reused_from is not None or r.state not in ("COMPLETE", "PRUNED") or r.skipped:
            return None
        if r.error is None:
            return config_key(r.model, r.options, r.server), True
        if is_gpu_failure(r.error):
            return config_key(r.model, r.options, r.server), False
        return None

    def calibrate(self, records: Sequence[Any]) -> Calibration:
        return Evidence(self).calibrate(records)

    def to_dict(self) -> dict[str, Any]:
        return {"archs": {k: a.to_dict() for k, a in self.archs.items()}, "file_bytes": dict(self.file_bytes),
                "default_ctx": self.default_ctx, "default_batch": self.default_batch, "total_mib": self.total_mib,
                "ubatch_cap": self.ubatch_cap, "swa_full": self.swa_full}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudyMemory:
        return cls(archs={k: Architecture.from_dict(a) for k, a in (d.get("archs") or {}).items()},
                   file_bytes={k: int(v) for k, v in (d.get("file_bytes") or {}).items()},
                   default_ctx=int(d.get("default_ctx") or 4096),
                   default_batch=int(d["default_batch"]) if d.get("default_batch") else None,
                   total_mib=d.get("total_mib"), ubatch_cap=d.get("ubatch_cap"), swa_full=bool(d.get("swa_full")))


class Evidence:
    """:meth:`StudyMemory.calibrate` over a study's growing list of records (tuner.leaderboard.
    TrialCache hands the same objects from call to call): only the records new since the last
    call are turned into evidence; a list that does not start with the last one is read anew."""

    def __init__(self, memory: StudyMemory) -> None:
        self.memory = memory
        self._reset()

    def _reset(self) -> None:
        self._records: list[Any] = []
        self._points = Points()
        self._outcomes: dict[tuple[Any, ...], bool] = {}

    def calibrate(self, records: Sequence[Any]) -> Calibration:
        n = len(self._records)
        if len(records) < n or list(records[:n]) != self._records:
            self._reset()
            n = 0
        for r in records[n:]:
            self._records.append(r)
            p = self.memory.point(r)
            if p is not None:
                self._points.add(p)
            out = self.memory.outcome(r)
            if out is None:
                continue
            if out[1]:
                self._outcomes[out[0]] = True
            else:
                self._outcomes.setdefault(out[0], False)
        cal = self._points.calibration(self.memory.total_mib)
        cal.outcomes = dict(self._outcomes)
        return cal


def default_headroom_mib(capacity_mib: float) -> float:
    """GPU memory a winner should leave free: 5% of the GPU, at least 256 MiB (another
    program's window, a browser tab or a driver update takes that much without asking)."""
    return max(256.0, 0.05 * capacity_mib)


@dataclass(frozen=True)
class Fit:
    """How a loaded config fits the GPU, for the winner's summary and export."""

    observed_mib: float | None
    predicted_mib: float | None
    #: GPU memory left beside it: at most this much (the capacity's upper bound); None unknown.
    spare_mib: float | None
    #: What bounds the capacity: "NVML total" or the failed trial ("#N did not load").
    bound: str
    headroom_mib: float | None

    @property
    def tight(self) -> bool:
        return self.spare_mib is not None and self.headroom_mib is not None and self.spare_mib < self.headroom_mib

    def lines(self) -> list[str]:
        if self.observed_mib is None and self.predicted_mib is None:
            return []
        seen = f"{self.observed_mib:,.0f} MiB reported by the server" if self.observed_mib is not None else "not reported"
        pred = f" (predicted {self.predicted_mib:,.0f} MiB)" if self.predicted_mib is not None else ""
        out = [f"GPU memory: {seen}{pred}"]
        if self.spare_mib is not None:
            out[0] += f"; fits with at most {max(0.0, self.spare_mib):,.0f} MiB to spare ({self.bound})"
        else:
            out[0] += "; headroom unknown (no config failed to load and NVML does not see the GPU)"
        if self.tight:
            out.append(f"WARNING: less than {self.headroom_mib:,.0f} MiB of GPU memory to spare: another program "
                       "that takes a little GPU memory would make this config fail to load "
                       "(--vram-headroom-mib sets the margin)")
        return out


def fit_of(trial: Any, attrs: Mapping[str, Any], records: Sequence[Any]) -> Fit | None:
    """The fit of a stored trial from the study's memory model and every trial's evidence."""
    d = attrs.get(MEMORY_MODEL)
    if not isinstance(d, Mapping) or trial.memory is None:
        return None
    sm = StudyMemory.from_dict(d)
    cal = sm.calibrate(records)
    observed = trial.server_vram_mib if trial.server_vram_mib is not None else trial.memory.get("observed_mib")
    spare = None if observed is None or not math.isfinite(cal.upper_mib) else cal.upper_mib - float(observed)
    if cal.total_mib <= cal.fails_mib and math.isfinite(cal.total_mib):
        bound = f"of {cal.total_mib:,.0f} MiB"
    else:
        bound = f"#{cal.fails_trial} needing {cal.fails_mib:,.0f} MiB did not load"
    floor = d.get("headroom_mib")
    cap = cal.upper_mib if math.isfinite(cal.upper_mib) else None
    head = float(floor) if floor is not None else (default_headroom_mib(cap) if cap else None)
    return Fit(observed_mib=float(observed) if observed is not None else None,
               predicted_mib=trial.memory.get("predicted_mib"), spare_mib=spare, bound=bound, headroom_mib=head)
