"""SAR re-ranking against a plain-Python brute force, the two-direction recall and the leaderboard row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsnc_bench.engine.retrieval import Reranked, grouped_recall, grouped_recall_reranked
from rsnc_bench.errors import ConfigError
from rsnc_bench.results import aggregate, runs
from rsnc_builtin_methods.sar import sar_rerank

from .test_results import doc, row
from .test_retrieval import values


def stable_order(vals: list[float]) -> list[int]:
    """Indices by score desc, then lower index first."""
    return sorted(range(len(vals)), key=lambda i: (-vals[i], i))


def brute_sar(s: list[list[float]], k: int) -> list[list[int]]:
    """SAR order of each query row of ``s`` (rows = queries, columns = gallery): the full new order."""
    n_q, n_g = len(s), len(s[0])
    out = []
    for q in range(n_q):
        forward = stable_order(s[q])
        top = forward[:k]
        keys = []
        for fwd, j in enumerate(top):
            reverse = stable_order([s[r][j] for r in range(n_q)]).index(q)
            keys.append((fwd + reverse, -s[q][j], j))
        out.append([key[2] for key in sorted(keys)] + forward[k:])
    assert all(len(o) == n_g for o in out)
    return out


def order_of(matrix: torch.Tensor) -> list[list[int]]:
    """The stable order each row of ``matrix`` implies."""
    return [stable_order(r) for r in matrix.tolist()]


def check(s: torch.Tensor, k: int) -> None:
    got = sar_rerank(s, k)
    assert got.t2i.shape == got.i2t.shape == s.shape
    assert order_of(got.t2i) == brute_sar(s.tolist(), k)
    assert order_of(got.i2t.T) == brute_sar(s.T.tolist(), k)


def test_small_hand_made():
    s = torch.tensor([[0.9, 0.8, 0.1],
                      [0.2, 0.7, 0.6],
                      [0.95, 0.3, 0.5],
                      [0.1, 0.85, 0.4]])
    got = sar_rerank(s, k=2)
    # text 0: top-2 images 0 (fwd 0, reverse 1: text 2 beats it) and 1 (fwd 1, reverse 1) -> keys 1, 2
    # text 1: top-2 images 1 (fwd 0, rev 2) and 2 (fwd 1, rev 0) -> keys 2, 1: image 2 first
    assert order_of(got.t2i)[:2] == [[0, 1, 2], [2, 1, 0]]
    # image 0: top-2 texts 2 (fwd 0, rev 0) and 0 (fwd 1, rev 0) -> keys 0, 1
    # image 2: top-2 texts 1 (fwd 0, rev 1) and 2 (fwd 1, rev 1) -> keys 1, 2
    assert order_of(got.i2t.T)[0][:2] == [2, 0] and order_of(got.i2t.T)[2][:2] == [1, 2]
    check(s, 2)
    img_of = np.array([0, 1, 2, 1])
    assert grouped_recall_reranked(got, img_of).mr == pytest.approx(values_mean(got, img_of))


def values_mean(got: Reranked, img_of: np.ndarray) -> float:
    return (sum(values(grouped_recall(got.i2t, img_of))[:3]) + sum(values(grouped_recall(got.t2i, img_of))[3:])) / 6


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 12, 40])
def test_random_matches_brute_force(seed, k):
    s = torch.from_numpy(np.random.RandomState(seed).randn(30, 12).astype(np.float32))
    check(s, k)  # k >= 12 (t2i) and k = 40 >= 30 (i2t) re-sort whole rows / columns


@pytest.mark.parametrize("seed", range(3))
def test_ties_follow_the_stable_rule(seed):
    s = torch.from_numpy(np.round(np.random.RandomState(seed).rand(25, 9), 1).astype(np.float32))
    s[3] = s[4]  # duplicate caption rows: exact ties everywhere
    check(s, 5)
    assert torch.equal(sar_rerank(s, 5).t2i, sar_rerank(s.clone(), 5).t2i)


def test_chunked_rank_computation(monkeypatch):
    import rsnc_builtin_methods.sar as sar

    s = torch.from_numpy(np.round(np.random.RandomState(7).randn(40, 15), 1).astype(np.float32))
    whole = sar_rerank(s, 4)
    import rsnc_bench.engine.retrieval as retrieval

    monkeypatch.setattr(sar, "ELEMENT_BUDGET", 1)  # one query row per chunk
    monkeypatch.setattr(retrieval, "SORT_BUDGET", 1)  # tie-crossing rows of the top K sorted one at a time
    chunked = sar_rerank(s, 4)
    assert torch.equal(whole.t2i, chunked.t2i) and torch.equal(whole.i2t, chunked.i2t)


def test_outside_top_k_unchanged_and_large_scores():
    s = torch.from_numpy(np.random.RandomState(1).randn(20, 8).astype(np.float32)) * 1e6
    got = sar_rerank(s, 3)
    top = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :3]
    rest = torch.ones_like(s, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(got.t2i[rest], s[rest])
    check(s, 3)


def test_rejects_bad_input():
    with pytest.raises(ConfigError):
        sar_rerank(torch.zeros(3, 3), k=0)
    with pytest.raises(ConfigError):
        sar_rerank(torch.tensor([[0.0, float("nan")]]))


def test_grouped_recall_reranked_combines_directions():
    rng = np.random.RandomState(3)
    img_of = np.concatenate([np.arange(15), rng.randint(0, 15, 25)])
    a, b = (torch.from_numpy(rng.randn(40, 15).astype(np.float32)) for _ in range(2))
    got = grouped_recall_reranked(Reranked(t2i=a, i2t=b), img_of, chunk=7)
    from_a, from_b = grouped_recall(a, img_of), grouped_recall(b, img_of)
    assert values(got)[3:] == values(from_a)[3:] and values(got)[:3] == values(from_b)[:3]
    assert got.mr == pytest.approx((sum(values(from_b)[:3]) + sum(values(from_a)[3:])) / 6)
    with pytest.raises(ConfigError):
        grouped_recall_reranked(Reranked(t2i=a, i2t=b[:, :3]), img_of)


def rerank_doc(mr: float, rerank_mr: float, tag: str | None = "sar", **key) -> dict:
    d = doc(mr, **key)
    d["test_rerank"] = {**d["test"], "mr": rerank_mr}
    if tag is not None:
        d["rerank_tag"] = tag
    return d


def leaderboard(results, split: str = "test"):
    return aggregate(runs(results, split))


def test_results_rerank_row():
    docs = [rerank_doc(40.0, 45.0, method="iebaker", noise_seed=0), rerank_doc(42.0, 47.0, method="iebaker", noise_seed=1),
            rerank_doc(30.0, 31.0, tag=None, method="other"), doc(50.0, method="ncr")]
    df = leaderboard(docs)
    assert row(df, method="iebaker").mr_mean == pytest.approx(41.0)
    sar = row(df, method="iebaker+sar")
    assert sar.mr_mean == pytest.approx(46.0) and sar.n == 2 and sar.failed == 0
    assert row(df, method="other+rerank").mr_mean == pytest.approx(31.0)
    assert len(df) == 5
    current = doc(40.0, method="iebaker")  # results since test_variants: a row per further scorer
    current["test_variants"] = {"sar": {**current["test"], "mr": 44.0}, "other": {**current["test"], "mr": 41.0}}
    assert sorted(leaderboard([current]).method) == ["iebaker", "iebaker+other", "iebaker+sar"]
    assert row(leaderboard([current]), method="iebaker+sar").mr_mean == 44.0
    for d in docs:
        d["val"] = dict(d["test"])
    assert sorted(leaderboard(docs, split="val").method) == ["iebaker", "ncr", "other"]  # re-rank rows: test split only
