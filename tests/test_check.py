"""tuner/check.py: ``tune check`` re-measures the stored winner and the defaults on the fake
Ollama server, compares with the stored values, keeps each check with the study and exits
0 / 1 / 2 / 3 for cron and CI."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any, Iterator

import ollama
import pytest
from conftest import invoke
from fake_ollama import FakeOllama, default_models, default_speed

from tuner import results
from tuner.checks import Check, checks_of, environment_changes, last_check
from tuner.stats import log_ratio_ci95, t975
from tuner.storage import open_storage
from tuner.study import TuneOptions, run_study

STORAGE = "sqlite:///t.db"


@pytest.fixture(autouse=True)
def _no_interference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other test processes share this machine's cores: a check here must not read them as a
    neighbour competing with the server (that path has its own test below)."""
    import tuner.check

    monkeypatch.setattr(tuner.check, "_sampler_factory", lambda engine: None)


@pytest.fixture
def old() -> Iterator[FakeOllama]:
    """A fake server that will be "upgraded" during the test."""
    with FakeOllama(version="0.12.3") as server:
        yield server


def _study(fake: FakeOllama, **kw: Any) -> str:
    base: dict[str, Any] = dict(model=["gemma3:1b"], host=fake.url, trials=4, repeats=2, num_predict=16,
                                storage=STORAGE, seed=1, params={"num_thread": [1, 2, 4, 8]},
                                measure_interference=False, roofline=False)
    base.update(kw)
    return run_study(TuneOptions(**base)).study_name


def _attrs(name: str) -> dict[str, Any]:
    return dict(results.load_study(open_storage(STORAGE), name).user_attrs)


def _check(*args: Any) -> Any:
    return invoke("check", "--storage", STORAGE, *args)


def test_an_unchanged_server_passes_and_the_check_is_stored(old: FakeOllama) -> None:
    name = _study(old)
    st = results.read_study(results.load_study(open_storage(STORAGE), name))
    winner, base = st.best(), st.baseline()
    assert winner is not None and base is not None and winner.number != base.number
    r = _check(name)
    assert r.exit_code == 0, r.output
    checks = _attrs(name)["checks"]
    assert len(checks) == 1
    c = Check.from_dict(checks[0])
    assert c.verdict == "ok" and c.exit_code == 0 and c.rounds == 3 and c.winner_trial == winner.number
    assert c.defaults_trial == base.number and c.environment_changes == [] and c.error is None
    # The study has a re-validation: its per-round values are the stored side.
    assert c.compared == "rounds" and len(c.winner_values) == 3
    prefill, decode = old.speed(winner.model, winner.options)
    assert c.winner_now == pytest.approx(decode, rel=1e-4) and c.winner_stored == pytest.approx(decode, rel=1e-4)
    # The fake is deterministic (durations are exact nanoseconds): no spread, so the interval is the point.
    assert c.change_pct == pytest.approx(0.0, abs=1e-3) and c.change_ci95 == (c.change_pct, c.change_pct)
    assert c.environment["server_version"] == "0.12.3"
    lines = r.output.splitlines()
    assert lines[0] == (f"re-measuring the winner (#{winner.number}) and the defaults (#{base.number}) of study "
                        f"'{name}' over 3 interleaved rounds ...")
    assert "  Ollama        0.12.3" in lines
    assert lines[-1] == (f"OK: winner #{winner.number} {decode:,.0f} tok/s now vs {decode:,.0f} stored (+0.0%, 95% CI "
                         "+0.0%..+0.0%) (environment unchanged); defaults moved +0.0%: no regression beyond 5% (the 95% interval "
                         "rules one out)")
    assert c.text == lines[-1] and last_check(_attrs(name)) == c
    # Each round measured the winner and the defaults, each after its warm-up when it was not loaded.
    sent = [g for g in old.prompt_requests() if g["options"].get("num_predict") == 16][-12:]
    # Interleaved, the order turned each round (W D, D W, W D): neither always goes first.
    w = winner.options["num_thread"]
    assert [g.get("options", {}).get("num_thread") for g in sent[::2]] == [w, None, None, w, w, None]
    quiet = _check(name, "-q")
    assert quiet.exit_code == 0 and quiet.output == last_check(_attrs(name)).text + "\n"  # type: ignore[union-attr]


