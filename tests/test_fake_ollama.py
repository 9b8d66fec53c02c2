"""Tests of the fake Ollama server, driven by the real ``ollama`` Python client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from fake_ollama import (
    TEMPLATE_TOKENS,
    FakeModel,
    FakeOllama,
    count_tokens,
    parse_keep_alive,
    prompt_token_count,
)

METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
FULL = {"num_gpu": 27, "num_thread": 4}


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


@pytest.fixture
def client(fake: FakeOllama) -> ollama.Client:
    return ollama.Client(host=fake.url)


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def raw_lines(fake: FakeOllama, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[dict[str, Any]]]:
    resp = httpx.post(fake.url + path, json=body, timeout=10)
    return resp, [json.loads(line) for line in resp.text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- basic shapes


def test_root_version_tags_show_ps_shapes(fake: FakeOllama, client: ollama.Client) -> None:
    assert httpx.get(fake.url).text == "Ollama is running"
    assert httpx.head(fake.url).status_code == 200
    assert httpx.get(fake.url + "/api/version").json() == {"version": "0.33.1"}

    tags = httpx.get(fake.url + "/api/tags").json()["models"]
    names = [m["name"] for m in tags]
    assert set(names) >= {"gemma3:1b", "gemma3:1b-it-q4_K_M", "gemma3:1b-it-qat", "gemma3:1b-it-q8_0",
                          "gemma3:1b-it-fp16", "llama3.2:3b"}
    by_name = {m["name"]: m for m in tags}
    assert by_name["gemma3:1b"]["digest"] == by_name["gemma3:1b-it-q4_K_M"]["digest"]
    assert re.fullmatch(r"[0-9a-f]{64}", by_name["gemma3:1b"]["digest"])
    assert by_name["gemma3:1b-it-qat"]["details"]["quantization_level"] == "Q4_0"
    assert by_name["gemma3:1b"]["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "gemma3",
        "families": ["gemma3"],
        "parameter_size": "999.89M",
        "quantization_level": "Q4_K_M",
    }
    listed = client.list()
    assert any(m.model == "gemma3:1b-it-fp16" for m in listed.models)

    show = client.show("gemma3:1b")
    assert show.modelinfo is not None
    assert show.modelinfo["general.architecture"] == "gemma3"
    assert show.modelinfo["gemma3.block_count"] == 26
    assert show.modelinfo["gemma3.context_length"] == 32768
    assert show.modelinfo["general.parameter_count"] == 999885952
    assert show.capabilities == ["completion"]
    assert show.details is not None and show.details.quantization_level == "Q4_K_M"
    assert show.parameters is not None and 'stop                           "<end_of_turn>"' in show.parameters
    llama = client.show("llama3.2:3b")
    assert llama.modelinfo is not None and llama.modelinfo["llama.block_count"] == 28

    assert client.ps().models == []
    client.generate(model="gemma3:1b", prompt="hi", options={"num_ctx": 2048, **FULL})
    ps = client.ps().models
    assert len(ps) == 1
    assert ps[0].name == "gemma3:1b" and ps[0].context_length == 2048
    assert ps[0].size == ps[0].size_vram  # full offload
    assert ps[0].expires_at is not None
    client.generate(model="gemma3:1b", prompt="hi", options={"num_ctx": 2048, "num_gpu": 10})
    ps = client.ps().models
    assert ps[0].size_vram is not None and ps[0].size is not None and 0 < ps[0].size_vram < ps[0].size


def test_unknown_paths_and_methods(fake: FakeOllama) -> None:
    assert httpx.get(fake.url + "/api/nothing").status_code == 404
    assert httpx.get(fake.url + "/api/generate").status_code == 405
    resp = httpx.post(fake.url + "/api/generate", content=b"{not json")
    assert resp.status_code == 400 and "error" in resp.json()


# ----------------------------------------------------------------------------- generate & chat


def test_streaming_generate_wire_format(fake: FakeOllama) -> None:
    prompt = words(20)
    resp, lines = raw_lines(fake, "/api/generate",
                            {"model": "gemma3:1b", "prompt": prompt, "options": {"num_predict": 5}})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert len(lines) == 6
    for chunk in lines[:-1]:
        assert set(chunk) == {"model", "created_at", "response", "done"}
        assert chunk["done"] is False and chunk["response"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", chunk["created_at"])
    final = lines[-1]
    assert final["done"] is True and final["response"] == ""
    assert final["done_reason"] == "length"
    for key in METRICS:
        assert isinstance(final[key], int) and final[key] > 0
    assert final["prompt_eval_count"] == count_tokens(prompt) + TEMPLATE_TOKENS
    assert final["eval_count"] == 5
    text = "".join(chunk["response"] for chunk in lines[:-1])
    assert count_tokens(text) == 5


def test_streaming_generate_with_client(fake: FakeOllama, client: ollama.Client) -> None:
    prompt = words(30)
    chunks = list(client.generate(model="gemma3:1b", prompt=prompt, stream=True,
                                  options={"num_predict": 12, **FULL}))
    assert len(chunks) == 13
    assert all(not c.done and c.eval_count is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.done and final.done_reason == "length"
    assert final.eval_count == 12
    assert final.prompt_eval_count == prompt_token_count(prompt)
    prefill, decode = fake.speed("gemma3:1b", FULL)
    assert final.eval_duration is not None and final.prompt_eval_duration is not None
    assert final.prompt_eval_count is not None
    assert final.eval_count / final.eval_duration * 1e9 == pytest.approx(decode, rel=1e-3)
    # cold runner: only the 3 template head tokens could have been cached (cache is empty here)
    assert final.prompt_eval_count / final.prompt_eval_duration * 1e9 == pytest.approx(prefill, rel=1e-3)
    assert final.total_duration is not None and final.load_duration is not None
    assert final.total_duration >= final.load_duration + final.prompt_eval_duration + final.eval_duration


def test_non_stream_generate_and_chat(fake: FakeOllama, client: ollama.Client) -> None:
    r = client.generate(model="gemma3:1b", prompt="tell me a story", options={"num_predict": 7})
    assert r.done and r.done_reason == "length" and r.eval_count == 7
    assert r.response is not None and count_tokens(r.response) == 7
    resp = httpx.post(fake.url + "/api/generate", json={"model": "gemma3:1b", "prompt": "x", "stream": False})
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["done_reason"] == "stop" and body["eval_count"] == 128

    messages = [{"role": "user", "content": "hello there friend"}]
    c = client.chat(model="gemma3:1b", messages=messages, options={"num_predict": 4})
    assert c.message.role == "assistant" and c.message.content is not None
    assert count_tokens(c.message.content) == 4
    assert c.prompt_eval_count == prompt_token_count(messages=messages)
    chunks = list(client.chat(model="gemma3:1b", messages=messages, stream=True, options={"num_predict": 3}))
    assert [ch.done for ch in chunks] == [False, False, False, True]
    assert chunks[-1].message.content == "" and chunks[-1].eval_count == 3
    assert len(fake.generate_requests()) == 4
    assert fake.generate_requests()[0]["prompt"] == "tell me a story"


def test_deterministic_output_and_seed(client: ollama.Client) -> None:
    a = client.generate(model="gemma3:1b", prompt="same", options={"num_predict": 6, "temperature": 0})
    b = client.generate(model="gemma3:1b", prompt="same", options={"num_predict": 6, "temperature": 0.9})
    c = client.generate(model="gemma3:1b", prompt="same", options={"num_predict": 6, "seed": 42})
    assert a.response == b.response
    assert c.response != a.response


def test_empty_prompt_loads_and_keep_alive_zero_unloads(fake: FakeOllama, client: ollama.Client) -> None:
    r = client.generate(model="gemma3:1b", prompt="")
    assert r.done and r.done_reason == "load"
    assert len(fake.loads) == 1 and len(client.ps().models) == 1
    r = client.generate(model="gemma3:1b", prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    assert client.ps().models == []
    c = client.chat(model="gemma3:1b", messages=[])
    assert c.done_reason == "load"
    # keep_alive 0 on a real request unloads after the response
    client.generate(model="gemma3:1b", prompt="hi", keep_alive=0)
    assert client.ps().models == []
    client.generate(model="gemma3:1b", prompt="hi", keep_alive="10m")
    assert len(client.ps().models) == 1


def test_keep_alive_parsing() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive(-1) == -1
    with pytest.raises(ValueError):
        parse_keep_alive("soon")


# ----------------------------------------------------------------------------- reload semantics


def test_reload_only_on_runner_option_or_model_change(fake: FakeOllama, client: ollama.Client) -> None:
    def gen(model: str = "gemma3:1b", **opts: Any) -> ollama.GenerateResponse:
        return client.generate(model=model, prompt="hi there", options={"num_predict": 2, **opts})

    first = gen()
    assert len(fake.loads) == 1 and first.load_duration is not None and first.load_duration > 1_000_000_000
    assert fake.loads[0]["options"] == {"num_ctx": 4096, "num_batch": 512, "num_gpu": -1, "main_gpu": 0,
                                        "use_mmap": None, "num_thread": 0}
    warm = gen(temperature=0.1, top_k=5, num_predict=3, seed=7)  # predict options: no reload
    assert len(fake.loads) == 1 and warm.load_duration == 50_000
    gen(num_ctx=4096, num_batch=512)  # explicit defaults: same runner
    assert len(fake.loads) == 1
    changes: list[dict[str, Any]] = [
        {"num_ctx": 8192}, {"num_batch": 256}, {"num_gpu": 27}, {"num_thread": 4}, {"use_mmap": False},
        {"main_gpu": 1},
    ]
    for i, opts in enumerate(changes, start=2):
        r = gen(**opts)
        assert len(fake.loads) == i, opts
        assert r.load_duration is not None and r.load_duration > 1_000_000_000
    gen(main_gpu=1)
    assert len(fake.loads) == 7
    gen(model="gemma3:1b-it-q4_K_M", main_gpu=1)  # same weights blob: runner shared
    assert len(fake.loads) == 7
    gen(model="gemma3:1b-it-q8_0", main_gpu=1)
    assert len(fake.loads) == 8 and fake.loads[-1]["model"] == "gemma3:1b-it-q8_0"
    gen(main_gpu=1)  # max_loaded_models=1: the q4 runner was evicted
    assert len(fake.loads) == 9


def test_unknown_option_ignored_and_wrong_type_rejected(fake: FakeOllama, client: ollama.Client) -> None:
    client.generate(model="gemma3:1b", prompt="x", options={"num_predict": 1, "no_such_option": 3, "numa": True})
    assert len(fake.loads) == 1
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="gemma3:1b", prompt="x", options={"num_ctx": "big"})
    assert err.value.error == 'option "num_ctx" must be of type integer'
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="gemma3:1b", prompt="x", options={"use_mmap": 1})
    assert err.value.error == 'option "use_mmap" must be of type boolean'
    # floats are accepted for integer options (Go truncates)
    client.generate(model="gemma3:1b", prompt="x", options={"num_ctx": 2048.0, "num_predict": 1})
    assert fake.loads[-1]["options"]["num_ctx"] == 2048


# ----------------------------------------------------------------------------- prompt cache


def test_prompt_cache_inflates_prefill_and_nonce_defeats_it(fake: FakeOllama, client: ollama.Client) -> None:
    prompt = words(200)
    opts = {"num_predict": 4, **FULL}
    prefill, _ = fake.speed("gemma3:1b", FULL)

    def rate(r: ollama.GenerateResponse) -> float:
        assert r.prompt_eval_count is not None and r.prompt_eval_duration is not None
        return r.prompt_eval_count / r.prompt_eval_duration * 1e9

    cold = client.generate(model="gemma3:1b", prompt=prompt, options=opts)
    assert rate(cold) == pytest.approx(prefill, rel=1e-3)
    repeat = client.generate(model="gemma3:1b", prompt=prompt, options=opts)
    assert repeat.prompt_eval_count == cold.prompt_eval_count == prompt_token_count(prompt)
    assert rate(repeat) > 50 * prefill  # only one token re-evaluated
    nonced = client.generate(model="gemma3:1b", prompt=f"{uuid.uuid4().hex} {prompt}", options=opts)
    n = prompt_token_count(prompt) + 1
    assert nonced.prompt_eval_count == n
    # the 3 template head tokens (<bos> <start_of_turn> user) are still shared
    assert nonced.prompt_eval_duration == round((n - 3) / prefill * 1e9)
    assert rate(nonced) == pytest.approx(prefill, rel=0.03)
    # a reload clears the cache
    reloaded = client.generate(model="gemma3:1b", prompt=prompt, options={**opts, "num_batch": 256})
    assert rate(reloaded) == pytest.approx(fake.speed("gemma3:1b", {**FULL, "num_batch": 256})[0], rel=1e-3)


def test_prompt_cache_can_be_disabled() -> None:
    with FakeOllama(prompt_cache=False) as fake:
        client = ollama.Client(host=fake.url)
        a = client.generate(model="gemma3:1b", prompt=words(50), options={"num_predict": 1})
        b = client.generate(model="gemma3:1b", prompt=words(50), options={"num_predict": 1})
        assert a.prompt_eval_duration == b.prompt_eval_duration


def test_prompt_truncated_to_num_ctx(client: ollama.Client) -> None:
    r = client.generate(model="gemma3:1b", prompt=words(300), options={"num_ctx": 128, "num_predict": 1})
    assert r.prompt_eval_count is not None and r.prompt_eval_count < 128


# ----------------------------------------------------------------------------- errors


def test_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope:1b", prompt="x")
    assert err.value.status_code == 404 and err.value.error == "model 'nope:1b' not found"
    with pytest.raises(ollama.ResponseError) as err:
        list(client.generate(model="nope", prompt="x", stream=True))
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404


def test_oom_gpu_and_system_memory(fake: FakeOllama, client: ollama.Client) -> None:
    fake.memory_budget_mib = 4000  # a 4 GB GPU: fp16 at 32k with batch 2048 needs 4.2 GB
    opts = {"num_ctx": 32768, "num_gpu": 27, "num_batch": 2048}
    assert not fake.fits("gemma3:1b-it-fp16", opts)
    assert fake.fits("gemma3:1b-it-q8_0", opts)
    assert fake.fits("gemma3:1b-it-fp16", {"num_ctx": 32768, "num_gpu": 20, "num_batch": 2048})
    assert fake.fits("gemma3:1b-it-fp16", {**opts, "num_gpu": -1})  # auto reduces layers
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="gemma3:1b-it-fp16", prompt="x", options=opts)
    assert err.value.status_code == 500
    assert err.value.error == "memory layout cannot be allocated with num_gpu = 27"
    assert client.ps().models == [] and fake.loads == []
    assert fake.failed_loads[-1]["model"] == "gemma3:1b-it-fp16"

    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3.2:3b", prompt="x", options={"num_ctx": 131072, "num_gpu": 0})
    assert err.value.status_code == 500
    assert re.fullmatch(
        r"model requires more system memory \(\d+\.\d GiB\) than is available \(15\.6 GiB\)", err.value.error
    )


def test_current_ollama_memory_behaviour() -> None:
    """Current Ollama (GpuSettings(auto_max_layers=None)): auto places as many layers as fit,
    num_batch drives the compute buffer, unset num_batch and num_ctx take the adaptive defaults,
    the KV cache type changes KV bytes, and failed loads come in Ollama's forms."""
    from fake_ollama import GpuSettings, memory_parts

    current = GpuSettings(auto_max_layers=None)
    with FakeOllama(time_scale=0, memory_budget_mib=1600, gpu=current, default_num_ctx=None) as f:
        m = f.get_model("gemma3:1b")
        assert m is not None
        # Auto fits every layer that fits the GPU less the fit margin; capped at 20 in the old mode.
        assert f.memory("gemma3:1b", {"num_ctx": 2048, "num_batch": 32})["gpu_layers"] == 27
        assert f.memory("gemma3:1b-it-fp16", {"num_ctx": 2048, "num_batch": 32})["gpu_layers"] < 27
        # Unset: the VRAM tier's context (4096 under 24 GiB) and 512 up to 8k, 1024 to 32k.
        assert f.runner_options("gemma3:1b")["num_ctx"] == 4096 and f.runner_options("gemma3:1b")["num_batch"] == 512
        assert f.runner_options("gemma3:1b", {"num_ctx": 16384})["num_batch"] == 1024
        small = f.memory("gemma3:1b", {"num_ctx": 2048, "num_batch": 32, "num_gpu": 27})["gpu_mib"]
        big = f.memory("gemma3:1b", {"num_ctx": 2048, "num_batch": 512, "num_gpu": 27})["gpu_mib"]
        assert big - small > 400  # the logits of a 512-token micro-batch over a 262k vocabulary
    opts = {"num_ctx": 32768, "num_batch": 512}
    f16 = memory_parts(m, opts, 27, GpuSettings())["kv_mib"]
    q8 = memory_parts(m, opts, 27, GpuSettings(kv_cache_type="q8_0"))["kv_mib"]
    q4 = memory_parts(m, opts, 27, GpuSettings(kv_cache_type="q4_0"))["kv_mib"]
    assert q4 < q8 < f16 and abs(q8 / f16 - 34 / 64) < 1e-9
    forms = set()
    for batch in (512, 1024, 2048, 256, 128, 64):
        with FakeOllama(time_scale=0, memory_budget_mib=600, gpu=GpuSettings(oom_style="rotate")) as f:
            err = f.memory("gemma3:1b", {"num_ctx": 2048, "num_batch": batch, "num_gpu": 27})["error"]
            assert err is not None
            forms.add(err.split(":")[0])
    assert {"memory layout cannot be allocated with num_gpu = 27", "llama-server process has terminated"} <= forms


