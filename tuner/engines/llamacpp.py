"""The llama.cpp engine: GGUF files run in-process through ``llama-cpp-python``.

Every tuned setting is a load parameter of ``llama_cpp.Llama``; a request whose settings
differ from the loaded ones closes the model and loads it again, and reports that load as
``load_ms`` (like Ollama's ``load_duration``). Timings come from llama.cpp's own perf
counters (``llama_perf_context``), so decode and prefill rates mean what Ollama's mean.

Parameter mapping (tuner name -> ``Llama`` keyword): the ``llama_cpp`` columns of
:data:`tuner.settings.SETTINGS` (``num_ctx`` -> ``n_ctx``, ``num_batch`` -> ``n_batch`` and
``n_ubatch``, ``kv_cache_type`` -> ``type_k`` and ``type_v``, ...). Where the binding has no
``flash_attn_type`` (0.3.x) flash attention goes to the boolean ``flash_attn``, which cannot
say "auto": auto then passes nothing (the binding's default, off in llama-cpp-python 0.3.x).

Engine defaults (the baseline, ``runner_options=None``): :data:`BASELINE`.

Prompts run as plain completions (no chat template, unlike Ollama's ``/api/generate``).
Each request starts from an empty KV cache, so its whole prompt is evaluated and counted.

Drafting (``draft_num_predict`` > 0, docs/drafting.md): llama-cpp-python's prompt-lookup
decoding (``LlamaPromptLookupDecoding``). Its verification samples from every position of a
batch, which needs ``logits_all=True`` from the load on (what ``Llama(draft_model=...)`` sets):
turning drafting on or off reloads the model, and a drafting model computes logits for every
prompt token (slower prefill). The draft length and n-gram size change per request. llama.cpp's
perf counters book every batch of more than one token as prompt processing, so a drafting
request's decode time is the counters' total after its first token (prompt and decode split
where the first draft is asked for).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import inspect
import mmap
import os
import re
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tuner._imports import require
from tuner.engines.base import Drafting, Echo, Engine, GpuOffload, ModelInfo
from tuner import settings
from tuner.errors import LoadError, ModelNotFoundError, SpaceError, TunerError
from tuner.metrics import RequestSample
from tuner.memory import Architecture

#: The baseline configuration: llama-cpp-python's defaults, except the context, which is
#: llama-server's (and Ollama's) 4096 (or the trained context if smaller) because the
#: binding's 512 cannot hold the built-in document prompt. ``n_threads=None`` lets the
#: binding choose (half the logical CPUs for decode, all of them for prompt processing).
BASELINE: dict[str, Any] = {
    "n_ctx": 4096,
    "n_batch": 512,
    "n_ubatch": 512,
    "n_gpu_layers": 0,
    "n_threads": None,
    "n_threads_batch": None,
}
#: GGML tensor types of the KV cache, from the settings registry.
KV_CACHE_TYPES = dict(settings.SETTINGS["kv_cache_type"].llama_cpp_values)
#: Per-request options and the ``create_completion`` keyword each maps to.
_PREDICT = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "seed": "seed",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "stop": "stop",
}
#: LlamaPromptLookupDecoding's default n-gram size (llama-cpp-python 0.3.x).
DRAFT_NGRAM_DEFAULT = 2
#: ggml_log_level ERROR in the ggml that llama-cpp-python >= 0.3 bundles (NONE, DEBUG,
#: INFO, WARN, ERROR, CONT = 0..5); llama-cpp-python's own _logger comment is outdated.
_GGML_LOG_ERROR = 4


def _lib() -> Any:
    return require("llama_cpp", "the llama-cpp engine")


#: A child process that loads a model with llama.cpp's defaults and decodes a few tokens.
_PROBE = ("import sys; from llama_cpp import Llama; "
          "Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)"
          ".create_completion('The sky is', max_tokens=4, temperature=0)")
#: path -> whether llama.cpp's repacked CPU weight buffers decode without crashing (per process).
_EXTRA_BUFFERS_OK: dict[str, tuple[bool, str]] = {}


def extra_buffers_ok(lib: Any, path: str) -> tuple[bool, str]:
    """Whether llama.cpp's extra CPU weight buffers (the AMX and REPACK copies) decode here, and
    what said so. A build with AMX is checked in a child process first: its AMX matrix kernel
    crashed the process (SIGSEGV in ggml_backend_amx_mul_mat) on a virtual machine whose CPU
    reports AMX, so a tuner that trusted it would die in the first trial instead of measuring."""
    raw = lib.llama_print_system_info()
    info = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    if "AMX_INT8 = 1" not in info:
        return True, ""
    real = os.path.realpath(path)
    if real not in _EXTRA_BUFFERS_OK:
        import subprocess
        import sys

        try:
            rc = subprocess.run([sys.executable, "-c", _PROBE, real], capture_output=True, timeout=300).returncode
        except subprocess.TimeoutExpired:
            rc = None
        _EXTRA_BUFFERS_OK[real] = (True, "") if rc == 0 else (
            False, "llama.cpp's AMX build crashed decoding a test prompt ("
            + (f"signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}" if rc is not None else "no answer in 300 s")
            + "): measuring without its repacked CPU weight buffers (use_extra_bufts off)")
    return _EXTRA_BUFFERS_OK[real]


def new_llama(lib: Any, path: str, **kwargs: Any) -> Any:
    """``llama_cpp.Llama`` as the engine loads it (without the extra buffers where they crash):
    tests that measure llama-cpp-python directly load it the same way."""
    ok, _ = extra_buffers_ok(lib, path)
    with _without_extra_buffers(lib, not ok):
        return lib.Llama(model_path=path, **kwargs)


@contextmanager
def _without_extra_buffers(lib: Any, off: bool) -> Iterator[None]:
    """Load with ``use_extra_bufts`` off: Llama() has no keyword for it, so the defaults it
    starts from are changed while it loads."""
    low = getattr(lib, "llama_cpp", None)
    default = getattr(low, "llama_model_default_params", None)
    if not off or default is None or "use_extra_bufts" not in dict(getattr(default(), "_fields_", [])):
        yield
        return

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


# -- GGUF header ---------------------------------------------------------------------------
#: llama_ftype (llama.h) -> the quantization name Ollama shows.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4",
}
_QUANT_IN_NAME = re.compile(r"(?<![a-z0-9])(i?q\d(?:_[a-z0-9]+)*|bf16|f16|f32)(?![a-z0-9])", re.I)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: Arrays longer than this (vocabularies) are skipped, not stored.
_MAX_STORED_ARRAY = 64


@dataclass(frozen=True)
class GgufHeader:
    """The metadata of a GGUF file and its parameter count (from the tensor infos)."""

    version: int
    metadata: dict[str, Any]
    n_params: int
    #: The length of each array too long to keep in ``metadata`` (the token list: the vocabulary).
    array_lengths: dict[str, int] = field(default_factory=dict)


class _Reader:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0
        self.skipped_len = 0

    def scalar(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > len(self.buf) - self.pos:
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if n <= _MAX_STORED_ARRAY:
                return [self.value(item) for _ in range(n)]
            if item in _SCALARS:
                self.pos += n * struct.calcsize(_SCALARS[item])
            elif item == _STRING:
                for _ in range(n):
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            else:
                for _ in range(n):
                    self.value(item)
            if self.pos > len(self.buf):
                raise ValueError("array runs past the end of the file")
            self.skipped_len = n
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def read_gguf(path: str | Path) -> GgufHeader:
    """Read a GGUF file's metadata and tensor infos without loading its weights."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise TunerError(
                    f"'{p}' is not a GGUF file (it starts with {magic!r}, not b'GGUF'): "
                    "pass a .gguf model file (convert others with llama.cpp's convert_hf_to_gguf.py)"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm)
    except OSError as e:
        raise TunerError(f"cannot read GGUF file '{p}': {e.strerror or e}") from None
    except (struct.error, ValueError, OverflowError, MemoryError) as e:
        raise TunerError(f"'{p}' is a damaged or truncated GGUF file ({e}): download it again") from None


