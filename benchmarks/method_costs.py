"""Every registered method's training-step cost against clip-ft's, the share of a step spent
outside the model (issue 18, benchmark 3), and each method's test evaluation against clip-ft's
(benchmark 4, on a synthetic test split of RSICD's size), as ratios measured in one run.

    python benchmarks/method_costs.py                  # tiny-b32 (the CPU preset's architecture), batch 64, 1 thread

Each method trains on the built-in synthetic dataset with the harness's step (``StepRunner``):
the batch (crops and normalisation, built two ahead by a background worker as the trainer does:
data is the time the step waits for it; ``--prefetch 0`` builds it inline), the method's loss,
backward, clipping and fused AdamW (model), the per-row clean-ness signals and the logged loss
(bookkeeping). With one torch thread the worker has the second core to itself; in a grid with a
worker process per core it shares them. Methods take turns,
``--steps`` steps a round, so load from other processes hits all alike; a method's step time is
its best round's mean. Evaluation is ``evaluate`` on the test split (encoding and every scorer),
best of ``--rounds``, on 1,093 images x 5,465 captions (RSICD's test size; ``--quick``: 150).
Targets: every method within 3x clip-ft's step; data and bookkeeping under 10 % of a step;
evaluation within 20x clip-ft's. The table goes to stdout and
``benchmarks/results/method_costs.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from figures import Figure, save  # benchmarks/, on sys.path when a script here runs
from step_runner import make_runner

from rsnc_bench.config import parse_assignments
from rsnc_bench.data.datasets import DATASETS, get_dataset
from rsnc_bench.engine.batches import split_tensors
from rsnc_bench.engine.evaluate import evaluate
from rsnc_bench.methods import METHODS

BASELINE = "clip-ft"
STEP_TARGET, OUTSIDE_TARGET, EVAL_TARGET = 3.0, 0.10, 20.0


def trained_methods() -> list[str]:
    """Every registered method that trains, once (data variants such as the oracle train as their class)."""
    names = []
    for name in METHODS.names():
        entry = METHODS.entry(name)
        if entry.rows == "all" and entry.cls.capabilities.trains and not name.startswith("test-"):
            names.append(name)
    return [BASELINE] + [n for n in names if n != BASELINE]


def eval_seconds(method, split, rounds: int, device: torch.device = torch.device("cpu")) -> float:
    """The best of ``rounds`` test evaluations (encoding and every scorer of the method), in seconds."""
    tensors = split_tensors(split, method.backbone)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        evaluate(method, tensors, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-b32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=200, help="synthetic train images (5 captions each)")
    parser.add_argument("--n-test", type=int, default=1093, help="synthetic test images (5 captions each); 1,093: RSICD's test split")
    parser.add_argument("--quick", action="store_true", help="a 150-image test split and 2 rounds")
    parser.add_argument("--steps", type=int, default=4, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    parser.add_argument("--prefetch", type=int, default=2, help="batches built ahead by a background worker, as the trainer does (0: inline)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n_test, args.rounds = 150, 2
    options = [f"n_train={args.n_train}", f"n_test={args.n_test}"]
    dataset = get_dataset("synthetic", **parse_assignments(DATASETS.get("synthetic").Options, options))
    data = dataset.load(tempfile.mkdtemp(prefix="rsnc-method-costs-"))
    train = data["train"]
    names = trained_methods()
    runners = {name: make_runner(name, args.backbone, train, train.captions, args.batch_size) for name in names}
    for runner in runners.values():  # warm-up: first-touch allocations, thread pools
        runner.prefetch(args.prefetch)
        runner.seconds(1)
        runner.times = dict.fromkeys(runner.times, 0.0)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            best[name] = min(best.get(name, float("inf")), runner.seconds(args.steps) / args.steps)
    evaluation = {name: eval_seconds(runner.method, data["test"], min(2, args.rounds)) for name, runner in runners.items()}
    rows = []
    for name, runner in runners.items():
        total = sum(runner.times.values())
        outside = (runner.times["data"] + runner.times["bookkeeping"]) / total
        ratio = best[name] / best[BASELINE]
        rows.append({"method": name, "step_ms": 1000 * best[name], "x_clip_ft": ratio, "step_target_met": ratio <= STEP_TARGET,
                     "data_share": runner.times["data"] / total, "bookkeeping_share": runner.times["bookkeeping"] / total,
                     "outside_share": outside, "outside_target_met": outside < OUTSIDE_TARGET,
                     "eval_s": evaluation[name], "eval_x_clip_ft": evaluation[name] / evaluation[BASELINE],
                     "eval_target_met": evaluation[name] / evaluation[BASELINE] <= EVAL_TARGET})
    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "backbone": args.backbone, "batch_size": args.batch_size,
             "steps": args.steps, "rounds": args.rounds, "prefetch": args.prefetch, "test_split": [data["test"].n_images, data["test"].n_rows]}
    figures = []
    for r in rows:
        m = r["method"]
        if m != BASELINE:
            figures.append(Figure("3 step cost", f"{m} step over {BASELINE}'s", r["x_clip_ft"], "x", f"<= {STEP_TARGET:g}", r["step_target_met"],
                                  f"{r['step_ms']:.0f} ms against {rows[0]['step_ms']:.0f} ms"))
    for r in rows:
        figures.append(Figure("3 step cost", f"{r['method']}: data wait and bookkeeping share of a step", r["outside_share"], "%",
                              f"< {OUTSIDE_TARGET:.0%}", r["outside_target_met"],
                              f"data {r['data_share']:.1%}, bookkeeping {r['bookkeeping_share']:.1%}"))
    for r in rows:
        if r["method"] != BASELINE:
            figures.append(Figure("4 evaluation cost", f"{r['method']} test evaluation over {BASELINE}'s ({args.n_test:,} x {5 * args.n_test:,})",
                                  r["eval_x_clip_ft"], "x", f"<= {EVAL_TARGET:g}", r["eval_target_met"], f"{r['eval_s']:.2f} s"))
    path = save("method_costs", setup, figures, targets={"step_x_clip_ft": STEP_TARGET, "outside_share": OUTSIDE_TARGET,
                                                         "eval_x_clip_ft": EVAL_TARGET}, methods=rows)
    print(f"{setup}\n")
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(f"| method | step ms | x {BASELINE} (target <= {STEP_TARGET:g}) | data | bookkeeping | outside the model (target < {OUTSIDE_TARGET:.0%}) "
          f"| test evaluation s | x {BASELINE} (target <= {EVAL_TARGET:g}) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['step_ms']:.0f} | {r['x_clip_ft']:.2f} {met(r['step_target_met'])} | {r['data_share']:.1%} | "
              f"{r['bookkeeping_share']:.1%} | {r['outside_share']:.1%} {met(r['outside_target_met'])} | {r['eval_s']:.2f} | "
              f"{r['eval_x_clip_ft']:.1f} {met(r['eval_target_met'])} |")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