def test_fail_next_then_recovers(fake: FakeOllama, client: ollama.Client) -> None:
    client.generate(model="gemma3:1b", prompt="x", options={"num_predict": 1})
    fake.fail_next(2)
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="gemma3:1b", prompt="x")
        assert err.value.status_code == 500
        assert err.value.error == "llama-server process has terminated: exit status 2"
    assert client.ps().models == []  # the runner crashed
    r = client.generate(model="gemma3:1b", prompt="x", options={"num_predict": 1})
    assert r.done and len(fake.loads) == 2
    fake.fail_next(status=503, error="server busy, please try again.  maximum pending requests exceeded")
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="gemma3:1b", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503


def test_truncated_stream(fake: FakeOllama, client: ollama.Client) -> None:
    fake.truncate_next_stream(after_chunks=2)
    got: list[ollama.GenerateResponse] = []
    with pytest.raises(httpx.HTTPError):
        for chunk in client.generate(model="gemma3:1b", prompt="x", stream=True, options={"num_predict": 10}):
            got.append(chunk)
    assert len(got) == 2 and not any(c.done for c in got)

    fake.truncate_next_stream(after_chunks=3, clean=True)
    chunks = list(client.generate(model="gemma3:1b", prompt="x", stream=True, options={"num_predict": 10}))
    assert len(chunks) == 3 and not any(c.done for c in chunks)
    # the next request is normal again
    chunks = list(client.generate(model="gemma3:1b", prompt="x", stream=True, options={"num_predict": 2}))
    assert chunks[-1].done


