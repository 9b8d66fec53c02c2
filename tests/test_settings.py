from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tuner import export, server, settings, space
from tuner.engines import llamacpp, ollama
from tuner.errors import ExportError, ServerSetupError, SpaceError
from tuner.settings import SETTINGS


def test_every_setting_states_its_facts() -> None:
    assert list(SETTINGS) == ["variant", "num_ctx", "num_batch", "num_gpu", "num_thread",
                              "flash_attention", "kv_cache_type", "num_parallel", "draft_num_predict",
                              "draft_ngram_size"]
    for name, s in SETTINGS.items():
        assert s.name == name and s.level in settings.LEVELS and s.help, name
        assert s.kind in (int, str), name
        assert not s.choices or s.kind is str, name
        assert (s.minimum is None) == (not s.too_low), name
        if s.level == "runner" and name != "draft_ngram_size":
            # A runner setting is a Modelfile PARAMETER and request option that Ollama types as int
            # (but prompt lookup's n-gram size, which only llama-cpp-python has).
            assert s.modelfile and export.OLLAMA_OPTIONS[s.modelfile] is s.kind is int, name
            assert s.env is None and s.llama_cpp, name
        if s.level == "server":
            assert s.env and s.env.startswith("OLLAMA_") and s.modelfile is None, name
        if s.level == "model":
            assert s.env is None and s.modelfile is None, name
    assert settings.ENV_VARS == {"flash_attention": "OLLAMA_FLASH_ATTENTION",
                                 "kv_cache_type": "OLLAMA_KV_CACHE_TYPE", "num_parallel": "OLLAMA_NUM_PARALLEL"}
    assert SETTINGS["num_gpu"].words == {"auto": -1} and SETTINGS["num_thread"].words == {"auto": 0}


def test_llama_cpp_arguments() -> None:
    kw = settings.llama_cpp_kwargs
    assert kw("num_ctx", 2048) == {"n_ctx": 2048}
    assert kw("num_batch", 64) == {"n_batch": 64, "n_ubatch": 64}
    assert kw("num_gpu", -1) == {"n_gpu_layers": -1}
    assert kw("num_thread", 0) == {"n_threads": None, "n_threads_batch": None}
    assert kw("num_thread", 4) == {"n_threads": 4, "n_threads_batch": 4}
    assert kw("flash_attention", "auto") == {"flash_attn_type": -1}
    assert kw("kv_cache_type", "q8_0") == {"type_k": 8, "type_v": 8}
    with pytest.raises(SpaceError, match="'num_parallel' is not supported by the llama-cpp engine"):
        kw("num_parallel", 2)


def test_readers_take_their_lists_from_the_registry() -> None:
    assert space.RUNNER_PARAMS is settings.RUNNER_PARAMS == ("num_ctx", "num_batch", "num_gpu", "num_thread",
                                                            "draft_num_predict", "draft_ngram_size")
    assert space.SERVER_PARAMS is settings.SERVER_PARAMS == ("flash_attention", "kv_cache_type", "num_parallel")
    assert ollama.OllamaEngine.supported_params == ("variant", *settings.RUNNER_PARAMS[:-1])
    assert settings.DRAFT_PARAMS == tuple(n for n, s in SETTINGS.items() if n.startswith("draft_"))
    assert space.SpaceLimits(1, 1, 1, False).supported == ollama.OllamaEngine.supported_params
    assert llamacpp.LlamaCppEngine.supported_params == tuple(n for n in SETTINGS if n != "num_parallel")
    assert llamacpp.KV_CACHE_TYPES == {"f16": 1, "q8_0": 8, "q4_0": 2}
    assert export.DEFAULT_EQUIVALENT == {"num_gpu": -1, "num_thread": 0}


def test_keep_alive_is_defined_once() -> None:
    assert ollama.KEEP_ALIVE is server.KEEP_ALIVE


