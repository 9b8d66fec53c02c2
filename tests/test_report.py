"""tuner/report/: the data behind the HTML report, its figures, escaping, and safe writing."""

from __future__ import annotations

import errno
import html
import math
import os
from pathlib import Path
from typing import Any

import pytest

from tuner import files, report, results
from tuner.errors import StudyError, TunerError

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
STUDY = "gemma3:1b@127.0.0.1:11434"
SPACE: dict[str, list[Any]] = {
    "variant": ["gemma3:1b", f"gemma3:1b-{XSS}"],
    "num_ctx": [2048, 4096, 8192, 32768],
    "num_batch": [256, 512, 1024],
    "num_gpu": list(range(0, 28)),
    "flash_attention": ["auto", "on", "off"],
    "kv_cache_type": ["f16", "q8_0"],
}
ENVIRONMENT = {
    "tuner_version": "0.1.0",
    "engine": "ollama",
    "server_version": "0.33.1",
    "model": "gemma3:1b",
    "os": "Linux 6.8",
    "hostname": "box",
    "host": {"cpu_model": "AMD EPYC 9654", "cpu_physical_cores": 16, "cpu_logical_cores": 32, "ram_total_mib": 131072},
    "gpus": [{"index": 0, "name": "NVIDIA H200", "memory_total_mib": 143771, "driver_version": "570.1"}],
}


def _dists() -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    return {
        "variant": CategoricalDistribution(SPACE["variant"]),
        "num_ctx": CategoricalDistribution(SPACE["num_ctx"]),
        "num_batch": CategoricalDistribution(SPACE["num_batch"]),
        "num_gpu": IntDistribution(0, 27),
        "flash_attention": CategoricalDistribution(SPACE["flash_attention"]),
        "kv_cache_type": CategoricalDistribution(SPACE["kv_cache_type"]),
    }


def _metrics(decode: float, ttft_p95: float, *, telemetry: bool = True) -> dict[str, Any]:
    m: dict[str, Any] = {}
    for key, mean in (("decode_tps", decode), ("prefill_tps", decode * 20), ("e2e_tps", decode * 0.8),
                      ("ttft_ms", ttft_p95 * 0.8), ("latency_ms", ttft_p95 + 2000), ("load_ms", 5.0)):
        m.update({f"{key}_mean": mean, f"{key}_sd": mean * 0.02, f"{key}_p50": mean, f"{key}_p95": mean * 1.05,
                  f"{key}_min": mean * 0.9, f"{key}_max": mean * 1.1})
    m["ttft_ms_p95"] = ttft_p95
    m["latency_ms_p95"] = ttft_p95 + 2100
    m.update(n_requests=6, reload_ms=900.0, unexpected_reloads=0, done_reasons=["length"],
             samples=[{"prompt": "chat", "repeat": 0, "decode_tps": decode, "ttft_ms": ttft_p95}],
             warmup={"prompt": "chat", "decode_tps": decode})
    if telemetry:
        power = 100 + decode
        m.update(gpu_power_mean_w=power, gpu_power_max_w=power + 20, gpu_energy_j=power * 3.0,
                 gpu_mem_used_peak_mib=2000 + decode * 10, gpu_mem_increase_mib=900.0,
                 tokens_per_joule=round(768 / (power * 3.0), 6), host_cpu_util_mean_pct=12.5,
                 gpu0_power_mean_w=power, gpu0_energy_source="counter", gpu0_throttle_reasons=["gpu_idle"])
    return m


def _config(params: dict[str, Any]) -> dict[str, Any]:
    runner = {k: params[k] for k in ("num_ctx", "num_batch", "num_gpu", "num_thread") if k in params}
    server = {k: params[k] for k in ("flash_attention", "kv_cache_type", "num_parallel") if k in params}
    return {"model": params.get("variant", "gemma3:1b"), "options": runner, "server": server}


def _ok(ttft_p95: float, limit: float = 500.0) -> dict[str, float]:
    return {"load": 0.0, "ttft_p95_ms": (ttft_p95 - limit) / limit, "vram_mib": -0.5}


def make_study(
    tmp_path: Path | None,
    name: str = STUDY,
    *,
    feasible: bool = True,
    objectives: tuple[str, ...] = ("decode_tps",),
    searched: tuple[str, ...] = tuple(SPACE),
    baseline: bool = True,
    validation: bool = False,
    roofline: bool = False,
    pruned: bool = False,
) -> tuple[str, Any]:
    """A study in a tmp SQLite storage shaped like what tuner/study.py stores.

    Trials: 0 baseline, 1-3 feasible (1 best, 2 fast TTFT, 3 dominated), 4 infeasible
    (TTFT limit, model name with a script tag), 5 failed load with an error, 6 FAIL.
    ``feasible=False`` makes every measured trial break the TTFT limit. With ``tmp_path``
    None the study is in memory (faster; the URL returned is then "").
    ``pruned`` adds trial 7, PRUNED after 3 of 6 requests (single objective only);
    ``validation`` stores a re-validation of 1-3 that declares #2 the winner, overlapping #1,
    with #3 failed; ``roofline`` stores the winner's share of the bandwidth ceiling.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'tuner.db'}" if tmp_path is not None else ""
    directions: list[Any] = ["maximize" if o.endswith("tps") or o == "tokens_per_joule" else "minimize" for o in objectives]
    study = optuna.create_study(study_name=name, storage=url or None, directions=directions)
    space = {k: v for k, v in SPACE.items() if k in searched}
    for k, v in {"model": "gemma3:1b", "engine": "ollama", "objectives": list(objectives), "space": space,
                 "workload": {"prompts": [{"name": "chat", "chars": 80}, {"name": XSS, "chars": 900}],
                              "repeats": 3, "num_predict": 128, "source": "builtin"},
                 "environment": ENVIRONMENT, "limits": {"max_ttft_ms": 500.0, "max_vram_mib": 6000.0},
                 "host": "http://127.0.0.1:11434", "server_version": "0.33.1", "space_hash": "abc",
                 "created_at": "2026-08-01T10:00:00+00:00"}.items():
        study.set_user_attr(k, v)
    dists = _dists()
    bump = 0.0 if feasible else 1000.0

    def values(decode: float, ttft: float) -> list[float]:
        return [decode if o.endswith("tps") else ttft for o in objectives]

    def add(params: dict[str, Any], decode: float, ttft: float, *, is_baseline: bool = False,
            violations: list[str] | None = None) -> None:
        params = {k: v for k, v in params.items() if k in searched}
        ttft += bump
        ua = {"config": _config(params) if not is_baseline else {"model": "gemma3:1b", "options": {}, "server": {}},
              "baseline": is_baseline, **_metrics(decode, ttft)}
        viol = violations or ([f"p95 TTFT {ttft:.0f} ms > 500 ms"] if ttft > 500 else [])
        ua["violations"] = viol
        study.add_trial(create_trial(values=values(decode, ttft), params=params,
                                     distributions={k: dists[k] for k in params}, user_attrs=ua,
                                     constraints=_ok(ttft)))

    if baseline:
        add({}, 40.0, 300.0, is_baseline=True)
    add({"variant": "gemma3:1b", "num_ctx": 4096, "num_batch": 512, "num_gpu": 27, "flash_attention": "on",
         "kv_cache_type": "q8_0"}, 60.0, 200.0)
    add({"variant": "gemma3:1b", "num_ctx": 8192, "num_batch": 256, "num_gpu": 27, "flash_attention": "off",
         "kv_cache_type": "f16"}, 55.0, 150.0)
    add({"variant": "gemma3:1b", "num_ctx": 2048, "num_batch": 1024, "num_gpu": 20, "flash_attention": "auto",
         "kv_cache_type": "f16"}, 50.0, 400.0)
    add({"variant": f"gemma3:1b-{XSS}", "num_ctx": 2048, "num_batch": 256, "num_gpu": 27, "flash_attention": "on",
         "kv_cache_type": "f16"}, 70.0, 900.0)
    failed = {k: v for k, v in {"variant": "gemma3:1b", "num_ctx": 32768, "num_batch": 1024, "num_gpu": 27,
                                "flash_attention": "off", "kv_cache_type": "f16"}.items() if k in searched}
    err = f"llama-server process has terminated: out of memory {XSS}"
    study.add_trial(create_trial(
        values=[0.0 if d == "maximize" else 1e12 for d in directions], params=failed,
        distributions={k: dists[k] for k in failed},
        user_attrs={"config": _config(failed), "baseline": False, "error": err,
                    "violations": [f"failed to load: {err}"]},
        constraints={"load": 1.0, "ttft_p95_ms": 1.0, "vram_mib": 1.0},
    ))
    study.add_trial(create_trial(
        state=TrialState.FAIL,
        user_attrs={"config": _config({"num_ctx": 4096}), "baseline": False,
                    "error": "cannot reach Ollama at http://127.0.0.1:11434: is it running?"},
    ))
    if pruned:
        add_pruned(study, searched, objectives)
    if validation:
        study.set_user_attr("validation", validation_attr())
    if roofline:
        best = results.best_feasible(study)
        assert best is not None
        study.set_user_attr("roofline", roofline_attr(best.number, best.stat("decode_tps") or 0.0))
    return url, study


PRUNED_PARAMS = {"variant": "gemma3:1b", "num_ctx": 2048, "num_batch": 256, "num_gpu": 0,
                 "flash_attention": "off", "kv_cache_type": "f16"}


def add_pruned(study: Any, searched: tuple[str, ...] = tuple(SPACE), objectives: tuple[str, ...] = ("decode_tps",)) -> None:
    """A trial stopped by the pruner after 3 of 6 requests, as tuner/study.py leaves it: its
    metrics so far, the requests it measured as intermediate values, the last one as value."""
    from optuna.trial import TrialState, create_trial

    params = {k: v for k, v in PRUNED_PARAMS.items() if k in searched}
    ua = {"config": _config(params), "baseline": False, **_metrics(31.0, 250.0), "violations": [],
          "samples": [{"prompt": "chat", "repeat": r, "decode_tps": d} for r, d in enumerate((32.0, 31.0, 30.0))],
          "pruned_saved_s": 12.5}
    study.add_trial(create_trial(
        state=TrialState.PRUNED, values=[30.0] if len(objectives) == 1 else None, params=params,
        distributions={k: _dists()[k] for k in params}, user_attrs=ua, constraints=_ok(250.0),
        intermediate_values={0: 32.0, 1: 31.0, 2: 30.0},
    ))


def validation_attr(winner: int = 2, overlap: bool = True, trials_at: int = 7) -> dict[str, Any]:
    """``Validation.to_dict()`` of re-measuring trials 1-3 over 4 rounds: #2 ahead of #1 by a
    little (the intervals overlap), #3 failed to load."""
    from tuner.results import Validated, Validation
    from tuner.stats import mean_ci95

    def entry(number: int, values: list[float]) -> Validated:
        m, sd, lo, hi = mean_ci95(values)
        return Validated(number, values, m, sd, (lo, hi))

    gap = 0.0 if overlap else 20.0
    entries = [entry(1, [58.0, 59.0, 60.0, 61.0]), entry(2, [v + gap for v in (59.5, 60.5, 61.5, 62.5)]),
               Validated(3, error=f"model failed to load: out of memory {XSS}")]
    return Validation("decode_tps", 4, entries, winner, overlap, trials_at).to_dict()