def test_malformed_response(fake: FakeOllama, client: ollama.Client) -> None:
    fake.malformed_next()
    with pytest.raises(json.JSONDecodeError):
        list(client.generate(model="gemma3:1b", prompt="x", stream=True, options={"num_predict": 2}))
    fake.malformed_next()
    with pytest.raises(json.JSONDecodeError):
        client.generate(model="gemma3:1b", prompt="x", options={"num_predict": 2})
    assert client.generate(model="gemma3:1b", prompt="x", options={"num_predict": 2}).done


def test_stopped_server_refuses_connections() -> None:
    fake = FakeOllama().start()
    client = ollama.Client(host=fake.url)
    assert client.generate(model="gemma3:1b", prompt="x", options={"num_predict": 1}).done
    fake.stop()
    with pytest.raises(ConnectionError):
        client.generate(model="gemma3:1b", prompt="x")
    fake.start()  # same port again
    assert client.generate(model="gemma3:1b", prompt="x", options={"num_predict": 1}).done
    fake.stop()


# ----------------------------------------------------------------------------- pull & create


def test_pull_progress_and_unknown_model() -> None:
    extra = FakeModel(name="gemma3:270m", size=291_554_930, parameter_size="268.10M", block_count=18)
    with FakeOllama(models=[], pullable=[extra]) as fake:
        client = ollama.Client(host=fake.url)
        assert client.list().models == []
        events = list(client.pull("gemma3:270m", stream=True))
        statuses = [e.status for e in events]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        layer = [e for e in events if e.status and e.status.startswith("pulling ") and e.digest]
        assert layer and layer[0].digest is not None and layer[0].digest.startswith("sha256:")
        assert layer[0].status == f"pulling {layer[0].digest[7:19]}"
        assert any(e.completed == e.total for e in layer)
        assert [m.model for m in client.list().models] == ["gemma3:270m"]
        assert client.pull("gemma3:270m").status == "success"

        with pytest.raises(ollama.ResponseError) as err:
            list(client.pull("nothing:here", stream=True))
        assert err.value.error == "pull model manifest: file does not exist"
        with pytest.raises(ollama.ResponseError) as err:
            client.pull("nothing:here")
        assert err.value.status_code == 500