def _parse(buf: Any) -> GgufHeader:
    r = _Reader(buf)
    r.pos = 4
    version = r.scalar("<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old for llama.cpp")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_kv > 1 << 20 or n_tensors > 1 << 24:
        raise ValueError(f"implausible header ({n_kv} keys, {n_tensors} tensors)")
    meta: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = r.string()
        r.skipped_len = 0
        value = r.value(r.scalar("<I"))
        if value is not None:
            meta[key] = value
        elif r.skipped_len:
            lengths[key] = r.skipped_len
    n_params = 0
    for _ in range(n_tensors):
        r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        r.pos += 12  # tensor type (u32) and data offset (u64)
        count = 1
        for d in dims:
            count *= d
        n_params += count
    return GgufHeader(version, meta, n_params, lengths)


def file_type_names(lib: Any = None) -> dict[int, str]:
    """:data:`FILE_TYPES`, extended by the binding's own ``LLAMA_FTYPE_MOSTLY_*`` constants."""
    names = dict(FILE_TYPES)
    for attr, value in vars(lib).items() if lib is not None else ():
        if attr.startswith("LLAMA_FTYPE_MOSTLY_") and "GUESSED" not in attr and isinstance(value, int):
            names.setdefault(value, attr.removeprefix("LLAMA_FTYPE_MOSTLY_"))
    return names


