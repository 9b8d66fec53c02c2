"""The llama-cpp engine against a fake ``llama_cpp`` module and tiny hand-written GGUF files."""

from __future__ import annotations

import hashlib
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tuner.engines import get_engine
from tuner.engines import llamacpp
from tuner.engines.llamacpp import BASELINE, LlamaCppEngine, quantization_name, read_gguf
from tuner.errors import LoadError, ModelNotFoundError, SpaceError, TunerError

PREDICT = {"num_predict": 8, "temperature": 0.0, "seed": 42}


# -- a GGUF writer -------------------------------------------------------------------------
def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value: Any) -> bytes:
    if isinstance(value, bool):
        return _s(key) + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return _s(key) + struct.pack("<II", 4, value)
    if isinstance(value, float):
        return _s(key) + struct.pack("<If", 6, value)
    if isinstance(value, str):
        return _s(key) + struct.pack("<I", 8) + _s(value)
    if all(isinstance(v, str) for v in value):
        return _s(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_s(v) for v in value)
    return _s(key) + struct.pack("<IIQ", 9, 6, len(value)) + struct.pack(f"<{len(value)}f", *value)


def write_gguf(
    path: Path,
    arch: str = "gemma3",
    block_count: int = 18,
    context_length: int = 32768,
    file_type: int | None = 15,
    extra: dict[str, Any] | None = None,
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = (("tok_embd", (640, 1000)), ("norm", (640,))),
) -> Path:
    meta: dict[str, Any] = {"general.architecture": arch, f"{arch}.block_count": block_count,
                            f"{arch}.context_length": context_length}
    if file_type is not None:
        meta["general.file_type"] = file_type
    meta["tokenizer.ggml.tokens"] = [f"tok{i}" for i in range(300)]  # long: skipped, not stored
    meta["tokenizer.ggml.scores"] = [0.5] * 300
    meta.update(extra or {})
    out = bytearray(b"GGUF") + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        out += _kv(k, v)
    for name, dims in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", 12, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out) + b"\0" * 64)
    return path


# -- a fake llama_cpp ----------------------------------------------------------------------
class FakeCtx:
    def __init__(self) -> None:
        self.perf = SimpleNamespace(t_p_eval_ms=0.0, t_eval_ms=0.0, n_p_eval=0, n_eval=0)
        self.perf_resets = 0


class FakeLlama:
    """Records its load keywords; each completion adds to the perf counters like llama.cpp."""

    created: list[FakeLlama] = []
    fail_load: str | None = None
    fail_run: str | None = None

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        if FakeLlama.fail_load:
            raise ValueError(FakeLlama.fail_load)
        self.model_path, self.kwargs = model_path, kwargs
        self.ctx = FakeCtx()
        self.closed = False
        self.resets = 0
        self.calls: list[dict[str, Any]] = []
        FakeLlama.created.append(self)

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        self.closed = True

    def create_completion(self, prompt: str, stream: bool = False, **kw: Any) -> Iterator[dict[str, Any]]:
        assert stream
        self.calls.append({"prompt": prompt, **kw})
        n = int(kw.get("max_tokens", 16))
        if FakeLlama.fail_run:
            raise ValueError(FakeLlama.fail_run)
        p = self.ctx.perf
        p.n_p_eval += len(prompt.split())
        p.t_p_eval_ms += 10.0
        yield {"choices": [{"text": "", "finish_reason": None}]}
        time.sleep(0.02)
        for _ in range(n):
            yield {"choices": [{"text": " w", "finish_reason": None}]}
        p.n_eval += n - 1
        p.t_eval_ms += (n - 1) * 20.0
        yield {"choices": [{"text": "", "finish_reason": "length"}]}


class FakeLlamaEnum(FakeLlama):
    """A binding whose Llama takes llama.cpp's flash-attention enum."""

    def __init__(self, model_path: str, *, flash_attn_type: int = -1, **kwargs: Any) -> None:
        super().__init__(model_path, flash_attn_type=flash_attn_type, **kwargs)


