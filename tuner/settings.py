"""The settings registry: every tunable runtime setting, and its name wherever it is written.

One row per setting gives its level (what a change costs), value type, allowed values, what
it means, and how each place spells it: the ``ollama serve`` environment (server settings),
the Modelfile ``PARAMETER`` / request option (runner settings) and ``llama_cpp.Llama``'s
keywords. :func:`parse` is the one reader of a value: the search space (``--param``, TOML),
the managed server, the llama.cpp engine and export all call it, so they accept the same
values and agree on what they mean.

Flash attention is ``auto``, ``on`` or ``off`` (any case), or a TOML boolean (true = on).
The strings "true", "1", "false" and "0" are refused everywhere: export once took them while
the space and the server refused them; now what a study can store is exactly what exports.

Levels: ``model`` picks the model file or tag; ``runner`` is fixed when the model loads (a
change reloads it); ``server`` lives in the server's environment (a change restarts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tuner.errors import SpaceError

LEVELS = ("model", "runner", "server")


@dataclass(frozen=True)
class Setting:
    """One tunable setting: what it is, which values it takes, and its name in each place."""

    name: str
    level: str
    kind: type
    help: str
    #: The only values a string setting takes (matched case-insensitively, stored lower-case).
    choices: tuple[str, ...] = ()
    #: The integer that means "the runtime decides", also accepted as the word ``auto``.
    auto: int | None = None
    #: Smallest valid value, and what to tell a user below it.
    minimum: int | None = None
    too_low: str = ""
    #: ``ollama serve`` environment variable (server settings).
    env: str | None = None
    #: How a value is written there where it differs from ``str(value)``; None: leave it unset.
    env_values: Mapping[str, str | None] = field(default_factory=dict)
    #: Modelfile ``PARAMETER`` name, which is also the request's ``options`` key.
    modelfile: str | None = None
    #: ``llama_cpp.Llama`` keywords set to the value.
    llama_cpp: tuple[str, ...] = ()
    #: llama.cpp's value where it differs from ours (GGML type ids, enums, None = not passed).
    llama_cpp_values: Mapping[Any, Any] = field(default_factory=dict)
    #: Values shown in messages as an example of what to write after ``name=``.
    example: str = ""
    #: Taken per request by a running model (no reload on Ollama); the llama-cpp engine still
    #: reloads when drafting turns on or off (see tuner/engines/llamacpp.py).
    per_request: bool = False

    @property
    def words(self) -> dict[str, int]:
        """Words accepted in place of a number (``auto``)."""
        return {} if self.auto is None else {"auto": self.auto}


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # The variant is the Modelfile's FROM line, not a PARAMETER.
        Setting("variant", "model", str, "quantization variant (Ollama tag or GGUF path)",
                llama_cpp=("model_path",), example="gemma3:1b-it-q4_K_M,gemma3:1b-it-q8_0"),
        Setting("num_ctx", "runner", int, "context window in tokens",
                minimum=1, too_low="it must be a positive number of tokens",
                modelfile="num_ctx", llama_cpp=("n_ctx",), example="2048,4096"),
        # n_ubatch follows n_batch, as in Ollama's runner: with n_ubatch capped at 512 every
        # num_batch >= 512 would run the same physical batch.
        Setting("num_batch", "runner", int, "prompt-processing batch size",
                minimum=1, too_low="it must be at least 1",
                modelfile="num_batch", llama_cpp=("n_batch", "n_ubatch"), example="256,512"),
        Setting("num_gpu", "runner", int, "layers offloaded to the GPU (-1 = auto, 0 = CPU only)",
                auto=-1, minimum=-1, too_low="use -1 (auto), 0 (CPU) or a layer count",
                modelfile="num_gpu", llama_cpp=("n_gpu_layers",), example="-1,20"),
        # 0 passes nothing to llama.cpp, so the binding picks its own thread counts.
        Setting("num_thread", "runner", int, "CPU threads (0 = runtime decides)",
                auto=0, minimum=0, too_low="use 0 (auto) or a thread count",
                modelfile="num_thread", llama_cpp=("n_threads", "n_threads_batch"),
                llama_cpp_values={0: None}, example="2..8"),
        # Unset means auto (Ollama >= 0.12.5); the enum is llama.h's llama_flash_attn_type.
        Setting("flash_attention", "server", str, "flash attention: auto, on or off",
                choices=("auto", "on", "off"),
                env="OLLAMA_FLASH_ATTENTION", env_values={"on": "1", "off": "0", "auto": None},
                llama_cpp=("flash_attn_type",), llama_cpp_values={"auto": -1, "off": 0, "on": 1}),
        # GGML tensor types (ggml.h: GGML_TYPE_F16 = 1, Q4_0 = 2, Q8_0 = 8).
        Setting("kv_cache_type", "server", str, "KV-cache type: f16, q8_0 or q4_0",
                choices=("f16", "q8_0", "q4_0"), env="OLLAMA_KV_CACHE_TYPE",
                llama_cpp=("type_k", "type_v"), llama_cpp_values={"f16": 1, "q8_0": 8, "q4_0": 2}),
        Setting("num_parallel", "server", int, "parallel request slots",
                minimum=1, too_low="it must be at least 1", env="OLLAMA_NUM_PARALLEL", example="1,2"),
        # Speculative decoding (docs/drafting.md): Ollama >= 0.31 drafts with a model's built-in
        # MTP heads; llama-cpp-python with prompt lookup (LlamaPromptLookupDecoding num_pred_tokens).
        Setting("draft_num_predict", "runner", int, "tokens drafted per step (0 = no drafting)",
                minimum=0, too_low="use 0 (off) or a number of draft tokens", modelfile="draft_num_predict",
                llama_cpp=("draft_model",), example="0..8", per_request=True),
        # llama-cpp only: LlamaPromptLookupDecoding's max_ngram_size (Ollama has no such option).
        Setting("draft_ngram_size", "runner", int, "longest n-gram prompt lookup matches (llama-cpp)",
                minimum=1, too_low="it must be at least 1", llama_cpp=("draft_model",), example="1..4",
                per_request=True),
    )
}


def names(*levels: str) -> tuple[str, ...]:
    """Setting names of the given levels, in registry order."""
    return tuple(n for n, s in SETTINGS.items() if s.level in levels)


RUNNER_PARAMS = names("runner")
SERVER_PARAMS = names("server")
#: Settings a running server takes per request (no restart): what any Ollama engine tunes (the
#: variant, and every runner setting Ollama has a request option for).
REQUEST_PARAMS = tuple(n for n in names("model", "runner") if n == "variant" or SETTINGS[n].modelfile)
#: The speculative-decoding settings: in a space only where the engine says the model can draft.
DRAFT_PARAMS = ("draft_num_predict", "draft_ngram_size")
#: Server setting -> its ``ollama serve`` environment variable.
ENV_VARS = {n: s.env for n, s in SETTINGS.items() if s.env}
#: Settings llama-cpp-python can load with.
LLAMA_CPP_PARAMS = tuple(n for n, s in SETTINGS.items() if s.llama_cpp)


def or_list(items: tuple[str, ...] | list[str]) -> str:
    """``a, b or c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def get(name: str) -> Setting:
    """The setting called ``name``; raises SpaceError listing the known ones."""
    try:
        return SETTINGS[name]
    except KeyError:
        raise SpaceError(f"unknown parameter '{name}': known parameters are {', '.join(SETTINGS)}") from None