def test_create_with_parameters(fake: FakeOllama, client: ollama.Client) -> None:
    events = list(client.create("tuned", from_="gemma3:1b", parameters={"num_ctx": 8192, "num_gpu": 27},
                                stream=True))
    assert events[-1].status == "success" and events[-2].status == "writing manifest"
    assert "tuned:latest" in [m.model for m in client.list().models]
    show = client.show("tuned")
    assert show.parameters is not None
    assert "num_ctx                        8192" in show.parameters.splitlines()
    assert "num_gpu                        27" in show.parameters.splitlines()
    assert show.modelinfo is not None and show.modelinfo["gemma3.block_count"] == 26
    # Modelfile parameters become the defaults for runner options; requests still override them
    client.generate(model="tuned", prompt="x", options={"num_predict": 1})
    assert fake.loads[-1]["model"] == "tuned:latest"
    assert fake.loads[-1]["options"]["num_ctx"] == 8192 and fake.loads[-1]["options"]["num_gpu"] == 27
    client.generate(model="tuned", prompt="x", options={"num_predict": 1, "num_ctx": 2048})
    assert fake.loads[-1]["options"]["num_ctx"] == 2048

    with pytest.raises(ollama.ResponseError) as err:
        client.create("bad", from_="gemma3:1b", parameters={"num_ctxx": 1})
    assert err.value.status_code == 400 and err.value.error == "unknown parameter 'num_ctxx'"
    with pytest.raises(ollama.ResponseError) as err:
        client.create("bad", from_="gemma3:1b", parameters={"num_ctx": "big"})
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.create("bad", from_="missing:1b")
    assert "file does not exist" in err.value.error
    assert client.copy("tuned", "tuned-copy").status == "success"
    assert client.delete("tuned-copy").status == "success"
    assert fake.get_model("tuned-copy") is None