def test_parse_words_and_types() -> None:
    assert settings.parse("num_gpu", " Auto ") == -1
    assert settings.parse("num_thread", "auto") == 0
    assert settings.parse("num_ctx", "2048") == 2048
    assert settings.parse("kv_cache_type", "Q8_0") == "q8_0"
    assert settings.parse("variant", " gemma3:1b-it-qat ") == "gemma3:1b-it-qat"
    with pytest.raises(SpaceError, match=r"^invalid value 'big' for num_gpu: expected an integer or 'auto'$"):
        settings.parse("num_gpu", "big")
    with pytest.raises(SpaceError, match=r"^invalid value True for num_ctx: expected an integer$"):
        settings.parse("num_ctx", True)
    with pytest.raises(SpaceError, match=r"^unknown parameter 'num_cores': known parameters are variant, "):
        settings.parse("num_cores", "2")
    settings.check("num_thread", 0)
    with pytest.raises(SpaceError, match=r"^num_parallel=0 is invalid: it must be at least 1$"):
        settings.normalise("num_parallel", "0")
    assert settings.expected("flash_attention") == "auto, on or off"
    assert settings.expected("num_parallel") == "a whole number >= 1"
    assert settings.expected("num_gpu") == "a whole number >= -1 or 'auto'"


def _space(name: str, raw: Any) -> Any:
    try:
        return space.parse_param_option(f"{name}={raw}")[1][0] if isinstance(raw, str) else space.parse_value(name, raw)
    except SpaceError:
        return "rejected"


def _server(name: str, raw: Any) -> Any:
    try:
        return server.effective_settings({name: raw}, "0.33.1")[name]
    except ServerSetupError:
        return "rejected"


def _trial(server: dict[str, Any]) -> Any:
    return SimpleNamespace(number=1, server=server, effective_server=server)


def _export(name: str, raw: Any) -> Any:
    try:
        env, _ = export._server_env(_trial({name: raw}))
    except ExportError:
        return "rejected"
    return env.get(settings.ENV_VARS[name])


FLASH = [("auto", "auto", None), ("ON", "on", "1"), (" off ", "off", "0"), (True, "on", "1"), (False, "off", "0"),
         ("true", "rejected", "rejected"), ("1", "rejected", "rejected"), ("false", "rejected", "rejected"),
         ("0", "rejected", "rejected"), ("none", "rejected", "rejected"), (1, "rejected", "rejected")]


@pytest.mark.parametrize(("raw", "value", "env"), FLASH, ids=[repr(f[0]) for f in FLASH])
def test_flash_attention_forms_are_read_alike_everywhere(raw: Any, value: str, env: str | None) -> None:
    assert _space("flash_attention", raw) == value
    assert _server("flash_attention", raw) == value
    assert _export("flash_attention", raw) == env
    if value != "rejected":
        assert server.server_env({"flash_attention": raw}, "0.33.1", {}).get("OLLAMA_FLASH_ATTENTION") == env


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("kv_cache_type", "Q4_0", "q4_0"), ("kv_cache_type", "q5_1", "rejected"), ("kv_cache_type", True, "rejected"),
    ("num_parallel", 4, 4), ("num_parallel", "2", 2), ("num_parallel", True, "rejected"),
])
def test_server_settings_are_read_alike_by_server_and_export(name: str, raw: Any, value: Any) -> None:
    assert _server(name, raw) == value
    assert _export(name, raw) == (value if value == "rejected" else str(value))


def test_a_value_below_the_minimum_is_refused_by_server_and_export() -> None:
    assert _server("num_parallel", 0) == _export("num_parallel", 0) == "rejected"
    with pytest.raises(ServerSetupError, match=r"^invalid num_parallel 0: use a whole number >= 1$"):
        server.effective_settings({"num_parallel": 0}, None)
    with pytest.raises(ExportError, match=r"^trial #1 has flash_attention='true': expected auto, on or off$"):
        export._server_env(_trial({"flash_attention": "true"}))
