"""The package's layers: the record at the bottom, the read side apart from what measures, and
every metric key spelled in tuner/record.py only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuner import record

PACKAGE = Path(__file__).resolve().parent.parent / "tuner"

#: What measures, searches or runs a study: never loaded by reading one.
WRITE_SIDE = ("tuner.study", "tuner.runner", "tuner.start", "tuner.progress", "tuner.staged", "tuner.space",
              "tuner.measure", "tuner.validate", "tuner.engines", "tuner.server", "tuner.telemetry",
              "tuner.gpu_telemetry", "tuner.host_telemetry", "tuner.warmstart", "tuner.check", "tuner.ablate")
#: The read side's entry points: ``tune show``, ``studies``, ``report``, ``export``.
READ_SIDE = ("tuner.show", "tuner.fleet", "tuner.report", "tuner.report.fleet", "tuner.export", "tuner.results",
             "tuner.checks", "tuner.machine", "tuner.caveats", "tuner.gains")


def _loaded(code: str) -> set[str]:
    """The tuner modules a fresh interpreter has loaded after running ``code``."""
    code += "\nimport sys; print(sorted(m for m in sys.modules if m == 'tuner' or m.startswith('tuner.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(ast.literal_eval(out.strip().splitlines()[-1]))


def _write_side(loaded: set[str]) -> set[str]:
    return {m for m in loaded if any(m == w or m.startswith(w + ".") for w in WRITE_SIDE)}


@pytest.mark.parametrize("module", READ_SIDE)
def test_the_read_side_loads_nothing_that_measures(module: str) -> None:
    loaded = _loaded(f"import {module}")
    assert _write_side(loaded) == set(), sorted(loaded)


def test_the_record_is_the_bottom() -> None:
    # The vocabulary imports nothing of the tuner but plain values; machine facts only the record.
    base = {"tuner", "tuner.errors", "tuner.files", "tuner.metrics", "tuner.telemetry_summary"}
    assert _loaded("import tuner.record") <= base | {"tuner.record"}
    assert _loaded("import tuner.machine") <= base | {"tuner.record", "tuner.machine"}


def _study(url: str) -> None:
    """A small stored study as ``tune`` writes it: the baseline and two tuned trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from tuner.metrics import RequestSample
    from tuner.workload import Workload, builtin_prompts

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize"])
    record.write_study_info(study, record.StudyInfo(
        model="gemma3:1b", engine="ollama", objectives=[record.DEFAULT_OBJECTIVE], space_hash="a", workload_hash="b",
        host="http://127.0.0.1:11434", server_version="0.12.3", space={"num_thread": [1, 2]},
        workload=Workload(prompts=builtin_prompts()[:1], repeats=1, num_predict=64).to_dict(),
        environment={"engine": "ollama", "server_version": "0.12.3", "gpus": [], "host": {"cpu_model": "X"}},
        hardware={"cpu": "X", "cores": 4, "ram_gib": 16, "gpus": []}, created_at="2026-08-01T10:00:00+00:00"))
    for threads, eval_ms in ((None, 640.0), (1, 500.0), (2, 320.0)):
        options = {} if threads is None else {"num_thread": threads}
        samples = [RequestSample(builtin_prompts()[0].name, 0, 60.0, 1000.0, 100, 50.0, 64, eval_ms, 0.1, 1100.0, "length")]
        rec = record.build_record("gemma3:1b", options, {}, samples, baseline=threads is None)
        attrs = {**record.stored_attrs(rec), **({record.BASELINE: True} if threads is None else {})}
        study.add_trial(create_trial(
            values=[rec.stat(record.DECODE_TPS)], params=options,
            distributions={"num_thread": CategoricalDistribution([1, 2])} if options else {},
            user_attrs=json.loads(json.dumps(attrs)), system_attrs={record.CONSTRAINTS_KEY: [0.0]}))


def test_the_read_commands_load_nothing_that_measures(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    _study(url)
    commands = [["studies", "--storage", url], ["studies", "--by-hardware", "--storage", url],
                ["show", "s", "--storage", url], ["show", "s", "--json", "--storage", url],
                ["report", "s", "--storage", url, "-o", str(tmp_path / "r.html")],
                ["report", "--fleet", "--storage", url, "-o", str(tmp_path / "f.html")],
                ["export", "s", "--format", "modelfile", "--storage", url]]
    code = ("from click.testing import CliRunner\nfrom tuner.cli import cli\n"
            f"for args in {commands!r}:\n"
            "    r = CliRunner().invoke(cli, args, catch_exceptions=False)\n"
            "    assert r.exit_code == 0, (args, r.output)\n")
    loaded = _loaded(code)
    assert {"tuner.show", "tuner.fleet", "tuner.report.fleet", "tuner.export"} <= loaded
    assert _write_side(loaded) == set(), sorted(loaded)


def test_tune_check_does_not_load_the_study_runner(tmp_path: Path) -> None:
    # Machine facts and the stored checks come from machine.py and checks.py, not from study.py.
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    _study(url)
    code = ("from click.testing import CliRunner\nfrom tuner.cli import cli\n"
            f"r = CliRunner().invoke(cli, ['check', 's', '--dry-run', '--storage', {url!r}], catch_exceptions=False)\n"
            "assert r.exit_code == 0 and 'DRY RUN' in r.output, r.output\n")
    loaded = _loaded(code)
    assert "tuner.check" in loaded
    assert loaded & {"tuner.study", "tuner.runner", "tuner.start", "tuner.staged", "tuner.warmstart",
                   "tuner.space"} == set(), sorted(loaded)


def test_no_metric_key_is_spelled_outside_the_record_module() -> None:
    # Constants from tuner/record.py, never the literal: one place says what a metric is called.
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "record.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in record.METRICS:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert offenders == []


def test_the_objective_when_none_was_stored_is_the_record_s() -> None:
    assert record.read_study_info({}).objectives == [record.DEFAULT_OBJECTIVE]
    assert record.read_study_info({"objectives": []}).objective == record.DEFAULT_OBJECTIVE
    assert record.read_study_info({"objectives": ["ttft_p95", "decode_tps"]}).objective == "ttft_p95"
