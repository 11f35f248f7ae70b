"""Named scorers: how the evaluator ranks a split with a trained method (methods.md 2.11).

A method lists its scorers (``Method.scorers``); the evaluator runs each and reports it as a row
of its own. The first is the method's own score (``FullScore``: ``Method.score`` over every pair,
or a cheaper first stage such as PMPGuard's top-K, tagged); the others re-rank it (``Rerank``:
SAR). Every block is computed in fp32, whatever autocast the caller is in.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from rsnc_bench.backbones.base import Features
from rsnc_bench.engine.retrieval import Reranked, block_rows, matrix_blocks

if TYPE_CHECKING:
    from rsnc_bench.methods import Method


def full_precision(device: torch.device):
    """A context that switches off any autocast the caller entered (training, a user's)."""
    return torch.autocast(device.type, enabled=False)


def feature_rows(features: Features, start: int, stop: int) -> Features:
    pick = lambda t: None if t is None else t[start:stop]  # noqa: E731
    return Features(pick(features.embedding), pick(features.tokens), pick(features.mask))


class EncodedSplit:
    """A method and its encoded split, what every scorer works from. The method's full score
    matrix is computed once, and kept only when ``keep`` (a re-ranker needs it whole)."""

    def __init__(self, method: Method, texts: Features, images: Features, chunk: int, keep: bool = False):
        self.method, self.texts, self.images, self.chunk, self.keep = method, texts, images, chunk, keep
        self.device = texts.embedding.device

    @property
    def rows(self) -> int:
        """Caption rows per block: the chunk, fewer for a gallery so large that a block would pass the entry budget."""
        return block_rows(self.chunk, len(self.images.embedding))

    def text_chunks(self) -> Iterator[Features]:
        n = len(self.texts.embedding)
        for start in range(0, n, self.rows):
            yield feature_rows(self.texts, start, min(n, start + self.rows))

    def blocks(self) -> Iterator[torch.Tensor]:
        """``Method.score`` of each block of caption rows against all images, as fp32 on the CPU."""
        if self.keep:
            return matrix_blocks(self.matrix, self.chunk)
        return self._score_chunks()

    @functools.cached_property
    def matrix(self) -> torch.Tensor:
        return torch.cat(list(self._score_chunks()))

    def _score_chunks(self) -> Iterator[torch.Tensor]:
        for texts in self.text_chunks():
            with full_precision(self.device):
                yield self.method.score(texts, self.images).float().cpu()


class Scorer:
    """One way to rank a split; ``tag`` names its leaderboard row ("" for the method's own)."""

    tag = ""

    def __call__(self, split: EncodedSplit) -> Iterable[torch.Tensor] | torch.Tensor | Reranked:
        """Row blocks (or the whole matrix) of [n_texts, n_images] scores, or a ``Reranked`` pair
        when text->image and image->text rank differently."""
        raise NotImplementedError


class FullScore(Scorer):
    """``Method.score`` over every (text, image) pair."""

    def __call__(self, split: EncodedSplit) -> Iterable[torch.Tensor]:
        return split.blocks()


class Rerank(Scorer):
    """A re-ranker over the method's full score matrix, e.g. ``Rerank("sar", sar_rerank)``."""

    def __init__(self, tag: str, rerank: Callable[[torch.Tensor], torch.Tensor | Reranked]):
        self.tag, self.rerank = tag, rerank

    def __call__(self, split: EncodedSplit) -> torch.Tensor | Reranked:
        with full_precision(split.matrix.device):
            return self.rerank(split.matrix)
