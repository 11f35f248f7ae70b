"""How evaluation scales with the test set (issue 18, benchmark 6): time and peak memory of the
chunked grouped-recall evaluator at 1k, 5k, 20k and 50k images with 5 captions each.

    python benchmarks/evaluator_scaling.py                 # prints a Markdown table
    python benchmarks/evaluator_scaling.py --sizes 1000,5000

Each size runs in a fresh process (peak resident memory is a per-process high-water mark): random
unit embeddings (d = 64) are made first, then ``grouped_recall`` scores them block by block
(``cosine_blocks``: 1,024 captions a block, fewer once the gallery passes 8,192 images, so that a
block stays within ``ENTRY_BUDGET`` entries). Reported: seconds, nanoseconds per score entry, and
the peak memory the evaluation adds over the embeddings. Targets: time linear in the entries (ns
per entry at the largest size within 2x of the smallest's); memory flat (the largest size's added
peak within 2x of the 5k size's, the first whose blocks near the budget; below it a block grows
with the gallery), while the full score matrix it never builds grows with the square. Results go
to ``benchmarks/results/evaluator_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from figures import Figure, save, table  # benchmarks/, on sys.path when a script here runs

from rsnc_bench.engine.retrieval import ENTRY_BUDGET, cosine_blocks, grouped_recall

CAPTIONS_PER_IMAGE, DIM, CHUNK = 5, 64, 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def one(n_images: int) -> dict:
    """Evaluate one size in this process; the embeddings' memory is counted before evaluation starts."""
    g = torch.Generator().manual_seed(n_images)
    images = torch.nn.functional.normalize(torch.randn(n_images, DIM, generator=g), dim=-1)
    img_of = torch.arange(n_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    texts = torch.nn.functional.normalize(images[img_of] + 0.8 * torch.randn(len(img_of), DIM, generator=g), dim=-1)
    before = peak_mb()
    started = time.perf_counter()
    metrics = grouped_recall(cosine_blocks(texts, images, CHUNK), img_of.numpy(), chunk=CHUNK)
    seconds = time.perf_counter() - started
    entries = len(texts) * n_images
    return {"images": n_images, "captions": len(texts), "entries": entries, "seconds": seconds, "ns_per_entry": 1e9 * seconds / entries,
            "added_peak_mb": peak_mb() - before, "full_matrix_mb": entries * 4 / 2**20, "mr": metrics.mr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,20000,50000")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(size)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base, budget_size, largest = rows[0], rows[min(1, len(rows) - 1)], rows[-1]
    linear = largest["ns_per_entry"] / base["ns_per_entry"]
    flat = largest["added_peak_mb"] / max(budget_size["added_peak_mb"], 1.0)
    name = lambda r: f"{r['images']:,} x {r['captions']:,}"  # noqa: E731
    figures = [Figure("6 evaluator scaling", f"ns per score entry, {name(largest)} over {name(base)}", linear, "x", "<= 2", linear <= 2),
               Figure("6 evaluator scaling", f"added peak memory, {name(largest)} over {name(budget_size)}", flat, "x", "<= 2", flat <= 2,
                      f"{largest['added_peak_mb']:.0f} MB against a {largest['full_matrix_mb']:,.0f} MB full matrix")]
    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "dim": DIM, "chunk": CHUNK, "entry_budget": ENTRY_BUDGET}
    path = save("evaluator_scaling", setup, figures, sizes=rows)
    print(f"{setup}\n")
    print("| images x captions | score entries | seconds | ns / entry | peak added MB | full matrix MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {name(r)} | {r['entries']:.2e} | {r['seconds']:.1f} | {r['ns_per_entry']:.2f} | {r['added_peak_mb']:.0f} | {r['full_matrix_mb']:,.0f} |")
    print(f"\n{table(figures)}\n\nwritten: {path}")


if __name__ == "__main__":
    main()