ROOFLINE_DEVICE = "GPU 0 (NVIDIA H200 <NVL>)"


def roofline_attr(trial: int, decode: float) -> dict[str, Any]:
    """What tuner/study.py stores: Roofline.to_dict() plus the trial and the described text."""
    from tuner.roofline import Roofline

    r = Roofline(ROOFLINE_DEVICE, 4800.0, "NVML memory clock x bus width", 20_000_000_000, 240.0, decode)
    return {**r.to_dict(), "trial": trial, "text": r.describe()}


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    # Read-only for every test that uses it, so built once.
    return make_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def full_study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Stored in SQLite, so the PRUNED trial's value and intermediate values go through storage.
    return make_study(tmp_path_factory.mktemp("full"), validation=True, roofline=True, pruned=True)[1]


def test_header_facts(study_url: tuple[str, Any]) -> None:
    data = report.build_report(study_url[1])
    h = data.header
    assert h.study_name == STUDY and h.model == "gemma3:1b" and h.server_version == "0.33.1"
    assert h.host == "http://127.0.0.1:11434"
    assert "NVIDIA H200" in h.gpu and "143771 MiB" in h.gpu
    assert "AMD EPYC 9654" in h.cpu and "16 cores" in h.cpu
    # The terminal's words: a failed load is an infeasible trial, counted apart as well.
    assert h.counts == {"feasible": 4, "infeasible": 2, "failed": 1} == results.read_study(study_url[1]).counts()
    assert h.total == 7 and h.load_failed == 1
    assert h.limits == {"max_ttft_ms": 500.0, "max_vram_mib": 6000.0}


def test_best_config_with_spread_and_speedup(study_url: tuple[str, Any]) -> None:
    b = report.build_report(study_url[1]).best
    assert b is not None and b.feasible and b.number == 1
    assert b.options == {"num_ctx": 4096, "num_batch": 512, "num_gpu": 27}
    assert b.server == {"flash_attention": "on", "kv_cache_type": "q8_0"}
    decode = next(m for m in b.metrics if m.key == "decode_tps")
    assert (decode.mean, decode.sd, decode.p50) == (60.0, pytest.approx(1.2), 60.0)
    assert b.speedup == pytest.approx(60.0 / 40.0)
    assert b.baseline_number == 0 and b.baseline_value == 40.0
    assert dict(b.telemetry)["GPU power mean W"] == 160.0


def test_top_rows_ranked_feasible_only(study_url: tuple[str, Any]) -> None:
    top = report.build_report(study_url[1]).top
    assert [r.number for r in top] == [1, 2, 3, 0]
    assert [r.rank for r in top] == [1, 2, 3, 4]
    assert top[0].tps_mean == 60.0 and top[0].ttft_ms_p95 == 200.0 and top[0].speedup == pytest.approx(1.5)
    assert top[3].config.endswith("(defaults: no options sent)")


def test_pareto_and_constraint_line(study_url: tuple[str, Any]) -> None:
    data = report.build_report(study_url[1])
    assert data.max_ttft_ms == 500.0
    assert {p.number for p in data.tradeoff} == {0, 1, 2, 3, 4}  # failed load and FAIL not measured
    # 1 (fastest feasible) and 2 (lowest TTFT) are the front; 4 is faster but infeasible.
    assert [p.number for p in data.pareto] == [2, 1]
    assert not next(p for p in data.tradeoff if p.number == 4).feasible
    fig = next(f.figure for f in data.figures if f.key == "tradeoff")
    assert any(s.y0 == 500.0 for s in fig.layout.shapes)


def test_pareto_front_function() -> None:
    pts = [(10.0, 100.0), (20.0, 200.0), (15.0, 300.0), (20.0, 250.0), (5.0, 50.0)]
    assert report.pareto_front(pts) == [0, 1, 4]


def test_failures_listed_with_error_text(study_url: tuple[str, Any]) -> None:
    f = {r.number: r for r in report.build_report(study_url[1]).failures}
    assert set(f) == {4, 5, 6}
    assert f[4].kind == "infeasible" and "p95 TTFT 900 ms > 500 ms" in f[4].message
    assert f[5].kind == "load failed" and "out of memory" in f[5].message
    assert f[6].kind == "failed" and "cannot reach Ollama" in f[6].message


def test_figures_present(study_url: tuple[str, Any]) -> None:
    data = report.build_report(study_url[1])
    keys = [f.key for f in data.figures]
    assert keys == ["history", "effects", "parallel", "slices", "tradeoff", "power", "vram", "tokens_per_joule",
                    "prefill", "host", "timeline"]
    # The history marks infeasible trials apart (optuna draws them as their own trace).
    hist = next(f.figure for f in data.figures if f.key == "history")
    assert any(tr.name == "Infeasible Trial" for tr in hist.data)
    # Baseline and the failed load have no place in the parameter plots.
    slices = next(f.figure for f in data.figures if f.key == "slices")
    per_axis: dict[str, int] = {}
    for tr in slices.data:
        per_axis[tr.xaxis] = per_axis.get(tr.xaxis, 0) + len(tr.x)
    assert len(per_axis) == 6 and max(per_axis.values()) == 4


def test_importances_skipped_with_one_param() -> None:
    _, study = make_study(None, searched=("num_ctx",))
    data = report.build_report(study)
    assert "importances" not in [f.key for f in data.figures]
    assert [e.key for e in data.empty] == ["importances", "validation", "drift"]
    assert data.empty[-1].reason.startswith("No `tune check` has run on this study yet: `tune check ")
    assert data.empty[0].reason.startswith("Fewer than 50 measured trials for importances (4 measured)")


def test_parameter_effects_replace_the_importances_ranking_below_the_threshold(
        study_url: tuple[str, Any]) -> None:
    from tuner.effects import MIN_TRIALS_FOR_IMPORTANCES

    data = report.build_report(study_url[1])
    eff = data.effects
    assert eff is not None and eff.n_trials == 4 and eff.objective == "decode_tps" and eff.log_scale
    ctx = next(p for p in eff.params if p.name == "num_ctx")
    assert [(v.value, v.n, v.trials) for v in ctx.values] == [(2048, 2, (3, 4)), (4096, 1, (1,)), (8192, 1, (2,))]
    two = ctx.values[0]
    assert two.ci_low is not None and two.ci_high is not None and 0 < two.ci_low < two.mean < two.ci_high
    assert ctx.values[1].ci_low is None and ctx.effect is None  # one value measured twice: no effect to size
    assert eff.top is None and eff.verdict.startswith("Not distinguishable")
    # No ranking below the threshold, and the page says why and shows the effects with the verdict.
    assert data.importances == [] and "importances" not in [f.key for f in data.figures]
    empty = {e.key: e.reason for e in data.empty}
    assert empty["importances"].startswith(f"Fewer than {MIN_TRIALS_FOR_IMPORTANCES} measured trials for "
                                           "importances (4 measured)")
    fig = next(f.figure for f in data.figures if f.key == "effects")
    bars = [tr for tr in fig.data if tr.error_y is not None and tr.error_y.array is not None]
    assert bars and all(lo <= m for tr in bars for lo, m in zip(tr.error_y.arrayminus, tr.y))
    text = report.render_html(data)
    assert "<h2>Parameter effects</h2>" in text and "Not distinguishable: " in text
    # The figure's place says why there is no ranking.
    assert "<h2>Parameter importances</h2><p class=\"empty\" data-figure=\"importances\">Fewer than" in text


