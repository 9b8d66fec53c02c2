"""What several sections of the report share: its constants, the figure slots and number helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tuner import objectives
from tuner.record import DECODE_TPS, TOKENS_PER_JOULE

TOP_N = 10
#: The rate shown beside an objective that is not a rate (tokens/J, p95 TTFT).
DEFAULT_RATE = DECODE_TPS
#: p95 TTFT and p95 latency of a record, as the objectives of those names read them.
_TTFT_P95 = objectives.get("ttft_p95").value
_LATENCY_P95 = objectives.get("latency_p95").value
#: Telemetry plotted against the rate: (figure key, axis label, limit name, caption, value of a record).
TELEMETRY_VIEWS: tuple[tuple[str, str, str | None, str, Any], ...] = (
    ("power", "mean GPU power (W)", "max_power_w", "", lambda r: r.power_mean_w),
    ("vram", "GPU memory (MiB)", "max_vram_mib",
     "NVML's peak during the measured requests where the tuner sees the GPU, else the VRAM the server "
     "reports the model holds: the value --max-vram-mib is checked against.", lambda r: r.vram_peak_mib),
    (TOKENS_PER_JOULE, "tokens per joule", None, "", lambda r: r.tokens_per_joule),
)
#: An axis is drawn on a log scale when its largest value is at least this many times its
#: smallest: one slow outlier (an infeasible 12 s TTFT) no longer flattens 35-68 ms onto zero.
LOG_AXIS_RATIO = 10.0
#: The figures in report order; a figure with no data says why in its place. "parameters"
#: stands for the four parameter figures when there is no trial with searched settings at all.
FIGURE_ORDER = ("history", "parameters", "effects", "drafting", "importances", "parallel", "slices", "tradeoff", "power",
                "vram", TOKENS_PER_JOULE, "prefill", "host", "timeline", "validation", "drift")


@dataclass(frozen=True)
class NamedFigure:
    """A plotly figure and where it goes in the report."""

    key: str
    title: str
    figure: Any
    caption: str = ""


@dataclass(frozen=True)
class EmptyFigure:
    """A figure the study has no data for, and why; the page says so in the figure's place."""

    key: str
    title: str
    reason: str


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _gpu_names(env: dict[str, Any]) -> str:
    """The GPUs NVML saw, as names ("2x NVIDIA H200"); "" when it saw none."""
    names = [str(g["name"]) for g in env.get("gpus") or [] if isinstance(g, dict) and g.get("name")]
    return ", ".join(f"{names.count(n)}x {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names))
