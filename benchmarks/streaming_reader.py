"""RS5M's streaming reader against the in-memory path (issue 19, part 3: "images per second on CPU").

    python benchmarks/streaming_reader.py            # 1,536 images of 256 x 256 JPEG in 6 shards; about a minute on 2 cores
    python benchmarks/streaming_reader.py --quick    # 512 images

Both paths build the same training batches for ``tiny-b32`` (batch 64, one torch thread): uint8
native images with their sizes, the shared pipeline's random resized crop to the model size and
normalisation (``Preprocess``), and token ids.

- **in-memory**: the existing path, ``train_batches`` + ``make_batch`` over a ``SplitTensors`` whose
  images were decoded beforehand (not timed) and captions tokenised once.
- **streamed**: ``ShardStream.rank_samples`` reading the tar shards (stdlib ``tarfile``), through a
  1,000-sample shuffle buffer, decoding each JPEG onto a 256 px canvas, then ``batched``, the
  captions tokenised per batch and the same ``Preprocess``: with decoding in the reading thread,
  and with a pool of decode threads (one per core).

The figures are images per second of the streamed path over the in-memory path's, in one run,
best of three passes each (target: at least half); as context, the reader's uint8 batches alone.
The shards are generated (smooth random fields with noise, 256 x 256, JPEG quality 90, about
32 KB each) under a temporary folder.

Results go to ``benchmarks/results/streaming_reader.json``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from figures import Figure, save, table  # benchmarks/, on sys.path when a script here runs
from PIL import Image

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.data import load_dataset
from rsnc_bench.data.images import SplitImages
from rsnc_bench.data.shards import iter_shard
from rsnc_bench.data.stream import StreamState, batched
from rsnc_bench.engine.batches import Preprocess, SplitTensors, make_batch, train_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.rs5m_shards import write_metafile, write_shard  # noqa: E402  (the tests' writer of the real layout)

BACKBONE, BATCH, SIDE, SHARDS = "tiny-b32", 64, 256, 6
# target: the streamed batch path keeps at least half the in-memory path's rate, decoding inline or in threads
TARGET = 0.5


def scene(i: int) -> bytes:
    """A 256 x 256 JPEG of a smooth random field with fine noise (JPEG sizes like aerial photos')."""
    rng = np.random.RandomState(i)
    coarse = rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(field + rng.randint(-24, 25, field.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write(root: Path, n_train: int, n_val: int = 8) -> None:
    root.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        names = [f"millionaid_{split}_P{i:07d}.jpg" for i in range(n)]
        captions = [f"an aerial view of scene {i} with {i % 7} buildings beside a road" for i in range(n)]
        write_metafile(root / f"rs3_{split}_intermediate.csv", list(zip(names, captions)))
        per, shards = -(-n // SHARDS), SHARDS if split == "train" else 1
        for s in range(shards):
            block = range(s * per, min(n, (s + 1) * per)) if split == "train" else range(n)
            write_shard(root / f"rs3-{split}-{s:04d}.tar", [(f"{s:04d}{i:06d}", scene(i), names[i], captions[i]) for i in block])


def best_of(rounds: int, run) -> tuple[float, list[float]]:
    """(best images per second, every round's)"""
    rates = [run() for _ in range(rounds)]
    return max(rates), rates


def in_memory_rate(data: SplitTensors, preprocess: Preprocess) -> float:
    rows = np.arange(data.n_rows)
    started, n = time.perf_counter(), 0
    for picked, ids in train_batches(data, rows, BATCH, torch.Generator().manual_seed(0)):
        batch = make_batch(data, picked, ids, preprocess, torch.device("cpu"))
        n += len(batch.rows)
    return n / (time.perf_counter() - started)


def streamed_rate(stream, backbone, preprocess: Preprocess, threads: int) -> float:
    started, n = time.perf_counter(), 0
    for batch in batched(stream.rank_samples(StreamState(0), threads=threads), BATCH):
        text = backbone.tokenize(batch.captions)
        images = preprocess(batch.images, torch.device("cpu"), batch.sizes)
        n += len(images)
        assert len(text) == len(images)
    return n / (time.perf_counter() - started)


def raw_memory_rate(data: SplitTensors) -> float:
    """Context: the in-memory path's uint8 batches alone (indexing decoded pixels, no crop)."""
    started, n = time.perf_counter(), 0
    for picked, ids in train_batches(data, np.arange(data.n_rows), BATCH, torch.Generator().manual_seed(0)):
        images, text = data.images[ids], data.text[picked]
        n += len(images) + 0 * len(text)
    return n / (time.perf_counter() - started)


def raw_streamed_rate(stream, threads: int) -> float:
    """Context: the reader's uint8 batches alone (tar reading, shuffle buffer, JPEG decoding, canvas)."""
    started, n = time.perf_counter(), 0
    for batch in batched(stream.rank_samples(StreamState(0), threads=threads), BATCH):
        n += len(batch.images)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, rounds, threads = (512 if args.quick else 1536), 3, os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="rsnc-streaming-"))
    os.environ.setdefault("RSNC_BENCH_CACHE", str(tmp / "cache"))  # the carved val/test images land here
    write(tmp / "rs5m", n)
    shard_bytes = sum(p.stat().st_size for p in (tmp / "rs5m").glob("rs3-train-*.tar"))
    data = load_dataset("rs5m", tmp / "rs5m", options=dict(subsets="rs3", val_rows=4, test_rows=4, canvas=SIDE, shuffle_buffer=1000))
    backbone = build_backbone(BackboneConfig(BACKBONE))
    preprocess = Preprocess(backbone, augment=True, generator=torch.Generator().manual_seed(1))

    # the in-memory path: the same images decoded beforehand (files written from the shards' bytes)
    folder = tmp / "images"
    folder.mkdir()
    for shard in data.train_shards:
        for sample in iter_shard(shard):
            (folder / sample.img_name).write_bytes(sample.image_bytes)
    train = data["train"]
    split = type(train)(train.name, folder, train.images, train.classes, train.captions, train.img_of)
    loader = SplitImages(split, None)
    memory = SplitTensors(loader.stacked(), backbone.tokenize(list(split.captions)), torch.as_tensor(split.img_of), torch.from_numpy(loader.sizes()))

    stream = data.stream(seed=3)
    memory_rate, memory_rounds = best_of(rounds, lambda: in_memory_rate(memory, preprocess))
    inline_rate, inline_rounds = best_of(rounds, lambda: streamed_rate(stream, backbone, preprocess, 0))
    pooled_rate, pooled_rounds = best_of(rounds, lambda: streamed_rate(stream, backbone, preprocess, threads))
    raw_memory, _ = best_of(rounds, lambda: raw_memory_rate(memory))
    raw_inline, _ = best_of(rounds, lambda: raw_streamed_rate(stream, 0))
    raw_pooled, _ = best_of(rounds, lambda: raw_streamed_rate(stream, threads))

    def rounds_note(values):
        return ", ".join(f"{v:.0f}" for v in values)

    figures = [
        Figure("streaming reader", "streamed images/s over the in-memory path's, decoding in the reading thread", inline_rate / memory_rate, "x",
               f">= {TARGET:g}", inline_rate / memory_rate >= TARGET,
               f"{inline_rate:.0f} img/s against {memory_rate:.0f} img/s (rounds: {rounds_note(inline_rounds)} / {rounds_note(memory_rounds)})"),
        Figure("streaming reader", f"streamed images/s over the in-memory path's, {threads} decode threads", pooled_rate / memory_rate, "x",
               f">= {TARGET:g}", pooled_rate / memory_rate >= TARGET,
               f"{pooled_rate:.0f} img/s against {memory_rate:.0f} img/s (rounds: {rounds_note(pooled_rounds)})"),
        Figure("streaming reader", f"reader alone: uint8 batches, no crop ({threads} decode threads / inline)", raw_pooled, "img/s", "", None,
               f"inline {raw_inline:.0f} img/s; the in-memory path's uint8 batches {raw_memory:.0f} img/s (a copy of decoded pixels); "
               f"context: the crop and resize bound both batch paths"),
    ]
    setup = {"torch": torch.__version__, "torch_threads": 1, "decode_threads": threads, "cpus": os.cpu_count(), "backbone": BACKBONE,
             "batch_size": BATCH, "images": n, "image": f"{SIDE} x {SIDE} JPEG q90", "shards": SHARDS,
             "mean_jpeg_bytes": round(shard_bytes / n), "shuffle_buffer": 1000}
    path = save("streaming_reader", setup, figures, images_per_second={"in_memory": memory_rounds, "streamed_inline": inline_rounds,
                                                                       "streamed_threads": pooled_rounds},
                images_per_second_uint8={"in_memory": raw_memory, "streamed_inline": raw_inline, "streamed_threads": raw_pooled})
    print(f"{setup}\n\n{table(figures)}\n\nwritten: {path}")


if __name__ == "__main__":
    main()
