"""Helpers shared by the benchmark commands: paths, the recorded grid, tables, machine load."""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT / "benchmarks" / "data"
DEFAULT_GRID = DATA / "cpu-grid-gemma3-270m.json.gz"

#: The built-in benchmark prompt: short, so one request costs seconds on 2 CPU cores.
SHORT_PROMPT = (
    "Read the note below and answer in two sentences: which pipe material should the city "
    "replace first, and why?\n\n"
    "Note: The Riverside district has 41,000 residents. Its water mains were laid between 1952 "
    "and 1968: cast iron for the trunk lines, asbestos cement for most smaller pipes. Leaks per "
    "kilometre have doubled in ten years, mostly in the asbestos cement pipes, which also fail "
    "without warning. Cast iron mains corrode slowly and usually leak before they break."
)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation (sample sd / mean), as a fraction."""
    if len(values) < 2:
        return 0.0
    m = statistics.fmean(values)
    return statistics.stdev(values) / m if m else 0.0


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A Markdown table (readable in a terminal, pasteable into the README)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [f"**{title}**", ""] if title else []
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


@dataclass(frozen=True)
class Truth:
    """One recorded configuration's mean decode rate and p95 TTFT over all its samples."""

    config: dict[str, Any] | None
    decode_tps: float
    ttft_p95_ms: float
    ok: bool


def truths(grid: Any) -> dict[Any, Truth]:
    """Per recorded config key (baseline included): the metrics a trial of it reports."""
    from tuner.engines.replay import true_metrics

    out: dict[Any, Truth] = {}
    for key, e in grid.entries.items():
        if e.error or not e.samples:
            out[key] = Truth(e.config, 0.0, float("inf"), False)
            continue
        r = true_metrics(e)
        out[key] = Truth(e.config, r.stat("decode_tps") or 0.0, r.stat("ttft_ms", "p95") or 0.0, True)
    return out
