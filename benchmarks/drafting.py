"""Drafting on this machine: real decode with and without prompt-lookup drafting (llama-cpp,
Gemma 3 270M) on the two built-in workloads, with 95% intervals and the identity check.

    python benchmarks/drafting.py [--draft 0,2,4,8] [--repeats 3] [--num-predict 96]

One study per workload (``builtin:copy``: a code edit the answer mostly copies; ``builtin:chat``:
free text), grid over ``draft_num_predict``, 2 threads. Per config: decode tok/s (geometric mean
and 95% t interval on the log scale over the measured requests), the speed-up over drafting off
(ratio of geometric means, Welch 95% interval), the accepted share of drafted tokens, and the
output-identity check (greedy text with drafting == without, on the workload's first and longest
prompt) and,
where it fails, its control: the text without drafting scored in verification-sized batches with
no drafter, and the first generated token whose greedy choice that changes.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from typing import Any

from _common import load_average, now_iso, table

from tuner import results
from tuner.demo import demo_model_path
from tuner.options import TuneOptions
from tuner.record import DECODE_TPS
from tuner.stats import log_ci95, log_ratio_ci95
from tuner.storage import open_storage
from tuner.study import run_study


def _study(workload: str, drafts: list[int], repeats: int, num_predict: int, storage: str,
           flash: str) -> list[Any]:
    o = TuneOptions(model=[str(demo_model_path())], engine="llama-cpp", trials=len(drafts) + 2, repeats=repeats,
                    num_predict=num_predict, storage=storage, study_name=workload, seed=1, sampler="grid",
                    prompts_file=f"builtin:{workload}", validate=0, prune=False, warm_start=False,
                    params={"draft_num_predict": drafts, "num_thread": [2], "num_ctx": [2048], "num_batch": [512],
                            "flash_attention": [flash]})
    run_study(o)
    stored = results.read_study(results.load_study(open_storage(storage), workload))
    return [r for r in stored.records if not r.baseline and r.measured]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="0,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-predict", type=int, default=96)
    ap.add_argument("--flash-attention", default="on", choices=("on", "off"),
                    help="llama.cpp's flash attention for every config (on: the setting under which its batched "
                         "verification matched one token at a time here; docs/drafting.md)")
    a = ap.parse_args(argv)
    drafts = [int(x) for x in a.draft.split(",")]
    print(f"{now_iso()}  drafting benchmark; load average {load_average()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/drafting.db"
        for workload in ("copy", "chat"):
            recs = _study(workload, drafts, a.repeats, a.num_predict, storage, a.flash_attention)
            by_draft: dict[int, list[float]] = {}
            info: dict[int, Any] = {}
            busy: dict[int, int] = {}
            for r in recs:
                k = int(r.options.get("draft_num_predict", 0))
                if r.contended:  # measured while other processes competed: not a number to keep
                    busy[k] = busy.get(k, 0) + 1
                    continue
                by_draft.setdefault(k, []).extend(r.per_request_values(DECODE_TPS))
                info[k] = r
            off = by_draft.get(0)
            for k in sorted(set(by_draft) | set(busy)):
                if k not in by_draft:
                    rows.append([workload, k, 0, "contended only", "-", "-", "-", "-", busy[k]])
                    continue
                g, lo, hi = log_ci95(by_draft[k])
                ratio = "-"
                if off and k:
                    x, xlo, xhi = log_ratio_ci95(by_draft[k], off)
                    ratio = f"{x:.2f}x ({xlo:.2f}-{xhi:.2f})"
                r = info[k]
                acc = "-" if r.draft_acceptance is None else f"{100 * r.draft_acceptance:.0f}% of {r.draft_tokens}"
                ident = "-" if r.identity is None else ("yes" if r.identity["identical"] else
                                                        f"NO, at character {r.identity.get('first_difference')}")
                control = (r.identity or {}).get("batched_scoring")
                cause = "-" if not isinstance(control, dict) else (
                    f"flips token {control['flips_at_token']} at batch {control.get('flip_batch')} "
                    f"(gap {control.get('top_two_gap')})"
                    if control.get("flips_at_token") is not None else "no flip")
                rows.append([workload, k, len(by_draft[k]), f"{g:.1f} ({lo:.1f}-{hi:.1f})", ratio, acc, ident,
                             cause, busy.get(k, 0)])
    print(table(["workload", "draft", "requests", "decode tok/s (95% CI)", "vs off (95% CI)", "accepted",
                 "same greedy output", "batches alone (no drafter)", "contended trials left out"], rows,
                f"prompt-lookup drafting, Gemma 3 270M, 2 threads, flash attention {a.flash_attention}, {a.repeats} repeats, "
                f"{a.num_predict} tokens"))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
