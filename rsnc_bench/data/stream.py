"""A deterministic, resumable stream of training samples over tar shards, split across ranks and
data-loader workers, with a seeded shuffle buffer and noise applied by row id.

**Who reads what.** A stream has ``world_size x workers`` slots; slot ``rank * workers + worker``
is one data-loader worker of one rank. Each epoch the read units are permuted by
``RandomState([seed, epoch])`` and unit ``k`` goes to slot ``k % slots``. A unit is a whole shard
when there are at least as many shards as slots; otherwise each shard is cut into
``parts = ceil(slots / shards)`` units by sample position (sample ``j`` of a shard belongs to part
``j % parts``), so every slot has work: each sample is decoded by exactly one slot per epoch (the
tar bytes of a cut shard are scanned by each of its parts' slots).

**Order.** A slot reads its units in turn and passes the still-encoded samples through a shuffle
buffer of ``shuffle_buffer`` samples (fill the buffer, then emit a uniformly drawn element and
put the next sample in its place; at the end the rest in a drawn order: the tf.data / webdataset
shuffle-buffer rule), drawn from ``RandomState([seed, epoch, slot, slots])``. A rank's sequence
interleaves its workers' sequences one sample at a time, skipping a worker once it is exhausted:
the order in which ``torch.utils.data.DataLoader`` (``batch_size=None``, in-order) returns the
samples of an ``IterableDataset`` from its workers. So the samples a slot reads and their order
are a function of (seed, epoch, rank, world size, worker, workers) only.

**Memory.** Only the shuffle buffer's encoded samples are held; images are decoded as they leave it.

**Resume.** A stream's state is (epoch, samples already yielded by the rank). Restarting from it
replays the same sequence without decoding the images of the yielded samples and yields exactly
the remaining ones.

**Noise.** ``RowLabels`` maps the image a sample holds (its metafile row, found by name) to the
noise manifest's row that pairs with it, that row's caption (``caption_row``, looked up in the
metafile by row) and its clean flag, so the per-row detection metrics work on streamed data.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from rsnc_bench.config import check_seed
from rsnc_bench.data.shards import RawSample, decode_sample, iter_shard
from rsnc_bench.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class StreamConfig:
    """How a stream reads: its seed (the cell's training seed), the shuffle buffer's length in
    samples (0 or 1: stored order) and the canvas side images are padded onto (larger ones shrunk)."""

    seed: int = 0
    shuffle_buffer: int = 1000
    canvas: int = 256

    def __post_init__(self) -> None:
        check_seed(self.seed, "stream seed")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer={self.shuffle_buffer}; give 0 (stored order) or more samples, e.g. 1000")
        if self.canvas < 8:
            raise ConfigError(f"canvas={self.canvas}; give the side in pixels images are padded onto, e.g. 256")


@dataclass(frozen=True)
class Unit:
    """What one slot reads of a shard: the samples at positions ``j % parts == part``."""

    shard: Path
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class StreamState:
    """Where a rank's stream stands: the epoch and the samples it has yielded in it."""

    epoch: int
    yielded: int = 0


@dataclass
class StreamedSample:
    """One training sample: the manifest ``row`` (what ``Batch.rows`` holds), the ``image`` it shows
    (its metafile row), the uint8 pixels [3, canvas, canvas] with the image's true (height, width),
    the caption the row carries and whether the pair is clean."""

    row: int
    image: int
    pixels: torch.Tensor
    size: tuple[int, int]
    caption: str
    clean: bool


def shuffled(items: Iterable[T], buffer: int, rng: np.random.RandomState) -> Iterator[T]:
    """``items`` through a shuffle buffer of ``buffer`` elements (at most ``buffer`` are held)."""
    if buffer <= 1:
        yield from items
        return
    held: list[T] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        j = rng.randint(len(held))
        out, held[j] = held[j], item
        yield out
    for j in rng.permutation(len(held)):
        yield held[j]


class RoundRobin:
    """(stream index, item): one item from each stream in turn (in the order ``turns``, default
    0, 1, ...), dropping a stream once it is exhausted: DataLoader's in-order round robin over its
    workers. ``upcoming()``: the streams not known to be exhausted, in the order of their next turns."""

    def __init__(self, streams: Sequence[Iterator[T]], turns: Sequence[int] | None = None):
        self.streams, self.active, self.turn = streams, list(range(len(streams)) if turns is None else turns), 0

    def __iter__(self) -> RoundRobin:
        return self

    def __next__(self) -> tuple[int, T]:
        while self.active:
            i = self.active[self.turn]
            item = next(self.streams[i], _END)
            if item is _END:
                self.active.pop(self.turn)
                self.turn = self.turn % len(self.active) if self.active else 0
                continue
            self.turn = (self.turn + 1) % len(self.active)
            return i, item
        raise StopIteration

    def upcoming(self) -> list[int]:
        return self.active[self.turn:] + self.active[:self.turn]


def replayed(streams: Sequence[Iterator], count: int) -> tuple[list[int], list[int]]:
    """After ``RoundRobin(streams)`` has given ``count`` items: how many each stream gave, and the
    streams not known to be exhausted, in the order of their next turns."""
    robin, given = RoundRobin(streams), [0] * len(streams)
    for i, _ in itertools.islice(robin, count):
        given[i] += 1
    return given, robin.upcoming()


_END = object()


class RowLabels:
    """The rows a streamed image is paired with: for image (metafile row) ``j``, the manifest row
    ``i`` with ``assigned_image[i] == j``, its caption ``captions[caption_row[i]]`` and its clean
    flag. Without a manifest every row is its own clean pair. Each image must be assigned to
    exactly one row (true of every protocol on one-caption-per-image data such as RS5M)."""

    def __init__(self, captions: Sequence[str], caption_row=None, assigned_image=None, clean=None):
        n = len(captions)
        self.captions = captions
        self.caption_row = np.arange(n) if caption_row is None else np.asarray(caption_row, dtype=np.int64)
        assigned = np.arange(n) if assigned_image is None else np.asarray(assigned_image, dtype=np.int64)
        self.clean = np.ones(n, dtype=bool) if clean is None else np.asarray(clean, dtype=bool)
        if not (len(self.caption_row) == len(assigned) == len(self.clean) == n):
            raise ConfigError(f"the noise manifest has {len(assigned)} rows but the streamed train split has {n}; "
                              "make the manifest for this dataset")
        counts = np.bincount(assigned, minlength=n)
        if len(counts) != n or (counts != 1).any():
            image = int(np.flatnonzero(counts != 1)[0])
            raise ConfigError(f"the noise pairs image {image} with {counts[image]} rows; a streamed split needs each image "
                              "in exactly one row (use a caption-moving protocol such as rrsitr, shuffle, ncr or hard)")
        self.row_of_image = np.empty(n, dtype=np.int64)
        self.row_of_image[assigned] = np.arange(n)

    @classmethod
    def from_manifest(cls, captions: Sequence[str], manifest) -> RowLabels:
        """From a ``rsnc_bench.noise.NoiseManifest`` made for the streamed train split."""
        return cls(captions, manifest.caption_row, manifest.assigned_image, manifest.clean)

    def __len__(self) -> int:
        return len(self.captions)

    def label(self, image: int) -> tuple[int, str, bool]:
        row = int(self.row_of_image[image])
        return row, self.captions[int(self.caption_row[row])], bool(self.clean[row])


class ShardStream:
    """Training samples streamed from ``shards``: ``image_of(sample)`` gives the metafile row of the
    image a raw sample holds (a ``DataFormatError`` naming the shard and member when it has none),
    ``labels`` pairs it with its (noisy) row. See the module doc for the order and the sharding."""

    def __init__(self, shards: Sequence[str | Path], image_of: Callable[[RawSample], int], labels: RowLabels,
                 config: StreamConfig = StreamConfig()):
        if not shards:
            raise ConfigError("a shard stream needs at least one shard")
        self.shards = tuple(Path(s) for s in shards)
        self.image_of, self.labels, self.config = image_of, labels, config

    # --- who reads what --------------------------------------------------------------------
    def units(self, epoch: int, world_size: int = 1, workers: int = 1) -> list[list[Unit]]:
        """The units of each slot (``rank * workers + worker``) in this epoch, in reading order."""
        if world_size < 1 or workers < 1:
            raise ConfigError(f"world size {world_size} and workers {workers} must be at least 1")
        slots = world_size * workers
        parts = max(1, math.ceil(slots / len(self.shards)))
        units = [Unit(shard, part, parts) for shard in self.shards for part in range(parts)]
        order = np.random.RandomState([self.config.seed, epoch]).permutation(len(units))
        plan: list[list[Unit]] = [[] for _ in range(slots)]
        for k, u in enumerate(order):
            plan[k % slots].append(units[u])
        return plan

    def raw_slot(self, epoch: int, rank: int = 0, world_size: int = 1, worker: int = 0, workers: int = 1) -> Iterator[RawSample]:
        """One slot's still-encoded samples in the order it yields them (after its shuffle buffer)."""
        if not (0 <= rank < world_size and 0 <= worker < workers):
            raise ConfigError(f"rank {rank} of {world_size} or worker {worker} of {workers} is out of range")
        slot, slots = rank * workers + worker, world_size * workers
        read = (sample for unit in self.units(epoch, world_size, workers)[slot]
                for j, sample in enumerate(iter_shard(unit.shard)) if j % unit.parts == unit.part)
        rng = np.random.RandomState([self.config.seed, epoch, slot, slots])
        return shuffled(read, self.config.shuffle_buffer, rng)

    # --- what a consumer reads ---------------------------------------------------------------
    def sample(self, raw: RawSample) -> StreamedSample:
        """A raw sample decoded and labelled."""
        image = self.image_of(raw)
        row, caption, clean = self.labels.label(image)
        pixels, size = decode_sample(raw, self.config.canvas)
        return StreamedSample(row, image, pixels, size, caption, clean)

    def slot_samples(self, epoch: int, rank: int = 0, world_size: int = 1, worker: int = 0, workers: int = 1,
                     start: int = 0) -> Iterator[StreamedSample]:
        """One slot's samples from its ``start``-th on (those before are not decoded)."""
        raw = itertools.islice(self.raw_slot(epoch, rank, world_size, worker, workers), start, None)
        return map(self.sample, raw)

    def raw_rank(self, epoch: int, rank: int = 0, world_size: int = 1, workers: int = 1) -> Iterator[tuple[int, RawSample]]:
        """(worker, raw sample) in the rank's order: its workers' slots interleaved."""
        return RoundRobin([self.raw_slot(epoch, rank, world_size, w, workers) for w in range(workers)])

    def resume_plan(self, state: StreamState, rank: int = 0, world_size: int = 1, workers: int = 1) -> tuple[list[int], list[int]]:
        """When the rank had yielded ``state.yielded`` samples: how many each worker had yielded, and
        the workers not known to be exhausted in the order of their next turns (replayed without
        decoding)."""
        streams = [self.raw_slot(state.epoch, rank, world_size, w, workers) for w in range(workers)]
        starts, turns = replayed(streams, state.yielded)
        if sum(starts) < state.yielded:
            raise ConfigError(f"stream state {state} is past the end of epoch {state.epoch} on rank {rank} "
                              f"({sum(starts)} samples); it belongs to other data or another world size")
        return starts, turns

    def rank_samples(self, state: StreamState, rank: int = 0, world_size: int = 1, workers: int = 1,
                     threads: int = 0, keep: np.ndarray | None = None) -> Iterator[StreamedSample | None]:
        """The rank's samples from ``state`` on, read in this process (the same sequence a DataLoader
        with ``workers`` workers over ``as_dataset`` returns); ``threads`` decode ahead in a pool.
        With ``keep`` (a mask over rows), the samples of other rows are None, never decoded."""
        raw = (sample for _, sample in itertools.islice(self.raw_rank(state.epoch, rank, world_size, workers), state.yielded, None))
        if keep is None:
            return ordered_map(self.sample, raw, threads)
        return ordered_map(lambda sample: self.sample(sample) if keep[self.labels.row_of_image[self.image_of(sample)]] else None, raw, threads)

    def as_dataset(self, state: StreamState, rank: int = 0, world_size: int = 1, workers: int = 1) -> ShardStreamDataset:
        """A ``torch`` IterableDataset of the rank's samples from ``state`` on, for a DataLoader with
        ``num_workers=workers`` (or 0 when ``workers`` is 1) and ``batch_size=None``."""
        starts, turns = self.resume_plan(state, rank, world_size, workers)
        return ShardStreamDataset(self, state.epoch, rank, world_size, workers, starts, turns)


def ordered_map(fn: Callable[[T], object], items: Iterable[T], threads: int) -> Iterator:
    """``map(fn, items)`` computed up to ``2 * threads`` items ahead in a thread pool, in order
    (PIL releases the GIL while it decodes)."""
    if threads <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ShardStreamDataset(torch.utils.data.IterableDataset):
    """One rank's stream for a DataLoader. The DataLoader asks its workers in turn from worker 0
    whenever it starts, so its worker ``i`` serves the slot whose turn is ``i``-th from the resume
    point (``turns``; workers past the active ones yield nothing) from that slot's start: the
    in-order round robin then returns the rank's sequence from there."""

    def __init__(self, stream: ShardStream, epoch: int, rank: int, world_size: int, workers: int, starts: list[int], turns: list[int]):
        super().__init__()
        self.stream, self.epoch, self.rank, self.world_size, self.workers = stream, epoch, rank, world_size, workers
        self.starts, self.turns = starts, turns

    def __iter__(self) -> Iterator[StreamedSample]:
        info = torch.utils.data.get_worker_info()
        loader_worker, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.workers:
            raise ConfigError(f"the stream was planned for {self.workers} data-loader workers but runs under {count}; "
                              f"give the DataLoader num_workers={self.workers if self.workers > 1 else 0}")
        if loader_worker >= len(self.turns):
            return iter(())
        worker = self.turns[loader_worker]
        return self.stream.slot_samples(self.epoch, self.rank, self.world_size, worker, self.workers, self.starts[worker])


@dataclass
class StreamBatch:
    """A batch of streamed samples: uint8 images [B, 3, C, C] with their true sizes [B, 2] (cropped
    per batch by ``engine.batches.Preprocess`` as a training split's native images are), the rows,
    the images they show, their captions and clean flags."""

    rows: torch.Tensor
    image_ids: torch.Tensor
    images: torch.Tensor
    sizes: torch.Tensor
    captions: list[str]
    clean: torch.Tensor


def collate(samples: Sequence[StreamedSample]) -> StreamBatch:
    return StreamBatch(
        rows=torch.tensor([s.row for s in samples], dtype=torch.long),
        image_ids=torch.tensor([s.image for s in samples], dtype=torch.long),
        images=torch.stack([s.pixels for s in samples]),
        sizes=torch.tensor([s.size for s in samples], dtype=torch.long).reshape(-1, 2),
        captions=[s.caption for s in samples],
        clean=torch.tensor([s.clean for s in samples], dtype=torch.bool),
    )


def batched(samples: Iterable[StreamedSample], batch_size: int, limit: int | None = None) -> Iterator[StreamBatch]:
    """Full batches of ``batch_size`` samples (the incomplete last one is dropped, as ``train_batches``
    drops it), at most ``limit`` of them."""
    it = iter(samples)
    for _ in itertools.count() if limit is None else range(limit):
        chunk = list(itertools.islice(it, batch_size))
        if len(chunk) < batch_size:
            return
        yield collate(chunk)