def test_the_drift_figure_marks_every_change_of_the_environment(old: FakeOllama) -> None:
    from tuner import report
    from tuner.checks import drift_series
    from tuner.report.figures import drift_figure

    name = _study(old, trials=2, validate=0)
    for version in ("0.13.0", "0.12.3", "0.13.0"):  # an upgrade, a rollback, the upgrade again
        old.version = version
        assert _check(name).exit_code == 0
    drift = drift_series(_attrs(name))
    assert drift is not None and [p.kind for p in drift.points] == ["stored", "ok", "ok", "ok"]
    # Each point against the one before: all three moves are marked, not only the first upgrade.
    assert [p.new_changes for p in drift.marked] == [
        ["Ollama: 0.12.3 -> 0.13.0"], ["Ollama: 0.13.0 -> 0.12.3"], ["Ollama: 0.12.3 -> 0.13.0"]]
    assert drift.marked == drift.points[1:]
    # What each check saw against the stored environment is kept as it was.
    assert [p.changes for p in drift.points[1:]] == [["Ollama: 0.12.3 -> 0.13.0"], [], ["Ollama: 0.12.3 -> 0.13.0"]]
    fig = drift_figure(report.build_data(results.load_study(open_storage(STORAGE), name)))
    assert len(fig.layout.shapes) == 3
    assert [a.text for a in fig.layout.annotations] == ["Ollama 0.12.3 -&gt; 0.13.0", "Ollama 0.13.0 -&gt; 0.12.3",
                                                         "Ollama 0.12.3 -&gt; 0.13.0"]
    # The same version checked again is no change.
    assert _check(name).exit_code == 0
    again = drift_series(_attrs(name))
    assert again is not None and len(again.points) == 5 and again.marked == drift.marked