# ----------------------------------------------------------------------------- speed model


def test_speed_model_optimum_is_unique_and_documented() -> None:
    best = FakeOllama.optimum()
    assert best["quantization_level"] == "Q4_K_M"
    assert (best["num_gpu"], best["num_thread"], best["num_batch"], best["num_ctx"]) == (27, 4, 512, 2048)
    assert best["decode_tps"] == pytest.approx(312.8, abs=0.1)
    assert FakeOllama.optimum(objective="prefill")["num_batch"] == 512
    fake = FakeOllama()
    base = {"num_ctx": 4096, "num_batch": 512, "num_gpu": 27, "num_thread": 4}
    top = fake.speed("gemma3:1b", base)
    for change in ({"num_gpu": 20}, {"num_gpu": -1}, {"num_gpu": 0}, {"num_thread": 0}, {"num_thread": 8},
                   {"num_thread": 3}, {"num_batch": 256}, {"num_batch": 1024}, {"num_ctx": 8192}):
        slower = fake.speed("gemma3:1b", {**base, **change})
        assert slower[1] < top[1], change
    for model in ("gemma3:1b-it-qat", "gemma3:1b-it-q8_0", "gemma3:1b-it-fp16"):
        assert fake.speed(model, base)[1] < top[1]
    assert fake.speed("gemma3:1b", {**base, "num_gpu": 99}) == top  # clamped to 27 layers
    # -1 (auto) behaves like 20 layers when they fit
    assert fake.speed("gemma3:1b", {**base, "num_gpu": -1}) == fake.speed("gemma3:1b", {**base, "num_gpu": 20})
    assert fake.speed("gemma3:1b", {**base, "num_thread": 0}) == fake.speed("gemma3:1b", {**base, "num_thread": 2})


