"""Start-up time of the CLI: `tune --help` and `tune run --help` (target <= 0.3 s).

    python benchmarks/startup.py [--runs 10]

Prints a Markdown table of wall times over fresh interpreter processes, and which heavy
modules (optuna, pandas, plotly, pynvml, llama_cpp) `tuner.cli` imported at start-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

TARGET_S = 0.3
HEAVY = ("optuna", "pandas", "plotly", "pynvml", "llama_cpp", "numpy", "sqlalchemy", "httpx")


def time_command(args: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def heavy_imports() -> list[str]:
    code = "import sys, tuner.cli; print(','.join(sorted(m for m in sys.modules)))"
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(mods.strip().split(","))
    return [m for m in HEAVY if m in loaded]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    cli = [sys.executable, "-m", "tuner.cli"]
    rows = []
    import shutil

    commands = [("python -m tuner.cli --help", [*cli, "--help"]), ("python -m tuner.cli run --help", [*cli, "run", "--help"])]
    script = shutil.which("tune")
    if script:
        commands += [("tune --help (console script)", [script, "--help"]),
                     ("tune run --help (console script)", [script, "run", "--help"])]
    for label, args in commands:
        ts = time_command(args, a.runs)
        med = statistics.median(ts)
        rows.append((label, med, max(ts), "met" if med <= TARGET_S else "MISSED"))
    print(f"load average: {os.getloadavg()}; {a.runs} runs each; target <= {TARGET_S} s (median)\n")
    print("| command | median s | max s | target |")
    print("|---|---|---|---|")
    for label, med, mx, ok in rows:
        print(f"| `{label}` | {med:.3f} | {mx:.3f} | {ok} |")
    print(f"\nheavy modules imported by `import tuner.cli`: {', '.join(heavy_imports()) or 'none'}")


if __name__ == "__main__":
    main()
