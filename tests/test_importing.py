"""`tune import`: other tools' results stored as imported trials: shown apart, never winners
unmeasured, idempotent, and seeds that a warm start measures first."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import invoke
from fake_ollama import FakeOllama
from test_importers import DATA, MAPPING, adhoc_folder

from tuner import results
from tuner.storage import open_storage

DB = "sqlite:///studies/tuner.db"


def _study(name: str) -> results.StoredStudy:
    return results.read_study(results.load_study(open_storage(DB, create=False), name))


def test_a_folder_imports_once_and_says_what_it_read() -> None:
    r = invoke("import", DATA, "--study", "lb")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "read 16 rows from 6 file(s) (1 llama-bench-csv, 1 llama-bench-json, 1 llama-bench-jsonl, 1 llama-bench-md, "
        "1 ollama-bench-csv, 1 ollama-benchstat); added 6 trial(s) to study 'lb' in sqlite:///studies/tuner.db; "
        "0 row(s) already present",
        "  skipped 3: no decode_tps in the config's rows (e.g. a prefill-only run): pass --objective"]
    st = _study("lb")
    assert len(st.records) == 6 and all(r.imported and not r.feasible and not r.measured for r in st.records)
    lb = next(r for r in st.records if r.source["format"] == "llama-bench-json")
    assert lb.source["lines"] == [2, 48] and lb.source["tests"] == ["pp512", "tg128"]
    assert lb.value == 118.881588 and lb.options == {"num_batch": 2048, "num_thread": 8, "num_gpu": -1}
    assert lb.server == {"kv_cache_type": "f16", "flash_attention": "auto"}
    assert lb.source["environment"]["gpu_info"] == "NVIDIA GeForce RTX 4080"
    stored = results.load_study(open_storage(DB, create=False), "lb").trials[lb.number].user_attrs
    assert stored["imported"] is True and stored["source"]["format"] == "llama-bench-json"
    # Again: nothing added.
    r = invoke("import", DATA, "--study", "lb")
    assert r.exit_code == 0 and "added 0 trial(s)" in r.output and "13 row(s) already present" in r.output
    assert len(_study("lb").records) == 6


def test_imported_results_are_shown_apart_and_never_exported_as_a_winner() -> None:
    assert invoke("import", DATA / "llama-bench.json", "--study", "lb").exit_code == 0
    r = invoke("show", "lb")
    assert r.exit_code == 0, r.output
    assert "No trial measured here yet: the study holds 1 imported results" in r.output
    assert "Imported (1 best; another tool's numbers, not measured here" in r.output
    assert "[pp512 tg128; llama-bench.json:2,48, llama-bench-json]" in r.output
    doc = json.loads(invoke("show", "lb", "--json").output)
    assert doc["imported"][0]["source"]["format"] == "llama-bench-json"
    r = invoke("export", "lb")
    assert r.exit_code == 2 and r.output.startswith("Error: study 'lb' has no feasible trial")


def test_a_broken_file_is_named_with_its_row() -> None:
    Path("bad.json").write_text('[{"n_prompt": 0, "n_gen": 16, "avg_ts": -5}]')
    r = invoke("import", "bad.json", "--study", "x")
    assert r.exit_code == 2
    assert r.output == "Error: bad.json row 1: avg_ts must be a positive rate (got -5)\n"
    assert not Path("studies/tuner.db").exists()


def test_a_folder_skips_broken_files_grouped_by_reason(tmp_path: Path) -> None:
    adhoc_folder(tmp_path / "runs", n=5)
    (tmp_path / "runs" / "broken.json").write_text("{not json")
    Path("map.toml").write_text(
        'model = "model"\n[metrics]\n' + "".join(f'{k} = "{v}"\n' for k, v in MAPPING["metrics"].items())
        + "[settings]\n" + "".join(f'{k} = "{v}"\n' for k, v in MAPPING["settings"].items()))
    r = invoke("import", tmp_path / "runs", "--study", "adhoc", "--map", "map.toml")
    assert r.exit_code == 0, r.output
    assert "read 10 rows from 5 file(s) (5 mapped); added 5 trial(s)" in r.output
    assert "  skipped 1: " in r.output


def test_a_warm_start_from_an_import_measures_the_imported_winner_first(fake: FakeOllama, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, (batch, threads, tps) in enumerate([(64, 1, 30.0), (256, 2, 55.0), (128, 1, 40.0)]):
        (runs / f"r{i}.json").write_text(json.dumps({"model": "gemma3:1b", "overall_tokens_per_second": tps,
                                                      "config": {"options": {"num_batch": batch, "num_thread": threads}}}))
    Path("map.toml").write_text('model = "model"\n[metrics]\ndecode_tps = "overall_tokens_per_second"\n'
                                '[settings]\nnum_batch = "config.options.num_batch"\n'
                                'num_thread = "config.options.num_thread"\n')
    assert invoke("import", runs, "--study", "mine", "--map", "map.toml").exit_code == 0
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "here", "--warm-start-from", "mine",
               "--param", "num_batch=64,128,256", "--param", "num_thread=1,2", "--trials", "2", "--repeats", "1",
               "--num-predict", "8", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    here = _study("here")
    first = next(x for x in here.records if not x.baseline)
    assert first.seeded_from == f"mine#{next(x.number for x in _study('mine').records if x.value == 55.0)}"
    assert first.options["num_batch"] == 256 and first.options["num_thread"] == 2
    assert first.measured


def test_our_own_export_imports_on_another_machine(fake: FakeOllama) -> None:
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "a", "--param", "num_batch=64,256",
               "--trials", "3", "--repeats", "1", "--num-predict", "8", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    assert invoke("export", "a", "--format", "csv", "-o", "a.csv").exit_code == 0
    assert invoke("export", "a", "--format", "parquet", "-o", "a.parquet").exit_code == 0
    for f in ("a.csv", "a.parquet"):
        r = invoke("import", f, "--study", f"back-{f}", "--storage", "sqlite:///other.db")
        assert r.exit_code == 0, r.output
        back = results.read_study(results.load_study(open_storage("sqlite:///other.db", create=False), f"back-{f}"))
        orig = [x for x in _study("a").records if x.measured]
        assert sorted(round(x.value or 0, 4) for x in back.records) == sorted(round(x.value or 0, 4) for x in orig)
        assert {x.source["format"] for x in back.records} == {"tuner-" + f.split(".")[1]}
        assert {x.options.get("num_batch") for x in back.records} == {x.params.get("num_batch") for x in orig}


def test_an_imported_study_is_one_machines_entry_in_the_fleet(fake: FakeOllama) -> None:
    assert invoke("import", DATA / "llama-bench.json", "--study", "lb-4080").exit_code == 0
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "here", "--trials", "1", "--repeats", "1",
               "--num-predict", "8", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    r = invoke("studies", "--by-hardware")
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "(imported)" in line and "lb-4080" in line)
    assert row.split()[:5] == ["NVIDIA", "GeForce", "RTX", "4080", "(imported)"]
    assert "118.9 (imported)" in row
    assert "! lb-4080: imported from llama-bench.json (llama-bench-json): another tool's numbers" in r.output
    doc = json.loads(invoke("studies", "--by-hardware", "--json").output)
    imported = next(x for x in doc["rows"] if x["study"] == "lb-4080")
    assert imported["value_source"] == "imported" and imported["engine"] == "imported"


def test_the_report_lists_imported_results_apart_with_their_source() -> None:
    from tuner.report import build_report

    assert invoke("import", DATA / "llama-bench.json", DATA / "ollama-bench.csv", "--study", "lb").exit_code == 0
    data = build_report(results.load_study(open_storage(DB, create=False), "lb"), DB)
    assert [(r.tests, r.source) for r in data.imported] == [
        ("prefill generate load", "ollama-bench.csv:2,3,4 (ollama-bench-csv)"),
        ("pp512 tg128", "llama-bench.json:2,48 (llama-bench-json)")]
    assert data.top == []  # never among the measured configs
    r = invoke("report", "lb", "-o", "r.html")
    assert r.exit_code == 0, r.output
    html = Path("r.html").read_text()
    assert "<h2>Imported results</h2>" in html and "llama-bench.json:2,48 (llama-bench-json)" in html


def test_a_warm_start_from_a_llama_bench_import_measures_its_winner_first(fake: FakeOllama) -> None:
    # Another tool's model file is no model here: its settings seed the search all the same.
    assert invoke("import", DATA / "llama-bench.json", "--study", "lb").exit_code == 0
    r = invoke("--model", "gemma3:1b", "--host", fake.url, "--study", "here", "--warm-start-from", "lb",
               "--param", "num_batch=512,2048", "--param", "num_thread=2,8", "--trials", "2", "--repeats", "1",
               "--num-predict", "8", "--validate", "0", "--no-roofline")
    assert r.exit_code == 0, r.output
    first = next(x for x in _study("here").records if not x.baseline)
    assert first.seeded_from == "lb#0" and first.measured
    assert first.options["num_batch"] == 2048 and first.options["num_thread"] == 8
