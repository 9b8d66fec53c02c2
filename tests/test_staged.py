"""The staged search end to end against the fake Ollama server, through the real client."""

from __future__ import annotations

from typing import Any

from fake_ollama import FakeOllama, GpuSettings

from tuner import staged
from tuner.record import TrialRecord
from tuner.study import TuneOptions, run_study

THREADS = [1, 2, 4, 8]
#: Current Ollama's placement: num_gpu unset fits as many layers as memory allows.
CURRENT = GpuSettings(auto_max_layers=None)


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
    # 800 MiB: no variant fits fully even at the smallest batch; the server's auto placement fits.
    with FakeOllama(time_scale=0, memory_budget_mib=800, gpu=CURRENT) as fake:
        summary = run_study(opts(fake))
        best_layers = max(g for g in range(28) if fake.fits("gemma3:1b", {"num_ctx": 2048, "num_batch": 32, "num_gpu": g}))
    trials = sorted(summary.trials, key=lambda t: t.number)
    screen = [t for t in trials if t.stage == staged.SCREEN]
    offload = [t for t in trials if t.stage == staged.OFFLOAD]
    # One failed screen of the smallest need rules out every larger variant: they are not loaded.
    assert len(screen) == 1 and screen[0].failed_load
    assert offload and min(t.number for t in offload) > max(t.number for t in screen)
    assert sum(1 for t in trials if t.failed_load) <= 2
    loaded = [t.options["num_gpu"] for t in offload if not t.error]
    assert max(loaded) == best_layers < 27
    assert summary.best is not None and not summary.best.baseline
    assert summary.best.options["num_gpu"] == best_layers


def test_a_memory_tight_gpu_gets_full_offload_with_a_smaller_batch(gpu: None) -> None:
    """1.3 GB: every variant's full offload fails at batch 512; gemma3:1b fits fully at a small batch."""
    with FakeOllama(time_scale=0, memory_budget_mib=1300, gpu=CURRENT) as fake:
        summary = run_study(opts(fake, params={"num_thread": [4]}))
        space = [(v, c, b, g) for v in ("gemma3:1b", "gemma3:1b-it-qat", "gemma3:1b-it-q8_0", "gemma3:1b-it-fp16")
                 for c in (2048, 4096, 8192, 16384, 32768) for b in (32, 64, 128, 256, 512, 1024, 2048)
                 for g in range(-1, 28)]
        ok = [(fake.speed(v, {"num_ctx": c, "num_batch": b, "num_gpu": g, "num_thread": 4})[1], v, c, b, g)
              for v, c, b, g in space if fake.fits(v, {"num_ctx": c, "num_batch": b, "num_gpu": g})]
        optimum = max(ok)
        assert not fake.fits("gemma3:1b", {"num_ctx": 2048, "num_batch": 512, "num_gpu": 27})
    trials = summary.trials
    assert sum(1 for t in trials if t.failed_load) <= 2
    assert summary.best is not None and summary.best.values is not None
    assert summary.best.values[0] >= 0.97 * optimum[0], (summary.best.config_text(), optimum)
    assert summary.best.options["num_gpu"] == 27
    # The prediction is stored beside what the server reported, within 10% where layers are known.
    errors = [abs(t.memory["error_pct"]) for t in trials if t.memory and t.memory.get("error_pct") is not None]
    assert errors and max(errors) <= 10.0
    # Nothing predicted not to fit reached the server.
    assert all(not t.samples for t in trials if t.skipped)


def test_random_skips_what_is_predicted_not_to_fit_and_tpe_is_repaired(gpu: None) -> None:
    with FakeOllama(time_scale=0, memory_budget_mib=1300, gpu=CURRENT) as fake:
        summary = run_study(opts(fake, sampler="random", trials=20, seed=3))
        tried = [(f["model"], f["options"]) for f in fake.failed_loads]
    skipped = [t for t in summary.trials if t.skipped]
    assert skipped and all(t.error and t.error.startswith("skipped: predicted to need") for t in skipped)
    assert all((t.model, t.options) not in [(m, {k: o[k] for k in t.options}) for m, o in tried] for t in skipped)
    assert all(t.constraints["load"] == 1.0 for t in skipped)
    # TPE's proposals are moved to configs predicted to fit before they are measured.
    with FakeOllama(time_scale=0, memory_budget_mib=1300, gpu=CURRENT) as fake:
        tpe = run_study(opts(fake, sampler="tpe", trials=20, seed=3))
    assert not any(t.skipped for t in tpe.trials)
    assert sum(1 for t in tpe.trials if t.failed_load) < sum(1 for t in summary.trials if t.failed_load or t.skipped)
    assert all(t.memory and t.memory["verdict"] in ("fits", "unknown") for t in tpe.trials if not t.baseline)


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


def test_the_report_and_show_print_the_prediction_beside_the_reported_value(gpu: None) -> None:
    from tuner import results
    from tuner.report.data import build_data
    from tuner.report.html import render_html
    from tuner.show import format_summary, format_trial
    from tuner.storage import open_storage

    with FakeOllama(time_scale=0, memory_budget_mib=1300, gpu=CURRENT) as fake:
        summary = run_study(opts(fake, trials=8, params={"num_thread": [4]}, storage="sqlite:///t.db"))
    data = build_data(results.load_study(open_storage("sqlite:///t.db"), summary.study_name))
    loaded = [m for m in data.memory if m.observed_mib is not None and m.error_pct is not None]
    assert loaded and all(abs(m.error_pct) <= 10.0 for m in loaded)
    assert any(m.failed for m in data.memory)  # a failed load keeps its prediction too
    assert data.memory_note.startswith("The memory model's error against the server's size_vram: median")
    assert data.first is not None and data.first.memory_lines[0].startswith("GPU memory: ")
    assert "MiB to spare (#" in data.first.memory_lines[0]
    page = render_html(data)
    assert "GPU memory: predicted and reported" in page and data.first.memory_lines[0].replace(",", "") in \
        page.replace(",", "")
    # The terminal: the winner's block and the summary say the same.
    assert summary.best is not None
    assert "GPU MiB predicted" in format_trial(summary.best, "Best") and "server reported" in format_trial(summary.best, "Best")
    assert "GPU memory: " in format_summary(summary) and "to spare" in format_summary(summary)
    from tuner.show import summary_json

    doc = summary_json(summary)
    assert doc["gpu_fit"]["spare_at_most_mib"] is not None and doc["gpu_fit"]["tight"] is False
    assert doc["best"]["memory"]["predicted_mib"] is not None and doc["best"]["memory"]["observed_mib"] is not None
