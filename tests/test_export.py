"""tuner/export.py: every format, trial choice, the infeasible refusal, and model creation."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from test_report import STUDY, XSS, make_study
from tuner import export, results
from tuner.errors import ExportError, MissingDependencyError, StudyError, TunerError

MODELFILE_COMMANDS = {"from", "adapter", "parameter", "template", "system", "license", "message", "requires"}
INT_KEYS = {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
            "main_gpu", "num_thread"}
FLOAT_KEYS = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty"}


def parse_modelfile(text: str) -> tuple[str, dict[str, list[str]]]:
    """A small parser of Ollama's Modelfile grammar (parser/parser.go): returns FROM and PARAMETERs.

    Each non-blank line is a ``#`` comment or ``COMMAND args``; commands are case-insensitive;
    PARAMETER takes ``key value`` where value may be double-quoted. Fails on anything else.
    """
    source: str | None = None
    params: dict[str, list[str]] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        command, _, rest = line.partition(" ")
        command = command.lower()
        assert command in MODELFILE_COMMANDS, f"line {n}: unknown command {command!r}"
        rest = rest.strip()
        assert rest, f"line {n}: {command} needs an argument"
        if command == "from":
            assert source is None, f"line {n}: second FROM"
            assert len(shlex.split(rest)) == 1, f"line {n}: FROM takes one name"
            source = rest
        elif command == "parameter":
            key, _, value = rest.partition(" ")
            value = value.strip()
            assert value, f"line {n}: PARAMETER {key} has no value"
            if value.startswith('"'):
                value = json.loads(value)
            params.setdefault(key, []).append(value)
    assert source is not None, "no FROM line"
    return source, params


def check_parameters(params: dict[str, list[str]]) -> None:
    """Every key is an Ollama option (api/types.go) and its value parses as Ollama would."""
    for key, values in params.items():
        assert key in export.OLLAMA_OPTIONS, f"unknown parameter '{key}'"
        for v in values:
            if key in INT_KEYS:
                assert re.fullmatch(r"-?\d+", v), f"{key} {v!r} is not an integer"
            elif key in FLOAT_KEYS:
                float(v)
            elif key == "use_mmap":
                assert v in ("true", "false")


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    return make_study(tmp_path_factory.mktemp("study"))


def test_modelfile_best(study_url: tuple[str, Any]) -> None:
    r = export.export(study_url[0], None, "modelfile")
    assert r.trial_number == 1 and r.path is None and r.text is not None
    source, params = parse_modelfile(r.text)
    check_parameters(params)
    assert source == "gemma3:1b"
    assert params == {"num_ctx": ["4096"], "num_batch": ["512"], "num_gpu": ["27"]}
    assert f"# study '{STUDY}', trial #1" in r.text
    # Measured once each in the search (no re-validation): the header says so.
    assert ("\n# 1.50x the baseline (Ollama defaults) on decode_tps (each measured once in the search; no interval: "
            "--validate 2 gives one)\n") in r.text
    assert "decode 60.0 ± 1.2 tok/s" in r.text
    # Server settings are explained, not emitted as commands.
    assert "flash_attention=on, kv_cache_type=q8_0" in r.text and "--format env --trial 1" in r.text


def test_modelfile_skips_automatic_values(study_url: tuple[str, Any]) -> None:
    study = study_url[1]
    v = results.view(study.get_trials()[1])
    v.options.update(num_gpu=-1, num_thread=0)
    text = export.modelfile_text(v, study)
    _, params = parse_modelfile(text)
    assert "num_gpu" not in params and "num_thread" not in params
    assert "# left to Ollama (automatic): num_gpu=-1, num_thread=0" in text


def test_modelfile_rejects_unknown_option(study_url: tuple[str, Any]) -> None:
    study = study_url[1]
    v = results.view(study.get_trials()[1])
    v.options["flash_attn"] = True
    with pytest.raises(ExportError, match="trial #1 sets 'flash_attn', which is not an Ollama option"):
        export.modelfile_text(v, study)
    v.options.pop("flash_attn")
    v.options["num_ctx"] = "4096"
    with pytest.raises(ExportError, match="trial #1 has num_ctx='4096' but Ollama needs a int"):
        export.modelfile_text(v, study)


def test_modelfile_baseline_and_newlines_in_names(study_url: tuple[str, Any]) -> None:
    study = study_url[1]
    v = results.view(study.get_trials()[0])
    v.violations.append("bad\nFROM evil")
    v.constraints["ttft_p95_ms"] = 0.5  # over the limit: not feasible
    text = export.modelfile_text(v, study)
    source, params = parse_modelfile(text)
    assert source == "gemma3:1b" and params == {}
    assert "(baseline: Ollama defaults)" in text
    assert "FROM evil" not in [line.strip() for line in text.splitlines()]


def test_parser_rejects_bad_modelfiles() -> None:
    with pytest.raises(AssertionError, match="unknown command"):
        parse_modelfile("FROM x\nPARAMS num_ctx 1\n")
    with pytest.raises(AssertionError, match="no FROM"):
        parse_modelfile("PARAMETER num_ctx 1\n")
    with pytest.raises(AssertionError, match="unknown parameter 'flash_attention'"):
        check_parameters(parse_modelfile("FROM x\nPARAMETER flash_attention true\n")[1])


def test_json_format(study_url: tuple[str, Any]) -> None:
    body = json.loads(export.export(study_url[0], STUDY, "json").text or "")
    assert body == {"model": "gemma3:1b", "options": {"num_ctx": 4096, "num_batch": 512, "num_gpu": 27}}
    assert set(body["options"]) <= set(export.OLLAMA_OPTIONS)


def test_json_baseline_has_empty_options(study_url: tuple[str, Any]) -> None:
    r = export.export(study_url[0], STUDY, "json", trial_number=0)
    assert json.loads(r.text or "") == {"model": "gemma3:1b", "options": {}}
    assert r.trial_number == 0


def _env_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key) and " " not in value, line
            out[key] = value
    return out


def test_env_format(study_url: tuple[str, Any]) -> None:
    assert _env_lines(export.export(study_url[0], None, "env").text or "") == {
        "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_KV_CACHE_TYPE": "q8_0"}
    off = export.export(study_url[0], None, "env", trial_number=2).text or ""
    assert _env_lines(off) == {"OLLAMA_FLASH_ATTENTION": "0", "OLLAMA_KV_CACHE_TYPE": "f16"}
    auto = export.export(study_url[0], None, "env", trial_number=3).text or ""
    assert _env_lines(auto) == {"OLLAMA_KV_CACHE_TYPE": "f16"}
    assert "# OLLAMA_FLASH_ATTENTION left unset: flash attention on auto" in auto


def test_env_num_parallel(study_url: tuple[str, Any]) -> None:
    study = study_url[1]
    v = results.view(study.get_trials()[1])
    v.server["num_parallel"] = 4
    assert _env_lines(export.env_text(v, study))["OLLAMA_NUM_PARALLEL"] == "4"
    v.server["num_parallel"] = 0
    with pytest.raises(ExportError, match="num_parallel=0: expected a whole number >= 1"):
        export.env_text(v, study)


def test_env_when_nothing_server_level_was_tuned(tmp_path: Path) -> None:
    url, _ = make_study(tmp_path, searched=("num_ctx", "num_batch"))
    text = export.export(url, None, "env").text or ""
    assert _env_lines(text) == {}
    assert "tuned no server-level setting" in text


def test_csv_every_trial(study_url: tuple[str, Any]) -> None:
    import pandas as pd

    r = export.export(study_url[0], None, "csv")
    assert r.path is None and r.trial_number is None
    df = pd.read_csv(io.StringIO(r.text or ""))
    assert list(df["number"]) == list(range(7))
    for col in ("state", "feasible", "baseline", "value", "params_num_ctx", "params_flash_attention",
                "decode_tps_mean", "decode_tps_sd", "decode_tps_p95", "ttft_ms_p95", "gpu_power_mean_w",
                "tokens_per_joule", "gpu0_power_mean_w", "constraint_ttft_p95_ms", "violations", "error"):
        assert col in df.columns, col
    assert df.loc[1, "decode_tps_mean"] == 60.0
    assert "out of memory" in df.loc[5, "error"]
    assert df.loc[6, "state"] == "FAIL"


def test_csv_to_file(study_url: tuple[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "trials.csv"
    r = export.export(study_url[0], None, "csv", output=str(out))
    assert r.path == out and out.read_text(encoding="utf-8") == r.text
    with pytest.raises(ExportError, match="--trial does not apply to csv"):
        export.export(study_url[0], None, "csv", trial_number=1)


def test_parquet_default_file(study_url: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    r = export.export(study_url[0], None, "parquet")
    assert r.text is None and r.path == Path("gemma3_1b_127.0.0.1_11434.parquet")
    df = pd.read_parquet(r.path)
    assert len(df) == 7 and df.loc[2, "params_num_ctx"] == 8192
    assert set(pd.read_csv(io.StringIO(export.csv_text(study_url[1]))).columns) == set(df.columns)


def test_parquet_without_pyarrow(study_url: tuple[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingDependencyError, match=r"parquet export needs the package 'pyarrow': install it with `pip install pyarrow`"):
        export.parquet_bytes(study_url[1])


def test_specific_trial_and_infeasible_trial(study_url: tuple[str, Any]) -> None:
    r = export.export(study_url[0], None, "json", trial_number=2)
    assert json.loads(r.text or "")["options"]["num_ctx"] == 8192
    with pytest.raises(StudyError, match=r"^trial 4 is not feasible \(complete\): pass --allow-infeasible to use it anyway$"):
        export.export(study_url[0], None, "modelfile", trial_number=4)
    with pytest.raises(StudyError, match="trial 5 is not feasible .*out of memory"):
        export.export(study_url[0], None, "json", trial_number=5)
    with pytest.raises(StudyError, match=f"study '{re.escape(STUDY)}' has no trial 99"):
        export.export(study_url[0], None, "json", trial_number=99)


def test_refuses_when_nothing_is_feasible(tmp_path: Path) -> None:
    url, _ = make_study(tmp_path, feasible=False)
    with pytest.raises(StudyError) as e:
        export.export(url, None, "modelfile")
    assert str(e.value) == (
        f"study '{STUDY}' has no feasible trial: relax the limits and run more trials, "
        "or pass --allow-infeasible to use the least-violating one"
    )
    r = export.export(url, None, "modelfile", allow_infeasible=True)
    assert "# WARNING: this trial is not feasible (p95 TTFT 1150 ms > 500 ms)" in (r.text or "")
    assert r.trial_number == 2 and "(not feasible)" in r.message
    parse_modelfile(r.text or "")


def test_unknown_format_and_bad_model_name(study_url: tuple[str, Any]) -> None:
    with pytest.raises(ExportError, match="unknown export format 'yaml': choose from modelfile, json, env, csv, parquet"):
        export.export(study_url[0], None, "yaml")
    study = study_url[1]
    bad = study.get_trials()[4]
    assert XSS in results.view(bad).model
    with pytest.raises(ExportError, match="trial #4 has no usable model name"):
        export.json_text(bad, study)


def test_output_write_failure(study_url: tuple[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match=r"cannot write the modelfile export to .*/file/Modelfile: .*/file is a file, not a folder; pass another --output$"):
        export.export(study_url[0], None, "modelfile", output=str(blocker / "Modelfile"))


def _create(storage: str, name: str, echo: Any = lambda s: None, **kw: Any) -> str:
    from tuner.engines.ollama import create_model

    plan = export.create_plan(storage, None, name, **kw)
    return create_model(plan.name, plan.source, plan.parameters, echo, host=plan.host, announce=plan.announce(),
                        note=plan.note)


def test_create_model_with_fake_ollama(study_url: tuple[str, Any]) -> None:
    fake_ollama = pytest.importorskip("fake_ollama")
    lines: list[str] = []
    with fake_ollama.FakeOllama() as fake:
        plan = export.create_plan(study_url[0], None, "gemma3-tuned", host=fake.url)
        msg = _create(study_url[0], "gemma3-tuned", lines.append, host=fake.url)
        model = fake.get_model("gemma3-tuned")
    assert model is not None
    assert {k: model.parameters[k] for k in ("num_ctx", "num_batch", "num_gpu")} == {
        "num_ctx": 4096, "num_batch": 512, "num_gpu": 27}
    assert plan.trial_number == 1 and "`ollama run gemma3-tuned`" in msg
    assert "--format env" in msg  # flash_attention and kv_cache_type need the server env
    assert any("success" in line for line in lines)
    assert parse_modelfile(plan.modelfile)[0] == "gemma3:1b"


def test_create_model_stubbed(study_url: tuple[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.engines.ollama import OllamaEngine

    calls: list[tuple[str, str, dict[str, Any]]] = []

    def fake_create(self: OllamaEngine, name: str, source: str, parameters: dict[str, Any], echo: Any) -> None:
        calls.append((self.host, name, dict(parameters, source=source)))

    monkeypatch.setattr(OllamaEngine, "create", fake_create)
    _create(study_url[0], "base", trial_number=0)
    _create(study_url[0], "fast", host="127.0.0.1:9", trial_number=2)
    assert calls == [
        ("http://127.0.0.1:11434", "base", {"source": "gemma3:1b"}),
        ("http://127.0.0.1:9", "fast", {"num_ctx": 8192, "num_batch": 256, "num_gpu": 27, "source": "gemma3:1b"}),
    ]
    with pytest.raises(ExportError, match="invalid model name 'my model'"):
        export.create_plan(study_url[0], None, "my model")


def test_create_targets_the_studys_host_not_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import invoke
    from fake_ollama import FakeOllama

    with FakeOllama() as tuned_on, FakeOllama() as other:
        r = invoke("--model", "gemma3:1b", "--host", tuned_on.url, "--trials", "1", "--repeats", "1",
                   "--num-predict", "4", "--study", "s", "--validate", "0", "--no-roofline")
        assert r.exit_code == 0, r.output
        monkeypatch.setenv("OLLAMA_HOST", other.url)
        r = invoke("export", "s", "--create", "gemma3-tuned")
        assert r.exit_code == 0, r.output
        assert tuned_on.get_model("gemma3-tuned") is not None and other.get_model("gemma3-tuned") is None
        assert f"created 'gemma3-tuned' on {tuned_on.url}" in r.output


def test_create_reports_a_404_from_the_endpoint_as_such(study_url: tuple[str, Any]) -> None:
    from conftest import static_server

    with static_server(404, b"404 page not found") as url:
        with pytest.raises(TunerError) as e:
            _create(study_url[0], "gemma3-tuned", host=url)
    assert str(e.value) == (
        f"Ollama at {url} answered 404 Not Found to /api/create (404 page not found): this server, or a proxy "
        "in front of it, does not offer model creation; write a Modelfile with `tune export --format modelfile "
        "-o Modelfile` and run `ollama create gemma3-tuned -f Modelfile` on the server")
