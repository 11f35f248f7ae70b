"""PMPGuard's training and evaluation throughput against clip-ft, as ratios measured in one run.

    python benchmarks/pmpguard_speed.py                    # tiny-b32, batch 64, prints a Markdown table
    python benchmarks/pmpguard_speed.py --threads 1 --rounds 5

Three methods train on the built-in synthetic dataset (noise-free; data written to a temporary
folder unless --data-root is given) with the harness's training step (the method's loss, fused
AdamW, gradient clipping, fp32 on the CPU) and then score the synthetic val split as the evaluator
does (every caption against every image, chunks of 1,024 captions, encoding excluded):

- ``clip-ft``: the baseline (cosine of the global embeddings);
- ``pmpguard``: today's scorer (:meth:`PmpGuard.grid`: texts in length order, one affinity
  product per block, batched gate products per side, PNAA rearranged, scratch buffers reused);
- ``pmpguard (straightforward)``: the same method with the scorer it replaced, kept here as the
  reference: :meth:`PmpGuard.pair` broadcast over [texts, 1] x [1, images] blocks of at most 2**24
  elements, the mined pairs gathered by advanced indexing, the text tower run over all 77
  positions.

The methods are timed in turns, --steps steps (or one scoring pass) each per round, so that load
from other processes hits all of them alike; a method's throughput is its best round. Before
timing, one batch checks that the optimised grid gives the straightforward scores and word maxima,
and that the training loss and its gradients match.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import types

import torch
from step_runner import StepRunner  # benchmarks/, on sys.path when a script here runs

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.config import parse_assignments
from rsnc_bench.data.datasets import DATASETS, get_dataset
from rsnc_bench.engine.batches import split_tensors
from rsnc_bench.engine.evaluate import encode_split
from rsnc_bench.engine.scoring import EncodedSplit
from rsnc_bench.methods import METHODS, Method

BASELINE = "clip-ft"
REFERENCE = "pmpguard (straightforward)"
REFERENCE_BLOCK_ELEMENTS = 2**24


def reference_grid(self, words, regions, want=("score",)):
    """The scorer before the optimisation: PNAA over broadcast CGA, [Ct, 1] texts x [1, Ci] images."""
    (m, d), n = words.tokens.shape[1:], regions.tokens.shape[1]
    pairs = max(1, REFERENCE_BLOCK_ELEMENTS // (max(m, n) * max(d, n)))
    n_t, n_i = len(words.tokens), len(regions.tokens)
    image_block = min(n_i, pairs)
    text_block = max(1, pairs // image_block)
    rows = []
    with torch.no_grad():
        for t in range(0, n_t, text_block):
            w = words.map(lambda x: x[t: t + text_block].unsqueeze(1))
            cols = [self.pair(w, regions.map(lambda x: x[i: i + image_block].unsqueeze(0)))[0] for i in range(0, n_i, image_block)]
            rows.append({name: torch.cat([getattr(c, name) for c in cols], dim=1) for name in want})
    return {name: torch.cat([r[name] for r in rows]) for name in want}


def reference_pairs(self, words, regions, text_idx, image_idx):
    return self.pair(words.map(lambda x: x[text_idx]), regions.map(lambda x: x[image_idx]))


class Runner(StepRunner):
    """A training StepRunner that also scores the val split; REFERENCE runs the replaced scorer."""

    def __init__(self, name: str, backbone: str, train, val, batch_size: int, seed: int = 0):
        torch.manual_seed(seed)
        cls = METHODS.get(name.split()[0])
        method: Method = cls(build_backbone(BackboneConfig(backbone)), cls.config_type())
        if name == REFERENCE:
            method.grid = types.MethodType(reference_grid, method)
            method.pairs = types.MethodType(reference_pairs, method)
            method.backbone.causal_text = lambda: False  # the text tower at every position, as before
        super().__init__(name, method, train, batch_size, 2.0, seed=seed)
        self.val = split_tensors(val, method.backbone, None)
        self.features = None

    def score_seconds(self) -> tuple[float, int]:
        """One scoring pass over the val split as the evaluator makes it; (seconds, pairs)."""
        self.method.eval()
        try:
            if self.features is None:
                self.features = encode_split(self.method, self.val, torch.device("cpu"))
            texts, images = self.features
            start = time.perf_counter()
            for _ in EncodedSplit(self.method, texts, images, 1024).blocks():
                pass
            return time.perf_counter() - start, len(texts.embedding) * len(images.embedding)
        finally:
            self.method.train()


def check(fast: Runner, slow: Runner) -> str:
    """The optimised grid and training loss against the straightforward ones, on one batch."""
    slow.method.load_state_dict(fast.method.state_dict())
    batch = fast.batch(0)
    worst = {}
    with torch.no_grad():
        texts = fast.method.backbone.encode_text(batch.text, tokens=True)
        images = fast.method.backbone.encode_image(batch.images, tokens=True)
        words, regions = fast.method.parts(texts, images)
        for boundary in (0.0, 0.3):  # t = 0 (the start) and a t that splits the similarities
            fast.method.estimate.value = slow.method.estimate.value = boundary
            a = fast.method.grid(words, regions, ("score", "word_max"))
            b = slow.method.grid(words, regions, ("score", "word_max"))
            real = words.mask.unsqueeze(1).expand_as(b["word_max"])
            worst[boundary] = max(float((a["score"] - b["score"]).abs().max()), float((a["word_max"] - b["word_max"])[real].abs().max()))
    fast.method.estimate.value = slow.method.estimate.value = 0.0
    params = [(p, q) for p, q in zip(fast.method.parameters(), slow.method.parameters()) if p.requires_grad]
    fast_loss = fast.method.training_loss(batch).loss
    slow_loss = slow.method.training_loss(batch).loss
    fast_grads = torch.autograd.grad(fast_loss, [p for p, _ in params], allow_unused=True)
    slow_grads = torch.autograd.grad(slow_loss, [q for _, q in params], allow_unused=True)
    grad = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
               for a, b in zip(fast_grads, slow_grads) if a is not None and b is not None)
    same_loss = math.isclose(fast_loss.item(), slow_loss.item(), rel_tol=1e-5)
    assert max(worst.values()) < 1e-5 and same_loss and grad < 1e-4, (worst, fast_loss, slow_loss, grad)
    return (f"check on one batch of {len(batch.rows)}: grid scores and word maxima within {max(worst.values()):.1e} of the "
            f"straightforward ones (t = 0 and 0.3); loss {fast_loss.item():.6f} vs {slow_loss.item():.6f}; largest gradient "
            f"difference {grad:.1e} of the parameter's largest gradient")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-b32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=200, help="synthetic train images (5 captions each)")
    parser.add_argument("--n-val", type=int, default=100, help="synthetic val images scored (5 captions each)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--no-reference", action="store_true", help="skip the straightforward scorer (and the check)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    options = [f"n_train={args.n_train}", f"n_val={args.n_val}"]
    dataset = get_dataset("synthetic", **parse_assignments(DATASETS.get("synthetic").Options, options))
    data = dataset.load(args.data_root or tempfile.mkdtemp(prefix="rsnc-pmpguard-speed-"))
    names = [BASELINE, "pmpguard"] + ([] if args.no_reference else [REFERENCE])
    runners = {name: Runner(name, args.backbone, data["train"], data["val"], args.batch_size) for name in names}
    notes = [] if args.no_reference else [check(runners["pmpguard"], runners[REFERENCE])]
    for runner in runners.values():  # warm-up: first-touch allocations, thread pools, the val features
        runner.seconds(1)
        runner.score_seconds()
    train: dict[str, list[float]] = {name: [] for name in names}
    score: dict[str, list[float]] = {name: [] for name in names}
    pairs = 0
    for _ in range(args.rounds):
        for name, runner in runners.items():
            train[name].append(runner.seconds(args.steps) / args.steps)
            seconds, pairs = runner.score_seconds()
            score[name].append(seconds)

    rate = {name: args.batch_size / min(t) for name, t in train.items()}
    speed = {name: pairs / min(t) for name, t in score.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.backbone}, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps per method (best round; median in brackets); "
          f"scoring: synthetic val, {pairs:,} caption-image pairs\n")
    print(f"| method | train samples/s | step ms | train vs {BASELINE} | eval pairs/s | scoring s | eval vs {BASELINE} |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        step_ms, median_ms = min(train[name]) * 1000, statistics.median(train[name]) * 1000
        print(f"| {name} | {rate[name]:.0f} | {step_ms:.0f} ({median_ms:.0f}) | {rate[name] / rate[BASELINE]:.3f} | "
              f"{speed[name]:,.0f} | {min(score[name]):.3f} ({statistics.median(score[name]):.3f}) | {speed[name] / speed[BASELINE]:.2e} |")
    if REFERENCE in runners:
        print(f"\npmpguard against the straightforward scorer: training {rate['pmpguard'] / rate[REFERENCE]:.2f}x, "
              f"evaluation scoring {speed['pmpguard'] / speed[REFERENCE]:.2f}x")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
