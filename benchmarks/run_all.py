"""Every performance figure of issue 18 in one table, each with its target and whether it is met.

    python benchmarks/run_all.py              # runs every benchmark below in turn (about 25 minutes on 2 cores)
    python benchmarks/run_all.py --quick      # shorter runs of each (about 10 minutes)
    python benchmarks/run_all.py --only data_path,method_costs
    python benchmarks/run_all.py --table      # only print the table from benchmarks/results/*.json

Each benchmark runs in its own process, one after another (nothing else should run meanwhile:
the figures are ratios, but a busy machine still skews them), and writes
``benchmarks/results/<name>.json`` in the shape of ``figures.py``; this script then prints every
figure as one Markdown table. A benchmark that fails is reported and the others still run; the
exit status is 1 when any failed. Optional tools (CLIP_benchmark, open_clip_train's extras) and a
GPU are used when present; without them their figures say "not measured" and why.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from figures import RESULTS, Figure, load, table

HERE = Path(__file__).parent

# name (script and results file), the benchmark numbers of issue 18 it measures
BENCHMARKS = {
    "evaluator_vs_clip_benchmark": "1",
    "train_vs_open_clip": "2",
    "method_costs": "3, 4",
    "data_path": "5 and the data path",
    "evaluator_scaling": "6",
    "streaming_reader": "issue 19: RS5M streamed from shards",
    "data_parallel": "issue 19: one cell data-parallel",
    "gpu_step": "2-4 on a GPU",
}


def run(name: str, quick: bool) -> bool:
    command = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if quick else [])
    started = time.perf_counter()
    print(f"== {name} ({BENCHMARKS[name]}): {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True)
    print(f"   {'done' if done.returncode == 0 else 'FAILED'} in {time.perf_counter() - started:.0f} s", flush=True)
    if done.returncode != 0:
        print("   " + "\n   ".join((done.stdout + done.stderr).strip().splitlines()[-15:]), flush=True)
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs of every benchmark")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--table", action="store_true", help="print the table from the saved results, running nothing")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    failed = [] if args.table else [n for n in names if not run(n, args.quick)]
    figures: list[Figure] = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if name in failed or not path.exists():
            why = "failed: see its output above" if name in failed else f"no {path.name} yet: run it"
            figures.append(Figure(BENCHMARKS[name], name, None, "", "", None, why))
        else:
            figures += load(path)
    print("\n" + table(figures))
    missed = sum(f.met is False for f in figures)
    print(f"\n{sum(f.met is True for f in figures)} targets met, {missed} missed, {sum(f.met is None for f in figures)} without a verdict")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
