"""Benchmarks 3 and 4 on a GPU (issue 18, "On a GPU"): ViT-B-32 (random init) with bf16 autocast.

    python benchmarks/gpu_step.py                        # every trained method, batch 128, on cuda
    python benchmarks/gpu_step.py --quick                # clip-ft, rrsitr and pmpguard only, fewer steps
    python benchmarks/gpu_step.py --device cpu --backbone tiny-b32 --quick --n-test 100   # a smoke test on a CPU

On a machine without CUDA it writes its figures as "not measured" and says so. Otherwise each
method trains with the harness's step (``StepRunner``: batches built two ahead by a background
worker, crops on the GPU, the method's loss under bf16 autocast, fused AdamW), taking turns in
rounds, on a synthetic split of native 256-px images. Reported:

- clip-ft's samples per second, and the fraction of the GPU's dense bf16 peak its step reaches
  (goal: 40 % or more): the step's floating-point operations are counted once with torch's
  ``FlopCounterMode`` (forward and backward), divided by the step's time and by the peak
  (``--peak-tflops``, else looked up from the device's name in ``PEAK_BF16_TFLOPS``);
- every method's step over clip-ft's (target <= 3) and the share of a step spent waiting for data
  or on bookkeeping (target < 10 %);
- every method's test evaluation over clip-ft's on a 1,093-image x 5,465-caption split, the RSICD
  test size (target <= 20).

Results go to ``benchmarks/results/gpu_step.json``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from figures import Figure, save, table  # benchmarks/, on sys.path when a script here runs
from method_costs import BASELINE, EVAL_TARGET, OUTSIDE_TARGET, STEP_TARGET, eval_seconds, trained_methods
from step_runner import make_runner, step_flops

from rsnc_bench.config import parse_assignments
from rsnc_bench.data.datasets import DATASETS, get_dataset

MFU_GOAL = 0.40
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}  # dense


def peak_tflops(device: torch.device, given: float) -> float | None:
    if given:
        return given
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def synced_seconds(runner, steps: int) -> float:
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return runner.seconds(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak (default: from its name)")
    parser.add_argument("--n-test", type=int, default=1093, help="test images (5 captions each); 1,093: RSICD's test split")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    setup = {"torch": torch.__version__, "backbone": args.backbone, "batch_size": args.batch_size, "precision": args.precision}
    if device.type == "cuda" and not torch.cuda.is_available():
        figures = [Figure("2-4 on a GPU", "clip-ft samples per second, fraction of bf16 peak, step and evaluation ratios", None, "", "", None,
                          "no CUDA device in this session; run it where there is one")]
        print(table(figures) + f"\n\nwritten: {save('gpu_step', setup, figures)}")
        return
    steps, rounds = (4, 2) if args.quick else (args.steps, args.rounds)
    names = [BASELINE, "rrsitr", "pmpguard"] if args.quick else trained_methods()
    options = [f"n_train={max(200, args.batch_size * 4)}", f"n_test={args.n_test}", "image_size=256"]
    dataset = get_dataset("synthetic", **parse_assignments(DATASETS.get("synthetic").Options, options))
    data = dataset.load(tempfile.mkdtemp(prefix="rsnc-gpu-step-"))
    runners = {}
    for name in names:
        runners[name] = runner = make_runner(name, args.backbone, data["train"], data["train"].captions, args.batch_size,
                                             device=args.device, precision=args.precision)
        runner.prefetch(2)
        runner.seconds(2)  # warm-up: kernels, allocator, autotuning
    flops = step_flops(runners[BASELINE])
    for runner in runners.values():
        runner.times = dict.fromkeys(runner.times, 0.0)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, runner in runners.items():
            best[name] = min(best.get(name, float("inf")), synced_seconds(runner, steps) / steps)
    evaluation = {name: eval_seconds(runner.method, data["test"], rounds, device) for name, runner in runners.items()}
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops / best[BASELINE] / 1e12
    setup.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", peak_bf16_tflops=peak,
                 step_gflop=flops / 1e9, steps=steps, rounds=rounds)
    figures = [Figure("2-4 on a GPU", f"{BASELINE} samples per second", args.batch_size / best[BASELINE], "/s", "", None,
                      f"{1000 * best[BASELINE]:.1f} ms a step of {flops / 1e9:.0f} GFLOP"),
               Figure("2-4 on a GPU", f"{BASELINE} step: fraction of the bf16 peak", None if peak is None else achieved / peak, "%",
                      f">= {MFU_GOAL:.0%}", None if peak is None else achieved / peak >= MFU_GOAL,
                      f"{achieved:.3g} TFLOP/s" + ("" if peak else "; unknown peak: give --peak-tflops"))]
    for name, runner in runners.items():
        total = sum(runner.times.values())
        outside = (runner.times["data"] + runner.times["bookkeeping"]) / total
        figures.append(Figure("2-4 on a GPU", f"{name}: data wait and bookkeeping share of a step", outside, "%", f"< {OUTSIDE_TARGET:.0%}",
                              outside < OUTSIDE_TARGET, f"data {runner.times['data'] / total:.1%}"))
        if name != BASELINE:
            ratio, eval_ratio = best[name] / best[BASELINE], evaluation[name] / evaluation[BASELINE]
            figures.append(Figure("2-4 on a GPU", f"{name} step over {BASELINE}'s", ratio, "x", f"<= {STEP_TARGET:g}", ratio <= STEP_TARGET,
                                  f"{1000 * best[name]:.1f} ms"))
            figures.append(Figure("2-4 on a GPU", f"{name} test evaluation over {BASELINE}'s ({args.n_test:,} x {5 * args.n_test:,})", eval_ratio, "x",
                                  f"<= {EVAL_TARGET:g}", eval_ratio <= EVAL_TARGET, f"{evaluation[name]:.2f} s"))
    path = save("gpu_step", setup, figures, step_ms={n: 1000 * t for n, t in best.items()}, eval_s=evaluation)
    print(f"{setup}\n\n{table(figures)}\n\nwritten: {path}")


if __name__ == "__main__":
    main()
