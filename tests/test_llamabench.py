"""`tune show --format md|csv|json|jsonl`: a study as llama-bench prints its results."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from conftest import invoke
from fake_ollama import FakeOllama

from tuner.importers import LLAMA_BENCH_MD, read_file

RUN = ["--repeats", "2", "--num-predict", "16", "--validate", "0", "--no-roofline", "--trials", "3",
       "--param", "num_batch=64,256", "--study", "s"]
HEADER = ("| model                          |       size |     params | backend    |  ngl |    n_batch |    threads "
          "| type_k | fa   | test       |              t/s |")


def _study(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, *RUN)
    assert r.exit_code == 0, r.output


def test_show_format_md_reads_as_a_llama_bench_table(fake: FakeOllama) -> None:
    _study(fake)
    r = invoke("show", "s", "--format", "md")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == HEADER
    assert set(lines[1]) <= set("|-: ") and lines[1].count("|") == 12
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert rows and all(len(c) == 11 for c in rows)
    # t/s as llama-bench writes it: mean ± sd, two decimals; tests are ppN (one per prompt) and tgN.
    assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", c[10]) for c in rows)
    assert {c[9] for c in rows} >= {"tg16"} and any(re.fullmatch(r"pp\d+", c[9]) for c in rows)
    assert "auto" in {c[5] for c in rows} and {c[5] for c in rows} & {"64", "256"}  # the baseline, the search
    # Our table reads back through the llama-bench importer: the same numbers.
    Path("t.md").write_text(r.output)
    fmt, imported = read_file("t.md")
    assert fmt == LLAMA_BENCH_MD and len(imported) == len(rows)
    assert [f"{x.mean:.2f}" for x in imported] == [c[10].split(" ± ")[0] for c in rows]


def test_show_format_csv_json_jsonl_carry_llama_bench_fields(fake: FakeOllama) -> None:
    _study(fake)
    docs = json.loads(invoke("show", "s", "--format", "json").output)
    fields = {"model_filename", "model_type", "model_size", "model_n_params", "backends", "n_gpu_layers", "n_batch",
              "n_threads", "type_k", "type_v", "flash_attn", "n_prompt", "n_gen", "avg_ts", "stddev_ts", "samples_ts"}
    assert docs and all(fields <= set(d) for d in docs)
    decode = [d for d in docs if d["n_gen"] == 16]
    assert all(len(d["samples_ts"]) == 4 for d in decode)  # 2 prompts x 2 repeats
    lines = invoke("show", "s", "--format", "jsonl").output.splitlines()
    assert [json.loads(x) for x in lines] == docs
    table = list(csv.DictReader(io.StringIO(invoke("show", "s", "--format", "csv").output)))
    assert [float(row["avg_ts"]) for row in table] == [d["avg_ts"] for d in docs]


def test_show_format_and_json_contradict(fake: FakeOllama) -> None:
    _study(fake)
    r = invoke("show", "s", "--format", "md", "--json")
    assert r.exit_code == 2 and r.output == "Error: --json and --format contradict each other: pass one of them\n"
