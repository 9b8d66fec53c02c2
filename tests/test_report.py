"""tuner/report.py: the data behind the HTML report, escaping, and safe writing."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from tuner import report, results
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
) -> tuple[str, Any]:
    """A study in a tmp SQLite storage shaped like what tuner/study.py stores.

    Trials: 0 baseline, 1-3 feasible (1 best, 2 fast TTFT, 3 dominated), 4 infeasible
    (TTFT limit, model name with a script tag), 5 failed load with an error, 6 FAIL.
    ``feasible=False`` makes every measured trial break the TTFT limit. With ``tmp_path``
    None the study is in memory (faster; the URL returned is then "").
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
    return url, study


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    # Read-only for every test that uses it, so built once.
    return make_study(tmp_path_factory.mktemp("study"))


def test_header_facts(study_url: tuple[str, Any]) -> None:
    data = report.build_report(study_url[1])
    h = data.header
    assert h.study_name == STUDY and h.model == "gemma3:1b" and h.server_version == "0.33.1"
    assert h.host == "http://127.0.0.1:11434"
    assert "NVIDIA H200" in h.gpu and "143771 MiB" in h.gpu
    assert "AMD EPYC 9654" in h.cpu and "16 cores" in h.cpu
    assert h.counts == {"total": 7, "complete": 6, "feasible": 4, "infeasible": 2, "load_failed": 1,
                        "failed": 1, "pruned": 0, "running": 0}
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
    assert top[3].config.endswith("(Ollama defaults: no options sent)")


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
    assert keys == ["history", "importances", "parallel", "slices", "tradeoff", "power", "vram", "tokens_per_joule"]
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
    assert any("Parameter importances skipped" in n for n in data.notes)


def test_baseline_only_study() -> None:
    import optuna
    from optuna.trial import create_trial

    study = optuna.create_study(study_name="b", direction="maximize")
    study.add_trial(create_trial(value=40.0, user_attrs={"baseline": True, "config": {"model": "m", "options": {}, "server": {}},
                                                         **_metrics(40.0, 100.0, telemetry=False)}))
    data = report.build_report(study)
    assert [f.key for f in data.figures] == ["history", "tradeoff"]
    assert data.best is not None and data.best.baseline
    assert any("Parameter plots skipped" in n for n in data.notes)
    assert any("Telemetry views skipped" in n for n in data.notes)
    assert "<html" in report.render_html(data)


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
    assert text.count("drawFigure(\"fig-") == 8


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

    monkeypatch.setattr(report.os, "fsync", full)
    with pytest.raises(TunerError, match=r"cannot write the report to .*r\.html: No space left on device; free some disk space or pass --output on another disk$"):
        report.write_report(study_url[0], STUDY, str(out / "r.html"))
    assert list(out.iterdir()) == []


def test_write_report_read_only_folder(study_url: tuple[str, Any], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, which ignores folder permissions.
    def denied(**kw: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(report.tempfile, "mkstemp", denied)
    with pytest.raises(TunerError, match="Permission denied; pass a writable --output$"):
        report.write_report(study_url[0], STUDY, str(tmp_path / "r.html"))
    assert not (tmp_path / "r.html").exists()


def test_results_helpers_agree(study_url: tuple[str, Any]) -> None:
    # The fixture is what results.py expects: one baseline, best feasible #1.
    study = study_url[1]
    base, best = results.baseline_trial(study), results.best_feasible(study)
    assert base is not None and base.number == 0
    assert best is not None and best.number == 1