def _fake_lib(llama: type = FakeLlama) -> SimpleNamespace:
    def reset(ctx: FakeCtx) -> None:
        ctx.perf = SimpleNamespace(t_p_eval_ms=0.0, t_eval_ms=0.0, n_p_eval=0, n_eval=0)
        ctx.perf_resets += 1

    return SimpleNamespace(
        __version__="9.9.9",
        Llama=llama,
        llama_perf_context=lambda ctx: SimpleNamespace(**vars(ctx.perf)),
        llama_perf_context_reset=reset,
        llama_print_system_info=lambda: b"CPU : AVX2 = 1 | ",
        llama_supports_gpu_offload=lambda: False,
    )


@pytest.fixture
def fake_lib(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    lib = _fake_lib()
    monkeypatch.setattr(llamacpp, "_lib", lambda: lib)
    monkeypatch.setattr(FakeLlama, "created", [])
    monkeypatch.setattr(FakeLlama, "fail_load", None)
    monkeypatch.setattr(FakeLlama, "fail_run", None)
    return lib


@pytest.fixture
def gguf(tmp_path: Path) -> str:
    return str(write_gguf(tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"))


# -- mapping -------------------------------------------------------------------------------
def test_get_engine_builds_the_llamacpp_engine(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = get_engine("llama-cpp", models=[gguf])
    assert isinstance(engine, LlamaCppEngine)
    assert engine.supported_params == (
        "variant", "num_ctx", "num_batch", "num_gpu", "num_thread", "flash_attention", "kv_cache_type",
        "draft_num_predict", "draft_ngram_size",
    )


def test_baseline_is_the_documented_default_config(fake_lib: SimpleNamespace, gguf: str, tmp_path: Path) -> None:
    engine = LlamaCppEngine([gguf])
    assert engine.load_kwargs(gguf, None) == BASELINE
    assert BASELINE == {"n_ctx": 4096, "n_batch": 512, "n_ubatch": 512, "n_gpu_layers": 0,
                        "n_threads": None, "n_threads_batch": None}
    small = str(write_gguf(tmp_path / "small.gguf", context_length=2048))
    assert engine.load_kwargs(small, None)["n_ctx"] == 2048


def test_runner_options_and_server_settings_map_to_llama_keywords(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    opts = {"num_ctx": 1024, "num_batch": 64, "num_gpu": -1, "num_thread": 2}
    assert engine.prepare({"flash_attention": "on", "kv_cache_type": "q8_0"}) is False
    assert engine.load_kwargs(gguf, opts) == {
        "n_ctx": 1024, "n_batch": 64, "n_ubatch": 64, "n_gpu_layers": -1,
        "n_threads": 2, "n_threads_batch": 2, "flash_attn": True, "type_k": 8, "type_v": 8,
    }
    engine.prepare({"flash_attention": "off", "kv_cache_type": "q4_0"})
    kw = engine.load_kwargs(gguf, {"num_batch": 2048, "num_thread": 0})
    assert (kw["n_batch"], kw["n_ubatch"], kw["n_threads"], kw["n_threads_batch"]) == (2048, 2048, None, None)
    assert (kw["flash_attn"], kw["type_k"], kw["type_v"]) == (False, 2, 2)
    assert kw["n_ctx"] == BASELINE["n_ctx"]  # options not given keep the baseline's value
    engine.prepare({"flash_attention": "auto", "kv_cache_type": "f16"})
    kw = engine.load_kwargs(gguf, opts)
    assert "flash_attn" not in kw and (kw["type_k"], kw["type_v"]) == (1, 1)
    engine.prepare({})
    assert "type_k" not in engine.load_kwargs(gguf, opts)


def test_flash_attention_uses_the_enum_where_the_binding_has_it(
    monkeypatch: pytest.MonkeyPatch, gguf: str
) -> None:
    lib = _fake_lib(FakeLlamaEnum)
    monkeypatch.setattr(llamacpp, "_lib", lambda: lib)
    engine = LlamaCppEngine([gguf])
    for value, enum in (("auto", -1), ("off", 0), ("on", 1)):
        engine.prepare({"flash_attention": value})
        kw = engine.load_kwargs(gguf, None)
        assert kw["flash_attn_type"] == enum and "flash_attn" not in kw


def test_prepare_rejects_unknown_settings(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    with pytest.raises(SpaceError, match="kv_cache_type.*f16, q8_0, q4_0"):
        engine.prepare({"kv_cache_type": "q5_1"})
    with pytest.raises(SpaceError, match="num_parallel"):
        engine.prepare({"num_parallel": 2})


# -- loading and measuring -----------------------------------------------------------------
def test_reloads_only_when_a_load_parameter_changes(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    opts = {"num_ctx": 1024, "num_batch": 64, "num_gpu": 0, "num_thread": 1}
    first = engine.generate(gguf, "a b c", opts, PREDICT)
    second = engine.generate(gguf, "a b c d", dict(opts), PREDICT)
    assert len(FakeLlama.created) == 1
    assert first.load_ms > 0 and second.load_ms == 0
    engine.prepare({"kv_cache_type": "f16"})
    assert engine.prepare({"kv_cache_type": "f16"}) is False
    engine.generate(gguf, "x", opts, PREDICT)
    engine.generate(gguf, "x", opts, PREDICT)
    assert len(FakeLlama.created) == 2
    engine.generate(gguf, "x", {**opts, "num_thread": 2}, PREDICT)
    assert len(FakeLlama.created) == 3
    engine.generate(gguf, "x", None, PREDICT)
    assert len(FakeLlama.created) == 4
    old = FakeLlama.created[:-1]
    assert all(llm.closed for llm in old) and not FakeLlama.created[-1].closed
    assert FakeLlama.created[-1].model_path == gguf
    engine.close()
    assert FakeLlama.created[-1].closed


def test_sample_comes_from_the_perf_counters_of_this_request_only(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    for _ in range(3):
        s = engine.generate(gguf, "one two three four", None, {"num_predict": 9, "temperature": 0.0, "seed": 7})
    llm = FakeLlama.created[0]
    assert llm.resets == 3 and llm.ctx.perf_resets == 3
    assert llm.calls[-1] == {"prompt": "one two three four", "max_tokens": 9, "temperature": 0.0, "seed": 7}
    assert (s.prompt, s.repeat) == ("", 0)
    assert (s.prompt_tokens, s.prompt_eval_ms) == (4, 10.0)
    assert (s.eval_tokens, s.eval_ms) == (8, 160.0)
    assert s.decode_tps == pytest.approx(50.0) and s.prefill_tps == pytest.approx(400.0)
    assert s.done_reason == "length" and s.load_ms == 0
    # TTFT is the first non-empty chunk, after the fake's 20 ms pause
    assert 20.0 <= s.ttft_ms <= s.latency_ms == s.total_ms


def test_load_failure_is_a_load_error(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    engine.generate(gguf, "x", {"num_ctx": 1024}, PREDICT)
    FakeLlama.fail_load = "Failed to create llama_context"
    with pytest.raises(LoadError, match="could not load gemma-3-270m-q4_k_m.gguf with n_ctx=2048.*Failed to create"):
        engine.generate(gguf, "x", {"num_ctx": 2048}, PREDICT)
    assert FakeLlama.created[0].closed
    FakeLlama.fail_load = None
    engine.generate(gguf, "x", {"num_ctx": 1024}, PREDICT)
    assert len(FakeLlama.created) == 2


def test_a_drafting_load_that_cannot_allocate_its_logits_is_a_load_error(fake_lib: SimpleNamespace, gguf: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # llama-cpp-python keeps n_ctx x vocabulary floats when drafting (logits_all): at a large
    # num_ctx numpy cannot allocate them. A config that does not fit, not a crash of the study.
    class Hungry(FakeLlama):
        def __init__(self, model_path: str, **kwargs: Any) -> None:
            if kwargs.get("logits_all"):
                raise MemoryError("Unable to allocate 32.0 GiB for an array with shape (32768, 262144)")
            super().__init__(model_path, **kwargs)

    monkeypatch.setattr(fake_lib, "Llama", Hungry)
    engine = LlamaCppEngine([gguf])
    with pytest.raises(LoadError, match=r"Unable to allocate 32.0 GiB .*\(a drafting load keeps the logits of every "
                                        r"position \(logits_all\)"):
        engine.generate(gguf, "x", {"num_ctx": 32768, "draft_num_predict": 4}, PREDICT)
    engine.generate(gguf, "x", {"num_ctx": 32768}, PREDICT)


def test_a_load_error_carries_llama_cpp_s_logged_reason(monkeypatch: pytest.MonkeyPatch, gguf: str) -> None:
    lib = _fake_lib()
    logger: dict[str, Any] = {"cb": "original"}
    lib._logger = SimpleNamespace(llama_log_callback="original")
    lib.llama_log_callback = lambda fn: fn
    lib.llama_log_set = lambda cb, user: logger.update(cb=cb)

    class Failing(FakeLlama):
        def __init__(self, model_path: str, **kwargs: Any) -> None:
            logger["cb"](3, b"a warning\n", None)
            logger["cb"](4, b"llama_init_from_model: quantized V cache requires flash_attn to be enabled\n", None)
            raise ValueError("Failed to create llama_context")

    lib.Llama = Failing
    monkeypatch.setattr(llamacpp, "_lib", lambda: lib)
    engine = LlamaCppEngine([gguf])
    engine.prepare({"kv_cache_type": "q8_0", "flash_attention": "off"})
    with pytest.raises(LoadError) as err:
        engine.generate(gguf, "x", None, PREDICT)
    assert str(err.value).endswith(
        "type_k=8, type_v=8: Failed to create llama_context "
        "(llama_init_from_model: quantized V cache requires flash_attn to be enabled)"
    )
    assert logger["cb"] == "original"  # llama-cpp-python's own logger is back


def test_run_failure_is_a_load_error(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    FakeLlama.fail_run = "Requested tokens (2002) exceed context window of 1024"
    with pytest.raises(LoadError, match="failed to run .*exceed context window"):
        engine.generate(gguf, "x", {"num_ctx": 1024}, PREDICT)


# -- paths and metadata --------------------------------------------------------------------
def test_missing_path_names_the_path_and_the_fix(fake_lib: SimpleNamespace, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError, match=r"'.*nope\.gguf' does not exist: check the path.*--model DIR"):
        LlamaCppEngine([missing])
    engine = LlamaCppEngine([str(write_gguf(tmp_path / "m.gguf"))])
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        engine.model_info(missing)
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        engine.generate(missing, "x", None, PREDICT)


def test_a_directory_expands_to_its_gguf_files(fake_lib: SimpleNamespace, tmp_path: Path) -> None:
    d = tmp_path / "models"
    b = str(write_gguf(d / "gemma-q8_0.gguf", file_type=7))
    a = str(write_gguf(d / "gemma-q4_k_m.gguf"))
    (d / "README.txt").write_text("not a model")
    engine = LlamaCppEngine([str(d), a])  # the file again: listed once
    assert engine.models == [a, b]
    assert engine.variants(str(d)) == [a, b]
    assert engine.variants(b) == [b, a]
    assert engine.model_info(str(d)).quantization == "Q4_K_M"
    engine.generate(str(d), "x", None, PREDICT)
    assert FakeLlama.created[-1].model_path == a
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no .gguf file"):
        LlamaCppEngine([str(empty)])


def test_a_non_gguf_file_is_a_clear_error(fake_lib: SimpleNamespace, tmp_path: Path) -> None:
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 a zip, not a model")
    engine = LlamaCppEngine([str(bad)])
    with pytest.raises(TunerError, match="is not a GGUF file.*pass a .gguf model file"):
        engine.model_info(str(bad))
    with pytest.raises(TunerError, match="is not a GGUF file"):
        engine.generate(str(bad), "x", None, PREDICT)
    assert FakeLlama.created == []
    good = write_gguf(tmp_path / "cut.gguf")
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(TunerError, match="damaged or truncated"):
        read_gguf(cut)


def test_model_info_reads_the_gguf_header(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    info = engine.model_info(gguf)
    data = Path(gguf).read_bytes()
    assert (info.architecture, info.block_count, info.context_length) == ("gemma3", 18, 32768)
    assert info.quantization == "Q4_K_M" and info.family == "gemma3"
    assert info.parameter_size == "641K"  # 640*1000 + 640 parameters, no size label
    assert info.digest == hashlib.sha256(data).hexdigest() and info.size_bytes == len(data)
    header = read_gguf(gguf)
    assert "tokenizer.ggml.tokens" not in header.metadata and header.n_params == 640 * 1000 + 640


def test_model_info_prefers_the_size_label_and_names_missing_facts(fake_lib: SimpleNamespace, tmp_path: Path) -> None:
    labelled = str(write_gguf(tmp_path / "a.gguf", extra={"general.size_label": "270M"}))
    engine = LlamaCppEngine([labelled])
    assert engine.model_info(labelled).parameter_size == "270M"
    no_ctx = tmp_path / "b.gguf"
    write_gguf(no_ctx, arch="clip", extra={}, context_length=0)
    raw = no_ctx.read_bytes().replace(b"clip.context_length", b"clip.xontext_length")
    no_ctx.write_bytes(raw)
    with pytest.raises(TunerError, match="lacks clip.block_count or .context_length"):
        engine.model_info(str(no_ctx))


def test_parameter_counts_print_like_ollama() -> None:
    assert [llamacpp._human_params(n) for n in (268_098_176, 1_235_814_400, 2_000_000_000, 640_640, 12, 0)] == [
        "268.10M", "1.2B", "2B", "641K", "12", ""]


def test_quantization_falls_back_to_the_file_name() -> None:
    assert quantization_name({"general.file_type": 7}, "x.gguf") == "Q8_0"
    assert quantization_name({"general.file_type": 99}, "x-q6_k.gguf") == "Q6_K"
    assert quantization_name({"general.file_type": 99}, "x.gguf", {99: "NEW4"}) == "NEW4"
    assert quantization_name({}, "/m/Llama-3.2-1B-Instruct-IQ4_XS.gguf") == "IQ4_XS"
    assert quantization_name({}, "gemma-3-1b-it-q4_0.gguf") == "Q4_0"
    assert quantization_name({}, "model-bf16.gguf") == "BF16"
    assert quantization_name({}, "model.gguf") == ""


def test_file_types_match_the_installed_binding() -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    names = llamacpp.file_type_names(llama_cpp)
    for name, value in vars(llama_cpp).items():
        if name.startswith("LLAMA_FTYPE_MOSTLY_") and "GUESSED" not in name:
            quant = name.removeprefix("LLAMA_FTYPE_MOSTLY_")
            assert names[value] == quant and llamacpp.FILE_TYPES.get(value, quant) == quant, name
    assert names[llama_cpp.LLAMA_FTYPE_ALL_F32] == "F32"
    for kind, value in llamacpp.KV_CACHE_TYPES.items():
        assert getattr(llama_cpp, f"GGML_TYPE_{kind.upper()}") == value


def test_server_info_and_gpu(fake_lib: SimpleNamespace, gguf: str) -> None:
    engine = LlamaCppEngine([gguf])
    assert engine.server_info() == {
        "engine": "llama-cpp", "host": "in-process", "version": "9.9.9", "system_info": "CPU : AVX2 = 1 |",
    }
    off = engine.gpu_offload(gguf, None)
    assert (off.offloads, off.source) == (False, "llama.cpp")
    fake_lib.llama_supports_gpu_offload = lambda: True
    assert engine.gpu_offload(gguf, None).offloads is True


def test_extra_cpu_buffers_are_checked_where_the_build_has_amx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An AMX build decodes a test prompt in a child first; a crash there turns the repacked
    buffers off (and says so) instead of killing the study in its first trial."""
    from tuner.engines import llamacpp

    class Lib:
        def __init__(self, info: bytes) -> None:
            self.info = info

        def llama_print_system_info(self) -> bytes:
            return self.info

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert llamacpp.extra_buffers_ok(Lib(b"CPU : AVX2 = 1 | REPACK = 1 |"), str(model)) == (True, "")
    monkeypatch.setattr(llamacpp, "_EXTRA_BUFFERS_OK", {})
    monkeypatch.setattr(llamacpp, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    ok, why = llamacpp.extra_buffers_ok(Lib(b"CPU : AMX_INT8 = 1 |"), str(model))
    assert not ok and why.startswith("llama.cpp's AMX build crashed decoding a test prompt (signal 11)")
    monkeypatch.setattr(llamacpp, "_EXTRA_BUFFERS_OK", {})
    monkeypatch.setattr(llamacpp, "_PROBE", "pass")
    assert llamacpp.extra_buffers_ok(Lib(b"CPU : AMX_INT8 = 1 |"), str(model)) == (True, "")


class ScoringLlama(FakeLlama):
    """Keeps logits for every position (as a drafting load does) from a known rule: the best next
    token follows from the history, the runner-up 0.01 behind; a batch of 3 or more lifts the
    runner-up above it from its second token on (other kernels), a batch of 2 moves a logit by
    0.001 and flips nothing."""

    VOCAB = 8

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        super().__init__(model_path, **kwargs)
        import numpy as np

        self.scores = np.zeros((kwargs.get("n_ctx", 64), self.VOCAB), dtype=np.float32)
        self.n_tokens = 0
        self.history: list[int] = []
        self.draft_model = None

    def reset(self) -> None:
        super().reset()
        self.n_tokens, self.history = 0, []

    def n_ctx(self) -> int:
        return int(self.scores.shape[0])

    def token_eos(self) -> int:
        return 0

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return [1] + [2 + b % 5 for b in text[:5]]

    def eval(self, tokens: list[int]) -> None:
        for j, t in enumerate(tokens):
            self.history.append(int(t))
            best = 1 + sum(self.history) % 7
            second = 1 + (best % 7)
            row = self.scores[self.n_tokens]
            row[:] = 0.0
            row[best], row[second] = 10.0, 9.99
            if len(tokens) >= 3 and j >= 1 and len(self.history) > 6:
                row[second] += 1.0
            elif len(tokens) == 2 and j == 1:
                row[self.VOCAB - 1] += 0.001
            self.n_tokens += 1


def test_the_batched_scoring_control_counts_positions_right(fake_lib: SimpleNamespace, gguf: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LlamaCppEngine(models=[gguf])
    llm = ScoringLlama(gguf, n_ctx=64)
    monkeypatch.setattr(engine, "_ready", lambda model, runner: setattr(engine, "_llm", llm))
    out = engine.batched_scoring(gguf, "hello", {"draft_num_predict": 3}, {"num_predict": 8})
    assert out is not None
    # Rows: the prompt's last position, then the 7 generated tokens fed back: 8 greedy choices.
    assert out["tokens"] == 8 and out["batch"] == 4
    assert out["max_logit_difference_by_batch"] == {"2": 0.001, "3": 1.0, "4": 1.0}
    # The first batch of 3 starts at the first generated token; its second token's logits predict
    # the third generated token, the first whose greedy choice flips (counted from 1).
    assert out["flips_at_token"] == 3 and out["flip_batch"] == 3 and out["top_two_gap"] == pytest.approx(0.01, abs=1e-4)
    # The control leaves no drafter and nothing evaluated behind.
    assert llm.draft_model is None and llm.n_tokens == 0
    assert engine.batched_scoring(gguf, "hello", {"draft_num_predict": 0}, {"num_predict": 8}) is None
