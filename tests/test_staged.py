"""The staged search end to end against the fake Ollama server, through the real client."""

from __future__ import annotations

from typing import Any

from fake_ollama import FakeOllama

from tuner import staged
from tuner.record import TrialRecord
from tuner.study import TuneOptions, run_study

THREADS = [1, 2, 4, 8]


def opts(fake: FakeOllama, **kw: Any) -> TuneOptions:
    base: dict[str, Any] = dict(
        model=["gemma3:1b"], host=fake.url, trials=15, repeats=1, num_predict=16, storage="memory",
        seed=1, params={"num_thread": THREADS}, validate=0, roofline=False, prune=False,
        measure_interference=False,
    )
    base.update(kw)
    return TuneOptions(**base)


def _stages(trials: list[TrialRecord]) -> list[str | None]:
    return [t.stage for t in sorted(trials, key=lambda t: t.number)]


def test_staged_is_the_default_sampler() -> None:
    assert TuneOptions(model=["m"]).sampler == "staged"


def test_screens_every_variant_at_full_offload_then_tunes_in_the_best(gpu: None) -> None:
    with FakeOllama(time_scale=0) as fake:
        lines: list[str] = []
        summary = run_study(opts(fake), echo=lines.append)
    trials = sorted(summary.trials, key=lambda t: t.number)
    names = _stages(trials)
    variants = {t.model for t in trials if t.stage == staged.SCREEN}
    assert len(variants) == 4  # gemma3:1b-it-q4_K_M is gemma3:1b (same digest)
    assert names == [staged.BASELINE] + [staged.SCREEN] * 4 + [staged.TUNE] * 10
    assert all(t.options["num_gpu"] == 27 for t in trials if t.stage in (staged.SCREEN, staged.TUNE))
    assert {t.model for t in trials if t.stage == staged.TUNE} == {"gemma3:1b"}  # the fastest variant
    assert "[screen] gemma3:1b-it-qat" in "\n".join(lines)
    optimum = FakeOllama.optimum(num_ctx=[2048, 4096, 8192, 16384, 32768], num_batch=[2**i for i in range(5, 12)],
                                 num_gpu=range(-1, 28), num_thread=THREADS)
    assert summary.best is not None and summary.best.model == optimum["model"]
    assert summary.best.values is not None and summary.best.values[0] >= 0.97 * optimum["decode_tps"]
    assert staged.OFFLOAD not in names  # everything fits: partial offload is never tried


def test_partial_offload_is_searched_only_after_full_offload_fails(gpu: None) -> None:
    with FakeOllama(time_scale=0, memory_budget_mib=1000) as fake:
        summary = run_study(opts(fake))
    trials = sorted(summary.trials, key=lambda t: t.number)
    screen = [t for t in trials if t.stage == staged.SCREEN]
    offload = [t for t in trials if t.stage == staged.OFFLOAD]
    assert len(screen) == 4 and all(t.error and "memory" in t.error for t in screen)
    assert offload and min(t.number for t in offload) > max(t.number for t in screen)
    # The bisection holds the screen's other settings and ends at the largest count that loads.
    first = [t for t in offload if t.options["num_ctx"] == 2048 and t.options["num_batch"] == 512]
    loaded = [t.options["num_gpu"] for t in first if not t.error]
    failed = [t.options["num_gpu"] for t in first if t.error]
    assert loaded and failed and max(loaded) + 1 == min(failed) < 27
    assert summary.best is not None and not summary.best.baseline
    assert summary.best.options["num_gpu"] >= max(loaded)


def test_cpu_only_server_with_one_variant_has_no_screen() -> None:
    with FakeOllama(time_scale=0, memory_budget_mib=0) as fake:
        summary = run_study(opts(fake, trials=6, params={"num_thread": THREADS, "variant": ["gemma3:1b"]}))
    names = _stages(summary.trials)
    assert names == [staged.BASELINE, staged.START] + [staged.TUNE] * 4
    assert all(t.options.get("num_gpu") == 0 for t in summary.trials if not t.baseline)


def test_plain_tpe_labels_only_the_baseline_and_the_starting_point(gpu: None) -> None:
    with FakeOllama(time_scale=0) as fake:
        summary = run_study(opts(fake, trials=4, sampler="tpe"))
    assert _stages(summary.trials) == [staged.BASELINE, staged.START, None, None]


def test_the_report_shows_each_top_trial_stage(gpu: None) -> None:
    from tuner.report.data import build_data
    from tuner.report.html import render_html
    from tuner.storage import open_storage
    from tuner import results

    with FakeOllama(time_scale=0) as fake:
        summary = run_study(opts(fake, trials=7, storage="sqlite:///t.db"))
    data = build_data(results.load_study(open_storage("sqlite:///t.db"), summary.study_name))
    assert {r.stage for r in data.top} <= {staged.BASELINE, staged.SCREEN, staged.TUNE}
    assert any(r.stage == staged.SCREEN for r in data.top)
    assert data.bench is not None and "stage" in data.bench.columns
    assert "<th>stage</th>" in render_html(data)