def quantization_name(meta: dict[str, Any], path: str | Path, names: dict[int, str] | None = None) -> str:
    """The quantization from ``general.file_type``, else from the file name."""
    ft = meta.get("general.file_type")
    names = FILE_TYPES if names is None else names
    if isinstance(ft, int) and ft in names:
        return names[ft]
    m = _QUANT_IN_NAME.search(Path(path).stem)
    return m.group(1).upper() if m else ""


def _human_params(n: int) -> str:
    """A parameter count the way Ollama prints it: 1.2B, 268.10M, 641K."""
    for scale, unit, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.{digits}f}{unit}"
    return str(n) if n else ""


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# -- paths -------------------------------------------------------------------------------
def _not_found(path: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"GGUF file '{path}' does not exist: check the path (relative paths start at "
        f"{os.getcwd()}), or pass --model DIR to use every .gguf file in a directory"
    )


def _ggufs_in(directory: str) -> list[str]:
    found = sorted(n for n in os.listdir(directory) if n.lower().endswith(".gguf"))
    if not found:
        raise ModelNotFoundError(
            f"directory '{directory}' holds no .gguf file: put GGUF models in it or pass a file path"
        )
    return [os.path.join(directory, n) for n in found]


def expand_models(models: list[str]) -> list[str]:
    """GGUF paths from files and directories (all ``*.gguf`` in each), duplicates dropped."""
    out: list[str] = []
    seen: set[str] = set()
    for m in models:
        m = os.path.expanduser(str(m))
        if os.path.isdir(m):
            paths = _ggufs_in(m)
        elif os.path.isfile(m):
            paths = [m]
        else:
            raise _not_found(m)
        for p in paths:
            real = os.path.realpath(p)
            if real not in seen:
                seen.add(real)
                out.append(p)
    return out


@contextmanager
def _llama_errors(lib: Any) -> Iterator[list[str]]:
    """Collect llama.cpp's error log lines: its exceptions alone say only 'Failed to ...'."""
    lines: list[str] = []
    log_set = getattr(lib, "llama_log_set", None)
    callback_type = getattr(lib, "llama_log_callback", None)
    original = getattr(getattr(lib, "_logger", None), "llama_log_callback", None)
    if log_set is None or callback_type is None or original is None:
        yield lines
        return

    def record(level: int, text: bytes, _user: Any) -> None:
        if level == _GGML_LOG_ERROR:
            lines.append(text.decode("utf-8", errors="replace").strip())

    callback = callback_type(record)
    log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        log_set(original, ctypes.c_void_p(0))


