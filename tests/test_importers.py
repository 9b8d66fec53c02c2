"""Reading other tools' results: llama-bench in its four formats, Ollama's bench tool, and
ad-hoc JSON through a mapping file; every field kept, bad rows named by file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner import importers as imp
from tuner.importers import ImportFileError, lookup, read_file
from tuner.record import DECODE_TPS, LOAD_MS, PREFILL_TPS

DATA = Path(__file__).parent / "data" / "imports"
LB = {"num_batch": 2048, "num_thread": 8, "num_gpu": -1, "kv_cache_type": "f16", "flash_attention": "auto"}


@pytest.mark.parametrize("name,fmt,lines", [
    ("llama-bench.json", imp.LLAMA_BENCH_JSON, [2, 48]),
    ("llama-bench.jsonl", imp.LLAMA_BENCH_JSONL, [1, 2]),
    ("llama-bench.csv", imp.LLAMA_BENCH_CSV, [2, 3]),
])
def test_llama_bench_machine_formats_import_every_field(name: str, fmt: str, lines: list[int]) -> None:
    got_fmt, rows = read_file(DATA / name)
    assert got_fmt == fmt
    assert [(r.line, r.test, r.metric, r.mean, r.sd) for r in rows] == [
        (lines[0], "pp512", PREFILL_TPS, 7100.002165, 140.34152), (lines[1], "tg128", DECODE_TPS, 118.881588, 1.041811)]
    pp = rows[0]
    assert pp.settings == LB and pp.model == "models/Qwen2.5-7B-Instruct-Q4_K_M.gguf" and pp.tokens == 512
    assert pp.environment == {"build_commit": "8cf427ff", "build_number": 5163, "backends": "CUDA", "devices": "auto",
                              "cpu_info": "AMD Ryzen 7 7800X3D 8-Core Processor", "gpu_info": "NVIDIA GeForce RTX 4080"}
    # Nothing dropped: every field llama-bench wrote is mapped, measured or kept raw.
    source = json.loads((DATA / "llama-bench.json").read_text())[0]
    kept = {*pp.raw, "n_batch", "n_threads", "n_gpu_layers", "type_k", "type_v", "flash_attn", "model_filename",
            *pp.environment, "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
            "samples_ns", "samples_ts"}
    assert set(source) <= kept
    assert pp.raw["n_ubatch"] == 512 and pp.raw["model_type"] == "qwen2 7B Q4_K - Medium"
    if fmt != imp.LLAMA_BENCH_CSV:  # the CSV printer writes no samples
        assert pp.samples == (6863.1, 7147.55, 7136.37, 7115.79, 7237.21)


def test_llama_bench_markdown_reads_the_columns_it_printed() -> None:
    fmt, rows = read_file(DATA / "llama-bench.md")
    assert fmt == imp.LLAMA_BENCH_MD
    assert [(r.line, r.model, r.test, r.metric, r.mean, r.sd, r.settings) for r in rows] == [
        (3, "llama 7B mostly Q4_0", "pp1024", PREFILL_TPS, 1436.51, 3.66, {"num_batch": 128, "num_gpu": -1}),
        (4, "llama 7B mostly Q4_0", "pp1024", PREFILL_TPS, 1932.43, 23.48, {"num_batch": 256, "num_gpu": -1}),
        (5, "llama 7B mostly Q4_0", "tg128", DECODE_TPS, 123.83, 0.25, {"num_batch": 512, "num_gpu": -1}),
        (6, "qwen2 7B Q4_K - Medium", "pp512 @ d512", PREFILL_TPS, 6425.91, 18.88, {"num_batch": 2048, "num_gpu": -1}),
    ]
    assert rows[0].environment == {"backends": "CUDA"} and rows[0].raw["model_size_text"] == "3.56 GiB"


@pytest.mark.parametrize("name,fmt", [("ollama-bench.csv", imp.OLLAMA_BENCH_CSV), ("ollama.bench", imp.OLLAMA_BENCHSTAT)])
def test_ollama_bench_output_imports(name: str, fmt: str) -> None:
    got, rows = read_file(DATA / name)
    assert got == fmt
    assert [(r.model, r.test, r.metric, r.mean, r.tokens) for r in rows] == [
        ("gpt-oss:20b", "prefill", PREFILL_TPS, 12800.0, 128), ("gpt-oss:20b", "generate", DECODE_TPS, 51200.0, 512),
        ("gpt-oss:20b", "load", LOAD_MS, 1500.0, None)]


def test_the_format_is_told_by_content_not_by_name(tmp_path: Path) -> None:
    (tmp_path / "results.txt").write_text((DATA / "llama-bench.jsonl").read_text())
    assert read_file(tmp_path / "results.txt")[0] == imp.LLAMA_BENCH_JSONL


def test_the_same_row_has_the_same_digest_wherever_it_is_read() -> None:
    a = read_file(DATA / "llama-bench.json")[1]
    b = read_file(DATA / "llama-bench.jsonl")[1]
    assert [r.digest for r in a][1] != [r.digest for r in a][0]
    # Same result, other file: the format and place differ, the content hash does not depend on place.
    assert a[0].line != b[0].line and a[0].settings == b[0].settings


@pytest.mark.parametrize("text,message", [
    ('[{"n_prompt": 512, "n_gen": 0, "avg_ts": "fast"}]',
     "bad.json row 1: n_prompt, n_gen and avg_ts must be numbers (could not convert string to float: 'fast')"),
    ('[{"n_prompt": 0, "n_gen": 0, "avg_ts": 5}]',
     "bad.json row 1: neither n_prompt nor n_gen is above 0: not a test llama-bench runs"),
    ('[{"n_prompt": 0, "n_gen": 16, "avg_ts": -5}]', "bad.json row 1: avg_ts must be a positive rate (got -5)"),
    ("NAME,STEP,COUNT,NS_PER_COUNT,TOKEN_PER_SEC\n,generate,5,1,1\n", "bad.json row 2: no model NAME"),
    ("NAME,STEP,COUNT,NS_PER_COUNT,TOKEN_PER_SEC\nm,generate,5,1,x\n",
     "bad.json row 2: TOKEN_PER_SEC must be a number (got 'x')"),
    ("{}\n", "bad.json: not a format the tuner recognises (llama-bench json/jsonl/csv/md, Ollama bench csv or "
             "benchstat text): for your own JSON or CSV pass a mapping file with --map (see the README)"),
])
def test_a_broken_row_is_named_by_file_and_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                               message: str) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.json").write_text(text)
    with pytest.raises(ImportFileError) as e:
        read_file("bad.json")
    assert str(e.value) == message


def test_lookup_follows_nested_keys_and_indexes() -> None:
    doc = {"results": [{"tokens_s": 1}, {"tokens_s": 2}], "timing_stats": {"latency_percentiles": {"p95": 7}},
           "metrics": [{"gpu": [{"fan_speed": 40}]}]}
    assert lookup(doc, "results[1].tokens_s") == 2
    assert lookup(doc, "timing_stats.latency_percentiles.p95") == 7
    assert lookup(doc, "metrics[0].gpu[0].fan_speed") == 40
    assert lookup(doc, "results[5].tokens_s") is None and lookup(doc, "nope.x") is None


def adhoc_folder(folder: Path, n: int = 100) -> None:
    """``n`` JSON files as a team's scripts write them: nested keys, a list of runs, extras."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        doc = {
            "model": "gemma3:1b" if i % 2 else "gemma3:1b-it-q8_0",
            "config": {"options": {"num_batch": 128 * (1 + i % 4), "num_thread": 1 + i % 2}},
            "overall_tokens_per_second": 40.0 + i / 10,
            "results": [{"tokens_s": 39.0 + i / 10}, {"tokens_s": 41.0 + i / 10}],
            "timing_stats": {"latency_percentiles": {"p95": 900 + i}},
            "metrics": [{"gpu": [{"fan_speed": 30 + i % 7}]}],
            "host": f"box-{i % 3}",
        }
        (folder / f"run-{i:03d}.json").write_text(json.dumps(doc))


