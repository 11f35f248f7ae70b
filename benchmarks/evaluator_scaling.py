"""How evaluation scales with the test set (issue 18, benchmark 6): time and peak memory of the
chunked grouped-recall evaluator at 1k, 5k, 20k and 50k images with 5 captions each.

    python benchmarks/evaluator_scaling.py                 # prints a Markdown table
    python benchmarks/evaluator_scaling.py --sizes 1000,5000

Each size runs in a fresh process (peak resident memory is a per-process high-water mark): random
unit embeddings (d = 64) are made first, then ``grouped_recall`` scores them block by block
(``cosine_blocks``, 1,024 captions a block). Reported: seconds, nanoseconds per score entry
(targets: time linear in the entries, so ns per entry stays within 2x of the smallest size's),
and the peak memory the evaluation adds over the embeddings (target: flat, within 2x of the
smallest size's, while the full score matrix it never builds grows with the square). Results go
to ``benchmarks/results/evaluator_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from rsnc_bench.engine.retrieval import cosine_blocks, grouped_recall

CAPTIONS_PER_IMAGE, DIM, CHUNK = 5, 64, 1024
RESULTS = Path(__file__).with_name("results") / "evaluator_scaling.json"


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
    base = rows[0]
    for row in rows:
        row["time_linear"] = row["ns_per_entry"] <= 2 * base["ns_per_entry"]
        row["memory_flat"] = row["added_peak_mb"] <= 2 * max(base["added_peak_mb"], 1.0)
    RESULTS.parent.mkdir(exist_ok=True)
    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "dim": DIM, "chunk": CHUNK}
    RESULTS.write_text(json.dumps({"setup": setup, "sizes": rows}, indent=2) + "\n")
    print(f"{setup}\n")
    print("| images x captions | score entries | seconds | ns / entry (linear: <= 2x the first) | peak added MB (flat: <= 2x the first) | full matrix MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']:,} x {r['captions']:,} | {r['entries']:.2e} | {r['seconds']:.1f} | {r['ns_per_entry']:.2f} "
              f"{'met' if r['time_linear'] else 'MISSED'} | {r['added_peak_mb']:.0f} {'met' if r['memory_flat'] else 'MISSED'} | {r['full_matrix_mb']:,.0f} |")
    print(f"\nwritten: {RESULTS}")


if __name__ == "__main__":
    main()
