"""The harness's evaluator against CLIP_benchmark 1.6.2's retrieval recall (issue 18, benchmark 1).

    python benchmarks/evaluator_vs_clip_benchmark.py            # 1,093 x 5,465 and 5,000 x 25,000
    python benchmarks/evaluator_vs_clip_benchmark.py --quick    # 1,093 x 5,465 only, fewer rounds

CLIP_benchmark is not a dependency of the harness. Install it without its dependencies (its
metrics module needs only torch and tqdm, which the harness has):

    pip install --no-deps clip_benchmark==1.6.2         # or: pip install -e '.[bench]' (pulls scikit-learn, pycocoevalcap)

Both sides score the same random unit embeddings (d = 64, 5 captions per image, a caption is its
image's embedding plus noise, seeded; continuous values, so no ties: the count of tied top-10
places is checked and recorded) at the RSICD test size (1,093 images x 5,465 captions) and at
5,000 x 25,000:
- ours: ``grouped_recall(cosine_blocks(texts, images, chunk), img_of, chunk=chunk)`` with the
  harness's default chunk of 1,024 caption rows (``--chunk`` to try others);
- CLIP_benchmark: what its ``zeroshot_retrieval.evaluate`` does after encoding: the full
  text x image score matrix, the boolean positive-pair mask, then ``batchify(recall_at_k, ...)``
  for k = 1, 5, 10, over text queries (its ``image_retrieval_recall@k``, our t2i) and over the
  transposed matrix for image queries (its ``text_retrieval_recall@k``, our i2t), a recall > 0
  counting as a hit, in batches of 64 queries (its CLI's default ``--batch_size``, which
  ``evaluate`` reuses for the recall).

Measured per size: parity (the six recalls as hit counts; target: all six equal), the speed
ratio (CLIP_benchmark's seconds over ours, each the best of a few rounds; target >= 10) and the
peak-memory ratio (target >= 10: ours at least 10x less). Each side runs in its own process, the
two alternating, so that peak resident memory (``ru_maxrss``) is its own: the memory figure is
the high-water mark minus the resident size once the embeddings are built, the modules
imported and one small warm-up evaluation run (so that library code paged in on first use is
not counted), as in ``evaluator_scaling.py``. One torch thread by default (``--threads``). The
figures go to ``benchmarks/results/evaluator_vs_clip_benchmark.json``. Without CLIP_benchmark
installed, our side is still timed and the comparison figures are written as not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from figures import Figure, save, table  # benchmarks/, on sys.path when a script here runs

from rsnc_bench.engine.retrieval import DEFAULT_CHUNK, KS, cosine_blocks, grouped_recall

NAME = "evaluator_vs_clip_benchmark"
BENCHMARK = "1 evaluator vs CLIP_benchmark"
CB_VERSION = "1.6.2"
INSTALL = f"pip install --no-deps clip_benchmark=={CB_VERSION}"
CAPTIONS_PER_IMAGE, DIM = 5, 64
CB_BATCH = 64  # clip_benchmark's --batch_size default; its evaluate batches the recall by it
SPEED_TARGET = MEMORY_TARGET = 10.0
RECALLS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def embeddings(n_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit image and caption embeddings (caption = own image + noise) and each caption's image."""
    g = torch.Generator().manual_seed(n_images)
    images = torch.nn.functional.normalize(torch.randn(n_images, DIM, generator=g), dim=-1)
    img_of = torch.arange(n_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    texts = torch.nn.functional.normalize(images[img_of] + 0.8 * torch.randn(len(img_of), DIM, generator=g), dim=-1)
    return texts, images, img_of


def ours(texts: torch.Tensor, images: torch.Tensor, img_of: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    metrics = grouped_recall(cosine_blocks(texts, images, chunk), img_of.numpy(), chunk=chunk)
    return {key: getattr(metrics, key) for key in RECALLS}


def theirs(texts: torch.Tensor, images: torch.Tensor, img_of: torch.Tensor, chunk: int = 0) -> dict[str, float]:
    """clip_benchmark's evaluate from the embeddings on: its score matrix, mask and batched recall_at_k
    (``chunk`` is ours; it has no effect here)."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), img_of] = True
    out = {}
    for k in KS:
        # its "image_retrieval_recall@k": text queries over the image gallery (our t2i);
        # its "text_retrieval_recall@k": image queries over the text gallery (our i2t)
        out[f"t2i_r{k}"] = 100 * (batchify(recall_at_k, scores, positive_pairs, CB_BATCH, "cpu", k=k) > 0).float().mean().item()
        out[f"i2t_r{k}"] = 100 * (batchify(recall_at_k, scores.T, positive_pairs.T, CB_BATCH, "cpu", k=k) > 0).float().mean().item()
    return out


def boundary_ties(texts: torch.Tensor, images: torch.Tensor) -> int:
    """Queries (both directions) with an exact score tie across the k-th place (k = 1, 5, 10), the
    only ties where a tie rule can change a recall: 0 means the comparison has none."""
    at = torch.tensor(KS) - 1  # a tie between sorted places k-1 and k (0-based)
    ties = 0
    for start in range(0, len(texts), 4096):
        top = torch.topk(texts[start: start + 4096] @ images.T, max(KS) + 1, dim=1).values
        ties += int((top[:, at] == top[:, at + 1]).any(1).sum())
    columns = torch.full((max(KS) + 1, len(images)), -float("inf"))
    for start in range(0, len(texts), 4096):
        block = torch.cat([columns, texts[start: start + 4096] @ images.T])
        columns = torch.topk(block, max(KS) + 1, dim=0).values
    return ties + int((columns[at] == columns[at + 1]).any(0).sum())


def one(side: str, n_images: int, rounds: int, threads: int, chunk: int) -> dict:
    """Time ``side`` on one size in this process; memory counted from after the embeddings and imports."""
    torch.set_num_threads(threads)
    if side == "clip_benchmark":
        import clip_benchmark.metrics.zeroshot_retrieval  # noqa: F401  (import before the baseline)
    run = ours if side == "ours" else theirs
    run(*embeddings(50), chunk)  # warm-up: library code paged in and thread pools made before the baseline
    texts, images, img_of = embeddings(n_images)
    before = peak_mb()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        recalls = run(texts, images, img_of, chunk)
        times.append(time.perf_counter() - started)
    added = peak_mb() - before
    row = {"side": side, "images": n_images, "captions": len(texts), "seconds": min(times), "all_seconds": times,
           "added_peak_mb": added, "recalls": recalls}
    if side == "clip_benchmark":
        row["tied_queries"] = boundary_ties(texts, images)
    return row


def hits(recalls: dict[str, float], n_images: int) -> dict[str, int]:
    """Recalls in percent back to hit counts (i2t over images, t2i over captions): float32 and
    float64 means then compare exactly."""
    return {key: round(value / 100 * (n_images if key.startswith("i2t") else n_images * CAPTIONS_PER_IMAGE)) for key, value in recalls.items()}


def run_side(side: str, n_images: int, rounds: int, threads: int, chunk: int) -> dict:
    command = [sys.executable, __file__, "--one", side, "--size", str(n_images), "--rounds", str(rounds), "--threads", str(threads),
               "--chunk", str(chunk)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{side} at {n_images} images failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(n_images: int, ours_rows: list[dict], cb_rows: list[dict]) -> tuple[list[Figure], dict]:
    size = f"{n_images:,} x {n_images * CAPTIONS_PER_IMAGE:,}"
    best = min(ours_rows, key=lambda r: r["seconds"])
    ours_mb = statistics.median(r["added_peak_mb"] for r in ours_rows)  # each side's median process: CLIP_benchmark's varies several-fold
    detail = {"size": size, "ours_seconds": best["seconds"], "ours_added_peak_mb": ours_mb, "ours_recalls": best["recalls"],
              "ours_runs": ours_rows}
    if not cb_rows:
        note = f"CLIP_benchmark not installed: {INSTALL}"
        return [Figure(BENCHMARK, f"{what} at {size}", None, unit, target, None, note)
                for what, unit, target in (("recalls differing (of 6)", "", "0"), ("speed ratio", "x", f">= {SPEED_TARGET:g}"),
                                           ("peak-memory ratio", "x", f">= {MEMORY_TARGET:g}"))], detail
    cb_best = min(cb_rows, key=lambda r: r["seconds"])
    cb_mb = statistics.median(r["added_peak_mb"] for r in cb_rows)  # above its working set, the allocator's fragmentation varies by run
    ours_hits, cb_hits = hits(best["recalls"], n_images), hits(cb_best["recalls"], n_images)
    differing = [key for key in RECALLS if ours_hits[key] != cb_hits[key]]
    speed = cb_best["seconds"] / best["seconds"]
    memory = cb_mb / max(ours_mb, 1.0)
    tied = cb_best["tied_queries"]
    detail.update({"clip_benchmark_seconds": cb_best["seconds"], "clip_benchmark_added_peak_mb": cb_mb,
                   "clip_benchmark_recalls": cb_best["recalls"], "ours_hits": ours_hits, "clip_benchmark_hits": cb_hits,
                   "tied_queries": tied, "clip_benchmark_runs": cb_rows})
    tie_note = f"{tied} queries with a tie across the 1st/5th/10th place"
    paired = ", ".join(f"{c['seconds'] / o['seconds']:.1f}" for o, c in zip(ours_rows, cb_rows))
    timed = f"best of {sum(len(r['all_seconds']) for r in ours_rows)} / {sum(len(r['all_seconds']) for r in cb_rows)} rounds; process pair by pair: {paired}"
    cb_peaks = ", ".join(f"{r['added_peak_mb']:.0f}" for r in cb_rows)
    figures = [
        Figure(BENCHMARK, f"recalls differing (of 6) at {size}", len(differing), "", "0", not differing,
               (f"differ: {', '.join(differing)}; " if differing else "") + f"R@1/5/10 both ways as hit counts; {tie_note}"),
        Figure(BENCHMARK, f"speed ratio at {size}", speed, "x", f">= {SPEED_TARGET:g}", speed >= SPEED_TARGET,
               f"ours {best['seconds']:.3f} s, CLIP_benchmark {cb_best['seconds']:.3f} s ({timed})"),
        Figure(BENCHMARK, f"peak-memory ratio at {size}", memory, "x", f">= {MEMORY_TARGET:g}", memory >= MEMORY_TARGET,
               f"added peak, median process: ours {ours_mb:.0f} MB (of {len(ours_rows)}), CLIP_benchmark {cb_mb:.0f} MB "
               f"(of {cb_peaks})"),
    ]
    return figures, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,093 x 5,465 only, one process per side")
    parser.add_argument("--sizes", default="1093,5000", help="images (5 captions each)")
    parser.add_argument("--passes", type=int, default=2, help="alternating process pairs (ours, CLIP_benchmark) per size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="our evaluator's caption rows per block (the harness's default)")
    parser.add_argument("--one", choices=("ours", "clip_benchmark"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.rounds, args.threads, args.chunk)))
        return
    sizes = [1093] if args.quick else [int(s) for s in args.sizes.split(",")]
    passes = 1 if args.quick else args.passes
    installed = importlib.util.find_spec("clip_benchmark") is not None
    version = None
    if installed:
        from importlib.metadata import version as dist_version

        version = dist_version("clip_benchmark")
    figures, details = [], []
    for n_images in sizes:
        ours_rounds = 5 if n_images <= 2000 else 3
        cb_rounds = 3 if n_images <= 2000 else 1
        ours_rows, cb_rows = [], []
        for _ in range(passes):
            ours_rows.append(run_side("ours", n_images, ours_rounds, args.threads, args.chunk))
            if installed:
                cb_rows.append(run_side("clip_benchmark", n_images, cb_rounds, args.threads, args.chunk))
        size_figures, detail = compare(n_images, ours_rows, cb_rows)
        figures += size_figures
        details.append(detail)
    setup = {"torch": torch.__version__, "threads": args.threads, "clip_benchmark": version, "dim": DIM, "chunk": args.chunk,
             "clip_benchmark_batch": CB_BATCH, "captions_per_image": CAPTIONS_PER_IMAGE, "passes": passes, "quick": args.quick}
    path = save(NAME, setup, figures, sizes=details)
    print(f"{setup}\n")
    print(table(figures))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
