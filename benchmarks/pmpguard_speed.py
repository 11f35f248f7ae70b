"""PMPGuard's training and evaluation throughput against clip-ft, as ratios measured in one run.

    python benchmarks/pmpguard_speed.py                    # tiny-b32, batch 64, prints a Markdown table
    python benchmarks/pmpguard_speed.py --threads 1 --rounds 5
    python benchmarks/pmpguard_speed.py --eval-split --threads 1   # issue 18, benchmark 4 (see below)

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

``--eval-split`` (issue 18, benchmark 4) instead measures a whole test evaluation, as ``evaluate``
makes it (encoding, every caption against every image in chunks of 1,024 captions, the grouped
recalls), of ``pmpguard`` (its full pair-wise scorer) against ``clip-ft`` on the RSICD test split:
1,093 images and 5,465 captions, the real ones from ``--rsicd-root`` (the shared RSICD subset holds
the whole test split), random weights of the preset architecture (``--backbone``, the CPU run's
tiny-b32 by default). First an equality check: on 24 captions against every image, the grid
against the straightforward pair-wise scorer (:meth:`PmpGuard.pair` broadcast), in fp64 where they
must agree to 1e-9 (fp32 differences are reported: a similarity within rounding of the boundary t
can fall on either side of it, a jump of the method's own). Then clip-ft's evaluation
``--rounds`` times, PMPGuard's once, clip-ft's again: the ratio is PMPGuard's time over clip-ft's
best. ``--fraction f`` scores only the first share f of the caption chunks and extrapolates the
scoring time by their distinct captions (each is scored once), saying so. The report ends with the
floor the pair-wise products alone set at this core's best sgemm rate.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from step_runner import StepRunner  # benchmarks/, on sys.path when a script here runs

from rsnc_bench.backbones import BackboneConfig, Features, build_backbone
from rsnc_bench.config import parse_assignments
from rsnc_bench.data.datasets import DATASETS, get_dataset, load_dataset
from rsnc_bench.engine.batches import Preprocess, SplitTensors, split_tensors
from rsnc_bench.engine.evaluate import encode_split
from rsnc_bench.engine.retrieval import grouped_recall
from rsnc_bench.engine.scoring import EncodedSplit
from rsnc_bench.methods import METHODS, Method
from rsnc_builtin_methods import pmpguard as pmp

BASELINE = "clip-ft"
REFERENCE = "pmpguard (straightforward)"
REFERENCE_BLOCK_ELEMENTS = 2**24
RSICD_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsicd-subset"  # ../shared/data/rsicd-subset
EVAL_CHUNK = 1024  # captions per scored block, as evaluate's default
EVAL_TARGET = 20.0  # PMPGuard's evaluation within 20x clip-ft's (issue 18, benchmark 4)
PRODUCTS = 7  # m x n x d products per pair: affinities 1, word side 2, region side 2, PNAA's similarities and context 2


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


# --- issue 18, benchmark 4: the whole test evaluation on the RSICD test split ----------------------
def clocks() -> tuple[float, float]:
    """(wall, this process's CPU) seconds: on a shared machine the CPU time is what other processes' load touches least."""
    return time.perf_counter(), time.process_time()


def evaluation_seconds(method: Method, data: SplitTensors, fraction: float = 1.0) -> dict:
    """One test evaluation as ``evaluate`` makes it with the method's own scorer (encoding, the
    score blocks of EVAL_CHUNK captions, grouped recall), each part's (wall, CPU) seconds. With
    ``fraction`` < 1 only the first chunks are scored and the scoring time is extrapolated by
    distinct captions (the grid scores each distinct caption once); the recall then runs on random
    scores for the rest."""
    method.eval()
    distinct = [len(torch.unique(data.text[i: i + EVAL_CHUNK], dim=0)) for i in range(0, data.n_rows, EVAL_CHUNK)]
    chunks = len(distinct)
    scored = chunks if fraction >= 1 else max(1, math.ceil(fraction * chunks))
    marks = [clocks()]
    texts, images = encode_split(method, data, torch.device("cpu"))
    marks.append(clocks())
    split = EncodedSplit(method, texts, images, EVAL_CHUNK)  # both methods have one scorer, their own
    blocks = list(itertools.islice(iter(method.scorers()[0](split)), scored))
    marks.append(clocks())
    blocks += [torch.rand(min(EVAL_CHUNK, data.n_rows - i), len(data.images)) for i in range(scored * EVAL_CHUNK, data.n_rows, EVAL_CHUNK)]
    marks.append(clocks())
    grouped_recall(iter(blocks), data.img_of.numpy(), chunk=EVAL_CHUNK)
    marks.append(clocks())
    part = lambda k: tuple(b - a for a, b in zip(marks[k], marks[k + 1]))  # noqa: E731
    factor = sum(distinct) / sum(distinct[:scored])
    out = {"encode": part(0), "score": tuple(factor * x for x in part(1)), "recall": part(3)}
    out["total"] = tuple(sum(times) for times in zip(*out.values()))
    return out | {"scored_chunks": scored, "chunks": chunks, "distinct_captions": sum(distinct)}


def check_split(method: Method, data: SplitTensors, rows: int = 24) -> str:
    """The grid against the straightforward pair-wise scorer on the first ``rows`` captions and
    every image of the split: fp64 within 1e-9 (asserted), fp32 differences reported."""
    method.eval()
    with torch.no_grad():
        texts = method.backbone.encode_text(data.text[:rows], tokens=True)
        images = method.backbone.encode_image(preprocessed(method, data.images), tokens=True)
    notes, pairs = [], 2 * rows * len(data.images)
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(method).to(dtype)
        cast = lambda f: Features(*(None if x is None else x.to(dtype) if x.is_floating_point() else x for x in (f.embedding, f.tokens, f.mask)))  # noqa: E731
        with torch.no_grad():
            words, regions = m.parts(cast(texts), cast(images))
            worst, flips = 0.0, 0
            for boundary in (0.0, 0.3):  # t = 0 (the untrained estimate) and a t that splits the similarities
                m.estimate.safe = boundary
                fast, slow = m.grid(words, regions, ("score", "word_max")), reference_grid(m, words, regions, ("score", "word_max"))
                real = words.mask.unsqueeze(1).expand_as(slow["word_max"])
                diff = (fast["score"] - slow["score"]).abs()
                worst = max(worst, float(diff.max()), float((fast["word_max"] - slow["word_max"])[real].abs().max()))
                flips += int((diff > 1e-5).sum())
        if dtype == torch.float64:
            assert worst < 1e-9, f"fp64 grid differs from the straightforward scorer by {worst:.1e}"
            notes.append(f"fp64 scores and word maxima within {worst:.1e}")
        else:
            notes.append(f"fp32 within {worst:.1e} ({flips} of {pairs:,} pair scores beyond 1e-5: similarities at t within rounding)")
    return (f"check: grid vs the straightforward pair-wise scorer, {rows} captions x {len(data.images):,} images, t = 0 and 0.3: "
            + "; ".join(notes))


def preprocessed(method: Method, images: torch.Tensor) -> torch.Tensor:
    return Preprocess(method.backbone, augment=False)(images, torch.device("cpu"))


def product_macs(method: Method, data: SplitTensors) -> float:
    """Multiply-adds of the PRODUCTS m x n x d products over the split as the grid blocks it: per
    chunk its distinct captions, in length order, blocks of GRID_TEXT_BLOCK cut to their longest."""
    lengths = (data.text != 0).sum(1)  # the token mask's real positions: SOT, words, EOT
    with torch.no_grad():
        images = method.backbone.encode_image(preprocessed(method, data.images[:1]), tokens=True)
    n, d = images.tokens.shape[1:]
    words = 0
    for i in range(0, data.n_rows, EVAL_CHUNK):
        ids = data.text[i: i + EVAL_CHUNK]
        distinct, first = torch.unique(ids, dim=0, return_inverse=True)
        chunk_lengths = torch.zeros(len(distinct), dtype=torch.long).scatter_(0, first, lengths[i: i + EVAL_CHUNK]).sort().values
        blocks = chunk_lengths.split(pmp.GRID_TEXT_BLOCK)
        words += sum(len(b) * int(b.max()) for b in blocks)
    return float(PRODUCTS * words * len(data.images) * n * d)


def sgemm_rate(size: int = 1024, repeats: int = 10) -> float:
    """This core's best fp32 matrix product rate, FLOP/s, on a size^3 product (best of ``repeats``, CPU time)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = math.inf
    for _ in range(repeats + 1):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * size**3 / best