def _end_of_generation(lib: Any, llm: Any, token: int) -> bool:
    """Whether generation ends at ``token`` (any end-of-generation token, as llama-cpp-python's
    completion loop decides; the end-of-sequence token where the library has no such test)."""
    low = getattr(lib, "llama_cpp", None)
    test = getattr(low, "llama_vocab_is_eog", None)
    vocab = getattr(getattr(llm, "_model", None), "vocab", None)
    if test is not None and vocab is not None:
        return bool(test(vocab, token))
    return token == llm.token_eos()


class _CountedDraft:
    """Prompt-lookup drafting that counts what it drafts and what the model accepted, and notes
    llama.cpp's counters when the first draft is asked for (the prompt is evaluated by then).

    The generate loop asks for a draft after each verification with the text so far: its growth
    since the last call is the accepted drafts plus the one token the model sampled itself. The
    last step of a request is cut short by its end, so its accepted count is a lower bound.
    """

    def __init__(self, lib: Any, llm: Any, num_pred_tokens: int, max_ngram_size: int) -> None:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self._lib, self._llm = lib, llm
        self._inner = LlamaPromptLookupDecoding(max_ngram_size=max_ngram_size, num_pred_tokens=num_pred_tokens)
        self.drafted = self.accepted = 0
        self._last_len: int | None = None
        self._last_k = 0
        #: (prompt tokens, prompt ms, decode ms) of llama.cpp's counters at the first call, and
        #: the wall clock then (perf_counter seconds).
        self.at_first: tuple[int, float, float] | None = None
        self.first_s = 0.0

    def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
        n = int(input_ids.shape[0])
        if self._last_len is None:
            perf = self._lib.llama_perf_context(self._llm.ctx)
            self.at_first = (int(perf.n_p_eval), float(perf.t_p_eval_ms), float(perf.t_eval_ms))
            self.first_s = time.perf_counter()
        else:
            self.accepted += max(0, min(self._last_k, n - self._last_len - 1))
        draft = self._inner(input_ids)
        self._last_len, self._last_k = n, int(len(draft))
        self.drafted += self._last_k
        return draft

    def finish(self, total_len: int) -> None:
        """Count the last step, the text (prompt and output tokens) being ``total_len`` long."""
        if self._last_len is not None:
            self.accepted += max(0, min(self._last_k, total_len - self._last_len - 1))
            self._last_len = None


