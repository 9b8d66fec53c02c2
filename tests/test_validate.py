"""tuner/validate.py: log-scale intervals, adaptive interleaved rounds, the simpler config when
the top ones are not distinguishable, the defaults re-measured for the speedup, contended rounds."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from typing import Any

import pytest
from conftest import invoke
from fake_ollama import FakeOllama, default_models, default_speed
from test_report import make_study

from tuner import results
from tuner.errors import TunerError
from tuner.record import Stats, TrialRecord
from tuner.results import Speedup, Validated, Validation
from tuner.roofline import Roofline, cpu_bandwidth_gbs
from tuner.stats import log_ci95, mean_ci95, t975
from tuner.validate import changed_settings, decide, paired_speedup, validate_top

# ----------------------------------------------------------------------------- intervals


def test_log_ci95_hand_computed() -> None:
    values = [10.0, 12.0, 14.0]
    logs = [math.log(v) for v in values]
    half = t975(2) * statistics.stdev(logs) / math.sqrt(3)
    g, lo, hi = log_ci95(values)
    assert g == pytest.approx(math.exp(statistics.fmean(logs))) == pytest.approx((10 * 12 * 14) ** (1 / 3))
    assert lo == pytest.approx(g / math.exp(half)) and hi == pytest.approx(g * math.exp(half))
    m, sd, lo2, hi2 = mean_ci95(values)
    assert (m, lo2, hi2) == (g, lo, hi) and sd == 2.0  # sd: the spread of the values themselves


def test_interval_stays_positive_for_wildly_noisy_small_samples() -> None:
    # A t-interval on the raw values of [20, 2, 40] goes far below 0 (clamping only hid it).
    raw = statistics.fmean([20, 2, 40]) - t975(2) * statistics.stdev([20, 2, 40]) / math.sqrt(3)
    assert raw < 0
    g, lo, hi = log_ci95([20.0, 2.0, 40.0])
    assert 0 < lo < g < hi
    rng = random.Random(7)
    for _ in range(500):
        values = [rng.uniform(0.01, 100) for _ in range(rng.randint(2, 5))]
        _, lo, hi = log_ci95(values)
        assert 0 < lo <= statistics.geometric_mean(values) <= hi


def test_log_ci95_refuses_what_is_not_a_rate() -> None:
    for bad in ([], [1.0, 0.0], [3.0, -1.0]):
        with pytest.raises(ValueError):
            log_ci95(bad)
    assert log_ci95([5.0]) == (pytest.approx(5.0),) * 3


def test_t975_matches_the_printed_table() -> None:
    # Two-sided 95% quantiles as printed in t tables (3 decimals); large df approach 1.96.
    for df, printed in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (100, 1.984)):
        assert t975(df) == pytest.approx(printed, abs=5e-4)
    assert t975(10_000) == pytest.approx(1.96, abs=1e-3)


def test_paired_speedup_cancels_drift_between_rounds() -> None:
    # The machine slows down round by round; the winner stays 2x the defaults in every round.
    rounds = [{1: 2.0 * s, 0: s} for s in (50.0, 40.0, 30.0, 20.0)]
    sp = paired_speedup(rounds, 1, 0)
    assert sp is not None and sp.ratio == pytest.approx(2.0) and sp.ci95 == (pytest.approx(2.0), pytest.approx(2.0))
    # Each config's own interval is wide: only the pairing makes the speedup precise.
    _, lo, hi = log_ci95([r[1] for r in rounds])
    assert hi / lo > 2
    noisy = paired_speedup([{1: 2.1, 0: 1.0}, {1: 1.8, 0: 1.0}, {1: 2.0, 0: 1.1}], 1, 0)
    assert noisy is not None and 0 < noisy.ci95[0] < noisy.ratio < noisy.ci95[1] and noisy.distinguishable
    assert paired_speedup([{1: 2.0, 0: 1.0}, {1: 2.0}], 1, 0) is None  # one paired round: no interval


def test_speedup_says_when_it_is_not_distinguishable_from_the_defaults() -> None:
    sp = Speedup(3, 0, 1.83, (1.71, 1.95), [1.8, 1.85, 1.84])
    assert sp.describe("decode tok/s", "llama.cpp defaults") == \
        "1.83x decode tok/s vs llama.cpp defaults (95% CI 1.71-1.95x, re-measured interleaved over 3 rounds)"
    flat = Speedup(3, 0, 1.02, (0.97, 1.08), [1.0, 1.05])
    assert flat.describe("decode tok/s", "Ollama defaults").endswith(": not distinguishable from the defaults")


# ------------------------------------------------------------------- deciding the winner


def _entry(number: int, values: list[float], changed: int) -> Validated:
    m, sd, lo, hi = mean_ci95(values)
    return Validated(number, values, m, sd, (lo, hi), changed=[f"s{i}=1" for i in range(changed)])


def test_decide_separated_leader_wins() -> None:
    entries = [_entry(1, [60, 61, 62], 3), _entry(3, [40, 41, 42], 1)]
    assert decide(entries) == (1, 1, False)


def test_decide_indistinguishable_recommends_the_simpler_config() -> None:
    entries = [_entry(3, [60, 50, 65], 3), _entry(1, [58, 52, 61], 1), _entry(2, [20, 21, 22], 0)]
    assert decide(entries) == (1, 3, True)  # #2 is simplest but clearly worse: not a candidate
    tie = [_entry(3, [60, 50, 65], 2), _entry(1, [58, 52, 61], 2)]
    assert decide(tie) == (3, 3, True)  # equally simple: the better centre
    failed = [_entry(3, [60, 61], 2), Validated(1, [70.0], error="out of memory")]
    assert decide(failed) == (3, 3, False)
    assert decide([]) == (None, None, False)


def test_changed_settings_counts_what_differs_from_the_defaults() -> None:
    base = TrialRecord(model="gemma3:1b", options={"num_ctx": 8192}, server={}, server_effective={"num_parallel": 1},
                       baseline=True)
    r = TrialRecord(model="gemma3:1b", options={"num_ctx": 8192, "num_thread": 0, "num_gpu": -1, "num_batch": 256},
                    server={"flash_attention": "auto", "kv_cache_type": "q8_0", "num_parallel": 1})
    # num_ctx: what the baseline sent (--context); 0/-1/auto: the runtime decides; num_parallel: as the defaults ran.
    assert changed_settings(r, base, "gemma3:1b") == ["num_batch=256", "kv_cache_type=q8_0"]
    q8 = dataclasses.replace(r, model="gemma3:1b-it-q8_0")
    assert changed_settings(q8, base, "gemma3:1b")[0] == "variant=gemma3:1b-it-q8_0"
    assert changed_settings(base, base, "gemma3:1b") == []
    assert changed_settings(r, None, "gemma3:1b") == ["num_ctx=8192", "num_batch=256", "kv_cache_type=q8_0",
                                                      "num_parallel=1"]


def test_verdict_names_the_recommendation_and_why() -> None:
    entries = [_entry(3, [60, 50, 65, 55, 62, 58, 61, 57], 3), _entry(1, [58, 52, 61, 56, 60, 57, 59, 55], 1)]
    entries[1].changed = ["num_thread=2"]
    val = Validation("decode_tps", 8, entries, 1, True, 10, max_rounds=8, leader=3, interval="log-t")
    assert val.verdict() == ("#3 and #1 are not distinguishable (95% CIs overlap after 8 rounds): recommending #1, "
                             "which changes 1 setting (num_thread=2) from the defaults instead of 3.")
    text = "\n".join(val.describe())
    assert "geometric mean and 95% CI" in text and "  #1: " in text and "<- winner" in text
    ahead = Validation("decode_tps", 4, [_entry(1, [60, 61], 1), _entry(2, [40, 41], 1)], 1, False, 10,
                       max_rounds=8, leader=1, interval="log-t")
    assert ahead.verdict() == "#1 is ahead of the others (95% CIs do not overlap after 4 rounds)."
    assert "(4 interleaved rounds of at most 8," in ahead.describe()[0]


def test_validation_round_trip_and_validations_stored_before() -> None:
    base = _entry(0, [30, 31, 29], 0)
    val = Validation("decode_tps", 3, [_entry(1, [60, 61, 62], 2), _entry(2, [40, 41, 42], 1)], 1, False, 9,
                     max_rounds=8, leader=1, contended=2, dropped=1, interval="log-t", baseline=base,
                     speedup=Speedup(1, 0, 2.0, (1.9, 2.1), [2.0, 1.97, 2.14]))
    back = Validation.from_dict(val.to_dict())
    assert back == val and isinstance(back.entries[0].ci95, tuple) and isinstance(back.speedup, Speedup)
    assert "  2 rounds contended (other processes competed) and measured again; 1 contended again and dropped" \
        in back.describe()
    assert "  #0 (defaults): 29.99 (95% CI" in "\n".join(back.describe())
    # As stored before adaptive rounds: no new keys; read back and described as then.
    old = {"objective": "decode_tps", "rounds": 3, "winner": 3, "overlap": True, "trials_at": 8,
           "entries": [{"number": 3, "values": [20.0, 2.0, 40.0], "mean": 20.9, "sd": 22.5, "ci95": [0.0, 76.85],
                        "error": None},
                       {"number": 1, "values": [19.0, 20.0], "mean": 19.4, "sd": 16.4, "ci95": [0.0, 60.16],
                        "error": None}]}
    v = Validation.from_dict(old)
    assert v.winner == 3 and v.interval == "" and v.baseline is None and v.speedup is None and v.max_rounds == 0
    assert v.describe()[-1] == ("  The top two intervals overlap: they are not distinguishable at this precision "
                                "(more --validate-rounds narrows the intervals).")
    assert Validation.from_dict({**old, "added_later": 1}).winner == 3  # keys of a later version are ignored


# ------------------------------------------------------------ validate_top, measured by a stub


class _Measured:
    def __init__(self, value: float, contended: bool) -> None:
        self.value, self.contended = value, contended

    def record(self, model: str, runner: Any, server: Any) -> TrialRecord:
        v = self.value
        return TrialRecord(model=model, options=runner or {}, server=server,
                           stats={"decode_tps": Stats(v, 0.0, v, v, v, v)}, contended=self.contended)


class _Engine:
    def prepare(self, server: dict[str, Any]) -> bool:
        return False


def _stub(monkeypatch: pytest.MonkeyPatch, values: dict[int, list[float]],
          contended: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """Measure make_study's configs from scripted values (by trial number, one per call, the last
    repeated); the calls whose index is in ``contended`` were contended. Returns the trials measured."""
    import tuner.validate as v

    by_ctx = {4096: 1, 8192: 2, 2048: 3}
    calls: list[int] = []

    def measure(engine: Any, model: str, runner: Any, workload: Any, **kw: Any) -> _Measured:
        n = 0 if runner is None else by_ctx[runner["num_ctx"]]
        script = values[n]
        val = script.pop(0) if len(script) > 1 else script[0]
        calls.append(n)
        return _Measured(val, len(calls) - 1 in contended)

    monkeypatch.setattr(v, "measure_config", measure)
    return calls


def _validate(study: Any, rounds: int = 3, max_rounds: int = 8, k: int = 3) -> tuple[Validation | None, list[str]]:
    from tuner.workload import Workload, builtin_prompts

    lines: list[str] = []
    wl = Workload(prompts=builtin_prompts(), repeats=3, num_predict=16, source="builtin")
    val = validate_top(study, _Engine(), wl, "gemma3:1b", "decode_tps", k, rounds, lines.append,  # type: ignore[arg-type]
                       max_rounds=max_rounds)
    return val, lines


def test_rounds_stop_once_the_leader_is_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    _, study = make_study(None)
    calls = _stub(monkeypatch, {1: [60, 62, 61, 63], 2: [50, 49, 51], 3: [40, 41, 39], 0: [30, 31, 30.5]})
    val, lines = _validate(study)
    assert val is not None and val.rounds == 3 and val.max_rounds == 8 and not val.overlap
    assert val.winner == val.leader == 1 and val.interval == "log-t" and val.trials_at == 7
    # The defaults ride along in every round but are not a candidate; each round turns the order
    # by one, so no config always follows the same one.
    assert calls == [1, 2, 3, 0, 2, 3, 0, 1, 3, 0, 1, 2] and [e.number for e in val.entries] == [1, 2, 3]
    assert val.baseline is not None and val.baseline.values == [30, 31, 30.5]
    assert val.speedup is not None and val.speedup.trial == 1 and val.speedup.baseline == 0
    assert val.speedup.ratios == [2.0, 2.0, 2.0] and val.speedup.ratio == pytest.approx(2.0)
    for e in [*val.entries, val.baseline]:
        assert 0 < e.ci95[0] <= e.mean <= e.ci95[1]
    assert lines[0] == "re-validating the top 3 configs and the defaults over 3 to 8 interleaved rounds ..."
    assert lines[-1] == "re-validation: #1 is ahead after 3 rounds (95% CIs do not overlap)"


def test_indistinguishable_configs_get_the_max_rounds_and_the_simpler_one_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    _, study = make_study(None)
    # #1 and #3 alternate around 60; #3 changes 4 settings (flash_attention=auto is the default), #1 five.
    _stub(monkeypatch, {1: [62, 57] * 10, 3: [58, 61] * 10, 2: [20], 0: [30]})
    val, lines = _validate(study, rounds=2, max_rounds=5)
    assert val is not None and val.rounds == 5 and val.overlap and val.leader == 1 and val.winner == 3
    e3 = next(e for e in val.entries if e.number == 3)
    assert e3.changed == ["num_ctx=2048", "num_batch=1024", "num_gpu=20", "kv_cache_type=f16"]
    assert val.verdict() == ("#1 and #3 are not distinguishable (95% CIs overlap after 5 rounds): recommending #3, "
                             "which changes 4 settings (num_ctx=2048, num_batch=1024, num_gpu=20, kv_cache_type=f16) "
                             "from the defaults instead of 5.")
    assert "recommending #3" in lines[-1]
    assert val.speedup is not None and val.speedup.trial == 3  # the speedup is the recommendation's
    # Stored, the recommendation is the best config: what show, report and export use.
    study.set_user_attr("validation", val.to_dict())
    best = results.read_study(study).best()
    assert best is not None and best.number == 3
    assert results.pick_trial(study, None).number == 3


def test_a_winner_no_faster_than_the_defaults_recommends_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _, study = make_study(None)
    # #1 leads the tuned configs, but round by round it is no faster than the defaults (#0).
    _stub(monkeypatch, {1: [60, 62, 59, 61, 60], 2: [40], 3: [30], 0: [61, 60, 60, 62, 59]})
    val, lines = _validate(study, rounds=3, max_rounds=5)
    assert val is not None and val.leader == 1 and val.defaults_won and val.winner == 0
    assert val.speedup is not None and val.speedup.trial == 1 and val.speedup.ci95[0] <= 1.0 <= val.speedup.ci95[1]
    assert lines[-1].startswith("re-validation: #1 is not distinguishable from the defaults (paired ")
    assert lines[-1].endswith("): recommending the defaults")
    assert val.verdict().endswith("recommending the defaults, which change nothing.")
    assert any(line.startswith("  #0 (defaults): ") and line.endswith("<- winner") for line in val.describe())
    # Stored, the defaults are the best config: what show, report and export use.
    study.set_user_attr("validation", val.to_dict())
    st = results.read_study(study)
    best = st.best()
    assert best is not None and best.baseline
    assert isinstance(st.winner_speedup(best), results.NoSpeedup)


def test_what_the_defaults_ran_is_no_change() -> None:
    """The engine's report of what the baseline ran (llama.cpp's 4096 context, batch 512, one
    thread) makes those values no change: a config that only sets them changes nothing."""
    base = TrialRecord(model="m.gguf", baseline=True, ran={"num_ctx": 4096, "num_batch": 512, "num_thread": 1})
    same = TrialRecord(model="m.gguf", options={"num_ctx": 4096, "num_batch": 512, "num_thread": 2})
    assert changed_settings(same, base, "m.gguf") == ["num_thread=2"]


def test_contended_rounds_are_redone_once_then_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    _, study = make_study(None)
    # 4 configs a round. Round 2's first try is contended at its 2nd measurement (call 5), its
    # redo is quiet; the next round is contended twice (calls 13 and 17), so it is dropped.
    calls = _stub(monkeypatch, {1: [60], 2: [50], 3: [40], 0: [30]}, contended={5, 13, 17})
    val, lines = _validate(study, rounds=3, max_rounds=4)
    assert val is not None and val.contended == 2 and val.dropped == 1
    assert val.rounds == 3 and all(len(e.values) == 3 for e in val.entries)
    # The void round stopped at once, then redone (each try turned by one more).
    assert calls[4:6] == [2, 3] and calls[6:10] == [3, 0, 1, 2]
    assert "re-validation round 2 was contended (other processes competed): measuring it again" in lines
    assert "re-validation round 3 was contended again: dropped" in lines
    assert any("2 rounds contended" in line for line in val.describe())


def test_a_machine_too_busy_to_compare_declares_no_winner(monkeypatch: pytest.MonkeyPatch) -> None:
    _, study = make_study(None)
    _stub(monkeypatch, {1: [60], 2: [50], 3: [40], 0: [30]}, contended=set(range(100)))
    val, _ = _validate(study, rounds=2, max_rounds=2)
    assert val is not None and val.rounds == 0 and val.dropped == 2 and val.winner is None and val.speedup is None
    assert val.verdict().startswith("Too few uncontended rounds (0) to compare the top configs")
    study.set_user_attr("validation", val.to_dict())
    best = results.read_study(study).best()
    assert best is not None and best.number == 1  # the search's leader


def test_no_speedup_without_a_baseline_or_one_config(monkeypatch: pytest.MonkeyPatch) -> None:
    _, study = make_study(None, baseline=False)
    calls = _stub(monkeypatch, {1: [60], 2: [50], 3: [40]})
    val, lines = _validate(study, rounds=2, max_rounds=2)
    assert val is not None and val.baseline is None and val.speedup is None and 0 not in calls
    assert lines[0] == "re-validating the top 3 configs over 2 interleaved rounds ..."
    assert _validate(study, k=1)[0] is None


# --------------------------------------------------------------------------- options, CLI


def test_max_rounds_below_the_minimum_is_refused() -> None:
    from tuner.study import TuneOptions, validate_options

    with pytest.raises(TunerError, match=r"^--validate-max-rounds 4 is below --validate-rounds 5: raise "
                                         r"--validate-max-rounds to 5 or more$"):
        validate_options(TuneOptions(model=["m"], validate_rounds=5, validate_max_rounds=4))
    r = invoke("--model", "gemma3:1b", "--validate-rounds", "9")
    assert r.exit_code == 2
    assert r.output == ("Error: --validate-max-rounds 8 is below --validate-rounds 9: raise --validate-max-rounds "
                        "to 9 or more\n")


# ------------------------------------------------------------- end to end on the fake server


def _noisy(seed: int, sd: float) -> Any:
    rng = random.Random(seed)

    def speed(model: str, opts: dict[str, Any]) -> tuple[float, float]:
        prefill, decode = default_speed(next(m for m in default_models() if m.name == model), opts)
        return prefill, decode * math.exp(rng.gauss(0.0, sd))

    return speed


def _quiet_sampler(monkeypatch: pytest.MonkeyPatch, contended_calls: set[int] | None = None) -> None:
    """Telemetry that reports a quiet machine, except for the re-validation measurements
    numbered in ``contended_calls`` (a neighbour busy-looping a core)."""
    import tuner.runner as runner_mod
    import tuner.validate as v
    from tuner.telemetry import HostSummary, TelemetrySummary

    def summary(pct: float) -> TelemetrySummary:
        return TelemetrySummary(gpus=[], host=HostSummary(
            samples=2, cpu_util_mean_pct=50.0, mem_used_peak_mib=1.0, server_rss_peak_mib=None, wall_s=2.0,
            foreign_cpu_s=pct / 100 * 2.0, busiest="neighbour", busiest_pct=pct))

    monkeypatch.setattr(runner_mod._Runner, "_sampler", lambda self: None)
    real = v.measure_config
    n = [0]

    def measure(*a: Any, **kw: Any) -> Any:
        m = real(*a, **kw)
        m.telemetry = summary(100.0 if n[0] in (contended_calls or set()) else 0.0)
        n[0] += 1
        return m

    monkeypatch.setattr(v, "measure_config", measure)


def test_fake_server_revalidation_with_the_defaults(fake: FakeOllama, gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_study import _load, opts

    from tuner.show import format_summary
    from tuner.study import run_study

    fake.speed_fn = _noisy(3, 0.03)
    # The 2nd measurement of the re-validation is contended: its round is measured again.
    _quiet_sampler(monkeypatch, contended_calls={1})
    lines: list[str] = []
    summary = run_study(opts(fake, trials=6, repeats=1, prune=False, validate=2, validate_rounds=2,
                             validate_max_rounds=6, roofline=False, starting_points=False,
                             params={"num_gpu": [0, 27], "num_thread": [1, 4], "num_ctx": [2048],
                                     "num_batch": [512], "variant": ["gemma3:1b"]}), echo=lines.append)
    val = Validation.from_dict(_load().user_attrs["validation"])
    assert 2 <= val.rounds <= 6 and val.interval == "log-t" and val.contended == 1 and val.dropped == 0
    assert val.baseline is not None and len(val.baseline.values) == val.rounds
    for e in [*val.entries, val.baseline]:
        assert len(e.values) == val.rounds and 0 < e.ci95[0] <= e.mean <= e.ci95[1]
    assert val.winner == results.best_feasible(_load()).number
    assert val.speedup is not None and val.speedup.trial == val.winner and len(val.speedup.ratios) == val.rounds
    assert val.speedup.ci95[0] > 1.0  # the GPU configs are several times the defaults (CPU)
    text = format_summary(summary)
    assert (f"{val.speedup.ratio:.2f}x decode tok/s vs Ollama defaults (95% CI {val.speedup.ci95[0]:.2f}-"
            f"{val.speedup.ci95[1]:.2f}x, re-measured interleaved over {val.rounds} rounds)") in text
    assert "1 round contended (other processes competed) and measured again; 0 contended again and dropped" in text
    assert any(x.startswith("re-validation round 1 was contended") for x in lines)


def test_report_shows_the_remeasured_speedup_and_the_recommendation(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner import report

    _, study = make_study(None)
    _stub(monkeypatch, {1: [62, 57] * 10, 3: [58, 61] * 10, 2: [20], 0: [30]})
    val, _ = _validate(study, rounds=2, max_rounds=5)
    assert val is not None
    study.set_user_attr("validation", val.to_dict())
    data = report.build_report(study)
    assert data.best is not None and data.best.number == 3 and data.validation_current
    assert data.validation_speedup == val.speedup and data.validation_interval == "log-t"
    assert data.validation_baseline is not None and data.validation_baseline.number == 0
    assert data.validation_verdict == val.verdict()
    text = report.render_html(data)
    assert val.speedup is not None
    assert f"{val.speedup.ratio:.2f}x decode tok/s vs Ollama defaults (95% CI" in text
    assert "recommending #3, which changes 4 settings (num_ctx=2048" in text
    assert text.count("are not distinguishable (95% CIs overlap") == 1
    assert "defaults (re-measured for the speedup)" in text
    assert "Student t on the log scale" in text


def test_roofline_share() -> None:
    r = Roofline("CPU", 20.0, "test", 250_000_000, 80.0, 40.0)
    assert r.share == 0.5 and "50%" in r.describe()


def test_cpu_bandwidth_is_plausible() -> None:
    assert 0.5 < cpu_bandwidth_gbs(size_mib=32, repeats=2) < 2000


def test_a_gpu_server_gets_a_gpu_ceiling_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner import roofline as rl
    from tuner.record import StudyInfo
    from tuner.results import roofline_of

    # NVML gives no memory clock and bus width: no line, never the CPU's ceiling.
    monkeypatch.setattr(rl, "gpu_bandwidth_gbs", lambda index=0: None)
    monkeypatch.setattr(rl, "cpu_bandwidth_gbs", lambda: pytest.fail("measured the CPU for a GPU server"))
    assert rl.roofline(120.0, 800_000_000, on_gpu=True) is None
    monkeypatch.setattr(rl, "gpu_bandwidth_gbs", lambda index=0: (1008.0, "RTX 4090"))
    r = rl.roofline(120.0, 800_000_000, on_gpu=True)
    assert r is not None and r.device == "GPU 0 (RTX 4090)" and r.ceiling_tps == pytest.approx(1260.0)
    # A CPU ceiling stored by an older version for a server that offloads is not shown.
    cpu = Roofline("CPU", 20.0, "test", 800_000_000, 25.0, 11000.0).to_dict()
    gpu_env = {"gpu_offload": {"offloads": True, "source": "ollama-ps", "detail": ""}}
    assert roofline_of(StudyInfo(roofline=cpu, environment=gpu_env, gpu_offload_source="ollama-ps")) is None
    assert roofline_of(StudyInfo(roofline=cpu, environment={"gpu_offload": {"offloads": False}})) == cpu
