"""Grouped retrieval against brute force, clip_benchmark semantics and a hand-made tie case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsnc_bench.engine.retrieval import cosine_blocks, grouped_recall, t2i_ceiling
from rsnc_bench.errors import ConfigError


def brute_force(scores: np.ndarray, img_of: np.ndarray) -> list[float]:
    """Full stable sorts, one query at a time (ties: lower index first)."""
    n_txt, n_img = scores.shape
    out = []
    for k in (1, 5, 10):
        hits = 0
        for j in range(n_img):
            order = np.argsort(-scores[:, j], kind="stable")[:k]
            hits += bool((img_of[order] == j).any())
        out.append(100 * hits / n_img)
    for k in (1, 5, 10):
        hits = sum(img_of[c] in np.argsort(-scores[c], kind="stable")[:k] for c in range(n_txt))
        out.append(100 * hits / n_txt)
    return out


def clip_benchmark_style(scores: torch.Tensor, img_of: torch.Tensor) -> list[float]:
    """topk then 'any positive in the top k' (clip_benchmark recall_at_k semantics)."""
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(img_of)), img_of] = True

    def recall(s, pos, k):
        top = s.topk(k, dim=1).indices
        return 100 * pos.gather(1, top).any(1).double().mean().item()

    return [recall(scores.T, positive.T, k) for k in (1, 5, 10)] + [recall(scores, positive, k) for k in (1, 5, 10)]


def random_case(seed: int, n_images: int = 37, quantize: bool = False):
    rng = np.random.RandomState(seed)
    img_of = np.concatenate([np.full(rng.randint(1, 8), i) for i in range(n_images)])
    rng.shuffle(img_of)  # captions of an image are not consecutive: grouping is by index
    scores = rng.randn(len(img_of), n_images).astype(np.float32)
    if quantize:  # many exact ties
        scores = np.round(scores, 1)
    return scores, img_of


def values(m) -> list[float]:
    return [m.i2t_r1, m.i2t_r5, m.i2t_r10, m.t2i_r1, m.t2i_r5, m.t2i_r10]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_matches_brute_force_and_clip_benchmark(seed, chunk):
    scores, img_of = random_case(seed)
    got = values(grouped_recall(scores, img_of, chunk=chunk))
    assert got == pytest.approx(brute_force(scores, img_of), abs=1e-9)
    assert got == pytest.approx(clip_benchmark_style(torch.from_numpy(scores), torch.from_numpy(img_of)), abs=1e-9)


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_ties_follow_the_stable_rule_in_every_chunking(chunk):
    scores, img_of = random_case(11, n_images=23, quantize=True)
    assert values(grouped_recall(scores, img_of, chunk=chunk)) == pytest.approx(brute_force(scores, img_of), abs=1e-9)


def test_hand_made_case_with_a_caption_shared_by_two_images():
    # rows 1 and 2 are the same text, of images 0 and 1, so they score identically
    scores = np.array([
        [0.9, 0.1, 0.2],   # row 0, image 0: rank 0
        [0.5, 0.5, 0.1],   # row 1, image 0: ties with image 1, lower index first -> rank 0
        [0.5, 0.5, 0.1],   # row 2, image 1: same tie -> rank 1
        [0.2, 0.3, 0.8],   # row 3, image 1: rank 1
        [0.1, 0.2, 0.3],   # row 4, image 2: rank 0
        [0.7, 0.05, 0.6],  # row 5, image 2: rank 1
    ])
    img_of = np.array([0, 0, 1, 1, 2, 2])
    for chunk in (1, 2, 6):
        m = grouped_recall(scores, img_of, chunk=chunk)
        # image 0: row 0 on top; image 1: rows 1/2 tie at 0.5, row 1 (image 0) first; image 2: row 3 on top
        assert (m.i2t_r1, m.i2t_r5, m.i2t_r10) == pytest.approx((100 / 3, 100, 100))
        assert (m.t2i_r1, m.t2i_r5, m.t2i_r10) == pytest.approx((50, 100, 100))
        assert m.mr == pytest.approx((100 / 3 + 50 + 400) / 6) and m.rsum == pytest.approx(6 * m.mr)
    assert "image->text R@1 33.33" in m.describe() and "text->image R@1 50.00" in m.describe()


def test_blocks_from_embeddings_equal_the_full_matrix():
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(300, 16, generator=g), torch.randn(60, 16, generator=g)
    img_of = np.repeat(np.arange(60), 5)
    full = torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(image, dim=-1).T
    lazy = grouped_recall(cosine_blocks(text, image, chunk=64), img_of)
    assert lazy == grouped_recall(full, img_of)
    assert lazy.t2i_r10 > 0


def test_bad_scores_are_clear_errors():
    img_of = np.repeat(np.arange(4), 2)
    scores = np.random.RandomState(0).rand(8, 4)
    scores[3, 1] = np.nan
    with pytest.raises(ConfigError, match="rows 0..7 contain NaN"):
        grouped_recall(scores, img_of)
    with pytest.raises(ConfigError, match="cover 6 caption rows but there are 8"):
        grouped_recall(np.zeros((6, 4)), img_of)


def test_t2i_ceiling_by_hand():
    captions = ["a", "a", "a", "b", "c", "c"]
    img_of = [0, 0, 1, 1, 2, 3]
    # "a": images {0: 2, 1: 1} -> 2 reachable at R@1; "b": 1; "c": {2: 1, 3: 1} -> 1 at R@1
    ceiling = t2i_ceiling(captions, img_of)
    assert ceiling["t2i_r1"] == pytest.approx(100 * 4 / 6)
    assert ceiling["t2i_r5"] == pytest.approx(100.0)


def test_a_large_gallery_is_scored_in_fewer_rows_per_block_with_the_same_recalls(monkeypatch):
    """Blocks stay within the entry budget (flat memory as the gallery grows) and give the same numbers."""
    import rsnc_bench.engine.retrieval as retrieval

    g = torch.Generator().manual_seed(3)
    images = torch.randn(40, 8, generator=g)
    img_of = torch.arange(40).repeat_interleave(5)
    texts = images[img_of] + torch.randn(200, 8, generator=g)
    whole = retrieval.grouped_recall(retrieval.cosine(texts, images), img_of.numpy(), chunk=1024)
    monkeypatch.setattr(retrieval, "ENTRY_BUDGET", 7 * 40)
    assert retrieval.block_rows(1024, 40) == 7 and retrieval.block_rows(3, 40) == 3 and retrieval.block_rows(1024, 10**6) == 1
    blocks = list(retrieval.cosine_blocks(texts, images, 1024))
    assert max(len(b) for b in blocks) == 7 and sum(len(b) for b in blocks) == 200
    assert retrieval.grouped_recall(iter(blocks), img_of.numpy(), chunk=1024) == whole
    assert [len(b) for b in retrieval.matrix_blocks(retrieval.cosine(texts, images), 1024)][:2] == [7, 7]