class _TokenCount:
    """A stopping criterion that stops nothing: it counts the tokens sampled."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        self.n += 1
        return False


def draft_config(runner_options: dict[str, Any] | None) -> tuple[int, int] | None:
    """(draft tokens, n-gram size) of prompt-lookup drafting, or None when it is off."""
    opts = runner_options or {}
    n = settings.parse("draft_num_predict", opts.get("draft_num_predict", 0))
    if n <= 0:
        return None
    return n, settings.parse("draft_ngram_size", opts.get("draft_ngram_size", DRAFT_NGRAM_DEFAULT))


class LlamaCppEngine(Engine):
    """Runs GGUF models in this process with llama-cpp-python."""

    name = "llama-cpp"
    supported_params = settings.LLAMA_CPP_PARAMS
    swa_full_cache = True

    def __init__(self, models: list[str]) -> None:
        if not models:
            raise TunerError("the llama-cpp engine needs a model: pass --model PATH.gguf (or a directory)")
        self._lib = _lib()
        self.models = expand_models(list(models))
        self._server: dict[str, Any] = {}
        self._headers: dict[str, GgufHeader] = {}
        self._llm: Any = None
        self._key: tuple[Any, ...] | None = None
        self._pending_load_ms = 0.0
        try:
            params = inspect.signature(self._lib.Llama.__init__).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        # Newer bindings take llama.cpp's enum (with "auto"); 0.3.x only a boolean.
        self._flash_type_api = "flash_attn_type" in params

    # -- models ------------------------------------------------------------------------
    def resolve(self, model: str) -> str:
        """The GGUF file ``model`` names (a directory names its first ``*.gguf``)."""
        m = os.path.expanduser(str(model))
        if os.path.isdir(m):
            return _ggufs_in(m)[0]
        if not os.path.isfile(m):
            raise _not_found(m)
        return m

    def header(self, model: str) -> GgufHeader:
        path = self.resolve(model)
        real = os.path.realpath(path)
        if real not in self._headers:
            self._headers[real] = read_gguf(path)
        return self._headers[real]

    def server_info(self) -> dict[str, Any]:
        raw = self._lib.llama_print_system_info()
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        out = {
            "engine": "llama-cpp",
            "host": "in-process",
            "version": str(getattr(self._lib, "__version__", "unknown")),
            "system_info": text.strip(),
        }
        ok, why = extra_buffers_ok(self._lib, self.resolve(self.models[0])) if self.models else (True, "")
        if not ok:
            # Kept with the study: its numbers were measured without the repacked buffers.
            out["cpu_extra_buffers"] = why
        return out

    def model_info(self, model: str) -> ModelInfo:
        path = self.resolve(model)
        h = self.header(path)
        meta = h.metadata
        arch = str(meta.get("general.architecture", ""))
        block, ctx = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.context_length")
        if not isinstance(block, int) or not isinstance(ctx, int):
            raise TunerError(
                f"'{path}' lacks {arch or '<arch>'}.block_count or .context_length: "
                "is it a GGUF language model? Use a text-generation GGUF"
            )
        return ModelInfo(
            name=str(model),
            architecture=arch,
            block_count=block,
            context_length=ctx,
            family=arch,
            parameter_size=str(meta.get("general.size_label") or _human_params(h.n_params)),
            quantization=quantization_name(meta, path, file_type_names(self._lib)),
            digest=file_digest(path),
            size_bytes=os.path.getsize(path),
            arch=Architecture.from_model_info(
                {**meta, "general.parameter_count": meta.get("general.parameter_count") or h.n_params,
                 f"{arch}.vocab_size": meta.get(f"{arch}.vocab_size") or h.array_lengths.get("tokenizer.ggml.tokens", 0)}
            ).to_dict(),
        )

    def variants(self, model: str) -> list[str]:
        first = self.resolve(model)
        real = os.path.realpath(first)
        return [first] + [p for p in self.models if os.path.realpath(p) != real]

    def ensure_models(self, models: list[str], echo: Echo) -> None:
        for m in models:
            read_gguf(self.resolve(m))

    def gpu_offload(self, model: str, runner_options: dict[str, Any] | None) -> GpuOffload:
        if self._lib.llama_supports_gpu_offload():
            return GpuOffload(True, "llama.cpp", "llama.cpp reports GPU offload support")
        return GpuOffload(False, "llama.cpp", "this llama.cpp build has no GPU offload (CPU only)")

    def server_pids(self) -> list[int]:
        return [os.getpid()]

    def drafting(self, model: str) -> Drafting:
        """Prompt lookup drafts for any model; searched only when asked for (it costs prefill)."""
        try:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding  # noqa: F401
        except ImportError:
            return Drafting(False, "", "this llama-cpp-python has no llama_speculative module")
        return Drafting(True, "prompt-lookup", "llama-cpp-python prompt-lookup decoding (LlamaPromptLookupDecoding): "
                        "searched with --param draft_num_predict=0..8")

    # -- configuration ----------------------------------------------------------------
    def prepare(self, server_settings: dict[str, Any]) -> bool:
        """Store flash_attention / kv_cache_type; they take effect at the next load."""
        stored: dict[str, Any] = {}
        for key, value in server_settings.items():
            if key not in settings.SERVER_PARAMS or key not in self.supported_params:
                raise SpaceError(f"parameter '{key}' is not supported by the llama-cpp engine")
            stored[key] = settings.normalise(key, value)
        self._server = stored
        return False

    def _flash_kwargs(self, value: str | None) -> dict[str, Any]:
        if value is None:
            return {}
        if self._flash_type_api:
            return settings.llama_cpp_kwargs("flash_attention", value)
        if value == "auto":
            return {}
        return {"flash_attn": value == "on"}

    def load_kwargs(self, model: str, runner_options: dict[str, Any] | None) -> dict[str, Any]:
        """The ``Llama`` keywords for runner options (None = :data:`BASELINE`) and server settings."""
        kw = dict(BASELINE)
        kw["n_ctx"] = min(BASELINE["n_ctx"], self._trained_ctx(model))
        opts = runner_options or {}
        for key in settings.RUNNER_PARAMS:
            if key in opts and not settings.SETTINGS[key].per_request:
                kw.update(settings.llama_cpp_kwargs(key, settings.parse(key, opts[key])))
        if draft_config(opts) is not None:
            # Verification samples from every position of a batch (see the module docstring).
            kw["logits_all"] = True
        kw.update(self._flash_kwargs(self._server.get("flash_attention")))
        kv = self._server.get("kv_cache_type")
        if kv is not None:
            kw.update(settings.llama_cpp_kwargs("kv_cache_type", kv))
        return kw

    def _trained_ctx(self, model: str) -> int:
        meta = self.header(model).metadata
        ctx = meta.get(f"{meta.get('general.architecture', '')}.context_length")
        return ctx if isinstance(ctx, int) and ctx > 0 else BASELINE["n_ctx"]

    # -- loading and measuring --------------------------------------------------------
    def _unload(self) -> None:
        llm, self._llm, self._key = self._llm, None, None
        if llm is not None:
            llm.close()
            del llm
            # A Llama sits in reference cycles (its tokenizer points back at it) holding
            # n_batch x n_vocab logits buffers; collect it now so a long study's memory
            # does not grow with every reload.
            gc.collect()

    def _load(self, path: str, kwargs: dict[str, Any], key: tuple[Any, ...]) -> None:
        self._unload()
        self.header(path)  # a clear error for a non-GGUF file before llama.cpp's vague one
        start = time.perf_counter()
        with _llama_errors(self._lib) as errors:
            try:
                llm = new_llama(self._lib, path, verbose=False, **kwargs)
            except (ValueError, RuntimeError, OSError, MemoryError) as e:
                reason = "; ".join(dict.fromkeys(errors))
                if isinstance(e, MemoryError) and kwargs.get("logits_all"):
                    # llama-cpp-python keeps n_ctx x vocabulary floats for a drafting load.
                    reason = "; ".join(filter(None, [reason, "a drafting load keeps the logits of every position "
                                                     "(logits_all): n_ctx x vocabulary x 4 bytes"]))
                shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
                raise LoadError(
                    f"llama.cpp could not load {Path(path).name} with {shown}: {e}" + (f" ({reason})" if reason else "")
                ) from None
        self._pending_load_ms = (time.perf_counter() - start) * 1e3
        self._llm, self._key = llm, key

    def ran_options(self, model: str) -> dict[str, Any]:
        """What the loaded Llama runs with: its context, batch, threads and GPU layers."""
        llm = self._llm
        if llm is None:
            return {}
        out: dict[str, Any] = {}
        for name, get in (("num_ctx", lambda: llm.n_ctx()), ("num_batch", lambda: llm.n_batch),
                          ("num_thread", lambda: llm.n_threads),
                          ("num_gpu", lambda: llm.model_params.n_gpu_layers)):
            try:
                value = get()
            except (AttributeError, TypeError):
                continue
            if isinstance(value, int):
                out[name] = value
        return out

    def _ready(self, model: str, runner_options: dict[str, Any] | None) -> str:
        """Load ``model`` with ``runner_options`` unless it is loaded so; return its path."""
        path = self.resolve(model)
        kwargs = self.load_kwargs(path, runner_options)
        key = (os.path.realpath(path), tuple(sorted(kwargs.items())))
        if key != self._key:
            self._load(path, kwargs, key)
        return path

    def generate(
        self,
        model: str,
        prompt: str,
        runner_options: dict[str, Any] | None,
        predict_options: dict[str, Any],
    ) -> RequestSample:
        start = time.perf_counter()
        path = self._ready(model, runner_options)
        llm, lib = self._llm, self._lib
        completion = {_PREDICT[k]: v for k, v in predict_options.items() if k in _PREDICT}
        dc = draft_config(runner_options)
        draft = None if dc is None else _CountedDraft(lib, llm, *dc)
        llm.draft_model = draft
        counted = _TokenCount()
        if draft is not None:
            completion["stopping_criteria"] = lib.StoppingCriteriaList([counted])
        # Clear the KV cache and the counters so this request evaluates (and counts) its
        # whole prompt, with nothing reused from the previous request.
        llm.reset()
        lib.llama_perf_context_reset(llm.ctx)
        first: float | None = None
        reason = ""
        asked = time.perf_counter()
        try:
            for chunk in llm.create_completion(prompt, stream=True, **completion):
                choice = chunk["choices"][0]
                if first is None and choice.get("text"):
                    first = time.perf_counter()
                if choice.get("finish_reason"):
                    reason = str(choice["finish_reason"])
        except (ValueError, RuntimeError, MemoryError) as e:
            raise LoadError(f"llama.cpp failed to run {Path(path).name}: {e}") from None
        finally:
            llm.draft_model = None
        end = time.perf_counter()
        perf = lib.llama_perf_context(llm.ctx)
        load_ms, self._pending_load_ms = self._pending_load_ms, 0.0
        latency_ms = (end - start) * 1e3
        # n_eval counts decode steps: one fewer than the tokens generated, since the
        # last sampled token is never fed back; n_eval / t_eval is llama.cpp's own rate.
        prompt_tokens, prompt_ms = int(perf.n_p_eval), float(perf.t_p_eval_ms)
        eval_tokens, eval_ms = int(perf.n_eval), float(perf.t_eval_ms)
        drafted = accepted = None
        if draft is not None:
            # create_completion asks the criteria once more after its loop; an end-of-generation
            # token is sampled but not generated.
            generated = counted.n - 1 - (1 if reason == "stop" else 0)
            if draft.at_first is not None:
                n_p, t_p, t_e = draft.at_first
                draft.finish(n_p + generated)
                # With logits_all the counters book the prompt's batch at ~0 ms (seen with
                # llama-cpp-python 0.3.36): its time is the wall clock up to the first draft.
                prompt_tokens, prompt_ms = n_p, (draft.first_s - asked) * 1e3
                eval_tokens = max(0, generated - 1)
                eval_ms = max(0.0, float(perf.t_p_eval_ms) + float(perf.t_eval_ms) - t_p - t_e)
            drafted, accepted = draft.drafted, draft.accepted
        return RequestSample(
            prompt="",
            repeat=0,
            ttft_ms=((first or end) - start) * 1e3,
            latency_ms=latency_ms,
            prompt_tokens=prompt_tokens,
            prompt_eval_ms=prompt_ms,
            eval_tokens=eval_tokens,
            eval_ms=eval_ms,
            load_ms=load_ms,
            total_ms=latency_ms,
            done_reason=reason,
            draft_tokens=drafted,
            draft_accepted=accepted,
        )

    def greedy_pair(self, model: str, prompt: str, runner_options: dict[str, Any],
                    predict_options: dict[str, Any]) -> tuple[str, str] | None:
        """The text with this config's drafting and with none, from the same loaded model."""
        dc = draft_config(runner_options)
        if dc is None:
            return None
        self._ready(model, runner_options)
        llm, lib = self._llm, self._lib
        completion = {_PREDICT[k]: v for k, v in predict_options.items() if k in _PREDICT}
        texts = []
        for draft in (_CountedDraft(lib, llm, *dc), None):
            llm.draft_model = draft
            llm.reset()
            try:
                out = llm.create_completion(prompt, **completion)
            except (ValueError, RuntimeError, MemoryError) as e:
                raise LoadError(f"llama.cpp failed to run {model}: {e}") from None
            finally:
                llm.draft_model = None
            texts.append(str(out["choices"][0]["text"]))
        return texts[0], texts[1]

    def batched_scoring(self, model: str, prompt: str, runner_options: dict[str, Any],
                        predict_options: dict[str, Any]) -> dict[str, Any] | None:
        """Score the greedy text without drafting again in batches of every size one verification
        can evaluate (2 to draft length + 1) with no drafter, and compare each position's logits
        and greedy choice with those made token by token (a drafting load keeps every position's
        logits)."""
        dc = draft_config(runner_options)
        if dc is None:
            return None
        import numpy as np

        self._ready(model, runner_options)
        llm = self._llm
        llm.draft_model = None
        llm.reset()
        by_size: dict[str, float] = {}
        flip: tuple[int, int] | None = None  # (generated token, batch size)
        try:
            tokens = [int(t) for t in llm.tokenize(prompt.encode("utf-8"), special=True)]
            n_prompt = len(tokens)
            llm.eval(tokens)
            # Greedy, one token at a time (temperature 0 is the argmax), up to the request's length
            # and the context, ending where generation would (any end-of-generation token).
            count = min(max(1, int(predict_options.get("num_predict") or 64)), llm.n_ctx() - n_prompt)
            for i in range(count):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if _end_of_generation(self._lib, llm, token):
                    break
                tokens.append(token)
                if i < count - 1:  # the last token is generated, never fed back
                    llm.eval([token])
            n = int(llm.n_tokens)
            # Row i predicts token i + 1: from the prompt's last token to the last one fed back.
            one_by_one = np.array(llm.scores[n_prompt - 1:n], dtype=np.float32)
            picks = one_by_one.argmax(axis=1)
            for size in range(2, dc[0] + 2):
                llm.reset()
                llm.eval(tokens[:n_prompt])
                for i in range(n_prompt, n, size):
                    llm.eval(tokens[i:min(i + size, n)])
                batched = np.array(llm.scores[n_prompt - 1:n], dtype=np.float32)
                by_size[str(size)] = round(float(np.abs(one_by_one - batched).max()), 4)
                differ = np.nonzero(batched.argmax(axis=1) != picks)[0]
                if len(differ) and (flip is None or int(differ[0]) < flip[0]):
                    flip = (int(differ[0]), size)
        except (ValueError, RuntimeError, KeyError, TypeError, MemoryError) as e:
            raise LoadError(f"llama.cpp failed to score {model} in batches: {e}") from None
        finally:
            llm.reset()
        result: dict[str, Any] = {
            "batch": dc[0] + 1, "tokens": int(len(picks)),
            "max_logit_difference": max(by_size.values(), default=0.0),
            "max_logit_difference_by_batch": by_size,
            # Counted from 1: the first generated token is token 1.
            "flips_at_token": None if flip is None else flip[0] + 1,
        }
        if flip is not None:
            row = np.sort(one_by_one[flip[0]])
            result["flip_batch"] = flip[1]
            result["top_two_gap"] = round(float(row[-1] - row[-2]), 4)
        return result

    def close(self) -> None:
        self._unload()
