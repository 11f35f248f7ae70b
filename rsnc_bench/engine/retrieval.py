"""Grouped image-text retrieval metrics (protocol.md section 5), computed in chunks.

One score per (caption row, image): ``scores[c, j]``. Ground truth is by index: caption row c
is positive only for its own image ``img_of[c]``, even when another image has the same text.
- image->text R@K (``i2t_rK``): image query, text gallery; a hit when any caption row of the
  image is among the top K texts of its column. Averaged over images.
- text->image R@K (``t2i_rK``): text query, image gallery; a hit when the row's image is among
  its top K images. Averaged over caption rows.
mR is the mean of the six (x100), rSum their sum.

Tie rule: equal scores rank by position, the lower index first, as a stable sort orders them.
Duplicate captions produce exact ties, so the rule is part of the protocol; with no ties the
numbers equal clip_benchmark's ``recall_at_k``.

Memory is bounded by the block: scores arrive as blocks of consecutive caption rows (``chunk``
rows x n_images, fewer rows when the gallery passes 8,192 images, so that a block stays within
``ENTRY_BUDGET`` entries: ``block_rows``), either sliced from a matrix or produced by a method's
scorer, and image->text keeps only a running top-K per image.

A re-ranker that re-sorts both directions (SAR) returns a ``Reranked`` pair of matrices, one
per direction; ``grouped_recall_reranked`` reads each direction from its own matrix.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from rsnc_bench.errors import ConfigError

KS = (1, 5, 10)
DIRECTIONS = {"i2t": "image->text", "t2i": "text->image"}
DEFAULT_CHUNK = 1024


@dataclass(frozen=True)
class RetrievalMetrics:
    """Recalls in percent: i2t = image query / text gallery, t2i = text query / image gallery."""

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float

    @property
    def rsum(self) -> float:
        return self.i2t_r1 + self.i2t_r5 + self.i2t_r10 + self.t2i_r1 + self.t2i_r5 + self.t2i_r10

    @property
    def mr(self) -> float:
        return self.rsum / 6

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "mr": self.mr, "rsum": self.rsum}

    def describe(self) -> str:
        """Two decimals, directions spelled out."""
        parts = [f"{DIRECTIONS[key[:3]]} R@{key[5:]} {value:.2f}" for key, value in asdict(self).items()]
        return " | ".join(parts) + f" | mR {self.mr:.2f} | rSum {self.rsum:.2f}"


@dataclass(frozen=True)
class Reranked:
    """Re-ranked scores, one [n_texts, n_images] matrix per direction: ``t2i`` is read row-wise
    (text queries), ``i2t`` column-wise (image queries)."""

    t2i: torch.Tensor
    i2t: torch.Tensor


ENTRY_BUDGET = DEFAULT_CHUNK * 8192  # score entries a block holds at most (32 MB in fp32): flat memory for large galleries


def block_rows(chunk: int, n_images: int) -> int:
    """Caption rows per score block: ``chunk``, or fewer when ``chunk`` rows of ``n_images`` scores
    would pass ``ENTRY_BUDGET`` (every split up to 8,192 images keeps the default chunk)."""
    return max(1, min(chunk, ENTRY_BUDGET // max(1, n_images)))


def matrix_blocks(scores: torch.Tensor | np.ndarray, chunk: int = DEFAULT_CHUNK) -> Iterator[torch.Tensor]:
    """Blocks of consecutive caption rows of a full score matrix."""
    scores = torch.as_tensor(scores)
    rows = block_rows(chunk, scores.shape[1])
    for start in range(0, scores.shape[0], rows):
        yield scores[start: start + rows]


def cosine(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[n_texts, n_images] cosine similarity of the embeddings, in fp32: the one definition every
    cosine score of the harness and the built-in methods uses. ``scale`` (a logit scale)
    multiplies the normalised texts before the product, the order the training losses have always
    used (the other order rounds differently, and PMPGuard's numbers moved with it)."""
    text = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    return (text if scale == 1.0 else scale * text) @ torch.nn.functional.normalize(image_emb.float(), dim=-1).T


