"""Training batches streamed from tar shards, for the trainer (the ``TrainData`` of engine/batches.py).

Each epoch reads the stream of ``rsnc_bench.data.stream`` afresh. Its epoch key is drawn from
the trainer's order generator, whose state the trainer checkpoints, so a cell resumed after an
epoch continues with the plan of the epoch it reached, and the same seed gives the same batches.
The rows the trainer trains on (all, or the clean ones for the oracle) are kept, the others read
past; batches are full (the incomplete last one is dropped, as ``train_batches`` drops it) and at
most the epoch's ``steps`` of them are given. Captions are tokenised batch by batch.

Data-parallel (``engine.distributed``): each rank reads its own share of the shards (slot
``rank``), ``batch_size / world`` samples a step, and the ranks' local batches are gathered into the
same global batch on every rank; the epoch ends on every rank as soon as one rank runs out.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from rsnc_bench.data.stream import ShardStream, StreamBatch, StreamState, batched
from rsnc_bench.engine import distributed
from rsnc_bench.engine.batches import RawBatch
from rsnc_bench.errors import ConfigError

EPOCH_KEYS = 2**31 - 1


class StreamTrainData:
    """``TrainData`` over a ``ShardStream``; ``tokenize`` turns a batch's captions into token ids,
    ``threads`` decode ahead of the batch being built (0: in the reading thread)."""

    random_access = False  # a stream reads its shards in order: no batch of arbitrary rows

    def __init__(self, stream: ShardStream, tokenize: Callable[[Sequence[str]], torch.Tensor], threads: int = 0):
        self.stream, self.tokenize, self.threads = stream, tokenize, threads

    @property
    def n_rows(self) -> int:
        return len(self.stream.labels)

    def steps(self, rows: np.ndarray, batch_size: int) -> int:
        world = distributed.world_size()
        if batch_size % world:
            raise ConfigError(f"batch_size={batch_size} does not split over {world} data-parallel ranks; give a multiple of {world}")
        return len(rows) // batch_size

    def epoch_batches(self, rows: np.ndarray, batch_size: int, generator: torch.Generator,
                      resume: dict | None = None) -> Iterator[RawBatch]:
        """``resume``: a batch's ``position``, {"steps": batches given, "read": samples each rank had
        read from its stream}; the epoch goes on from there without decoding what was read."""
        epoch = int(torch.randint(EPOCH_KEYS, (1,), generator=generator))
        keep = np.zeros(self.n_rows, dtype=bool)
        keep[np.asarray(rows, dtype=np.int64)] = True
        world, rank = distributed.world_size(), distributed.rank()
        if resume and len(resume["read"]) != world:  # each rank's stream position belongs to its share of the shards
            raise ConfigError(f"this cell was checkpointed within an epoch of a stream read by {len(resume['read'])} data-parallel "
                              f"rank(s); resume it with as many (torchrun --nproc-per-node), not {world}")
        steps, read = (resume["steps"], resume["read"][rank]) if resume else (0, 0)
        samples = self.stream.rank_samples(StreamState(epoch, read), rank, world, threads=self.threads, keep=keep)
        read_so_far = [read]

        def kept():
            for sample in samples:  # None: a row not trained on, read past without decoding
                read_so_far[0] += 1
                if sample is not None:
                    yield sample

        local = batched(kept(), batch_size // world, limit=self.steps(rows, batch_size) - steps)
        for batch in _together(local) if world > 1 else local:
            steps += 1
            yield self._raw(batch, {"steps": steps, "read": self._everyones(read_so_far[0])})

    @staticmethod
    def _everyones(read: int) -> list[int]:
        """Every rank's count of samples read (each rank's stream resumes from its own)."""
        if distributed.world_size() == 1:
            return [read]
        return distributed.gather_rows(torch.tensor([read])).tolist()

    def _raw(self, batch: StreamBatch, position: dict) -> RawBatch:
        text = self.tokenize(batch.captions)
        if distributed.world_size() > 1:
            gathered = [distributed.gather_rows(t) for t in (batch.rows, batch.image_ids, batch.images, batch.sizes, text)]
            return RawBatch(*gathered, position=position)
        return RawBatch(batch.rows, batch.image_ids, batch.images, batch.sizes, text, position)

    def raw_rows(self, rows: torch.Tensor) -> RawBatch:
        raise ConfigError("this method reads arbitrary train rows (EpochContext.batch_of), which a dataset streamed from "
                          "shards cannot give; choose a method that trains from its batches alone, such as clip-ft or rrsitr")


def _together(batches: Iterator[StreamBatch]) -> Iterator[StreamBatch]:
    """The local batches while every rank still has one (a rank with a smaller share of the shards
    ends the epoch for all, so that no rank waits on a gather the others never join)."""
    for batch in batches:
        if not bool(distributed.gather_rows(torch.ones(1, dtype=torch.uint8)).all()):
            return
        yield batch
    distributed.gather_rows(torch.zeros(1, dtype=torch.uint8))  # tell the others this rank is out