def test_a_slower_server_after_an_upgrade_is_a_regression(old: FakeOllama) -> None:
    from tuner import report
    from tuner.report.figures import drift_figure
    from tuner.show import format_show, show_json

    name = _study(old)
    assert _check(name).exit_code == 0
    old.speed_factor, old.version = 0.8, "0.13.0"
    r = _check(name, "--json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "regression" and doc["exit_code"] == 1 and doc["study"] == name
    assert doc["change_pct"] == pytest.approx(-20.0, abs=1e-3)
    assert doc["change_ci95"] == [pytest.approx(-20.0, abs=1e-3)] * 2
    assert doc["defaults_change_pct"] == pytest.approx(-20.0, abs=1e-3)
    assert doc["environment_changes"] == ["Ollama: 0.12.3 -> 0.13.0"]
    assert doc["stored_environment"]["server_version"] == "0.12.3" and doc["environment"]["server_version"] == "0.13.0"
    # The human text goes to standard error with --json.
    verdict = r.stderr.splitlines()[-1]
    assert verdict.startswith(f"REGRESSION: winner #{doc['winner_trial']} ")
    assert ("stored (-20%, 95% CI -20%..-20%) since Ollama 0.12.3 -> 0.13.0; defaults moved -20%: the defaults "
            "slowed alike, so the server or machine changed, not the fit of the tuned settings") in verdict
    text = _check(name)
    assert text.exit_code == 1
    assert "  Ollama        0.12.3 -> 0.13.0  (changed)" in text.output.splitlines()
    assert "-20%, 95% CI -20%..-20%" in text.output
    attrs = _attrs(name)
    assert [c.verdict for c in checks_of(attrs)] == ["ok", "regression", "regression"]
    shown = format_show(STORAGE, name)
    section = shown[shown.index("Checks (tune check):"):].splitlines()
    assert len(section) == 4 and " ok " in section[1] and " regression " in section[2]
    assert "(-20%, 95% CI -20%..-20%)  Ollama: 0.12.3 -> 0.13.0" in section[3]
    assert [c["verdict"] for c in show_json(STORAGE, name)["checks"]] == ["ok", "regression", "regression"]
    # The report's over-time series: the stored value, then each check, the upgrade marked once.
    data = report.build_data(results.load_study(open_storage(STORAGE), name))
    drift = data.drift
    assert drift is not None and [p.kind for p in drift.points] == ["stored", "ok", "regression", "regression"]
    # The first screen says it first: the winner slowed, since what, and what to do.
    f = data.first
    assert f is not None and f.check_regression
    assert f.check_note == (f"Last `tune check` ({checks_of(attrs)[-1].at[:10]}): the winner is now 20% slower (95% CI "
                            "20-20% slower) since Ollama 0.12.3 -> 0.13.0: the defaults slowed alike, so the "
                            "server or machine changed, not the fit of the tuned settings; re-tuning is unlikely to "
                            "win it back")
    assert drift.points[0].winner == pytest.approx(drift.points[1].winner, rel=1e-6)
    assert drift.points[2].winner == pytest.approx(0.8 * drift.points[1].winner, rel=1e-6)
    assert [p.new_changes for p in drift.marked] == [["Ollama: 0.12.3 -> 0.13.0"]]
    assert drift.marked[0] is drift.points[2] and drift.points[3].changes == ["Ollama: 0.12.3 -> 0.13.0"]
    fig = drift_figure(data)
    assert len(fig.layout.shapes) == 1 and fig.layout.annotations[0].text == "Ollama 0.12.3 -&gt; 0.13.0"  # escaped
    assert list(fig.data[0].y) == [p.winner for p in drift.points]
    page = report.render_html(report.build_report(results.load_study(open_storage(STORAGE), name)))
    assert "<h2>The winner&#x27;s speed over time</h2>" in page and "Ollama 0.12.3 -\\u0026gt; 0.13.0" in page


def test_only_the_tuned_config_slowed_so_it_says_re_tune(old: FakeOllama) -> None:
    name = _study(old)
    # Full offload (what the winner runs) lost 30%; the defaults (auto offload) did not change.
    old.speed_fn = lambda model, opts: tuple(  # type: ignore[assignment]
        x * (0.7 if opts["num_gpu"] >= 27 else 1.0)
        for x in default_speed(next(m for m in default_models() if m.name == model), opts))
    r = _check(name)
    assert r.exit_code == 1
    verdict = r.output.splitlines()[-1]
    # The re-tune keeps the study's workload and storage, so the new study warm-starts from this one.
    assert ("(-30%, 95% CI -30%..-30%) (environment unchanged); defaults moved +0.0%: re-tune with `tune --model "
            f"gemma3:1b --host {old.url} --repeats 2 --num-predict 16 --storage {STORAGE} --trials 20 "
            f"--study {name}-") in verdict
    # The command is kept with the check, so the report advises it without reading the verdict's words.
    stored = last_check(_attrs(name))
    assert stored is not None and verdict.endswith(f": re-tune with `{stored.retune}`")


def test_the_re_tune_keeps_the_limits_and_the_context(old: FakeOllama) -> None:
    name = _study(old, max_ttft_ms=5000.0, max_vram_mib=8000.0, context=4096, num_predict=128, repeats=3)
    old.speed_fn = lambda model, opts: tuple(  # type: ignore[assignment]
        x * (0.7 if opts["num_gpu"] >= 27 else 1.0)
        for x in default_speed(next(m for m in default_models() if m.name == model), opts))
    r = _check(name)
    assert r.exit_code == 1, r.output
    assert (f"re-tune with `tune --model gemma3:1b --host {old.url} --context 4096 --max-ttft-ms 5000 "
            f"--max-vram-mib 8000 --storage {STORAGE} --trials 20 --study {name}-") in r.output.splitlines()[-1]


def test_a_server_that_is_down_cannot_be_measured(old: FakeOllama) -> None:
    name = _study(old)
    url = old.url
    old.stop()
    r = _check(name)
    assert r.exit_code == 3
    assert r.output == (f"Error: could not measure study '{name}' now: cannot reach Ollama at {url}: is it running? "
                        "Start it with `ollama serve` or point --host at it\n")
    c = last_check(_attrs(name))
    assert c is not None and c.verdict == "unmeasured" and c.exit_code == 3 and "cannot reach Ollama" in (c.error or "")


def test_a_model_that_is_gone_cannot_be_measured(old: FakeOllama) -> None:
    name = _study(old)
    ollama.Client(host=old.url).delete("gemma3:1b")
    r = _check(name, "--json")
    assert r.exit_code == 3 and r.stdout == ""
    assert r.stderr.startswith(f"Error: could not measure study '{name}' now: model 'gemma3:1b' is not installed")


def test_rejected_input_exits_2(old: FakeOllama) -> None:
    name = _study(old)
    r = _check("nope")
    assert r.exit_code == 2
    assert r.output == f"Error: no study named 'nope' in this storage: known studies are {name}\n"
    r = _check(name, "--rounds", "1")
    assert (r.exit_code, r.output) == (2, "Error: --rounds must be at least 2 (got 1): one round gives no "
                                           "confidence interval\n")
    assert "checks" not in _attrs(name)


def test_the_stored_custom_prompts_are_replayed(old: FakeOllama, tmp_path: Path) -> None:
    prompts = tmp_path / "mine.txt"
    prompts.write_text("zebra quokka first custom prompt\n---\nsecond custom prompt about narwhals\n")
    name = _study(old, prompts_file=str(prompts), validate=0)
    prompts.unlink()  # the check needs no file: the study stored the text
    old.clear_history()
    r = _check(name)
    assert r.exit_code == 0, r.output
    sent = [g["prompt"] for g in old.prompt_requests()]
    # Winner and defaults interleave, the order turned each round (W D, D W, W D): a measurement
    # loads its config with a warm-up (the first prompt) unless the same config ran just before:
    # 2 configs x 3 rounds x 2 prompts, and 4 warm-ups.
    assert len(sent) == 2 * 3 * 2 + 4
    assert sum("zebra quokka first custom prompt" in p for p in sent) == 6 + 4
    assert sum("second custom prompt about narwhals" in p for p in sent) == 6
    c = last_check(_attrs(name))
    # No re-validation: the search's per-request samples are the stored side (2 prompts x 3 rounds now).
    assert c is not None and c.compared == "requests" and len(c.winner_values) == 6


def test_a_study_stored_before_prompts_were_kept_needs_the_file(old: FakeOllama, tmp_path: Path) -> None:
    prompts = tmp_path / "mine.txt"
    prompts.write_text("zebra quokka first custom prompt\n---\nsecond custom prompt about narwhals\n")
    name = _study(old, prompts_file=str(prompts), validate=0)
    study = results.load_study(open_storage(STORAGE), name)
    w = dict(study.user_attrs["workload"])
    w["prompts"] = [{k: v for k, v in p.items() if k != "text"} for p in w["prompts"]]
    study.set_user_attr("workload", w)
    r = _check(name)
    assert r.exit_code == 2 and r.output == ("Error: the study stored no text for prompt 'p1' (it was created before "
                                             "prompts were stored): pass the original file with --prompts\n")
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n")
    r = _check(name, "--prompts", other)
    assert r.exit_code == 2 and r.output.startswith(f"Error: the prompts in {other} are not the ones the study measured")
    old.clear_history()
    r = _check(name, "--prompts", prompts)
    assert r.exit_code == 0, r.output
    assert sum("second custom prompt about narwhals" in g["prompt"] for g in old.prompt_requests()) == 6


def test_a_contended_round_is_measured_again(old: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.check
    from tuner.telemetry import HostSummary, TelemetrySummary

    name = _study(old)
    calls = [0]

    class Neighbour:
        """Telemetry of a busy neighbour during the first measurement only."""

        def start(self) -> None:
            calls[0] += 1
            self.busy = calls[0] == 1

        def stop(self) -> TelemetrySummary:
            pct = 100.0 if self.busy else 0.0
            return TelemetrySummary(gpus=[], host=HostSummary(
                samples=2, cpu_util_mean_pct=50.0, mem_used_peak_mib=1.0, server_rss_peak_mib=None, wall_s=2.0,
                foreign_cpu_s=pct / 100 * 2.0, busiest="neighbour", busiest_pct=pct))

    monkeypatch.setattr(tuner.check, "_sampler_factory", lambda engine: Neighbour)
    r = _check(name)
    assert r.exit_code == 0, r.output
    assert "check round 1 was contended (other processes competed): measuring it again" in r.output
    c = last_check(_attrs(name))
    assert c is not None and c.rounds == 3 and c.contended == 1 and c.dropped == 0


def test_noise_is_carried_into_the_interval(old: FakeOllama) -> None:
    name = _study(old)
    rng = random.Random(5)

    def noisy(model: str, opts: dict[str, Any]) -> tuple[float, float]:
        prefill, decode = default_speed(next(m for m in default_models() if m.name == model), opts)
        return prefill, 0.8 * decode * math.exp(rng.gauss(0.0, 0.02))

    old.speed_fn = noisy
    r = _check(name, "--rounds", "4")
    assert r.exit_code == 1, r.output
    c = last_check(_attrs(name))
    assert c is not None and c.change_ci95 is not None and c.winner_now_ci95 is not None
    lo, hi = c.change_ci95
    assert lo < c.change_pct < hi < -5.0 and -20.0 - 6 < lo and hi < -20.0 + 6
    assert c.winner_now_ci95[0] < c.winner_now < c.winner_now_ci95[1]


def test_a_wide_interval_is_inconclusive_not_ok(old: FakeOllama) -> None:
    """Unchanged on average but very noisy now: no regression shown, none ruled out: said so."""
    name = _study(old)
    rng = random.Random(1)

    def noisy(model: str, opts: dict[str, Any]) -> tuple[float, float]:
        prefill, decode = default_speed(next(m for m in default_models() if m.name == model), opts)
        return prefill, decode * math.exp(rng.gauss(0.0, 0.3))

    old.speed_fn = noisy
    r = _check(name, "--rounds", "2")
    c = last_check(_attrs(name))
    assert c is not None and c.change_ci95 is not None
    assert c.change_ci95[0] < -5.0 < c.change_ci95[1], c.change_ci95
    assert (c.verdict, c.exit_code, r.exit_code) == ("inconclusive", 0, 0)
    assert r.output.splitlines()[-1].startswith("INCONCLUSIVE: ")
    assert r.output.splitlines()[-1].endswith(
        ": no regression beyond 5% shown, none ruled out either (the 95% interval reaches past 5%; more --rounds "
        "narrows it)")


# ----------------------------------------------------------------------------- pieces


def test_change_interval_is_welch_on_the_log_scale() -> None:
    now, stored = [80.0, 82.0, 79.0], [100.0, 101.0, 98.0, 99.5]
    a, b = [math.log(x) for x in now], [math.log(x) for x in stored]
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    d = statistics.fmean(a) - statistics.fmean(b)
    half = t975(df) * math.sqrt(va + vb)
    ratio, lo, hi = log_ratio_ci95(now, stored)
    assert ratio == pytest.approx(math.exp(d)) == pytest.approx(statistics.geometric_mean(now)
                                                                / statistics.geometric_mean(stored))
    assert (lo, hi) == (pytest.approx(math.exp(d - half)), pytest.approx(math.exp(d + half)))
    # No spread on either side (the deterministic fake): the interval is the point.
    assert log_ratio_ci95([8.0, 8.0], [10.0, 10.0, 10.0]) == (pytest.approx(0.8),) * 3
    # One stored value adds no spread: the interval is the spread measured now.
    r1, lo1, hi1 = log_ratio_ci95([9.0, 11.0, 10.0], [10.0])
    assert lo1 < r1 < hi1
    with pytest.raises(ValueError):
        log_ratio_ci95([], [1.0])


def test_environment_changes_name_what_changed() -> None:
    old = {"server_version": "0.12.3", "gpus": ["RTX 4090"], "driver": "550.1", "model_digest": "sha256:" + "a" * 64,
           "cpu": "AMD EPYC"}
    new = {**old, "server_version": "0.13.0", "driver": "560.2", "model_digest": "b" * 64, "cpu": None}
    assert environment_changes(old, new) == ["Ollama: 0.12.3 -> 0.13.0", "driver: 550.1 -> 560.2",
                                             "model digest: aaaaaaaaaaaa -> bbbbbbbbbbbb"]
    assert environment_changes(old, {**old, "gpus": []}, "llama-cpp") == ["GPU: RTX 4090 -> none"]
    # Digests that share their first 12 digits are shown up to the first that differs.
    near = {**old, "model_digest": "sha256:" + "a" * 20 + "c" + "a" * 43}
    assert environment_changes(old, near) == ["model digest: " + "a" * 21 + " -> " + "a" * 20 + "c"]
    assert environment_changes({**old, "server_version": "0.3.1"}, {**old, "server_version": "0.3.2"},
                               "llama-cpp") == ["llama.cpp: 0.3.1 -> 0.3.2"]


def test_last_check_reads_the_latest_entry() -> None:
    assert last_check({}) is None and last_check({"checks": "garbage"}) is None
    a = Check(at="2026-12-01T10:00:00+00:00", verdict="ok", exit_code=0, objective="decode_tps", change_ci95=(-1.0, 2.0))
    b = Check(at="2026-12-02T10:00:00+00:00", verdict="unmeasured", exit_code=3, objective="decode_tps", error="down")
    attrs = {"checks": [a.to_dict(), b.to_dict(), {"no": "fields"}]}
    assert last_check(attrs) == b and checks_of(attrs) == [a, b]
    assert json.loads(json.dumps(a.to_dict()))["change_ci95"] == [-1.0, 2.0]
    assert Check.from_dict({**a.to_dict(), "added_later": 1}) == a


def test_a_regression_advises_the_stored_re_tune_and_checks_stored_before_it_still_read() -> None:
    from tuner.checks import advice, since_text, verdict_text

    c = Check(at="2026-12-01T10:00:00+00:00", verdict="regression", exit_code=1, objective="decode_tps",
              winner_trial=4, winner_now=412.0, winner_stored=498.0, change_pct=-17.0, change_ci95=(-19.0, -15.0),
              environment_changes=["Ollama: 0.12.3 -> 0.13.0", "driver: 550.1 -> 560.2"],
              retune="tune --model gemma3:1b --trials 20")
    assert since_text(c.environment_changes) == " since Ollama 0.12.3 -> 0.13.0, driver 550.1 -> 560.2"
    assert advice(c) == ": re-tune with `tune --model gemma3:1b --trials 20`"
    assert verdict_text(c) == ("REGRESSION: winner #4 412 tok/s now vs 498 stored (-17%, 95% CI -19%..-15%) since "
                               "Ollama 0.12.3 -> 0.13.0, driver 550.1 -> 560.2: re-tune with `tune --model gemma3:1b "
                               "--trials 20`")
    stored = c.to_dict()
    del stored["retune"]  # as checks were stored before the command was kept
    assert advice(Check.from_dict(stored)) == ": re-tune"
    # The defaults slowed as much: re-tuning will not win it back, whatever the command.
    alike = Check.from_dict({**c.to_dict(), "defaults_change_pct": -16.0, "defaults_change_ci95": [-18.0, -14.0]})
    assert advice(alike).startswith(": the defaults slowed alike")
    assert verdict_text(alike).endswith("; defaults moved -16%" + advice(alike))


def test_the_re_tune_names_the_storage_unless_it_is_the_default() -> None:
    from tuner.check import _retune
    from tuner.storage import default_storage_url, storage_args

    attrs = {"model": "gemma3:1b", "host": "http://127.0.0.1:11434"}
    assert storage_args(None) == storage_args(default_storage_url()) == ()
    assert _retune(attrs, "s", None, default_storage_url()).startswith("tune --model gemma3:1b --trials 20 --study s-")
    assert _retune(attrs, "s", None, None) == _retune(attrs, "s", None, default_storage_url())
    url = "postgresql://bob:s3cret@db/t"
    assert storage_args(url) == ("--storage", "postgresql://bob:***@db/t")
    assert " --storage 'postgresql://bob:***@db/t' --trials 20 " in _retune(attrs, "s", None, url)


def test_a_llama_cpp_study_is_checked_on_its_stored_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_llamacpp import FakeLlama, _fake_lib, write_gguf

    from tuner.engines import llamacpp

    monkeypatch.setattr(llamacpp, "_lib", lambda: _fake_lib())
    monkeypatch.setattr(FakeLlama, "created", [])
    gguf = str(write_gguf(tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"))
    name = run_study(TuneOptions(model=[gguf], engine="llama-cpp", trials=3, repeats=1, num_predict=8, storage=STORAGE,
                                 seed=1, params={"num_thread": [1, 2], "num_ctx": [2048], "num_batch": [512]},
                                 measure_interference=False, roofline=False)).study_name
    r = _check(name)
    assert r.exit_code == 0, r.output
    c = last_check(_attrs(name))
    assert c is not None and c.verdict == "ok" and c.environment["server_version"] == "9.9.9"
    assert "  llama.cpp     9.9.9" in r.output.splitlines()
    Path(gguf).unlink()
    r = _check(name)
    assert r.exit_code == 3 and r.output.startswith(f"Error: could not measure study '{name}' now: GGUF file '{gguf}' "
                                                    "does not exist")


def test_ctrl_c_during_a_check_says_nothing_was_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.check

    def interrupted(*a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(tuner.check, "run_check", interrupted)
    r = invoke("check", "any", "--storage", "sqlite:///t.db")
    assert r.exit_code == 130
    assert r.output == "\nInterrupted: this check was not stored and the study is unchanged; run it again.\n"


def test_another_server_given_with_host_is_an_environment_change(old: FakeOllama) -> None:
    name = _study(old)
    with FakeOllama(version="0.12.3") as other:
        r = _check(name, "--host", other.url)
    assert r.exit_code == 0, r.output
    c = last_check(_attrs(name))
    assert c is not None and c.environment_changes[0] == f"server: {old.url} -> {other.url}"
    assert f"since server {old.url} -> {other.url}" in r.output.splitlines()[-1]


def test_a_drafting_winner_whose_output_changed_since_is_not_measured() -> None:
    # The study's drafting winner kept the greedy output then; an engine that now verifies drafts
    # with other arithmetic changes it: the check says so instead of timing a changed answer.
    from fake_ollama import mtp_model

    mtp = "qwen3.6:27b-mtp"
    with FakeOllama(models=default_models() + [mtp_model(mtp)]) as fake:
        name = _study(fake, model=[mtp], trials=3, prompts_file="builtin:copy", sampler="grid", validate=0,
                      params={"draft_num_predict": [0, 4], "num_thread": [4], "num_ctx": [2048], "num_gpu": [0]})
        best = results.summarise_study(results.load_study(open_storage(STORAGE), name), ["decode_tps"], STORAGE).best
        # The winner drafts (on an MTP model the defaults draft 4 too) and kept the output.
        assert best is not None and best.identity is not None and best.identity["identical"]
        assert _check(name).exit_code == 0
        fake.draft_changes_output = True
        r = _check(name)
    assert r.exit_code == 3, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: could not measure study '{name}' now: the winner (#{best.number}) did not run: "
                           "drafting changed the output: greedy text on prompt 'code_edit'"), r.output
    c = last_check(_attrs(name))
    assert c is not None and c.verdict == "unmeasured" and "drafting changed the output" in (c.error or "")
