"""tuner/warmstart.py: a new study starts from earlier studies' winners; configs proposed again
are not measured again when they are clearly behind."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama

from tuner import machine, record, results, warmstart
from tuner.record import TrialRecord
from tuner.space import Param, SearchSpace
from tuner.storage import open_storage
from tuner.study import TuneOptions, run_study

STORAGE = "sqlite:///t.db"


def opts(fake: FakeOllama, **kw: Any) -> TuneOptions:
    base: dict[str, Any] = dict(
        model=["gemma3:1b"], host=fake.url, trials=6, repeats=1, num_predict=8, storage=STORAGE, seed=3,
        validate=0, roofline=False, params={"num_thread": [1, 2, 4, 8], "num_batch": [128, 512]},
    )
    base.update(kw)
    return TuneOptions(**base)


def _study(name: str, storage: str = STORAGE) -> results.StoredStudy:
    return results.read_study(optuna.load_study(study_name=name, storage=open_storage(storage)))


GPU_SPACE = SearchSpace((Param("num_ctx", (2048, 4096, 8192)), Param("num_batch", (128, 256, 512)),
                         Param("num_gpu", tuple(range(0, 28))), Param("num_thread", (1, 2, 4)),
                         Param("variant", ("gemma3:1b", "gemma3:1b-it-qat"))))


def test_mapping_moves_values_into_the_new_space_and_says_which() -> None:
    r = TrialRecord(model="gemma3:1b", options={"num_ctx": 16384, "num_batch": 300, "num_gpu": 0, "num_thread": 8},
                    server={"kv_cache_type": "q4_0"})
    source = {"num_ctx": [16384, 32768], "num_gpu": list(range(0, 28))}
    params, notes, _ = warmstart.map_config(r, GPU_SPACE, source, offloads=True, same_hardware=True)
    # The source's smallest context maps to this study's; 300 is nearest 256 by ratio; CPU-only
    # offload never seeds a server that offloads to a GPU; 8 threads move to the nearest allowed.
    assert params == {"num_ctx": 2048, "num_batch": 256, "num_gpu": 27, "num_thread": 4, "variant": "gemma3:1b"}
    assert notes == ["num_ctx 16384 -> 2048 (the source's smallest context: this study's)",
                     "num_batch 300 -> 256 (nearest allowed)",
                     "num_gpu 0 -> 27 (full offload: this server offloads to a GPU)",
                     "num_thread 8 -> 4 (nearest allowed)"]
    # A partial offload is kept on the same hardware, moved to full offload on other hardware.
    part = TrialRecord(model="gemma3:1b", options={"num_gpu": 20})
    assert warmstart.map_config(part, GPU_SPACE, source, True, True)[0] == {"num_gpu": 20, "variant": "gemma3:1b"}
    assert warmstart.map_config(part, GPU_SPACE, source, True, False)[0]["num_gpu"] == 27
    other = TrialRecord(model="gemma3:1b-it-q8_0", options={"num_ctx": 2048})
    assert warmstart.map_config(other, GPU_SPACE, {}, True, True) == (
        None, [], "variant gemma3:1b-it-q8_0 is not searched here")


def test_hardware_tiers() -> None:
    def m(gpus: list[str], offloads: bool | None, vram: float | None = None, cpu: str = "X", cores: int = 8,
          server: str = "local") -> machine.Machine:
        return machine.Machine({"cpu": cpu, "cores": cores, "ram_gib": 32, "gpus": gpus}, offloads, vram, server)

    box = m(["RTX 4090"], True, 24564)
    assert machine.match(box, m(["RTX 4090"], True, 24564)) == machine.SAME_HARDWARE
    assert machine.match(box, m(["RTX 4090"], True, 24564, cpu="Y")) == machine.SAME_GPU
    assert machine.match(box, m(["RTX 3090"], True, 24576, cpu="Y")) == machine.SAME_VRAM
    assert machine.match(box, m(["RTX 4060"], True, 8188, cpu="Y")) is None
    # CPU-only studies seed only CPU-only machines, GPU studies only GPU machines.
    assert machine.match(box, m([], False)) is None
    assert machine.match(m([], False), m(["RTX 4090"], True, 24564)) is None
    assert machine.match(m([], False), m([], False, cores=4)) == machine.SAME_CPU
    assert machine.match(m([], False), m([], False, cpu="Y")) == machine.SAME_CORES
    # A remote server's hardware is not the measuring machine's fingerprint.
    assert machine.match(m([], True, server="gpu-box"), m([], True, server="other-box")) is None
    assert warmstart.family("gemma3:4b-it-qat") == warmstart.family("gemma3:4b") == "gemma3:4b"
    assert warmstart.family("gemma3:1b") != warmstart.family("gemma3:4b")


def test_a_second_study_starts_from_the_first_ones_winners(fake: FakeOllama) -> None:
    lines: list[str] = []
    first = run_study(opts(fake, study_name="first", trials=8))
    best = _study("first").best()
    assert best is not None and first.study_name == "first"
    # Another workload (more tokens per request): another study, seeded from the first.
    run_study(opts(fake, study_name="second", num_predict=12, trials=4), echo=lines.append)
    text = "\n".join(lines)
    assert "warm start: " in text and "from 'first' (same hardware)" in text, text
    second = _study("second")
    seeded = [r for r in second.records if r.stage == "warm"]
    assert seeded and seeded[0].number == 1  # right after the baseline
    assert seeded[0].seeded_from == f"first#{best.number}"
    assert {k: seeded[0].options[k] for k in ("num_thread", "num_batch")} == \
        {k: best.options[k] for k in ("num_thread", "num_batch")}
    assert second.attrs["warm_start"]["sources"] == [{"study": "first", "match": "same hardware"}]
    # Turned off, nothing is seeded; a resumed study is never seeded again.
    lines.clear()
    run_study(opts(fake, study_name="third", num_predict=10, trials=2, warm_start=False), echo=lines.append)
    assert not any("warm start" in x for x in lines)
    assert all(r.stage != "warm" for r in _study("third").records)


def _new_study(fake: FakeOllama, *args: str) -> Any:
    """``tune run`` of a new one-trial study 'new' of gemma3:1b in STORAGE, with ``args``."""
    return invoke("run", "--model", "gemma3:1b", "--host", fake.url, "--storage", STORAGE, "--study", "new",
                  "--trials", "1", *args)


def test_warm_start_from_another_storage_and_bad_sources(fake: FakeOllama) -> None:
    run_study(opts(fake, study_name="elsewhere", storage="sqlite:///other.db", trials=5))
    lines: list[str] = []
    run_study(opts(fake, study_name="here", trials=3, warm_start_from="elsewhere",
                   warm_start_storage="sqlite:///other.db"), echo=lines.append)
    assert any("from 'elsewhere' (same hardware)" in x for x in lines), lines
    assert any(r.seeded_from and r.seeded_from.startswith("elsewhere#") for r in _study("here").records)
    r = _new_study(fake, "--warm-start-from", "nope")
    assert r.exit_code == 2
    assert r.output == ("Error: --warm-start-from: no study named 'nope' in that storage "
                        "(known studies: here)\n")
    # Nothing was created for a rejected source.
    assert "new" not in optuna.get_all_study_names(open_storage(STORAGE))
    r = invoke("run", "--model", "gemma3:1b", "--host", fake.url, "--storage", STORAGE,
               "--warm-start-from", "here", "--no-warm-start")
    assert r.exit_code == 2
    assert r.output == ("Error: --warm-start-from and --warm-start-storage contradict --no-warm-start: pass one "
                        "of them\n")
    # A storage that cannot be read, or a study of another model, is refused before anything is created.
    for bad in ("sqlite:///nowhere/none.db", "bogus://x"):
        r = _new_study(fake, "--warm-start-storage", bad)
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"Error: --warm-start-storage: cannot read the storage {bad} ("), r.output
        assert r.output.endswith("): give the URL of the storage that holds the earlier study\n"), r.output
    run_study(opts(fake, study_name="llama", model=["llama3.2:3b"], trials=2))
    r = _new_study(fake, "--warm-start-from", "llama")
    assert r.exit_code == 2
    assert r.output == ("Error: --warm-start-from: study 'llama' tuned llama3.2:3b, not gemma3:1b or a variant of "
                        "it, so its settings do not carry over: pick a study of gemma3:1b, or leave the option out\n")
    assert "new" not in optuna.get_all_study_names(open_storage(STORAGE))


def test_a_cpu_only_study_does_not_seed_a_gpu_server(fake: FakeOllama) -> None:
    with FakeOllama(memory_budget_mib=0) as cpu_only:
        run_study(opts(cpu_only, study_name="cpu", trials=4))
    assert _study("cpu").attrs["environment"]["gpu_offload"]["offloads"] is False
    assert fake.memory_budget_mib > 0
    lines: list[str] = []
    run_study(opts(fake, study_name="gpu", trials=2, params={"num_thread": [1, 2, 4, 8]}), echo=lines.append)
    said = [x for x in lines if "warm start" in x]
    assert said == ["warm start: no config to start from: the earlier studies of gemma3:1b ('cpu') ran on hardware "
                    "too far from this machine's (another GPU or VRAM class, another CPU and core count, or CPU-only "
                    "against GPU): --warm-start-from NAME uses one anyway"], lines
    assert all(r.stage != "warm" for r in _study("gpu").records)
    stored = _study("gpu").attrs["warm_start"]
    assert (stored["sources"], stored["seeds"], stored["reason_code"]) == ([], [], warmstart.OTHER_HARDWARE)


def test_a_config_proposed_again_is_not_measured_again_when_clearly_behind(fake: FakeOllama) -> None:
    # Two configs, ten trials: the sampler proposes both again and again.
    o = opts(fake, study_name="dups", trials=10, baseline=False, starting_points=False, sampler="tpe",
             params={"num_thread": [1, 8], "num_batch": [512], "num_ctx": [2048]})
    lines: list[str] = []
    run_study(o, echo=lines.append)
    st = _study("dups")
    reused = [r for r in st.records if r.reused_from is not None]
    best = st.best()
    assert best is not None
    assert reused, "\n".join(lines)
    for r in reused:
        prior = next(x for x in st.records if x.number == r.reused_from)
        assert (prior.model, prior.options, prior.values) == (r.model, r.options, r.values)
        assert (prior.model, prior.options) != (best.model, best.options)  # the best is always measured again
    assert any("measurement reused (clearly behind the best)" in x for x in lines)
    # Requests sent: only the measured trials (each one warm-up on reload plus two prompts).
    measured = [r for r in st.records if r.reused_from is None]
    assert sum(1 for _ in fake.prompt_requests()) < 3 * len(st.records)
    assert len(measured) + len(reused) == 10
    # Listed once: the ranking (top tables, the winner) and the effects skip the reused copies.
    assert all(r.reused_from is None for r in st.ranked())
    from tuner.effects import compute

    assert compute(st).n_trials == len([r for r in measured if r.params])
    assert all(r.reload_ms is None and r.warmup is None for r in reused)
    assert all(record.REUSED_FROM not in t.user_attrs for t in optuna.load_study(
        study_name="dups", storage=open_storage(STORAGE)).trials if t.number == best.number)


@pytest.mark.parametrize("model,other,same", [("gemma3:1b", "gemma3:1b-it-qat", True),
                                               ("gemma3:1b", "gemma3:4b", False)])
def test_variants_of_one_model_seed_each_other(model: str, other: str, same: bool) -> None:
    assert warmstart.same_model(model, [], {"model": other}) is same


def test_show_names_the_warm_start(fake: FakeOllama) -> None:
    import json

    run_study(opts(fake, study_name="first", trials=4))
    run_study(opts(fake, study_name="second", num_predict=12, trials=3))
    seeded = [r for r in _study("second").records if r.seeded_from]
    r = invoke("show", "second", "--storage", STORAGE)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("Warm start:"))
    assert line == "Warm start: from 'first' (same hardware): " + ", ".join(
        f"#{v.number} ({v.seeded_from})" for v in seeded)
    doc = json.loads(invoke("show", "second", "--storage", STORAGE, "--json").output)
    assert doc["warm_start"]["sources"] == [{"study": "first", "match": "same hardware"}]
    assert doc["best"]["reused_from"] is None and "seeded_from" in doc["best"]


def test_configs_that_cannot_seed_are_named(fake: FakeOllama) -> None:
    run_study(opts(fake, study_name="fp16", trials=3, params={"variant": ["gemma3:1b-it-fp16"],
                                                                "num_thread": [1, 2]}))
    lines: list[str] = []
    run_study(opts(fake, study_name="qat", trials=2, params={"variant": ["gemma3:1b", "gemma3:1b-it-qat"],
                                                               "num_thread": [1, 2]}), echo=lines.append)
    text = "\n".join(lines)
    assert "warm start: no config to start from (" in text, text
    assert "  skipped fp16#1: variant gemma3:1b-it-fp16 is not searched here" in lines, text


def test_gguf_families_keep_the_size_and_drop_the_quantization() -> None:
    assert warmstart.family("llama-2-7b.Q4_K_M.gguf") == "llama-2-7b"
    assert warmstart.family("/m/llama-2-13b.Q4_K_M.gguf") == "llama-2-13b"
    assert warmstart.family("/m/gemma-3-270m-q4_k_m.gguf") == warmstart.family("gemma-3-270m-Q8_0.gguf")
    assert warmstart.family("Meta-Llama-3-8B-Instruct-IQ3_XS.gguf") == "meta-llama-3-8b-instruct"


def test_a_partial_offload_moved_on_the_same_hardware_says_nearest() -> None:
    space = SearchSpace((Param("num_gpu", (0, 27)), Param("num_thread", (1, 2))))
    r = TrialRecord(model="gemma3:1b", options={"num_gpu": 22})
    params, notes, _ = warmstart.map_config(r, space, {"num_gpu": list(range(0, 28))}, True, True)
    assert params == {"num_gpu": 27} and notes == ["num_gpu 22 -> 27 (nearest allowed)"]


def test_a_server_found_local_is_local_whatever_its_address() -> None:
    # Reached through the machine's own hostname: the study recorded that the server ran here.
    assert machine.server_of({"engine": "ollama", "host": "http://gpu-01:11434", "server_local": True}) == "local"
    assert machine.server_of({"engine": "ollama", "host": "http://gpu-01:11434"}) == "gpu-01"
    assert machine.server_of({"engine": "ollama", "host": "http://127.0.0.1:11434"}) == "local"


def test_partial_offload_seeds_keep_the_full_offload_screen() -> None:
    """Full offload did not fit the source's GPU: its winners are partial offloads, kept on the same
    hardware; the new study still screens full offload (a seed at full offload would cover it)."""
    with FakeOllama(memory_budget_mib=700) as small:
        params = {"num_gpu": list(range(0, 28)), "num_thread": [1, 2], "variant": ["gemma3:1b"]}
        run_study(opts(small, study_name="small", trials=8, params=params))
        source = _study("small")
        best = source.best()
        assert best is not None and 0 < best.options["num_gpu"] < 27, [(r.options, r.error) for r in source.records]
        # The screen is planned after the seeds (the memory model decides what it tries).
        run_study(opts(small, study_name="again", trials=5, num_predict=12, params=params))
    again = _study("again")
    stages = [(r.stage, r.options.get("num_gpu")) for r in sorted(again.records, key=lambda r: r.number)]
    assert stages[0][0] == "baseline" and stages[1] == ("warm", best.options["num_gpu"])
    assert ("screen", 27) in stages, stages


def test_a_server_recorded_remote_is_remote_whatever_its_address() -> None:
    # A tunnel to another machine reads as loopback: the study recorded that the server was not here.
    assert machine.server_of({"engine": "ollama", "host": "http://127.0.0.1:11434", "server_local": False}) \
        == "127.0.0.1"
    # Studies that did not record it: a loopback address in any spelling is local (no name is resolved).
    assert machine.server_of({"engine": "ollama", "host": "http://[::1]:11434"}) == "local"
    assert machine.server_of({"engine": "ollama", "host": "LOCALHOST:11434"}) == "local"
    assert machine.server_of({"engine": "ollama", "host": "gpu-01:11434"}) == "gpu-01"


def test_only_a_source_that_observed_the_offload_tells_gpu_from_cpu() -> None:
    def attrs(offloads: bool, source: str, gpus: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"engine": "ollama", "host": "http://127.0.0.1:11434",
                "hardware": {"cpu": "X", "cores": 8, "ram_gib": 32, "gpus": list(gpus)},
                "environment": {"gpu_offload": {"offloads": offloads, "source": source}}}

    assert machine.offloads(attrs(False, "ollama-ps")) is False
    assert machine.offloads(attrs(False, "ollama-ps")["environment"]) is False
    assert machine.offloads(attrs(True, "--param num_gpu")) is None
    cpu = machine.Machine.of(attrs(False, "ollama-ps"))
    assert cpu.offloads is False
    # num_gpu given on the command line decided nothing: not known, so it seeds and is seeded by either.
    given = machine.Machine.of(attrs(True, "--param num_gpu"))
    assert given.offloads is None
    assert machine.match(given, cpu) == machine.match(cpu, given) == machine.SAME_HARDWARE
    # Without the engine's word, GPUs NVML saw still say GPU.
    assert machine.Machine.of(attrs(True, "unknown", ("NVIDIA L4",))).offloads is True


def test_a_stored_warm_start_reads_back() -> None:
    ws = warmstart.WarmStart([warmstart.Source("a", machine.SAME_GPU)],
                             [warmstart.Seed({"num_gpu": 27}, "a#3", 41.5, ("num_gpu 20 -> 27 (nearest allowed)",))],
                             ["a#4: variant x is not searched here"])
    back = warmstart.WarmStart.from_dict(ws.to_dict())
    assert back.to_dict() == ws.to_dict()
    assert back.sources == ws.sources and back.seeds[0].value is None  # the value is not stored


def test_a_warm_start_that_seeds_nothing_says_why(fake: FakeOllama) -> None:
    # The first study of a storage: nothing to start from, said and stored; show says it too.
    lines: list[str] = []
    run_study(opts(fake, study_name="only", trials=2), echo=lines.append)
    assert "warm start: no config to start from: the storage holds no other study" in lines, lines
    assert _study("only").attrs["warm_start"]["reason_code"] == warmstart.EMPTY
    r = invoke("show", "only", "--storage", STORAGE)
    assert "Warm start: none: the storage holds no other study" in r.output.splitlines(), r.output
    # Another model's study is no source.
    lines.clear()
    run_study(opts(fake, study_name="llama", model=["llama3.2:3b"], trials=2), echo=lines.append)
    assert "warm start: no config to start from: no earlier study tuned llama3.2:3b or a variant of it" in lines


def test_contended_source_trials_seed_too_marked_as_such() -> None:
    import dataclasses

    space = SearchSpace((Param("num_thread", (1, 2, 4)), Param("num_batch", (128, 512))))

    def rec(n: int, threads: int, value: float, contended: bool) -> TrialRecord:
        return TrialRecord(model="gemma3:1b", options={"num_thread": threads, "num_batch": 512}, number=n,
                           state="COMPLETE", values=[value], contended=contended)

    base = dataclasses.replace(TrialRecord(model="gemma3:1b", baseline=True, number=0, state="COMPLETE",
                                           values=[10.0]), contended=True)
    busy = results.StoredStudy("busy", {"space": {"num_thread": [1, 2, 4], "num_batch": [512]}}, ["maximize"],
                               [base, rec(1, 4, 30.0, True), rec(2, 2, 20.0, True)])
    seeds, skipped = warmstart.seeds_of(busy, space, offloads=False, same_hardware=True)
    assert [(s.origin, s.contended) for s in seeds] == [("busy#1", True), ("busy#2", True)] and skipped == []
    ws = warmstart.WarmStart([warmstart.Source("busy", machine.SAME_HARDWARE)], seeds)
    assert ws.lines() == [
        "warm start: 2 config(s) from 'busy' (same hardware); all measured there while other processes competed "
        "(measured again here before one can win)",
        "  from busy#1 30.00: num_thread=4 num_batch=512 (contended in its source)",
        "  from busy#2 20.00: num_thread=2 num_batch=512 (contended in its source)"]
    assert warmstart.WarmStart.from_dict(ws.to_dict()).seeds[0].contended is True
    # Quiet trials come first, whatever their values.
    mixed = dataclasses.replace(busy, records=[base, rec(1, 4, 30.0, True), rec(2, 1, 12.0, False)])
    assert [s.origin for s in warmstart.seeds_of(mixed, space, False, True)[0]] == ["busy#2", "busy#1"]
