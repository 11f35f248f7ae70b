"""Evaluator speed and memory, as ratios measured in one run.

    python benchmarks/evaluator_speed.py            # prints a Markdown table

1. RSICD test size (1,093 images x 5,465 captions): the chunked evaluator against a naive one
   that materialises the full matrix and fully sorts it both ways (what most research code
   does), same numbers required.
2. 5,000 images x 25,000 captions from embeddings, scored block by block: peak resident memory
   added by the evaluation against the size of the full score matrix it never builds.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

from rsnc_bench.engine.retrieval import KS, RetrievalMetrics, cosine_blocks, grouped_recall


def naive(scores: torch.Tensor, img_of: torch.Tensor) -> RetrievalMetrics:
    """Full stable sorts of the whole matrix in both directions."""
    n_img = scores.shape[1]
    t2i_rank = (torch.argsort(scores, dim=1, descending=True, stable=True) == img_of[:, None]).float().argmax(1)
    order = torch.argsort(scores, dim=0, descending=True, stable=True)  # texts per image column
    own = img_of[order] == torch.arange(n_img)[None, :]
    i2t = [own[:k].any(0).double().mean().item() * 100 for k in KS]
    t2i = [(t2i_rank < k).double().mean().item() * 100 for k in KS]
    return RetrievalMetrics(*i2t, *t2i)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    torch.manual_seed(0)
    rows = []
    # 2 first, so that its peak RSS is not hidden by the larger allocations of 1
    n_img, n_txt, dim = 5000, 25000, 512
    text, image = torch.randn(n_txt, dim), torch.randn(n_img, dim)
    img_of = np.repeat(np.arange(n_img), 5)
    before = peak_rss_mb()
    seconds, _ = timed(lambda: grouped_recall(cosine_blocks(text, image, chunk=1024), img_of), repeat=1)
    added = peak_rss_mb() - before
    full_mb = n_img * n_txt * 4 / 2**20
    rows.append(("5,000 x 25,000 from embeddings, 1,024-row blocks", f"{seconds:.2f} s",
                 f"peak RSS +{added:.0f} MB vs {full_mb:.0f} MB full matrix (ratio {added / full_mb:.2f})"))

    n_img, n_txt = 1093, 5465
    scores = torch.randn(n_txt, n_img)
    img_of = torch.arange(n_img).repeat_interleave(5)
    ours_s, ours = timed(lambda: grouped_recall(scores, img_of.numpy()))
    naive_s, reference = timed(lambda: naive(scores, img_of))
    assert ours.as_dict() == reference.as_dict(), (ours, reference)
    rows.append(("1,093 x 5,465 score matrix (RSICD test)", f"{ours_s * 1000:.0f} ms",
                 f"naive full sort {naive_s * 1000:.0f} ms (ours {naive_s / ours_s:.1f}x faster, same numbers)"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| case | time | comparison |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