MAPPING = {"model": "model", "metrics": {DECODE_TPS: "overall_tokens_per_second", "latency_ms": "timing_stats.latency_percentiles.p95"},
           "settings": {"num_batch": "config.options.num_batch", "num_thread": "config.options.num_thread"}}


def test_a_folder_of_ad_hoc_json_imports_through_a_mapping(tmp_path: Path) -> None:
    adhoc_folder(tmp_path / "runs")
    files = imp.files_in([tmp_path / "runs"])
    assert len(files) == 100
    rows = [r for f in files for r in read_file(f, MAPPING)[1]]
    assert len(rows) == 200  # two mapped metrics per file
    first = [r for r in rows if r.source.endswith("run-000.json")]
    assert [(r.metric, r.mean, r.settings, r.model) for r in first] == [
        (DECODE_TPS, 40.0, {"num_batch": 128, "num_thread": 1}, "gemma3:1b-it-q8_0"),
        ("latency_ms", 900.0, {"num_batch": 128, "num_thread": 1}, "gemma3:1b-it-q8_0")]
    # Unknown keys are kept, never dropped silently.
    assert first[0].raw == {"results": [{"tokens_s": 39.0}, {"tokens_s": 41.0}], "metrics": [{"gpu": [{"fan_speed": 30}]}],
                            "host": "box-0"}