def parse(name: str, raw: Any) -> Any:
    """The canonical value of setting ``name`` for ``raw`` (CLI text, TOML or stored value).

    Text is stripped; ``auto`` gives the setting's auto number; choices are lower-cased. The
    range (``minimum``) is :func:`check`'s. Raises SpaceError naming what is accepted.
    """
    s = get(name)
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in s.words:
            return s.words[text.lower()]
        if s.kind is int:
            try:
                return int(text)
            except ValueError:
                raise SpaceError(
                    f"invalid value '{text}' for {name}: expected an integer" + (" or 'auto'" if s.words else "")
                ) from None
        if s.choices:
            if text.lower() not in s.choices:
                raise SpaceError(f"invalid value '{text}' for {name}: choose from {', '.join(s.choices)}")
            return text.lower()
        return text
    if s.kind is int and isinstance(raw, bool):
        raise SpaceError(f"invalid value {raw!r} for {name}: expected an integer")
    if s.kind is int and isinstance(raw, int):
        return raw
    if isinstance(raw, bool) and name == "flash_attention":  # a TOML boolean
        return "on" if raw else "off"
    raise SpaceError(f"invalid value {raw!r} for {name}: expected {s.kind.__name__}")


def check(name: str, value: Any) -> None:
    """Raise SpaceError when a parsed value is below the setting's minimum."""
    s = SETTINGS[name]
    if s.minimum is not None and value < s.minimum:
        raise SpaceError(f"{name}={value} is invalid: {s.too_low}")


def normalise(name: str, raw: Any) -> Any:
    """:func:`parse` then :func:`check`: a value that is safe to run or write."""
    value = parse(name, raw)
    check(name, value)
    return value


def expected(name: str) -> str:
    """What ``name`` accepts, for messages: ``auto, on or off``, ``a whole number >= 1``."""
    s = SETTINGS[name]
    if s.choices:
        return or_list(s.choices)
    if s.kind is int:
        text = "a whole number" + ("" if s.minimum is None else f" >= {s.minimum}")
        return text + (" or 'auto'" if s.words else "")
    return "a model tag or GGUF path" if name == "variant" else s.kind.__name__


def example(name: str) -> str:
    """``name=...`` with example values, for messages."""
    s = SETTINGS[name]
    return f"{name}={s.example or ','.join(s.choices)}"


def env_value(name: str, value: Any) -> str | None:
    """How a normalised server setting is written to its environment variable (None: unset)."""
    s = SETTINGS[name]
    if value in s.env_values:
        return s.env_values[value]
    return str(value)


def llama_cpp_kwargs(name: str, value: Any) -> dict[str, Any]:
    """The ``llama_cpp.Llama`` keywords for a normalised value."""
    s = SETTINGS[name]
    if not s.llama_cpp:
        raise SpaceError(f"parameter '{name}' is not supported by the llama-cpp engine")
    native = s.llama_cpp_values.get(value, value)
    return {kw: native for kw in s.llama_cpp}
