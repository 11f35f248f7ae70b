"""Training throughput of ebaker, iebaker and rrsitr against clip-ft, as ratios measured in one run.

    python benchmarks/ebaker_speed.py                      # tiny-b32, batch 100, prints a Markdown table
    python benchmarks/ebaker_speed.py --threads 1 --rounds 5
    python benchmarks/ebaker_speed.py --methods rrsitr,ebaker,ebaker:ker_weight=0,ebaker:ker_vocab=labels
    python benchmarks/ebaker_speed.py --methods ebaker,iebaker --batch-size 64 --threads 1 --clock cpu

Each method trains on the built-in synthetic dataset (noise-free; data written to a temporary
folder unless --data-root is given) with the harness's training step: the method's loss, AdamW
(fused), gradient clipping at 50, fp32 on the CPU. The methods are timed in turns, --steps steps
each per round, so that load from other processes hits all of them alike; a method's throughput
is its best round. ``--clock cpu`` times the process's CPU seconds instead of wall time: with
``--threads 1`` on a machine shared with other jobs, that is the step's own work, unaffected by
the scheduler handing the core to someone else (their use of caches and memory still shows).
The table gives samples/s, the step time's ratio to clip-ft's, and the arithmetic of one step
(loss and backward): the floating-point operations of its matrix products, convolutions and
attention, counted by ``torch.utils.flop_counter`` on one batch, and their ratio to clip-ft's.
A time ratio below the arithmetic ratio means the larger step runs its products more efficiently
than clip-ft's small ones; no exact rewrite can take a step below what its arithmetic costs.

Before timing, one batch checks that ebaker's optimised KER loss (the caption and its masked copy
in one text-tower call, the last KER block at the labelled positions only, the fused vocabulary
cross-entropy) equals the straightforward computation: separate text-tower calls, the head at
every position, ``F.cross_entropy`` on the full logits.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from step_runner import StepRunner, make_runner, step_flops  # benchmarks/, on sys.path when a script here runs

from rsnc_bench.config import parse_assignments
from rsnc_bench.data.datasets import DATASETS, get_dataset
from rsnc_bench.engine.batches import Preprocess, make_batch

BASELINE = "clip-ft"


def reference_ker_loss(method, batch) -> torch.Tensor:
    """EBAKER's KER loss the straightforward way (methods.md 4.2), for the equality check."""
    from rsnc_builtin_methods.keywords import IGNORE_LABEL

    head = method.ker
    images = method.backbone.encode_image(batch.images, tokens=True)
    masked = method.backbone.encode_text(method.ker_ids[batch.rows], tokens=True).tokens
    labels = method.ker_labels[batch.rows]
    image = head.ln_pre_i(images.tokens)
    x = head.cross_attn(head.ln_pre_t(masked), image, image, need_weights=False)[0]
    for block in head.blocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
    logits = head.mlm(head.ln_post(x))
    labelled = labels != IGNORE_LABEL
    return F.cross_entropy(logits[labelled].float(), labels[labelled])


def check_ker(runner: StepRunner) -> str:
    from rsnc_builtin_methods.keywords import ker_loss

    method = runner.method
    rows, image_ids = runner.batches[0]
    batch = make_batch(runner.train, rows, image_ids, Preprocess(method.backbone, augment=False), torch.device("cpu"))
    texts, masked = method.encode_text_batches(batch.text, method._masked_ids(batch))
    images = method.backbone.encode_image(batch.images, tokens=True)
    fast = ker_loss(method.ker, masked.tokens, images.tokens, method.ker_labels[batch.rows])
    params = [p for p in method.parameters() if p.requires_grad]
    fast_grads = torch.autograd.grad(fast, params, allow_unused=True)
    slow = reference_ker_loss(method, batch)
    slow_grads = torch.autograd.grad(slow, params, allow_unused=True)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                for a, b in zip(fast_grads, slow_grads) if a is not None and b is not None)
    n_labelled = int((method.ker_labels[batch.rows] != 0).sum())
    assert abs(fast.item() - slow.item()) <= 1e-5 * abs(slow.item()) and worst < 1e-4, (fast.item(), slow.item(), worst)
    return (f"KER loss on one batch ({n_labelled} labelled positions): optimised {fast.item():.6f}, straightforward "
            f"{slow.item():.6f}; largest gradient difference {worst:.1e} of the parameter's largest gradient")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-b32")
    parser.add_argument("--methods", default="rrsitr,ebaker,iebaker",
                        help=f"timed against {BASELINE}; options after colons, e.g. ebaker:ker_vocab=labels")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=200, help="synthetic train images (5 captions each)")
    parser.add_argument("--steps", type=int, default=8, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--no-check", action="store_true", help="skip the KER equality check")
    parser.add_argument("--no-flops", action="store_true", help="skip counting each step's arithmetic")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (with --threads 1: unaffected by other jobs' scheduling)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = get_dataset("synthetic", **parse_assignments(DATASETS.get("synthetic").Options, [f"n_train={args.n_train}"]))
    data = dataset.load(args.data_root or tempfile.mkdtemp(prefix="rsnc-ebaker-speed-"))
    train = data["train"]
    names = [BASELINE] + [m for m in args.methods.split(",") if m and m != BASELINE]
    runners = {name: make_runner(name, args.backbone, train, train.captions, args.batch_size) for name in names}
    kers = [name for name in names if getattr(runners[name].method, "ker", None) is not None]
    notes = [] if args.no_check or not kers else [check_ker(runners[kers[0]])]
    flops = {} if args.no_flops else {name: step_flops(runner) for name, runner in runners.items()}
    for runner in runners.values():  # warm-up: first-touch allocations, thread pools
        runner.seconds(2)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            started = time.process_time()
            wall = runner.seconds(args.steps)
            times[name].append((wall if args.clock == "wall" else time.process_time() - started) / args.steps)

    rate = {name: args.batch_size / min(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.backbone}, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps per method, {args.clock} clock (best round; median in brackets)\n")
    flop_head, flop_rule = (" GFLOP/step | arithmetic x clip-ft |", "---:|---:|") if flops else ("", "")
    print(f"| method | samples/s | step ms | relative to {BASELINE} | step x {BASELINE} |{flop_head}\n|---|---:|---:|---:|---:|{flop_rule}")
    for name in names:
        median = statistics.median(times[name]) * 1000
        arithmetic = f" {flops[name] / 1e9:.2f} | {flops[name] / flops[BASELINE]:.1f} |" if flops else ""
        print(f"| {name} | {rate[name]:.0f} | {min(times[name]) * 1000:.0f} ({median:.0f}) | {rate[name] / rate[BASELINE]:.2f} "
              f"| {rate[BASELINE] / rate[name]:.2f} |{arithmetic}")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
