"""The fleet view: studies of one storage grouped by model and hardware, from real stored trials."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Sequence

import optuna
import pytest
from conftest import invoke
from fake_ollama import FakeOllama

import tuner.study
from tuner import fleet, machine, results
from tuner.engines import GpuOffload
from tuner.engines.ollama import OllamaEngine
from tuner.storage import open_storage
from tuner.study import TuneOptions, run_study

STORAGE = "sqlite:///fleet.db"
XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def run_on(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch, name: str, storage: str = STORAGE,
           gpus: Sequence[str] = (), cpu: str | None = None, cpu_only: bool = False, **kw: Any) -> Any:
    """A tiny real study against the fake server, as a machine with ``gpus`` (names NVML would
    report) and ``cpu`` would record it; ``cpu_only``: the server says it runs the model on the CPU."""
    with monkeypatch.context() as m:
        if gpus or cpu:
            real = tuner.study.environment

            def environment(*a: Any) -> dict[str, Any]:
                env = real(*a)
                if gpus:
                    env["gpus"] = [{"index": i, "name": n, "memory_total_mib": 143771} for i, n in enumerate(gpus)]
                if cpu:
                    env["host"] = {**(env.get("host") or {}), "cpu_model": cpu}
                return env

            m.setattr(tuner.study, "environment", environment)
        if cpu_only:
            m.setattr(OllamaEngine, "gpu_offload", lambda self, model, options: GpuOffload(
                False, "ollama-ps", "the server runs the model on the CPU: /api/ps reports 0 MiB in VRAM"))
        opts: dict[str, Any] = dict(
            model=["gemma3:1b"], host=fake.url, trials=3, repeats=1, num_predict=4, storage=storage, seed=1,
            params={"num_thread": [1, 2, 4]}, validate=2, validate_rounds=2, validate_max_rounds=2,
            roofline=False, warm_start=False, measure_interference=False, study_name=name)
        opts.update(kw)
        return run_study(TuneOptions(**opts))


def _stored(name: str, storage: str = STORAGE) -> tuple[Any, results.StoredStudy]:
    study = optuna.load_study(study_name=name, storage=open_storage(storage, create=False, writable=True))
    return study, results.read_study(study)


def test_rows_group_studies_by_model_and_hardware(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    run_on(fake, monkeypatch, "box-slow")
    fake.speed_factor = 1.3  # the same machine measured again, faster: that study is the one shown
    run_on(fake, monkeypatch, "box-fast")
    fake.speed_factor = 1.0
    run_on(fake, monkeypatch, "h200", gpus=["NVIDIA H200", "NVIDIA H200"])
    run_on(fake, monkeypatch, "cpu", cpu_only=True)

    f = fleet.read_fleet(STORAGE)
    assert f.studies == 4
    rows = {r.study: r for r in f.rows}
    assert sorted(rows) == ["box-fast", "cpu", "h200"]
    assert all(r.model == "gemma3:1b" and r.objective == "decode_tps" and r.engine == "ollama" for r in f.rows)

    _, box = _stored("box-fast")
    _, slow = _stored("box-slow")
    hw = box.attrs["hardware"]
    assert hw["gpus"] == []  # NVML sees no GPU here: the server's own word labels it
    cpu_text = f"{hw['cpu']}, {hw['cores']} cores"
    assert rows["box-fast"].hardware == f"GPU (server-reported): {cpu_text}"
    assert rows["box-fast"].accelerator == machine.SERVER_GPU
    assert rows["box-fast"].studies == ("box-fast", "box-slow")
    assert rows["box-fast"].value is not None and slow.best() is not None
    assert rows["box-fast"].value > slow.best().values[0]  # type: ignore[union-attr]
    assert rows["cpu"].hardware == f"CPU-only: {cpu_text}" and rows["cpu"].accelerator == machine.CPU
    assert rows["cpu"].fingerprint == hw  # the same machine; what ran the model tells the rows apart
    assert rows["h200"].hardware == "2x NVIDIA H200" and rows["h200"].accelerator == machine.GPU
    assert rows["h200"].fingerprint == {**hw, "gpus": ["NVIDIA H200", "NVIDIA H200"]}

    for name, row in rows.items():
        study, st = _stored(name)
        best = st.best()
        assert best is not None
        val = study.user_attrs["validation"]
        entry = next(e for e in val["entries"] if e["number"] == best.number)
        assert row.best_trial == best.number and row.trials == len(study.trials)
        # Re-validated: the value is the winner's geometric mean over the rounds, with its interval.
        assert row.value_source == "revalidation"
        assert row.value == pytest.approx(entry["mean"])
        assert row.value_ci95 == pytest.approx(tuple(entry["ci95"]))
        # The settings changed from the defaults are those the re-validation named for the winner.
        assert list(row.changed) == entry["changed"] and row.config == best.config_text()
        assert row.last_check is None and row.warnings == ()
        if best.baseline:  # the defaults won (the fake's CPU-only speeds leave little to gain)
            assert row.config_text == "defaults" and row.speedup is None
            continue
        assert row.config_text == " ".join(entry["changed"])
        assert row.speedup is not None and row.speedup.source == "revalidation"
        assert row.speedup.ratio == pytest.approx(val["speedup"]["ratio"])
        assert row.speedup.rounds == len(val["speedup"]["ratios"]) == 2


def test_search_values_and_the_last_check(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.check

    run_on(fake, monkeypatch, "plain", validate=0)
    _, st = _stored("plain")
    best, base = st.best(), st.baseline()
    assert best is not None and base is not None and base.values and best.values
    [row] = fleet.read_fleet(STORAGE).rows
    assert (row.value, row.value_source, row.value_ci95) == (best.values[0], "search", None)
    assert row.speedup == fleet.FleetSpeedup(best.values[0] / base.values[0], "search")
    assert row.speedup.text() == f"{best.values[0] / base.values[0]:.2f}x (search)"
    assert row.last_check is None
    # `tune check` re-measures the winner later, on a server that has become 20% slower.
    monkeypatch.setattr(tuner.check, "_sampler_factory", lambda engine: None)  # no neighbour on the cores
    fake.speed_factor = 0.8
    r = invoke("check", "plain", "--storage", STORAGE, "--rounds", "2")
    assert r.exit_code == 1, r.output
    [row] = fleet.read_fleet(STORAGE).rows
    c = row.last_check
    assert c is not None and (c.verdict, c.trial) == ("regression", best.number)
    assert c.change_pct == pytest.approx(-20.0, abs=1e-3)
    today = c.at[:10]
    assert c.text(best.number) == f"{today} regression (-20.0%)"
    assert c.text(best.number + 1) == f"{today} regression (-20.0%, of #{best.number})"
    r = invoke("studies", "--by-hardware", "--storage", STORAGE)
    assert r.output.splitlines()[3].endswith(f"  {today} regression (-20.0%)")
    doc = json.loads(invoke("studies", "--by-hardware", "--json", "--storage", STORAGE).output)
    assert doc["rows"][0]["last_check"] == {"at": c.at, "verdict": "regression", "change_pct": c.change_pct,
                                            "change_ci95": list(c.change_ci95 or ()), "trial": best.number,
                                            "study": "plain"}


def test_machines_with_the_same_gpus_are_told_apart_by_their_cpu(fake: FakeOllama,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run_on(fake, monkeypatch, "l4-a", gpus=["NVIDIA L4"], cpu="Intel Xeon 6438N")
    run_on(fake, monkeypatch, "l4-b", gpus=["NVIDIA L4"], cpu="AMD EPYC 9654")
    rows = {r.study: r for r in fleet.read_fleet(STORAGE).rows}
    hw = rows["l4-a"].fingerprint
    assert hw is not None
    ram = f"{hw['cores']} cores, {hw['ram_gib']} GiB RAM"
    assert rows["l4-a"].hardware == f"NVIDIA L4 (Intel Xeon 6438N, {ram})"
    assert rows["l4-b"].hardware == f"NVIDIA L4 (AMD EPYC 9654, {ram})"


def test_a_study_without_a_feasible_trial_is_shown_only_alone(fake: FakeOllama,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run_on(fake, monkeypatch, "strict", validate=0, max_ttft_ms=0.001)  # no config answers that fast
    run_on(fake, monkeypatch, "fine", validate=0)
    run_on(fake, monkeypatch, "strict-h200", gpus=["NVIDIA H200"], validate=0, max_ttft_ms=0.001)
    _, strict = _stored("strict")
    assert strict.best() is None and len(strict.records) == 3
    rows = {r.study: r for r in fleet.read_fleet(STORAGE).rows}
    assert sorted(rows) == ["fine", "strict-h200"]
    assert rows["fine"].studies == ("fine", "strict") and rows["fine"].best_trial is not None
    alone = rows["strict-h200"]
    assert (alone.best_trial, alone.value, alone.speedup, alone.changed, alone.trials) == (None, None, None, (), 3)
    assert alone.config_text == "no feasible trial"
    line = next(x for x in invoke("studies", "--by-hardware", "--storage", STORAGE).output.splitlines()
                if " strict-h200 " in x)
    assert line.split()[-5:] == ["trial", "-", "-", "3", "-"]


def test_a_remote_server_is_its_own_machine(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    run_on(fake, monkeypatch, "here")
    for name, host in (("remote-a", "http://192.0.2.2:18440"), ("remote-b", "http://192.0.2.2:18441")):
        run_on(fake, monkeypatch, name)
        study, _ = _stored(name)
        # As a study tuned with --host on another machine stores it.
        study.set_user_attr("host", host)
        study.set_user_attr("server_local", False)
    _, here = _stored("here")
    rows = {r.study: r for r in fleet.read_fleet(STORAGE).rows}
    # The same measuring machine, three servers: the two remote ones are not merged with it or each other.
    assert sorted(rows) == ["here", "remote-a", "remote-b"]
    assert all(r.studies == (r.study,) for r in rows.values())
    assert rows["here"].server is None and rows["here"].fingerprint == here.attrs["hardware"]
    assert rows["here"].hardware.startswith("GPU (server-reported): ")
    for name, server in (("remote-a", "192.0.2.2:18440"), ("remote-b", "192.0.2.2:18441")):
        r = rows[name]
        assert r.hardware == f"server {server} (remote; hardware not seen by the tuner)"
        assert (r.server, r.fingerprint, r.accelerator) == (server, None, machine.SERVER_GPU)
    doc = json.loads(invoke("studies", "--by-hardware", "--json", "--storage", STORAGE).output)
    remote = next(d for d in doc["rows"] if d["study"] == "remote-a")
    assert remote["hardware"] == {"label": "server 192.0.2.2:18440 (remote; hardware not seen by the tuner)",
                                  "accelerator": "server-gpu", "fingerprint": None, "server": "192.0.2.2:18440"}


def _lower_the_revalidation(name: str, factor: float) -> None:
    """The stored re-validation of the winner, measured ``factor`` of its search value (as a lucky
    search measurement re-measures lower)."""
    study, st = _stored(name)
    best = st.best()
    assert best is not None
    val = study.user_attrs["validation"]
    for e in val["entries"]:
        if e["number"] == best.number:
            e["values"] = [v * factor for v in e["values"]]
            e["mean"], e["ci95"] = e["mean"] * factor, [x * factor for x in e["ci95"]]
    study.set_user_attr("validation", val)


def test_a_revalidated_study_is_preferred_over_single_search_values(fake: FakeOllama,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run_on(fake, monkeypatch, "revalidated")
    _lower_the_revalidation("revalidated", 0.9)
    fake.speed_factor = 1.05  # the same machine, a lucky study measured only in its search
    run_on(fake, monkeypatch, "lucky", validate=0)
    _, high = _stored("revalidated")
    _, lucky = _stored("lucky")
    hb, lb = high.best(), lucky.best()
    assert hb is not None and lb is not None and hb.values and lb.values
    assert lb.values[0] > hb.values[0] > 0.9 * hb.values[0]
    [row] = fleet.read_fleet(STORAGE).rows
    # A single search value, however high, does not displace a re-validated interval; the row
    # shows the re-validated value and says so.
    assert row.study == "revalidated" and row.studies == ("revalidated", "lucky")
    assert row.value_source == "revalidation" and row.value == pytest.approx(0.9 * hb.values[0], rel=1e-6)
    line = invoke("studies", "--by-hardware", "--storage", STORAGE).output.splitlines()[3]
    assert f"{row.value:,.1f} " in line and "(search)" not in line, line
    # Without any re-validation, the best search value is shown, marked as one.
    [row] = fleet.fleet_rows([lucky])
    assert (row.study, row.value_source, row.value) == ("lucky", "search", lb.values[0])
    assert f"{lb.values[0]:,.1f} (search)" in fleet.format_fleet(fleet.Fleet(STORAGE, 1, [row]))


def test_a_tie_goes_to_the_revalidated_study_and_the_last_check_is_the_pairs(
        fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuner.check

    run_on(fake, monkeypatch, "checked")
    _lower_the_revalidation("checked", 0.99)  # re-measured a little lower than its search value
    run_on(fake, monkeypatch, "later", validate=0)  # the same speeds, measured later without an interval
    _, a = _stored("checked")
    _, b = _stored("later")
    ab, bb = a.best(), b.best()
    assert ab is not None and bb is not None and ab.values == bb.values
    [row] = fleet.read_fleet(STORAGE).rows
    assert row.study == "checked" and row.studies == ("checked", "later")
    assert row.value_source == "revalidation" and row.speedup is not None and row.speedup.ci95 is not None
    # A check of the study not shown is the pair's latest: shown, saying whose it is.
    monkeypatch.setattr(tuner.check, "_sampler_factory", lambda engine: None)
    assert invoke("check", "later", "--storage", STORAGE, "--rounds", "2").exit_code == 0
    [row] = fleet.read_fleet(STORAGE).rows
    c = row.last_check
    assert row.study == "checked" and c is not None and (c.study, c.trial, c.verdict) == ("later", bb.number, "ok")
    assert c.text(row.best_trial, row.study) == f"{c.at[:10]} ok (+0.0%, of later #{bb.number})"
    line = invoke("studies", "--by-hardware", "--storage", STORAGE).output.splitlines()[3]
    assert line.endswith(f"  {c.at[:10]} ok (+0.0%, of later #{bb.number})")


@pytest.mark.parametrize(("attrs", "label"), [
    ({"hardware": {"cpu": "X", "cores": 8, "ram_gib": 64, "gpus": ["NVIDIA A100", "NVIDIA L4"]}},
     "NVIDIA A100 + NVIDIA L4"),
    ({"hardware": {"cpu": "X", "cores": 8, "ram_gib": 64, "gpus": []}, "gpu_offload_source": "llama.cpp",
      "environment": {"gpu_offload": {"offloads": False, "source": "llama.cpp"}}}, "CPU-only: X, 8 cores"),
    ({"hardware": {"cpu": "X", "cores": 8, "ram_gib": 64, "gpus": ["NVIDIA L4"]}, "gpu_offload_source": "llama.cpp",
      "environment": {"gpu_offload": {"offloads": False, "source": "llama.cpp"}}},
     "CPU-only: X, 8 cores (GPU not used: NVIDIA L4)"),
    # num_gpu given on the command line, or an offload check that failed: not evidence either way.
    ({"hardware": {"cpu": "X", "cores": 8, "ram_gib": 64, "gpus": []}, "gpu_offload_source": "--param num_gpu",
      "environment": {"gpu_offload": {"offloads": True, "source": "--param num_gpu"}}}, "GPU not known: X, 8 cores"),
    ({"hardware": {"cpu": None, "cores": None, "ram_gib": None, "gpus": []}}, "GPU not known: unknown CPU, ? cores"),
    ({"model": "m"}, "hardware not recorded"),
    # A server on another machine: the fingerprint is the measuring machine's, so it is not shown.
    ({"hardware": {"cpu": "X", "cores": 8, "ram_gib": 64, "gpus": ["NVIDIA L4"]}, "engine": "ollama",
      "host": "http://192.0.2.2:11434"}, "server 192.0.2.2:11434 (remote; hardware not seen by the tuner)"),
    ({"hardware": {"cpu": "X", "cores": 8, "ram_gib": 64, "gpus": ["NVIDIA L4"]}, "engine": "ollama",
      "host": "http://192.0.2.2:11434", "managed_server": True}, "NVIDIA L4"),
    ({"hardware": {"cpu": "X", "cores": 8, "ram_gib": 64, "gpus": ["NVIDIA L4"]}, "engine": "ollama",
      "host": "http://localhost:11434"}, "NVIDIA L4"),
])
def test_the_hardware_label_says_only_what_was_recorded(attrs: dict[str, Any], label: str) -> None:
    assert machine.hardware_label(attrs) == label


def test_studies_by_hardware_prints_a_table_and_json(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    run_on(fake, monkeypatch, "box")
    run_on(fake, monkeypatch, "h200", gpus=["NVIDIA H200"])
    rows = fleet.read_fleet(STORAGE).rows
    r = invoke("studies", "--by-hardware", "--storage", STORAGE)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"2 studies in {STORAGE}: 2 model x hardware pairs"
    assert lines[1].split() == ["hardware", "study", "best", "config", "(changed", "from", "defaults)", "decode",
                                "tok/s", "speedup", "trials", "last", "check"]
    assert lines[2] == "gemma3:1b"
    study_at, config_at = lines[1].index("study"), lines[1].index("best config")
    by_study = {line[study_at:config_at].strip(): line for line in lines[3:5]}
    for row in rows:
        line = by_study[row.study]
        assert line.startswith(f"  {row.hardware}")
        assert row.speedup is not None and row.value is not None
        assert row.config_text in line and f"{row.value:,.1f}" in line and row.speedup.text() in line
        assert line.endswith(f"{row.trials}  -")
    assert lines[5] == fleet.SPEEDUP_NOTE and len(lines) == 6

    r = invoke("studies", "--by-hardware", "--json", "--storage", STORAGE)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["storage"] == STORAGE and doc["studies"] == 2
    assert [d["study"] for d in doc["rows"]] == [row.study for row in rows]
    h200 = next(d for d in doc["rows"] if d["study"] == "h200")
    row = next(row for row in rows if row.study == "h200")
    assert h200["hardware"] == {"label": "NVIDIA H200", "accelerator": "gpu", "fingerprint": row.fingerprint,
                                "server": None}
    assert h200["value"] == row.value and h200["best_trial"] == row.best_trial and h200["studies"] == ["h200"]
    assert h200["changed"] == list(row.changed) and h200["value_source"] == "revalidation"
    assert row.speedup is not None
    assert h200["speedup"]["ratio"] == row.speedup.ratio and h200["speedup"]["source"] == "revalidation"
    assert h200["speedup"]["ci95"] == list(row.speedup.ci95 or ()) and h200["last_check"] is None


def test_fleet_of_an_empty_storage(tmp_path: Path) -> None:
    optuna.storages.RDBStorage("sqlite:///empty.db")
    r = invoke("studies", "--by-hardware", "--storage", "sqlite:///empty.db")
    assert (r.exit_code, r.output) == (0, "no studies in sqlite:///empty.db\n")
    r = invoke("studies", "--by-hardware", "--storage", "sqlite:///missing.db")
    assert r.exit_code == 2
    assert r.output == "Error: no study storage at missing.db: run `tune --model ...` first or pass --storage\n"


def test_report_fleet_writes_one_escaped_page(fake: FakeOllama, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    run_on(fake, monkeypatch, f"box-{XSS}")
    run_on(fake, monkeypatch, "h200", gpus=[f"NVIDIA {XSS}"])
    # A model name as another tool (or a crafted storage) may have stored it.
    study, _ = _stored("h200")
    study.set_user_attr("model", f"gemma3:{XSS}")
    r = invoke("report", "--fleet", "--storage", STORAGE)
    assert (r.exit_code, r.output) == (0, "reports/fleet.html\n")
    page = (tmp_path / "reports" / "fleet.html").read_text()
    assert "<script" not in page.lower() and "src=" not in page  # self-contained, no script at all
    assert f"<h2>gemma3:{XSS_ESCAPED}</h2>" in page and "<h2>gemma3:1b</h2>" in page
    assert f"NVIDIA {XSS_ESCAPED}" in page and f"<code>box-{XSS_ESCAPED}</code>" in page
    for row in fleet.read_fleet(STORAGE).rows:
        assert row.speedup is not None
        assert f">{row.speedup.text()}<" in page and f"trial #{row.best_trial}: " in page
        # Times in UTC, as in the single-study report (Optuna stores naive local times).
        assert row.last_update is not None
        assert row.last_update.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") in page

    r = invoke("report", "--fleet", "--storage", STORAGE, "-o", "out")
    assert r.exit_code == 0 and (tmp_path / "out").is_file()
    r = invoke("report", "h200", "--fleet", "--storage", STORAGE)
    assert r.exit_code == 2
    assert r.output == "Error: --fleet reports every study in the storage: drop STUDY, or drop --fleet\n"
