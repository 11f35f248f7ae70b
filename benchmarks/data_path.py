"""The data path at RSICD size and the work a grid reuses (issue 18: "The data path", benchmark 5).

    python benchmarks/data_path.py            # the RSICD subset in ../shared/data; about 5 minutes on 2 cores
    python benchmarks/data_path.py --quick    # one epoch fewer, and three noise rates for the zeroshot grid

Every figure comes from real cells (``run_cell``) on the RSICD subset (1,966 train images at
224 px, the 1,093-image test split) with ``clip-ft`` on ``tiny-b32`` (random init, batch 64), one
torch thread as a grid worker runs, so the measured shares are those of the CPU preset's step:

- **Data share of a step** (target < 10 %): the seconds the training step waits for its batch
  (the trainer's ``data_seconds``), over the epoch's seconds, in the last epoch: for the default
  path (a background worker building batches two ahead, images in memory), for the same with the
  images read from the memory-mapped cache (``images=disk``, the path for datasets larger than
  memory), and for batches built inline on the step's thread (``prefetch=0``, the path before).
- **Second epoch's data time over the first's** (target < 20 %): the first pass decodes every
  image into the cache (``cache_images``, timed) and waits for its batches; the second only waits.
  Measured on the ``images=disk`` run, whose first epoch also reads the cache file from disk.
- **Encodings per split in a zeroshot grid over five noise rates** (target: 1): ``encode_split``
  calls counted over the grid's cells, per split (val and test); the grid's time against the same
  cells with the embedding cache switched off (context).

Results go to ``benchmarks/results/data_path.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from figures import Figure, save, table  # benchmarks/, on sys.path when a script here runs

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.engine import evaluate as evaluate_module
from rsnc_bench.engine.cell import CellSpec, cache_images, run_cell
from rsnc_bench.engine.embedding_cache import EmbeddingCache
from rsnc_bench.store import CellKey, ResultStore

RSICD = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsicd-subset"
BACKBONE = "tiny-b32"
SHARE_TARGET, SECOND_EPOCH_TARGET = 0.10, 0.20
PATHS = {"default (prefetch 2, images in memory)": ("images=memory", "prefetch=2"),
         "images read from the memory-mapped cache": ("images=disk", "prefetch=2"),
         "inline batches (prefetch 0, the path before)": ("images=memory", "prefetch=0")}


def image_size() -> int:
    return build_backbone(BackboneConfig(BACKBONE)).image_size


def spec(method: str, rate: float, epochs: int, *train_options: str) -> CellSpec:
    key = CellKey(method, "rsicd", BACKBONE, "shuffle", rate, 42, 3)
    return CellSpec(key, BackboneConfig(BACKBONE), data_root=str(RSICD),
                    train_options=(f"epochs={epochs}", "batch_size=64", *train_options))


def data_shares(epochs: int) -> tuple[list[Figure], dict]:
    figures, details = [], {}
    for label, options in PATHS.items():
        cell = spec("clip-ft", 0.2, epochs, *options)
        store = ResultStore(Path(tempfile.mkdtemp(prefix="rsnc-data-path-")))
        started = time.perf_counter()
        cache_images(cell, store, image_size())
        decode = time.perf_counter() - started
        doc = run_cell(cell, store)
        if doc["status"] != "complete":
            raise SystemExit(f"{label}: the cell failed: {doc.get('error')}")
        history = doc["history"]
        last = history[-1]
        share = last["data_seconds"] / last["seconds"]
        details[label] = {"options": options, "decode_seconds": decode, "epochs": [
            {k: e[k] for k in ("epoch", "seconds", "data_seconds")} for e in history], "samples_per_second": doc["timings"]["samples_per_second"]}
        context = options[1] == "prefetch=0"  # the path before the background worker: no target of its own
        figures.append(Figure("data path", f"data share of a step: {label}", share, "%", "" if context else "< 10 %",
                              None if context else share < SHARE_TARGET,
                              f"{last['data_seconds']:.2f} s of {last['seconds']:.1f} s, epoch {last['epoch']}"
                              + ("; context: the path before the background worker" if context else "")))
        if options[0] == "images=disk":
            first, second = decode + history[0]["data_seconds"], history[1]["data_seconds"]
            figures.append(Figure("5 work reuse", "second epoch's data time over the first's (decode + wait)", second / first, "%", "< 20 %",
                                  second / first < SECOND_EPOCH_TARGET, f"{second:.2f} s against {decode:.1f} s decoding + "
                                  f"{history[0]['data_seconds']:.2f} s"))
    return figures, details


def zeroshot_grid(rates: list[float]) -> tuple[list[Figure], dict]:
    calls = []
    real = evaluate_module.encode_split

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def grid(cached: bool) -> float:
        store = ResultStore(Path(tempfile.mkdtemp(prefix="rsnc-zeroshot-grid-")))
        cache_images(spec("zeroshot", 0.0, 0), store, image_size())
        plain = EmbeddingCache.encoded
        if not cached:
            EmbeddingCache.encoded = lambda self, method, images, text, device, precision, encode: encode()
        started = time.perf_counter()
        try:
            docs = [run_cell(spec("zeroshot", rate, 0), store) for rate in rates]
        finally:
            EmbeddingCache.encoded = plain
        if any(d["status"] != "complete" for d in docs) or len({d["test"]["mr"] for d in docs}) != 1:
            raise SystemExit("the zeroshot cells failed or disagree")
        return time.perf_counter() - started

    evaluate_module.encode_split = counted
    try:
        with_cache = grid(True)
        encodes = len(calls)
        without = grid(False)
    finally:
        evaluate_module.encode_split = real
    per_split = encodes / 2
    return [Figure("5 work reuse", f"encodings per split, zeroshot grid over {len(rates)} noise rates", per_split, "", "= 1", per_split == 1,
                   f"grid {with_cache:.1f} s with the embedding cache, {without:.1f} s without")], \
        {"rates": rates, "encode_calls": encodes, "grid_seconds_cached": with_cache, "grid_seconds_uncached": without}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = {"torch": torch.__version__, "threads": 1, "backbone": BACKBONE, "batch_size": 64, "dataset": str(RSICD)}
    if not (RSICD / "dataset_rsicd.json").exists():
        figures = [Figure("data path", "data share of a step", None, "%", "< 10 %", None, f"no RSICD subset at {RSICD}")]
        print(table(figures) + f"\n\nwritten: {save('data_path', setup, figures)}")
        return
    figures, shares = data_shares(epochs=2 if args.quick else 3)
    grid_figures, grid = zeroshot_grid([0.0, 0.2, 0.4] if args.quick else [0.0, 0.2, 0.4, 0.6, 0.8])
    path = save("data_path", setup, figures + grid_figures, paths=shares, zeroshot_grid=grid)
    print(f"{setup}\n\n{table(figures + grid_figures)}\n\nwritten: {path}")


if __name__ == "__main__":
    main()