def test_speed_and_fits_overrides() -> None:
    def speed_fn(model: str, opts: dict[str, Any]) -> tuple[float, float]:
        return 1000.0, 10.0 * (1 + opts["num_batch"] / 512)

    with FakeOllama(speed_fn=speed_fn, fits_fn=lambda m, o: o["num_ctx"] <= 4096) as fake:
        client = ollama.Client(host=fake.url)
        r = client.generate(model="gemma3:1b", prompt="a b c", options={"num_predict": 20, "num_batch": 512})
        assert r.eval_count is not None and r.eval_duration is not None
        assert r.eval_count / r.eval_duration * 1e9 == pytest.approx(20.0, rel=1e-3)
        assert not fake.fits("gemma3:1b", {"num_ctx": 8192})
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="gemma3:1b", prompt="x", options={"num_ctx": 8192, "num_gpu": 5})
        assert err.value.error == "memory layout cannot be allocated with num_gpu = 5"


def test_wall_clock_is_proportional_to_synthetic_durations() -> None:
    with FakeOllama(time_scale=0.01) as fake:
        client = ollama.Client(host=fake.url)
        client.generate(model="llama3.2:3b", prompt="", options={"num_gpu": 0})  # cold load
        t0 = time.perf_counter()
        first = None
        final = None
        for chunk in client.generate(model="llama3.2:3b", prompt=words(100), stream=True,
                                     options={"num_gpu": 0, "num_predict": 20}):
            if first is None:
                first = time.perf_counter() - t0
            final = chunk
        total = time.perf_counter() - t0
        assert first is not None and final is not None
        assert final.prompt_eval_duration is not None and final.total_duration is not None
        assert first >= final.prompt_eval_duration * 1e-9 * 0.01 * 0.9
        assert total >= final.total_duration * 1e-9 * 0.01 * 0.9
        assert total < final.total_duration * 1e-9 * 0.01 + 0.5


def test_standalone_cli_prints_url() -> None:
    script = Path(__file__).with_name("fake_ollama.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert httpx.get(url + "/api/version").json()["version"] == "0.33.1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
