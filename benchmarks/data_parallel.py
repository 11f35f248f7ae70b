"""One cell data-parallel (issue 19, part 2): torchrun's N processes against one process on the same
devices, through the command users run.

    python benchmarks/data_parallel.py            # RSICD subset in ../shared/data (synthetic without it)
    python benchmarks/data_parallel.py --quick    # one epoch

The same cell (clip-ft, tiny-b32, batch 64, seed 3, noise 0) runs twice into fresh stores: as a
plain `rsnc-bench run --workers 1` and as `torchrun --nproc-per-node N -m rsnc_bench run`. On a
CPU the plain run gets all N cores as torch threads and each of the N gloo ranks one, so both use
the same cores; on a machine with N GPUs each run uses them all (one cell on one GPU for the
plain run). Figures: the training throughput ratio (samples per second of the trained epochs, from
the result's timings) and the largest relative difference of the per-epoch losses (the two runs
take the same steps to float rounding; ``tests/test_distributed.py`` checks it on every method).
Results go to ``benchmarks/results/data_parallel.json``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from figures import Figure, save, table  # benchmarks/, on sys.path when a script here runs

from rsnc_bench.store import ResultStore

RSICD = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsicd-subset"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(prefix: list[str], out: Path, data: list[str], epochs: int, env: dict) -> tuple[dict, float]:
    command = [*prefix, "run", "--methods", "clip-ft", "--backbone", "tiny-clip", "--noise", "0", "--seeds", "3", "--out", str(out),
               "-t", f"epochs={epochs}", "-t", "batch_size=64", *data]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    (doc,) = ResultStore(out).iter_results()
    return doc, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one epoch instead of two")
    parser.add_argument("--ranks", type=int, default=max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 2)
    args = parser.parse_args()
    epochs = 1 if args.quick else 2
    data = ["--datasets", "rsicd", "--data-root", str(RSICD)] if (RSICD / "dataset_rsicd.json").exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RSNC_BENCH_CACHE": os.environ.get("RSNC_BENCH_CACHE", str(Path(tmp) / "cache"))}
        rsnc = [sys.executable, "-m", "rsnc_bench"]
        _run(rsnc, Path(tmp) / "warm", data + ["--workers", "1"], 1, env)  # builds tiny-clip and the image cache outside the timing
        single, single_wall = _run(rsnc, Path(tmp) / "single", data + ["--workers", "1"], epochs, env)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks), "--master-port", str(_free_port()),
                    "-m", "rsnc_bench"]
        parallel, parallel_wall = _run(torchrun, Path(tmp) / "parallel", data, epochs, env)
    rate = lambda doc: doc["timings"]["samples_per_second"]  # noqa: E731
    losses = [(e["loss"], f["loss"]) for e, f in zip(single["history"], parallel["history"])]
    drift = max(abs(a - b) / abs(a) for a, b in losses)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = f"{args.ranks} ranks ({'NCCL' if device == 'cuda' else 'gloo, 1 thread each'}) / 1 process"
    figures = [
        Figure("issue 19: one cell data-parallel", f"training samples/s, {name}", rate(parallel) / rate(single), "x", "", None,
               f"{rate(parallel):.0f} vs {rate(single):.0f} samples/s on {device}"),
        Figure("issue 19: one cell data-parallel", "largest relative difference of the epoch losses", drift, "", "<= 1e-4", drift <= 1e-4,
               "the same global batch, encoders sharded"),
    ]
    setup = {"cell": "clip-ft, tiny-clip, batch 64, seed 3, noise 0", "dataset": "rsicd-subset" if data else "synthetic",
             "epochs": epochs, "ranks": args.ranks, "device": device, "cores": os.cpu_count(), "torch": torch.__version__}
    path = save("data_parallel", setup, figures, wall_seconds={"single": single_wall, "parallel": parallel_wall}, losses=losses)
    print(table(figures))
    print(f"written {path}")


if __name__ == "__main__":
    main()