def test_importances_shown_above_the_threshold_with_the_caveat(study_url: tuple[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.report import series

    monkeypatch.setattr(series, "MIN_TRIALS_FOR_IMPORTANCES", 4)
    data = report.build_report(study_url[1])
    assert [f.key for f in data.figures][:4] == ["history", "effects", "importances", "parallel"]
    assert {k for k, _ in data.importances} <= set(SPACE) and data.importances
    assert sum(v for _, v in data.importances) == pytest.approx(1.0)
    assert [v for _, v in data.importances] == sorted((v for _, v in data.importances), reverse=True)
    caption = next(f.caption for f in data.figures if f.key == "importances")
    assert "over 4 measured trials" in caption and "Parameter effects" in caption


def test_empty_effects_figure_says_why(study_url: tuple[str, Any]) -> None:
    import dataclasses

    from tuner.report import figures

    data = dataclasses.replace(report.build_data(study_url[1]), effects=None)
    fig = figures.effects_figure(data)
    assert fig.data == () and "no measured trial with searched parameters" in fig.layout.annotations[0].text


def test_effects_subplot_titles_fit_their_panels(study_url: tuple[str, Any]) -> None:
    from tuner.report import figures

    data = report.build_data(study_url[1])
    assert data.effects is not None and len(data.effects.params) == 6
    fig = figures.effects_figure(data)
    titles = [a for a in fig.layout.annotations if a.yref == "paper" and a.text]
    assert [a.text.split("<br>")[0] for a in titles] == [p.name for p in data.effects.params]
    per_char = figures.TITLE_FONT_PX * figures.CHAR_EM
    tallest = max(len(a.text.split("<br>")) for a in titles)
    gap = fig.layout.xaxis2.domain[0] - fig.layout.xaxis.domain[1]
    for a, axis in zip(titles, ("xaxis", "xaxis2", "xaxis3", "xaxis4", "xaxis5", "xaxis6")):
        lo, hi = fig.layout[axis].domain
        longest = max(len(html.unescape(line)) for line in a.text.split("<br>"))
        # Each line is narrower than its panel plus half the gaps beside it: neighbours never meet.
        assert longest * per_char <= (hi - lo + gap) * figures.PLOT_WIDTH_PX, (a.text, lo, hi)
    # Room above the panels for the tallest title, under the figure's own title at the top.
    assert fig.layout.margin.t >= 40 + tallest * figures.TITLE_FONT_PX * 1.2
    assert (fig.layout.title.yref, fig.layout.title.y, fig.layout.title.yanchor) == ("container", 1, "top")


def test_baseline_only_study() -> None:
    import optuna
    from optuna.trial import create_trial

    study = optuna.create_study(study_name="b", direction="maximize")
    study.add_trial(create_trial(value=40.0, user_attrs={"baseline": True, "config": {"model": "m", "options": {}, "server": {}},
                                                         **_metrics(40.0, 100.0, telemetry=False)}))
    data = report.build_report(study)
    assert [f.key for f in data.figures] == ["history", "tradeoff", "prefill", "timeline"]
    assert data.best is not None and data.best.baseline
    # Every figure left out says why, in its place.
    empty = {e.key: e.reason for e in data.empty}
    assert list(empty) == ["parameters", "power", "vram", "tokens_per_joule", "host", "validation", "drift"]
    assert empty["parameters"] == ("Only the baseline (the engine's defaults) was measured: no trial with "
                                   "searched settings yet.")
    assert empty["power"] == "No mean GPU power (W): no GPU telemetry, NVML not available on the server's machine."
    assert empty["vram"].endswith("and the server reported no VRAM use.")
    assert empty["host"].startswith("No host telemetry")
    assert data.notes == []
    text = report.render_html(data)
    assert "<html" in text
    for e in data.empty:
        assert f"<p class=\"empty\" data-figure=\"{e.key}\">{html.escape(e.reason)}</p>" in text
    # In report order: the parameter figures' reason after the history, GPU ones after the trade-off.
    assert text.index("fig-0-history") < text.index("data-figure=\"parameters\"") < text.index("fig-1-tradeoff") \
        < text.index("data-figure=\"power\"") < text.index("fig-2-prefill") < text.index("data-figure=\"host\"")


def test_no_feasible_shows_least_violating() -> None:
    _, study = make_study(None, feasible=False)
    data = report.build_report(study)
    assert data.best is not None and not data.best.feasible and data.best.speedup is None
    assert data.top == [] and data.pareto == []
    assert "No feasible configuration yet." in report.render_html(data)


def test_multi_objective_study() -> None:
    _, study = make_study(None, objectives=("decode_tps", "ttft_p95"))
    data = report.build_report(study)
    assert data.best is not None and data.best.number == 1
    assert "history" in [f.key for f in data.figures]


def test_minimised_first_objective_keeps_failed_loads_off_the_history() -> None:
    # A failed load scores 1e12 when minimising: plotted, it would flatten every other point.
    _, study = make_study(None, objectives=("ttft_p95", "decode_tps"))
    data = report.build_report(study)
    hist = next(f for f in data.figures if f.key == "history")
    ys = [y for tr in hist.figure.data for y in (tr.y or ()) if y is not None]
    assert ys and max(ys) < 1e6
    assert "failed loads are left out" in hist.caption
    assert data.best is not None and data.best.number == 2  # lowest p95 TTFT


def test_html_escapes_study_text_and_embeds_plotly_once(study_url: tuple[str, Any]) -> None:
    text = report.render_html(report.build_report(study_url[1]))
    assert XSS not in text
    assert XSS_ESCAPED in text  # prompt name, failure message, config text
    assert text.count("<script") == 3  # plotly.js, the helper, the figure calls
    assert "cdn.plot.ly" not in text.split("</head>")[1]
    assert text.count("Plotly.newPlot") == 1
    assert text.count("drawFigure(\"fig-") == 11


def test_write_report_default_path(study_url: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = report.write_report(study_url[0], None, None)
    assert path == Path("reports") / "gemma3_1b_127.0.0.1_11434.html"
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    out = report.write_report(study_url[0], STUDY, str(tmp_path))
    assert out == tmp_path / "gemma3_1b_127.0.0.1_11434.html" and out.exists()


def test_write_report_unknown_study(study_url: tuple[str, Any]) -> None:
    with pytest.raises(StudyError, match="no study named 'nope'"):
        report.write_report(study_url[0], "nope", None)


def test_write_report_disk_full_leaves_nothing(study_url: tuple[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    real_fsync = os.fsync

    def full(fd: int) -> None:
        real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(TunerError, match=r"cannot write the report to .*r\.html: No space left on device; free some disk space or pass --output on another disk$"):
        report.write_report(study_url[0], STUDY, str(out / "r.html"))
    assert list(out.iterdir()) == []


def test_write_report_read_only_folder(study_url: tuple[str, Any], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, which ignores folder permissions.
    def denied(**kw: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    with pytest.raises(TunerError, match="Permission denied; pass a writable --output$"):
        report.write_report(study_url[0], STUDY, str(tmp_path / "r.html"))
    assert not (tmp_path / "r.html").exists()


def test_results_helpers_agree(study_url: tuple[str, Any]) -> None:
    # The fixture is what results.py expects: one baseline, best feasible #1.
    study = study_url[1]
    st = results.read_study(study)
    base, best = st.baseline(), st.best()
    assert base is not None and base.number == 0
    assert best is not None and best.number == 1


# ------------------------------------------------------- validation, roofline, pruned trials


def test_validation_rows_and_winner(full_study: Any) -> None:
    data = report.build_report(full_study)
    assert data.winner == 2 and data.validation_current and data.validation_overlap
    # The winner is the best shown, so the best section tells the overlap.
    assert data.winner_row is not None and data.winner_row.number == 2 and data.overlap_with_best
    assert data.validation_objective == "decode_tps" and data.validation_rounds == 4 and data.validation_trials_at == 7
    rows = data.validation
    assert [(r.rank, r.number, r.winner) for r in rows] == [(1, 2, True), (2, 1, False), (3, 3, False)]
    win = rows[0]
    # The centre is the geometric mean (the intervals are t on the log scale).
    assert win.n == 4 and win.mean == pytest.approx(60.99, abs=0.005) and win.search_value == 55.0
    assert win.ci_low is not None and win.ci_high is not None and rows[1].ci_high is not None
    assert win.ci_low < 61.0 < win.ci_high and win.ci_low < rows[1].ci_high  # the overlap
    assert rows[2].mean is None and rows[2].n == 0 and "out of memory" in (rows[2].error or "")
    # The best config is the declared winner, as results.best_feasible decides.
    best = results.best_feasible(full_study)
    assert data.best is not None and best is not None and data.best.number == 2 == best.number
    assert data.top[0].number == 1  # the table still ranks by the search-time value
    fig = next(f.figure for f in data.figures if f.key == "validation")
    by_name = {tr.name: tr for tr in fig.data}
    assert list(by_name["winner"].x) == ["#2"] and list(by_name["winner"].y) == [pytest.approx(win.mean)]
    assert by_name["winner"].error_y.array[0] == pytest.approx(win.ci_high - win.mean)
    assert list(by_name["re-validated"].x) == ["#1"]  # the failed #3 has no point


def test_validation_html_says_overlap_and_escapes(full_study: Any) -> None:
    text = report.render_html(report.build_report(full_study))
    assert "Re-validated winner over 4 interleaved rounds: decode tok/s 60.99 (95% CI" in text
    assert "Chosen over trial #1" in text
    assert "The top two 95% intervals overlap (#2 and #1)" in text
    assert text.count("intervals overlap") == 1  # said once, in the best section
    assert "Re-validation of the top 3 configurations" in text
    assert f"failed: model failed to load: out of memory {XSS_ESCAPED}" in text
    assert XSS not in text


def test_validation_without_overlap() -> None:
    _, study = make_study(None)
    study.set_user_attr("validation", validation_attr(overlap=False))
    data = report.build_report(study)
    assert data.winner == 2 and data.validation_current and not data.validation_overlap
    assert data.validation[0].ci_low > data.validation[1].ci_high  # type: ignore[operator]
    text = report.render_html(data)
    assert "Re-validated winner" in text and "intervals overlap" not in text


def test_stale_validation_does_not_pick_the_winner() -> None:
    # A later trial took the lead, so the validation no longer decides the best config.
    _, study = make_study(None, validation=True)
    from optuna.trial import create_trial

    params = {"variant": "gemma3:1b", "num_ctx": 4096, "num_batch": 1024, "num_gpu": 27,
              "flash_attention": "on", "kv_cache_type": "q8_0"}
    study.add_trial(create_trial(
        value=80.0, params=params, distributions={k: _dists()[k] for k in params},
        user_attrs={"config": _config(params), "baseline": False, **_metrics(80.0, 200.0), "violations": []},
        constraints=_ok(200.0),
    ))
    data = report.build_report(study)
    assert data.winner == 2 and not data.validation_current
    best = results.best_feasible(study)
    assert data.best is not None and best is not None and data.best.number == 7 == best.number
    assert any("does not cover the current leader (#7)" in n for n in data.notes)
    text = report.render_html(data)
    assert "Re-validated winner" not in text and "winner (not current" in text
    # Decided from the data: the winner is not the best shown, so its section tells the overlap, once.
    assert data.validation_overlap and data.winner_row is None and not data.overlap_with_best
    assert "The top two intervals overlap: they are not distinguishable" in text  # in its own section then
    assert text.count("intervals overlap") == 1


def test_roofline_in_best_section(full_study: Any) -> None:
    data = report.build_report(full_study)
    r = data.roofline
    assert r is not None and r["trial"] == 2 and r["decode_tps"] == 55.0 and r["share"] == pytest.approx(0.2292)
    assert r["text"].startswith("55.0 tok/s is 23% of the GPU 0 (NVIDIA H200 <NVL>) bandwidth ceiling (")
    text = report.render_html(data)
    assert "Roofline: 55.0 tok/s is 23% of the GPU 0 (NVIDIA H200 &lt;NVL&gt;) bandwidth ceiling (4800.0 GB/s" in text
    assert "<NVL>" not in text


def test_roofline_text_rebuilt_and_other_trial_named() -> None:
    _, study = make_study(None)
    attr = roofline_attr(3, 50.0)
    del attr["text"]
    study.set_user_attr("roofline", attr)
    data = report.build_report(study)
    assert data.roofline is not None and data.roofline["text"].startswith("50.0 tok/s is 21% of the GPU 0")
    assert "(measured on trial #3)" in report.render_html(data)
    study.set_user_attr("roofline", {"device": "CPU"})  # malformed: left out, not a crash
    assert report.build_report(study).roofline is None


def test_pruned_trials_counted_listed_and_plotted(full_study: Any) -> None:
    data = report.build_report(full_study)
    assert data.header.counts == {"feasible": 4, "infeasible": 2, "failed": 1, "pruned": 1}
    assert len(data.pruned) == 1
    p = data.pruned[0]
    assert (p.number, p.requests, p.planned, p.decode_tps_mean, p.last_value, p.saved_s) == (7, 3, 6, 31.0, 30.0, 12.5)
    assert data.pruned_saved_s == 12.5
    # Not a failure, not a top row, not a point on the measured-trial plots.
    assert 7 not in {f.number for f in data.failures}
    assert 7 not in {r.number for r in data.top} and 7 not in {t.number for t in data.tradeoff}
    hist = next(f for f in data.figures if f.key == "history")
    pruned = [tr for tr in hist.figure.data if tr.name == "Pruned Trial"]
    assert len(pruned) == 1 and list(pruned[0].x) == [7] and list(pruned[0].y) == [30.0]
    assert "Pruned trials" in hist.caption
    text = report.render_html(data)
    assert "1 trial pruned, about 12.5 s of measurement saved" in text
    assert "8 in all: 4 feasible, 2 infeasible (1 failed to load), 1 pruned, 1 failed" in text
    assert "<h2>Pruned trials</h2>" in text and "3 of 6" in text


def test_pruned_trial_without_value_and_several_saved() -> None:
    # Multi-objective trials are stored without a value when pruned: the last report stands in.
    _, study = make_study(None, objectives=("decode_tps", "ttft_p95"), pruned=True)
    add_pruned(study, objectives=("decode_tps", "ttft_p95"))
    data = report.build_report(study)
    assert [p.last_value for p in data.pruned] == [30.0, 30.0] and data.pruned_saved_s == 25.0
    assert data.header.counts["pruned"] == 2
    assert "2 trials pruned, about 25.0 s of measurement saved" in report.render_html(data)


def test_full_report_escapes_and_draws_each_figure_once(full_study: Any) -> None:
    data = report.build_report(full_study)
    assert [f.key for f in data.figures] == ["history", "effects", "parallel", "slices", "tradeoff", "power",
                                            "vram", "tokens_per_joule", "prefill", "host", "timeline",
                                            "validation"]
    text = report.render_html(data)
    assert XSS not in text and XSS_ESCAPED in text
    assert text.count("<script") == 3 and text.count("drawFigure(\"fig-") == 12
    # The validation figure sits in its section, before the search figures.
    assert text.index("fig-11-validation") < text.index("fig-0-history")


def test_plain_study_has_no_new_sections(study_url: tuple[str, Any]) -> None:
    data = report.build_report(study_url[1])
    assert data.validation == [] and data.winner is None and not data.validation_overlap
    assert data.roofline is None and data.pruned == [] and data.pruned_saved_s == 0.0
    text = report.render_html(data)
    assert "Re-validated" not in text and "Roofline" not in text and "Pruned trials" not in text
    # In the re-validation's place, why there is none and how to get one.
    assert "<p class=\"empty\" data-figure=\"validation\">No re-validation in this study" in text
    assert "--validate 2 or more" in text


# ------------------------------------------------ the package: read once, data, figures from data


def test_the_study_is_read_once() -> None:
    _, study = make_study(None, validation=True, pruned=True)
    calls = []
    get_trials = study.get_trials

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return get_trials(*args, **kwargs)

    study.get_trials = counted
    data = report.build_report(study)
    assert calls == [{"deepcopy": False}]
    assert data.best is not None and len(data.figures) == 12


def test_figures_are_drawn_from_the_data_alone(study_url: tuple[str, Any]) -> None:
    import dataclasses

    from tuner.report import figures

    stored = report.read_study(study_url[1])
    data = report.build_data(stored)
    assert data.figures == []  # the data holds no figure; build_report draws them
    keys = [f.key for f in figures.draw(data)]
    assert keys == ["history", "effects", "parallel", "slices", "tradeoff", "power", "vram", "tokens_per_joule",
                    "prefill", "host", "timeline"]
    less = dataclasses.replace(data, history=[], effects=None, telemetry=[], host=[], timeline=[])
    assert [f.key for f in figures.draw(less)] == ["parallel", "slices", "tradeoff", "prefill"]


def test_search_data(study_url: tuple[str, Any]) -> None:
    data = report.build_report(study_url[1])
    assert data.objective == "decode_tps" and data.objective_label == "decode tok/s" and data.maximize
    # Complete trials with a value; the failed load (#5) scores 0 when maximising.
    assert [(p.number, p.value, p.feasible) for p in data.history] == [
        (0, 40.0, True), (1, 60.0, True), (2, 55.0, True), (3, 50.0, True), (4, 70.0, False), (5, 0.0, False)]
    assert report.best_so_far(data.history, maximize=True) == [40.0, 60.0, 60.0, 60.0, 60.0, 60.0]
    # Parameter plots: measured trials with settings (no baseline, no failed load).
    assert [p.number for p in data.param_points] == [1, 2, 3, 4]
    axes = {a.name: a for a in data.params}
    assert sorted(axes) == sorted(SPACE)
    assert not axes["variant"].numeric and axes["variant"].categories == SPACE["variant"]
    assert axes["num_ctx"].numeric and axes["num_ctx"].categories == [2048, 4096, 8192]  # the values measured
    # 4 measured trials: far below the importances threshold, so no ranking; the effects instead.
    assert data.importances == []
    assert data.effects is not None and {p.name for p in data.effects.params} == set(SPACE)
    # Telemetry views, with the study's VRAM limit on the VRAM one.
    views = {v.key: v for v in data.telemetry}
    assert views["vram"].limit == 6000.0 and views["power"].limit is None
    assert {p.number for p in views["power"].points} == {0, 1, 2, 3, 4}


def test_pareto_front_matches_the_definition() -> None:
    import random

    rng = random.Random(3)
    for _ in range(200):
        pts = [(float(rng.randint(0, 6)), float(rng.randint(0, 6))) for _ in range(rng.randint(0, 12))]
        brute = [i for i, (x, y) in enumerate(pts)
                 if not any(x2 >= x and y2 <= y and (x2 > x or y2 < y) for x2, y2 in pts)]
        assert report.pareto_front(pts) == brute, pts


def test_importing_the_report_loads_nothing_heavy() -> None:
    # plotly, optuna and pandas load when a report is built, not when the CLI imports the package.
    # (That the read side loads nothing that measures is tests/test_structure.py's.)
    import subprocess
    import sys

    code = "import sys, tuner.report; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert {m for m in loaded if m.split(".")[0] in ("optuna", "plotly", "pandas", "numpy", "sqlalchemy")} == set()


def test_the_report_counts_contention_and_warns_when_every_trial_was_contended() -> None:
    from tuner.record import TrialRecord
    from tuner.results import StoredStudy

    def rec(number: int, value: float, contended: bool, remeasured: int = 0) -> TrialRecord:
        return TrialRecord(model="gemma3:1b", options={"num_thread": number}, number=number, state="COMPLETE",
                           values=[value], params={"num_thread": number}, contended=contended,
                           interference_pct=80.0 if contended else 2.0, remeasured=remeasured,
                           contention_lost_s=30.0 if remeasured else None)

    st = StoredStudy("s", {"objectives": ["decode_tps"], "space": {"num_thread": [1, 2]}}, ["maximize"],
                     [rec(1, 50.0, True, 1), rec(2, 40.0, True)])
    data = report.build_data(st)
    h = data.header
    assert (h.contended, h.remeasured, h.contention_lost_s, h.only_contended) == (2, 1, 30.0, True)
    text = report.render_html(data)
    assert "1 measurement(s) redone because other processes competed; 2 trial(s) still contended" in text
    assert "Every feasible trial was measured while other processes competed for the machine" in text


# ------------------------------------------ the first screen, the table, the per-trial figures


def _rec(number: int, decode: float, *, ttft: float = 100.0, model: str = "gemma3:1b",
         options: dict[str, Any] | None = None, server: dict[str, Any] | None = None, baseline: bool = False,
         server_vram: float | None = None, telemetry: dict[str, Any] | None = None, state: str = "COMPLETE",
         start_s: float = 0.0, duration_s: float = 10.0, reload_ms: float | None = None,
         stage: str | None = None) -> Any:
    """A trial record as read back from storage (for studies built without Optuna)."""
    import datetime as dt

    from tuner.record import Stats, TrialRecord

    def spread(m: float) -> Stats:
        return Stats(m, m * 0.02, m, m * 1.05, m * 0.9, m * 1.1)

    t0 = dt.datetime(2026, 8, 1, 10, 0, 0) + dt.timedelta(seconds=start_s)
    measured = state == "COMPLETE"
    return TrialRecord(
        model=model, options=dict(options or {}), server=dict(server or {}), baseline=baseline,
        stats={"decode_tps": spread(decode), "prefill_tps": spread(decode * 20),
               "ttft_ms": Stats(ttft * 0.8, 1.0, ttft * 0.8, ttft, ttft * 0.7, ttft)} if measured else {},
        server_vram_mib=server_vram, telemetry=dict(telemetry or {}), reload_ms=reload_ms, stage=stage,
        number=number, state=state, values=[decode] if measured else None,
        params={**(options or {}), **(server or {})}, datetime_start=t0,
        datetime_complete=t0 + dt.timedelta(seconds=duration_s) if state != "RUNNING" else None)


def _stored(records: list[Any], environment: dict[str, Any] | None = None, **attrs: Any) -> Any:
    return results.StoredStudy("bench", {"model": "gemma3:1b", "engine": "ollama", "objectives": ["decode_tps"],
                                         "space": {"num_gpu": [0, 27], "num_ctx": [2048, 4096]},
                                         "environment": environment or {}, **attrs}, ["maximize"], records)


def _speedup_validation() -> dict[str, Any]:
    """The stored re-validation of trials 1 and 2 with the defaults (#0) re-measured in the same
    rounds: #2 wins, 1.5x the defaults with its 95% interval."""
    v = results.Validation(
        "decode_tps", 4, [results.Validated(2, [60.0, 61.0, 62.0, 63.0], 61.5, 1.3, (59.5, 63.5)),
                          results.Validated(1, [55.0, 56.0, 57.0, 58.0], 56.5, 1.3, (54.5, 58.5))],
        2, False, 7, interval="log-t", baseline=results.Validated(0, [41.0] * 4, 41.0, 0.0, (41.0, 41.0)),
        speedup=results.Speedup(2, 0, 1.5, (1.41, 1.6), [1.46, 1.49, 1.51, 1.54]))
    return v.to_dict()


def test_the_speedup_over_the_defaults_is_decided_once_for_every_view() -> None:
    import dataclasses

    from tuner import fleet
    from tuner.export import modelfile_text

    records = [_rec(0, 40.0, baseline=True), _rec(1, 55.0, options={"num_ctx": 4096}),
               _rec(2, 60.0, options={"num_ctx": 2048})]
    st = _stored(records, validation=_speedup_validation())
    assert st.best() == records[2]
    # The winner was re-measured with the defaults: the paired speedup, with its interval.
    paired = results.Speedup(2, 0, 1.5, (1.41, 1.6), [1.46, 1.49, 1.51, 1.54])
    assert st.winner_speedup(records[2]) == paired
    # A trial the re-validation did not pair with the defaults: the search's single measurements.
    assert st.winner_speedup(records[1]) == results.SearchSpeedup(55.0 / 40.0, 1, 55.0, 0, 40.0,
                                                                  no_interval=results.NOT_PAIRED)
    busy = _stored([dataclasses.replace(records[0], contended=True), records[1]])
    assert busy.winner_speedup(records[1]) == results.SearchSpeedup(55.0 / 40.0, 1, 55.0, 0, 40.0, contended=True)
    # None, with why: the defaults themselves, no baseline trial, a minimised objective.
    assert st.winner_speedup(records[0]) == results.NoSpeedup(results.DEFAULTS_WON)
    assert _stored(records[1:]).winner_speedup(records[2]) == results.NoSpeedup(results.NO_BASELINE)
    minimised = results.StoredStudy("bench", {"objectives": ["ttft_ms"]}, ["minimize"], records)
    assert minimised.winner_speedup(records[2]) == results.NoSpeedup(results.NO_RATIO)
    # Every view shows that one value.
    data = report.build_data(st)
    assert data.best is not None and data.best.winner_speedup == paired
    assert data.first is not None and (data.first.speedup, data.first.speedup_ci) == (1.5, (1.41, 1.6))
    [row] = fleet.fleet_rows([st])
    assert row.speedup == fleet.FleetSpeedup(1.5, "revalidation", (1.41, 1.6), 4)
    assert ("\n# 1.50x the baseline (Ollama defaults) on decode_tps (95% CI 1.41-1.60x, re-measured interleaved over "
            "4 rounds)\n") in modelfile_text(records[2], st)
    assert f"\n# {55.0 / 40.0:.2f}x the baseline (Ollama defaults) on decode_tps ({results.search_only(results.NOT_PAIRED)})\n" in (
        modelfile_text(records[1], st))
    assert "x the baseline" not in modelfile_text(records[0], st)
    # A search-only speedup measured under contention says so on the page, as in the terminal.
    busy_best = [r for r in records if r.number != 2]
    page = report.render_html(report.build_data(_stored([dataclasses.replace(busy_best[0], contended=True),
                                                         *busy_best[1:]])))
    assert "measured while other processes competed: not a number to rely on" in page


def test_first_screen_says_what_to_run_with_the_speedup_interval_and_the_costs() -> None:
    _, study = make_study(None)
    study.set_user_attr("validation", _speedup_validation())
    data = report.build_report(study, "sqlite:///data/my studies/tuner.db")
    f = data.first
    assert f is not None and f.number == 2 and f.missing == ""
    assert f.config == "gemma3:1b num_ctx=8192 num_batch=256 num_gpu=27 flash_attention=off kv_cache_type=f16"
    # The stored paired speedup, with its interval, in the words the terminal uses.
    assert (f.speedup, f.speedup_ci, f.speedup_note) == (1.5, (1.41, 1.6), "")
    assert f.speedup_text == ("1.50x decode tok/s vs Ollama defaults (95% CI 1.41-1.60x, re-measured interleaved "
                              "over 4 rounds)")
    # The Modelfile `tune export --format modelfile` writes, and the commands, shell-quoted.
    assert "\nFROM gemma3:1b\nPARAMETER num_ctx 8192\nPARAMETER num_batch 256\nPARAMETER num_gpu 27\n" in f.modelfile
    assert f.export_command == ("tune export gemma3:1b@127.0.0.1:11434 --storage 'sqlite:///data/my studies/tuner.db' "
                                "--format modelfile -o gemma3-1b-tuned.Modelfile")
    assert f.create_command == "ollama create gemma3-1b-tuned -f gemma3-1b-tuned.Modelfile"
    assert f.env_command.endswith("--format env -o gemma3-1b-tuned.env")  # flash_attention, kv_cache_type
    # What it costs, beside the defaults (#0): NVML's VRAM peak here, as no server report is stored.
    assert f.baseline_number == 0
    # The rate first as re-validated (the rounds the speedup comes from), then as searched.
    assert [(c.label, c.winner, c.defaults, c.source) for c in f.costs] == [
        ("decode tok/s", 61.5, 41.0, "re-validated, 4 interleaved rounds"), ("decode tok/s", 55.0, 40.0, "search"),
        ("VRAM MiB", 2550.0, 2400.0, "NVML peak"),
        ("mean GPU power W", 155.0, 140.0, ""), ("p95 TTFT ms", 150.0, 300.0, ""),
        ("tokens per joule", pytest.approx(768 / 465), pytest.approx(768 / 420), "")]
    text = report.render_html(data)
    first = text[text.index("<section id=\"what-to-run\""):text.index("</section>")]
    assert text.index("what-to-run") < text.index("<dl class=\"facts\">")  # before everything else
    assert "What to run: trial #2" in first and html.escape(f.speedup_text) in first
    assert f"<pre id=\"modelfile\" class=\"paste\">{html.escape(f.modelfile)}</pre>" in first
    assert html.escape(f.export_command) + "\n" + html.escape(f.create_command) in first
    assert "<td>VRAM MiB (NVML peak)</td><td class=\"n\">2,550</td><td class=\"n\">2,400</td>" in first
    assert "data-copy=\"modelfile\"" in first and "function copyText(" in text


def test_first_screen_modelfile_is_the_exported_one(study_url: tuple[str, Any]) -> None:
    from tuner.export import export

    url, study = study_url
    f = report.build_report(study, url).first
    exported = export(url, None, "modelfile").text
    assert f is not None and exported is not None
    # The same text but the time it was written.
    assert f.modelfile.splitlines()[1:] == exported.splitlines()[1:]
    assert f.export_command.startswith(f"tune export gemma3:1b@127.0.0.1:11434 --storage {url} --format modelfile")


def test_first_screen_without_an_interval_says_how_to_get_one() -> None:
    _, study = make_study(None)
    f = report.build_report(study).first  # the default storage: no --storage in the commands
    assert f is not None and f.number == 1 and f.speedup == pytest.approx(1.5) and f.speedup_ci is None
    assert f.speedup_text == ("1.50x decode tok/s vs Ollama defaults (trial #1 vs baseline #0, each measured once "
                              "during the search)")
    assert f.speedup_note == ("No interval: the winner and the defaults were never re-measured together; "
                              "--validate 2 (or more) re-measures them interleaved and gives a 95% interval.")
    assert f.export_command == "tune export gemma3:1b@127.0.0.1:11434 --format modelfile -o gemma3-1b-tuned.Modelfile"
    # A password in the storage URL stays out of the page.
    masked = report.build_data(study, "postgresql://tuner:s3cret@db/tuner").first
    assert masked is not None and "s3cret" not in masked.export_command and "tuner:***@db" in masked.export_command
    assert "--validate 2" in report.render_html(report.build_report(study))


def test_first_screen_when_nothing_is_feasible_or_the_defaults_win() -> None:
    _, study = make_study(None, feasible=False)
    data = report.build_report(study)
    f = data.first
    assert f is not None and f.number is None and f.modelfile == "" and f.export_command == ""
    assert f.missing.startswith("No configuration is feasible: every measured trial breaks a limit (the "
                                "least-violating, trial #")
    assert html.escape(f.missing) in report.render_html(data)
    # The defaults won: nothing to change, no speedup over themselves.
    st = _stored([_rec(0, 50.0, baseline=True), _rec(1, 40.0, options={"num_ctx": 4096})])
    g = report.build_data(st).first
    assert g is not None and g.number == 0 and g.speedup is None
    assert g.speedup_note == "The Ollama defaults are the best configuration: no tuned one beat them, so there is nothing to change."
    assert "\nFROM gemma3:1b\n" in g.modelfile and "PARAMETER" not in g.modelfile


def _over_the_limit(r: Any) -> Any:
    """``r`` as stored when it broke --max-vram-mib."""
    import dataclasses

    return dataclasses.replace(r, constraints={"max_vram_mib": 500.0}, violations=["VRAM peak 1500 MiB > 1000 MiB"])


def test_when_only_the_defaults_are_feasible_the_report_says_tuned_ones_broke_limits() -> None:
    from tuner.report.figures import draw

    # Both tuned configs are faster than the defaults, and both broke the VRAM limit.
    st = _stored([_rec(0, 50.0, baseline=True), _over_the_limit(_rec(1, 60.0, options={"num_ctx": 4096})),
                  _over_the_limit(_rec(2, 55.0, options={"num_ctx": 2048}))], limits={"max_vram_mib": 1000.0})
    data = report.build_data(st)
    f = data.first
    assert f is not None and f.number == 0 and f.speedup is None and f.speedup_text == ""
    assert f.speedup_note == ("The Ollama defaults are the only feasible configuration: every tuned config broke a "
                              "limit (see Failures); relax the limits or search other settings.")
    assert [r.number for r in data.failures] == [1, 2]
    # The parameter figures draw only the tuned trials, all infeasible: each caption says why.
    assert [p.feasible for p in data.param_points] == [False, False]
    assert data.param_note == ("Only the baseline was feasible, and it has no searched settings: every trial drawn "
                               "here broke a limit (see Failures).")
    captions = {fig.key: fig.caption for fig in draw(data)}
    assert {"effects", "parallel", "slices"} <= set(captions)
    for key in ("effects", "parallel", "slices"):
        assert captions[key].endswith(" " + data.param_note), key
    assert "history" in captions and data.param_note not in captions["history"]  # the baseline is drawn there
    page = report.render_html(report.build_report(st))
    assert html.escape(f.speedup_note) in page and "nothing to change" not in page
    # Tuned configs every one of which failed to load: nothing to draw, and the reason says so.
    failed = _stored([_rec(0, 50.0, baseline=True),
                      dataclasses_replace(_rec(1, 60.0, options={"num_ctx": 4096}), error="model failed to load")])
    g = report.build_data(failed)
    assert g.first is not None and g.first.speedup_note == (
        "The Ollama defaults are the only feasible configuration: every tuned config broke a limit or failed to "
        "load (see Failures); relax the limits or search other settings.")
    assert [(e.key, e.reason) for e in g.empty if e.key == "parameters"] == [(
        "parameters", "Only the baseline (the engine's defaults) was feasible: every trial with searched settings "
        "failed to load (see Failures).")]
    # A tuned config that is feasible and slower: then no tuned one beat the defaults.
    slower = report.build_data(_stored([_rec(0, 50.0, baseline=True), _rec(1, 40.0, options={"num_ctx": 4096}),
                                        _over_the_limit(_rec(2, 60.0, options={"num_ctx": 2048}))]))
    assert slower.first is not None and slower.first.speedup_note == (
        "The Ollama defaults are the best configuration: no tuned one beat them, so there is nothing to change.")
    assert slower.param_note == ""


def dataclasses_replace(r: Any, **kw: Any) -> Any:
    import dataclasses

    return dataclasses.replace(r, **kw)


def _check(verdict: str, pct: float, ci: tuple[float, float], changes: list[str], text: str = "") -> dict[str, Any]:
    from tuner.checks import Check

    return Check(at="2026-12-01T08:00:00+00:00", verdict=verdict, exit_code=1 if verdict == "regression" else 0,
                 objective="decode_tps", winner_trial=1, winner_now=60.0 * (1 + pct / 100), winner_stored=60.0,
                 change_pct=pct, change_ci95=ci, environment_changes=changes, text=text).to_dict()


def test_first_screen_names_the_last_check_and_a_regression_prominently() -> None:
    from tuner.checks import Check, verdict_text

    records = [_rec(0, 50.0, baseline=True), _rec(1, 60.0, options={"num_ctx": 4096})]
    ok = _check("ok", -0.8, (-2.0, 0.4), [])
    g = report.build_data(_stored(records, checks=[ok])).first
    assert g is not None and not g.check_regression
    assert g.check_note == ("Last `tune check` (2026-12-01): ok, the winner measured -0.8%, 95% CI -2.0%..+0.4% vs "
                            "stored (environment unchanged).")
    stored = _check("regression", -17.0, (-19.0, -15.0), ["Ollama: 0.12.3 -> 0.13.0"])
    stored["retune"] = "tune --model gemma3:1b --trials 20"
    stored["text"] = verdict_text(Check.from_dict(stored))
    st = _stored(records, checks=[ok, stored])
    data = report.build_data(st)
    f = data.first
    assert f is not None and f.check_regression
    assert f.check_note == ("Last `tune check` (2026-12-01): the winner is now 17% slower (95% CI 15-19% slower) "
                            "since Ollama 0.12.3 -> 0.13.0: re-tune with `tune --model gemma3:1b --trials 20`")
    page = report.render_html(data)
    first = page[page.index("<section id=\"what-to-run\""):page.index("</section>")]
    assert f"<p class=\"warn\">{html.escape(f.check_note)}</p>" in first
    assert first.index(html.escape(f.speedup_text)) < first.index(html.escape(f.check_note))
    # A check of the trial that won then, since displaced, says so.
    h = report.build_data(_stored([*records, _rec(2, 70.0, options={"num_ctx": 2048})], checks=[stored])).first
    assert h is not None and h.check_note.startswith("Last `tune check` (2026-12-01): trial #1 (the winner then) is "
                                                     "now 17% slower")
    none = report.build_data(_stored(records)).first
    assert none is not None and (none.check_note, none.check_regression) == ("", False)


def test_the_empty_drift_figure_names_the_storage_as_the_export_command_does() -> None:
    st = _stored([_rec(0, 50.0, baseline=True), _rec(1, 60.0, options={"num_ctx": 4096})])
    data = report.build_data(st, "postgresql://tuner:s3cret@db/tuner")
    assert data.first is not None
    at = data.first.export_command.split(" --format ")[0].removeprefix("tune export bench ")
    assert at.startswith("--storage ") and "s3cret" not in at
    [drift] = [e for e in data.empty if e.key == "drift"]
    assert drift.reason == (f"No `tune check` has run on this study yet: `tune check bench {at}` re-measures the "
                            "winner and the defaults and keeps the result.")
    plain = report.build_data(st)  # the default storage: no --storage in either
    assert [e.reason for e in plain.empty if e.key == "drift"] == [
        "No `tune check` has run on this study yet: `tune check bench` re-measures the winner and the defaults "
        "and keeps the result."]


def test_a_speedup_from_the_search_says_so_in_the_best_section_and_the_modelfile() -> None:
    _, study = make_study(None)
    data = report.build_report(study)
    page = report.render_html(data)
    best = page[page.index("Best feasible configuration"):]
    assert ("<p class=\"speedup\">1.50x decode tok/s vs Ollama defaults (baseline trial #0: 40.00, best: 60.00; each "
            "measured once in the search; no interval: --validate 2 gives one)</p>") in best
    assert data.first is not None
    assert ("# 1.50x the baseline (Ollama defaults) on decode_tps (each measured once in the search; no interval: "
            "--validate 2 gives one)\n") in data.first.modelfile
    # Re-validated with the defaults in the same rounds: the interval, in both places.
    study.set_user_attr("validation", _speedup_validation())
    data = report.build_report(study)
    page = report.render_html(data)
    best = page[page.index("Best feasible configuration"):]
    assert "1.50x decode tok/s vs Ollama defaults (95% CI 1.41-1.60x, re-measured interleaved over 4 rounds)" in best
    assert "each measured once" not in page
    assert data.first is not None
    assert ("# 1.50x the baseline (Ollama defaults) on decode_tps (95% CI 1.41-1.60x, re-measured interleaved over "
            "4 rounds)\n") in data.first.modelfile


def test_top_table_rows_backend_and_markdown() -> None:
    env = {"model": "gemma3:1b", "gpus": [{"index": 0, "name": "NVIDIA H200"}, {"index": 1, "name": "NVIDIA H200"}],
           "models": {"gemma3:1b": {"parameter_size": "999.89M", "quantization": "Q4_K_M", "size_bytes": 815 * 2**20},
                      "gemma3:1b-it-fp16": {"parameter_size": "999.89M", "quantization": "F16",
                                            "size_bytes": 2 * 2**30}}}
    records = [
        _rec(0, 40.0, baseline=True, server_vram=900.0),
        _rec(1, 60.0, options={"num_gpu": 27, "num_ctx": 4096}, server_vram=1200.0, stage="screen",
             telemetry={"gpu_mem_used_peak_mib": 1500.0}),
        _rec(2, 20.0, options={"num_gpu": 0, "num_ctx": 2048}, server_vram=0.0, stage="tune"),
        _rec(3, 50.0, model="gemma3:1b-it-fp16", options={"num_gpu": 27}, server={"flash_attention": "on"},
             server_vram=2100.0, stage="screen"),
    ]
    b = report.build_data(_stored(records, env)).bench
    assert b is not None and [r.number for r in b.rows] == [1, 3, 0, 2]
    rows = {r.number: r for r in b.rows}
    assert (rows[1].model, rows[1].size_gib, rows[1].params, rows[1].quant) == ("gemma3:1b", 815 / 1024, "999.89M",
                                                                               "Q4_K_M")
    assert (rows[3].quant, rows[3].size_gib) == ("F16", 2.0)
    # Where the server said the model ran: VRAM in use on NVML's GPUs, none on the CPU.
    assert [rows[n].backend for n in (1, 3, 0, 2)] == ["2x NVIDIA H200"] * 3 + ["CPU"]
    assert b.settings == ["num_gpu", "num_ctx", "flash_attention"]
    assert rows[3].settings == {"num_gpu": 27, "num_ctx": "default", "flash_attention": "on"}
    assert rows[0].settings == {"num_gpu": "default", "num_ctx": "default", "flash_attention": "default"}
    assert (rows[1].decode_tps, rows[1].decode_sd, rows[1].prefill_tps, rows[1].ttft_ms_p95) == (60.0, 1.2, 1200.0, 100.0)
    assert rows[1].vram_mib == 1500.0 and rows[2].vram_mib == 0.0  # NVML's peak where it saw one
    assert b.markdown.splitlines() == [
        "| rank | trial | stage | model | size | params | quant | backend | num_gpu | num_ctx | flash_attention "
        "| decode tok/s | prefill tok/s | p95 TTFT ms | VRAM MiB | tokens/J | x defaults |",
        "| ---: | ---: | --- | --- | ---: | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| 1 | #1 | screen | gemma3:1b | 0.80 GiB | 999.89M | Q4_K_M | 2x NVIDIA H200 | 27 | 4096 | default "
        "| 60.00 ± 1.20 | 1200.00 ± 24.00 | 100 | 1,500 | - | 1.50x |",
        "| 2 | #3 | screen | gemma3:1b-it-fp16 | 2.00 GiB | 999.89M | F16 | 2x NVIDIA H200 | 27 | default | on "
        "| 50.00 ± 1.00 | 1000.00 ± 20.00 | 100 | 2,100 | - | 1.25x |",
        "| 3 | #0 | - | gemma3:1b | 0.80 GiB | 999.89M | Q4_K_M | 2x NVIDIA H200 | default | default | default "
        "| 40.00 ± 0.80 | 800.00 ± 16.00 | 100 | 900 | - | 1.00x |",
        "| 4 | #2 | tune | gemma3:1b | 0.80 GiB | 999.89M | Q4_K_M | CPU | 0 | 2048 | default "
        "| 20.00 ± 0.40 | 400.00 ± 8.00 | 100 | 0 | - | 0.50x |",
    ]
    # No GPU name from NVML: the server's word that it used VRAM is all there is.
    no_nvml = report.build_data(_stored(records, {"model": "gemma3:1b"})).bench
    assert no_nvml is not None and [r.backend for r in no_nvml.rows] == ["GPU (server-reported)"] * 3 + ["CPU"]
    assert [r.quant for r in no_nvml.rows] == ["-"] * 4  # nothing stored about the models: not guessed
    # No server report (llama.cpp): CPU only where the runtime said it offloads nothing, else not reported.
    bare = [_rec(0, 40.0, baseline=True), _rec(1, 50.0, options={"num_gpu": 0})]
    cpu = report.build_data(_stored(bare, {"gpu_offload": {"offloads": False, "source": "llama.cpp"}})).bench
    assert cpu is not None and [r.backend for r in cpu.rows] == ["CPU", "CPU"]
    unknown = report.build_data(_stored(bare, {"gpu_offload": {"offloads": True, "source": "unknown"}})).bench
    assert unknown is not None and [r.backend for r in unknown.rows] == ["not reported", "not reported"]


def test_top_table_in_the_html_with_a_copy_as_markdown_button(study_url: tuple[str, Any]) -> None:
    data = report.build_report(study_url[1])
    b = data.bench
    assert b is not None and [r.number for r in b.rows] == [r.number for r in data.top]
    text = report.render_html(data)
    top = text[text.index("<h2>Top 10 feasible configurations</h2>"):]
    assert "<th>backend</th>" in top and "<th>kv_cache_type</th>" in top and "<td>q8_0</td>" in top
    assert "<button type=\"button\" class=\"copy\" data-copy=\"top-markdown\" onclick=\"copyText(this)\">" \
           "Copy as markdown</button>" in top
    # The markdown is on the page too, for when the clipboard is refused.
    assert f"<pre id=\"top-markdown\" class=\"paste\">{html.escape(b.markdown)}</pre>" in top
    assert b.markdown.startswith("| rank | trial | model | size | params | quant | backend | num_ctx |")
    assert text.count("<script") == 3  # the copy helper rides in the helper script


def test_tradeoff_log_axis_decided_in_the_data_both_ways(study_url: tuple[str, Any]) -> None:
    assert report.log_axis([35.0, 68.0, 12262.0]) and not report.log_axis([35.0, 68.0, 349.0])
    assert not report.log_axis([0.0, 50.0]) and not report.log_axis([])
    linear = report.build_report(study_url[1])  # p95 TTFT 150 .. 900 ms, 40 .. 70 tok/s
    assert not linear.tradeoff_log_x and not linear.tradeoff_log_y
    fig = next(f.figure for f in linear.figures if f.key == "tradeoff")
    assert fig.layout.yaxis.type is None and fig.layout.xaxis.type is None
    # An infeasible 12 s TTFT beside 35-68 ms feasible ones: the TTFT axis goes log.
    st = _stored([_rec(0, 40.0, ttft=68.0, baseline=True), _rec(1, 60.0, ttft=35.0, options={"num_ctx": 4096}),
                  _rec(2, 70.0, ttft=12262.0, options={"num_ctx": 2048})], limits={"max_ttft_ms": 500.0})
    st.records[2].constraints = {"ttft_p95_ms": 23.5}
    data = report.build_report(st)
    assert data.tradeoff_log_y and not data.tradeoff_log_x
    fig = next(f.figure for f in data.figures if f.key == "tradeoff")
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type is None
    assert any(s.y0 == 500.0 for s in fig.layout.shapes)  # the limit, at its value on the log axis
    assert [a.y for a in fig.layout.annotations if a.text == "max TTFT 500 ms"] == [pytest.approx(math.log10(500))]


def test_gpu_figures_say_why_they_are_empty() -> None:
    records = [_rec(0, 40.0, baseline=True, telemetry={"host_cpu_util_mean_pct": 50.0}),
               _rec(1, 60.0, options={"num_ctx": 4096}, telemetry={"host_cpu_util_mean_pct": 55.0})]
    no_nvml = report.build_data(_stored(records, {"gpus": [], "gpu_unavailable_reason": "pynvml not installed"}))
    empty = {e.key: e.reason for e in no_nvml.empty}
    assert empty["power"] == ("No mean GPU power (W): no GPU telemetry, NVML not available on the server's machine "
                              "(pynvml not installed).")
    assert empty["tokens_per_joule"].startswith("No tokens per joule: no GPU telemetry")
    assert "host" not in empty and [s.key for s in no_nvml.host] == ["host_cpu_util_mean_pct"]
    seen = report.build_data(_stored(records, {"gpus": [{"name": "NVIDIA L4"}]}))
    assert {e.key: e.reason for e in seen.empty}["power"] == (
        "No mean GPU power (W): NVML saw NVIDIA L4 but no measured trial recorded it (the server runs on another "
        "machine, or the model ran on the CPU).")
    # Nothing measured at all: each figure says so.
    failed = report.build_data(_stored([_rec(0, 0.0, state="FAIL")]))
    reasons = {e.key: e.reason for e in failed.empty}
    assert set(reasons) >= {"history", "parameters", "tradeoff", "power", "prefill", "host", "validation"}
    assert reasons["tradeoff"].endswith("every trial failed or failed to load.")
    assert reasons["parameters"].startswith("No trial was measured yet")


def test_prefill_and_host_telemetry_per_trial() -> None:
    records = [_rec(0, 40.0, baseline=True, telemetry={"host_cpu_util_mean_pct": 50.0, "server_rss_peak_mib": 900.0,
                                                       "host_mem_used_peak_mib": 6000.0}),
               _rec(1, 60.0, options={"num_ctx": 4096}, telemetry={"host_cpu_util_mean_pct": 70.0,
                                                                    "server_rss_peak_mib": 1100.0}),
               _rec(2, 0.0, state="FAIL")]
    data = report.build_report(_stored(records))
    assert [(p.number, p.value, p.sd) for p in data.prefill] == [(0, 800.0, 16.0), (1, 1200.0, 24.0)]
    series = {s.key: [(p.number, p.value) for p in s.points] for s in data.host}
    assert series == {"host_cpu_util_mean_pct": [(0, 50.0), (1, 70.0)], "host_mem_used_peak_mib": [(0, 6000.0)],
                      "server_rss_peak_mib": [(0, 900.0), (1, 1100.0)]}
    host = next(f.figure for f in data.figures if f.key == "host")
    assert sorted(a.text for a in host.layout.annotations) == ["host CPU util %", "host memory peak MiB",
                                                               "server RSS peak MiB"]
    assert sorted(tuple(tr.y) for tr in host.data) == [(50.0, 70.0), (900.0, 1100.0), (6000.0,)]
    prefill = next(f.figure for f in data.figures if f.key == "prefill")
    assert list(prefill.data[0].y) == [800.0, 1200.0] and list(prefill.data[0].error_y.array) == [16.0, 24.0]


def test_timeline_rows_and_figure() -> None:
    records = [_rec(0, 40.0, baseline=True, duration_s=30.0, reload_ms=4000.0),
               _rec(1, 60.0, options={"num_ctx": 4096}, start_s=30.0, duration_s=20.0, reload_ms=250.0),
               _rec(2, 0.0, state="FAIL", start_s=50.0, duration_s=5.0),
               _rec(3, 30.0, state="PRUNED", start_s=55.0, duration_s=8.0),
               _rec(4, 0.0, state="RUNNING", start_s=63.0)]
    data = report.build_report(_stored(records))
    assert [(r.number, r.outcome, r.start, r.duration_s, r.reload_ms) for r in data.timeline] == [
        (0, "feasible", "2026-08-01T10:00:00", 30.0, 4000.0), (1, "feasible", "2026-08-01T10:00:30", 20.0, 250.0),
        (2, "failed", "2026-08-01T10:00:50", 5.0, None), (3, "pruned", "2026-08-01T10:00:55", 8.0, None)]
    assert data.timeline[1].end == "2026-08-01T10:00:50"
    fig = next(f.figure for f in data.figures if f.key == "timeline")
    bars = {tr.name: tr for tr in fig.data}
    assert list(bars) == ["feasible", "failed", "pruned", "model (re)load"]
    assert list(bars["feasible"].base) == ["2026-08-01T10:00:00", "2026-08-01T10:00:30"]
    assert list(bars["feasible"].x) == [30000.0, 20000.0] and list(bars["feasible"].y) == [0, 1]
    assert list(bars["model (re)load"].x) == [4000.0, 250.0] and fig.layout.xaxis.type == "date"
    assert bars["failed"].marker.color != bars["feasible"].marker.color
    text = report.render_html(data)
    assert "<h2>Timeline of trials</h2>" in text


def test_the_table_from_a_real_study_names_what_the_server_reported(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # End to end against the fake server: no NVML here, so the GPU is the server's word (/api/ps
    # size_vram), and each variant's quantization is what /api/show said, stored with the study.
    import tuner.telemetry as telemetry
    from fake_ollama import FakeOllama

    from tuner.study import TuneOptions, run_study

    monkeypatch.setattr(telemetry, "probe_gpus", lambda indices=None: telemetry.GpuProbe(
        available=False, reason="NVML library not found"))
    url = f"sqlite:///{tmp_path / 't.db'}"
    with FakeOllama(time_scale=0.002) as fake:
        summary = run_study(TuneOptions(
            model=["gemma3:1b"], host=fake.url, trials=5, repeats=1, num_predict=16, storage=url, seed=1,
            validate=0, roofline=False, params={"variant": ["gemma3:1b", "gemma3:1b-it-fp16"], "num_gpu": [0, 27]}))
    from tuner.results import load_study
    from tuner.storage import open_storage

    data = report.build_report(load_study(open_storage(url), summary.study_name), url)
    b = data.bench
    assert b is not None and b.rows
    for r in b.rows:
        assert r.quant == {"gemma3:1b": "Q4_K_M", "gemma3:1b-it-fp16": "F16"}[r.model] and r.params == "999.89M"
        assert r.backend == ("CPU" if r.settings.get("num_gpu") == 0 else "GPU (server-reported)"), r
    assert {r.backend for r in b.rows} >= {"GPU (server-reported)"}
    f = data.first
    assert f is not None and f.number == b.rows[0].number and f"FROM {b.rows[0].model}\n" in f.modelfile
    assert {e.key: e.reason for e in data.empty}["power"] == (
        "No mean GPU power (W): no GPU telemetry, NVML not available on the server's machine (NVML library not "
        "found).")


def test_a_cpu_only_study_costs_no_vram() -> None:
    """llama.cpp on a CPU reports no VRAM: the first screen says the server offloads nothing
    (from the study's offload probe), not a blank."""
    st = _stored([_rec(0, 40.0, baseline=True), _rec(1, 50.0, options={"num_thread": 2})],
                 environment={"gpu_offload": {"offloads": False, "source": "llama.cpp"}})
    f = report.build_data(st).first
    assert f is not None
    assert ("VRAM MiB", 0.0, 0.0, "CPU only: the server offloads nothing") in [
        (c.label, c.winner, c.defaults, c.source) for c in f.costs]
    # Without the probe's word, nothing is claimed.
    g = report.build_data(_stored([_rec(0, 40.0, baseline=True), _rec(1, 50.0, options={"num_thread": 2})])).first
    assert g is not None and ("VRAM MiB", None, None) in [(c.label, c.winner, c.defaults) for c in g.costs]


def test_no_interval_after_a_re_validation_the_machine_kept_busy_says_so_not_validate_2() -> None:
    """The demo on a busy machine: the re-validation ran, every round was contended and dropped.
    Advising --validate 2 (which it already had) would rest on nothing it checked."""
    from tuner.export import modelfile_text

    records = [_rec(0, 40.0, baseline=True), _rec(1, 55.0, options={"num_ctx": 4096})]
    busy = results.Validation("decode_tps", 0, [results.Validated(1, []), results.Validated(0, [])], None, False, 2,
                              contended=2, dropped=2, interval="log-t")
    st = _stored(records, validation=busy.to_dict())
    w = st.winner_speedup(records[1])
    assert isinstance(w, results.SearchSpeedup) and w.no_interval == results.NO_QUIET_ROUNDS
    f = report.build_data(st).first
    assert f is not None and f.speedup_note == (
        "No interval: the re-validation found no round free of other processes' load; re-run when the machine is "
        "quiet to re-measure them interleaved.")
    assert "--validate 2" not in results.search_only(w.no_interval)
    assert modelfile_text(records[1], st).count("no round free of other processes' load") == 1
    # Without any re-validation the advice stays --validate 2.
    assert _stored(records).winner_speedup(records[1]).no_interval == results.NOT_REVALIDATED


def test_the_whole_command_writes_the_page_of_the_in_process_report(tmp_path: Path) -> None:
    """`python -m tuner.cli report` (its own process: it skips the last collections at exit)
    writes what ``write_report`` writes, leaves no side file and keeps the study as it was."""
    import hashlib
    import re
    import subprocess
    import sys

    url, _ = make_study(tmp_path, validation=True, pruned=True)
    db = tmp_path / "tuner.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    r = subprocess.run([sys.executable, "-m", "tuner.cli", "report", STUDY, "--storage", url, "-o",
                        str(tmp_path / "command.html")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "command.html")
    report.write_report(url, STUDY, str(tmp_path / "in-process.html"))

    def page(name: str) -> str:
        return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "DATE", (tmp_path / name).read_text(encoding="utf-8"))

    assert page("command.html") == page("in-process.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command.html", "in-process.html", "tuner.db"]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