def cosine_blocks(text_emb: torch.Tensor, image_emb: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> Iterator[torch.Tensor]:
    """``cosine``, one block of caption rows at a time (``block_rows``)."""
    rows = block_rows(chunk, image_emb.shape[0])
    for start in range(0, text_emb.shape[0], rows):
        yield cosine(text_emb[start: start + rows], image_emb)


SORT_BUDGET = 1 << 22  # entries of the columns fully sorted at once where a tie crosses the k-th place


def stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` best entries of each column (dim 0) under the tie rule: higher score
    first, equal scores by lower position. The one top-K rule (the recalls and SAR use it).

    topk picks the candidates, which are then put in stable order; only columns where a tie
    crosses the k-th place (topk's choice among equals is arbitrary) are sorted in full, a few
    columns at a time."""
    k = min(k, values.shape[0])
    top, pos = torch.topk(values, k, dim=0)
    pos, by_pos = pos.sort(dim=0)  # candidates by position, then a stable sort by score
    pos = pos.gather(0, torch.sort(top.gather(0, by_pos), dim=0, descending=True, stable=True).indices)
    crossing = ((values >= top[-1:]).sum(0) > k).nonzero().squeeze(1)
    step = max(1, SORT_BUDGET // max(1, values.shape[0]))
    for start in range(0, len(crossing), step):
        cols = crossing[start: start + step]
        pos[:, cols] = torch.sort(values[:, cols], dim=0, descending=True, stable=True).indices[:k]
    return pos


def _top_stable(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows per column by ``stable_top`` (``idx`` rises with position): their values and ``idx``."""
    pos = stable_top(vals, k)
    return vals.gather(0, pos), idx.gather(0, pos)


def _stable_rank(block: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Rank of each row's own image: higher scores first, equal scores by lower image index."""
    positive = block.gather(1, own[:, None])
    rank = (block > positive).sum(1)
    tied = ((block == positive).sum(1) > 1).nonzero().squeeze(1)  # rare: exact ties with another image
    if len(tied):
        before = torch.arange(block.shape[1])[None, :] < own[tied, None]
        rank[tied] += ((block[tied] == positive[tied]) & before).sum(1)
    return rank


def grouped_recall(
    scores: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
    img_of: np.ndarray | torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> RetrievalMetrics:
    """R@1/5/10 both ways from a (caption rows x images) score matrix or its row blocks."""
    img_of = torch.tensor(np.asarray(img_of), dtype=torch.long)  # a copy: split arrays are read-only
    blocks = matrix_blocks(scores, chunk) if isinstance(scores, (torch.Tensor, np.ndarray)) else scores
    kmax = max(KS)
    t2i_hits = torch.zeros(len(KS), dtype=torch.long)
    top_vals = top_idx = None
    start = 0
    n_images = None
    for block in blocks:
        block = torch.as_tensor(block).detach().float().cpu()
        rows, n_images = block.shape[0], block.shape[1]
        if torch.isnan(block.sum()) and torch.isnan(block).any():  # the sum first: one cheap pass when there is none
            raise ConfigError(f"the scores of caption rows {start}..{start + rows - 1} contain NaN; check the model's outputs")
        own = img_of[start: start + rows]
        if len(own) != rows:
            raise ConfigError(f"the scores have more rows than the {len(img_of)} captions")
        rank = _stable_rank(block, own)  # text -> image
        t2i_hits += torch.stack([(rank < k).sum() for k in KS])
        # image -> text: running top-K texts per image column (earlier rows stay first on ties)
        vals, idx = _top_stable(block, torch.arange(start, start + rows)[:, None].expand(rows, n_images), kmax)
        if top_vals is not None:
            vals, idx = _top_stable(torch.cat([top_vals, vals]), torch.cat([top_idx, idx]), kmax)
        top_vals, top_idx = vals, idx
        start += rows
    if start != len(img_of) or n_images is None:
        raise ConfigError(f"the scores cover {start} caption rows but there are {len(img_of)}")
    if len(img_of) and int(img_of.max()) >= n_images:
        raise ConfigError(f"caption rows point at image {int(img_of.max())} but the scores have {n_images} images")
    own_in_top = img_of[top_idx] == torch.arange(n_images)[None, :]  # (<=kmax, n_images)
    i2t = [own_in_top[:k].any(0).double().mean().item() * 100 for k in KS]
    t2i = (t2i_hits.double() / len(img_of) * 100).tolist()
    return RetrievalMetrics(*i2t, *t2i)


def grouped_recall_reranked(reranked: Reranked, img_of: np.ndarray | torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> RetrievalMetrics:
    """Text->image recalls from ``reranked.t2i``, image->text recalls from ``reranked.i2t``."""
    if reranked.t2i.shape != reranked.i2t.shape:
        raise ConfigError(f"re-ranked matrices differ in shape: t2i {tuple(reranked.t2i.shape)}, i2t {tuple(reranked.i2t.shape)}")
    t2i = grouped_recall(reranked.t2i, img_of, chunk=chunk)
    i2t = grouped_recall(reranked.i2t, img_of, chunk=chunk)
    return RetrievalMetrics(i2t.i2t_r1, i2t.i2t_r5, i2t.i2t_r10, t2i.t2i_r1, t2i.t2i_r5, t2i.t2i_r10)


def t2i_ceiling(captions: Iterable[str], img_of: Iterable[int]) -> dict[str, float]:
    """Best reachable text->image R@K when identical strings get identical scores (protocol.md 5.3).

    For each distinct text, at most the K images holding it most often can be hits.
    """
    per_text: dict[str, Counter] = defaultdict(Counter)
    n = 0
    for text, image in zip(captions, img_of):
        per_text[text][int(image)] += 1
        n += 1
    out = {}
    for k in KS:
        reachable = sum(sum(sorted(counts.values(), reverse=True)[:k]) for counts in per_text.values())
        out[f"t2i_r{k}"] = 100 * reachable / n
    return out
