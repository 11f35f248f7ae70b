"""SAR (Sort After Reversed retrieval): an evaluation-time re-ranker over the full score matrix
(methods.md section 4.5). Reconstructed: SAR is in no released code.

Text->image: for a text query q, each image j among q's top-K gets the reverse rank of q, the
0-based rank of text q among all texts when image j is the query (same matrix S, rows = caption
rows, columns = images). The top-K is re-sorted by forward rank + reverse rank; ties by S (higher
first), then the lower image index. Images outside the top-K keep their order below it.
Image->text is the same with the roles swapped, so each direction gets its own re-ranked matrix.

Ranks follow the harness's stable tie rule (retrieval.py): equal scores rank by lower index.
"""

from __future__ import annotations

import torch

from rsnc_bench.engine.retrieval import Reranked, stable_top
from rsnc_bench.errors import ConfigError

DEFAULT_K = 10
ELEMENT_BUDGET = 1 << 22  # entries per block of rows / columns sorted at once (bounds memory)


def sar_rerank(scores: torch.Tensor, k: int = DEFAULT_K) -> Reranked:
    """SAR both ways on a [n_texts, n_images] matrix: ``t2i`` re-sorts rows, ``i2t`` columns."""
    scores = torch.as_tensor(scores).detach()
    if not scores.is_floating_point():
        scores = scores.float()
    if k < 1:
        raise ConfigError(f"SAR needs k >= 1, got {k}")
    if not torch.isfinite(scores).all():
        raise ConfigError("SAR needs finite scores; the matrix has NaN or infinite entries")
    t2i = _rerank_rows(scores, k)
    i2t = _rerank_rows(scores.T.contiguous(), k).T.contiguous()
    return Reranked(t2i=t2i, i2t=i2t)


def _rerank_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Rows are queries, columns the gallery; each row's top-K is re-sorted by SAR."""
    n_queries, n_gallery = scores.shape
    k = min(k, n_gallery)
    if k == 0 or n_queries == 0:
        return scores.clone()
    top = stable_top(scores.T, k).T  # each row's k best columns, the harness's tie rule
    forward = torch.arange(k, device=scores.device).expand_as(top)
    # a stable sort keeps the forward order (S desc, index asc) among equal keys
    resorted = top.gather(1, torch.sort(forward + _reverse_ranks(scores, top), dim=1, stable=True).indices)
    return _lift(scores, resorted)


def _reverse_ranks(scores: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """For each pair (q, top[q, i]): the 0-based rank of row q in column top[q, i] among all rows,
    equal scores by lower row index. Columns are ranked in blocks by a stable sort."""
    n_queries, n_gallery = scores.shape
    rows = torch.arange(n_queries, device=scores.device)
    ranks = torch.empty_like(top)
    chunk = max(1, ELEMENT_BUDGET // n_queries)
    for start in range(0, n_gallery, chunk):
        columns = scores[:, start: start + chunk].T.contiguous()  # a column per row: row sorts are faster
        order = torch.sort(columns, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, rows.expand_as(order).contiguous())  # [column, row]
        pick = (top >= start) & (top < start + chunk)
        ranks[pick] = rank[top[pick] - start, rows[:, None].expand_as(top)[pick]]
    return ranks


def _lift(block: torch.Tensor, resorted: torch.Tensor) -> torch.Tensor:
    """Copy of ``block`` whose entries at ``resorted`` sit above every other entry of their row,
    in the order given; the rest are unchanged."""
    k = resorted.shape[1]
    top = block.max(dim=1, keepdim=True).values
    step = top.abs().clamp(min=1.0)  # keeps the lifted values distinct for large scores
    lifted = top + step * torch.arange(k, 0, -1, device=block.device, dtype=block.dtype)
    return block.clone().scatter_(1, resorted, lifted)