def eval_split(args) -> None:
    root = Path(args.rsicd_root)
    if not (root / "dataset_rsicd.json").exists():
        raise SystemExit(f"--eval-split needs the RSICD test split: no dataset_rsicd.json under {root} (--rsicd-root)")
    test = load_dataset("rsicd", root)["test"]
    methods = {}
    for name in (BASELINE, "pmpguard"):
        torch.manual_seed(0)
        cls = METHODS.get(name)
        methods[name] = cls(build_backbone(BackboneConfig(args.backbone)), cls.config_type()).eval()
    data = split_tensors(test, methods["pmpguard"].backbone)
    pairs = data.n_rows * len(data.images)
    note = check_split(methods["pmpguard"], data)
    print(note, flush=True)
    evaluation_seconds(methods[BASELINE], data)  # warm-up
    baseline = [evaluation_seconds(methods[BASELINE], data)["total"] for _ in range(args.rounds)]
    ours = evaluation_seconds(methods["pmpguard"], data, args.fraction)
    baseline += [evaluation_seconds(methods[BASELINE], data)["total"] for _ in range(args.rounds)]
    best = [min(times) for times in zip(*baseline)]  # clip-ft's best (wall, CPU)
    ratio = [x / b for x, b in zip(ours["total"], best)]
    rate = sgemm_rate()
    floor = 2 * product_macs(methods["pmpguard"], data) / rate
    extrapolated = ours["scored_chunks"] < ours["chunks"]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; {args.backbone} (random weights); RSICD test split: "
          f"{len(data.images):,} images x {data.n_rows:,} captions ({ours['distinct_captions']:,} distinct within the chunks of "
          f"{EVAL_CHUNK:,}), {pairs:,} pairs; clip-ft's best of {len(baseline)} evaluations, {args.rounds} before and after pmpguard's\n")
    print(f"| method | evaluation s (CPU s) | encoding s | scoring s | recall s | x {BASELINE}: wall (CPU), target <= {EVAL_TARGET:g} |\n"
          "|---|---:|---:|---:|---:|---:|")
    median = statistics.median(t[0] for t in baseline)
    print(f"| {BASELINE} | {best[0]:.2f} ({best[1]:.2f}); median {median:.2f} s | | | | 1 |")
    print(f"| pmpguard | {ours['total'][0]:.1f} ({ours['total'][1]:.1f}) | {ours['encode'][0]:.2f} | {ours['score'][0]:.1f}"
          f"{' *' if extrapolated else ''} | {ours['recall'][0]:.2f} | **{ratio[0]:.0f}** ({ratio[1]:.0f}): "
          f"{'met' if max(ratio) <= EVAL_TARGET else 'missed'} |")
    if extrapolated:
        print(f"\n* scored {ours['scored_chunks']} of {ours['chunks']} caption chunks, extrapolated by distinct captions")
    print(f"\npmpguard scoring: {pairs / ours['score'][0]:,.0f} pairs/s, {ours['distinct_captions'] * len(data.images) / ours['score'][0]:,.0f} "
          f"distinct-caption pairs/s (CPU time: {ours['distinct_captions'] * len(data.images) / ours['score'][1]:,.0f})")
    print(f"floor: the {PRODUCTS} pair-wise m x n x d products alone, at this core's best sgemm rate ({rate / 1e9:.0f} GFLOP/s on 1024^3), "
          f"take {floor:.1f} s, {floor / best[0]:.1f}x clip-ft's evaluation")


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
    parser.add_argument("--eval-split", action="store_true", help="the whole test evaluation against clip-ft's on RSICD's test split")
    parser.add_argument("--rsicd-root", default=str(RSICD_ROOT), help="with --eval-split: the RSICD files (dataset_rsicd.json)")
    parser.add_argument("--fraction", type=float, default=1.0, help="with --eval-split: score this share of the caption chunks, extrapolate")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_split:
        return eval_split(args)

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
