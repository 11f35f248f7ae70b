"""PMPGuard (reconstructed) against methods.md section 5: CGA, the PNAA boundary and branches, the
pair-wise scorer (chunked, top K) and its optimised forms against the equations written out pair by
pair, the mined-pair gradient, the clean-ness signal, run-to-run repeatability, and a short noisy
training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rsnc_builtin_methods.pmpguard as pmp
from rsnc_bench.backbones import Features
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.engine.scoring import EncodedSplit
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS
from rsnc_bench.store import CellKey, ResultStore
from rsnc_builtin_methods.cga import CrossGatedAttention
from rsnc_builtin_methods.pnaa import MASKED, SAFE_EXPONENT, BoundaryEstimate, gaussian_boundary, pnaa, pnaa_scores

from .token_stub import TokenBackbone, token_batch


def method(rows: int = 10, **options) -> pmp.PmpGuard:
    torch.manual_seed(0)
    return pmp.PmpGuard(TokenBackbone(rows), pmp.PmpGuardConfig(**options))


# --- CGA ----------------------------------------------------------------------------------
def test_cga_matches_the_equations_written_out_per_pair():
    """Shapes, and the gated fusion as a convex combination of the original and attended
    features, computed naively with the concatenations [u ; v~] and [v ; u~]."""
    torch.manual_seed(0)
    d, m, n = 6, 4, 3
    cga = CrossGatedAttention(d, scale=10.0)
    nn.init.normal_(cga.affinity)
    u, v = torch.randn(2, m, d), torch.randn(3, n, d)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    words, regions = cga.words(u, mask), cga.regions(v)
    fused = cga(words.map(lambda x: x.unsqueeze(1)), regions.map(lambda x: x.unsqueeze(0)))
    assert fused.words.shape == (2, 3, m, d) and fused.regions.shape == (2, 3, n, d) and fused.word_gate.shape == (2, 3)
    for a in range(2):
        for b in range(3):
            real = mask[a]
            aff = (u[a] / u[a].norm(dim=-1, keepdim=True)) @ cga.affinity @ (v[b] / v[b].norm(dim=-1, keepdim=True)).T
            alpha = torch.softmax(10 * aff, dim=1)
            beta = torch.softmax(10 * aff[real], dim=0)  # over real words only
            v_ctx, u_ctx = alpha @ v[b], beta.T @ u[a][real]
            g_u = torch.sigmoid(cga.word_gate(torch.cat([u[a], v_ctx], -1)))
            g_v = torch.sigmoid(cga.region_gate(torch.cat([v[b], u_ctx], -1)))
            torch.testing.assert_close(fused.words[a, b], g_u * u[a] + (1 - g_u) * v_ctx, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fused.regions[a, b], g_v * v[b] + (1 - g_v) * u_ctx, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fused.word_gate[a, b], g_u[real].mean(), atol=1e-6, rtol=1e-5)
            lo, hi = torch.minimum(u[a], v_ctx), torch.maximum(u[a], v_ctx)  # convex: between the two, elementwise
            assert ((fused.words[a, b] >= lo - 1e-6) & (fused.words[a, b] <= hi + 1e-6)).all()


# --- the boundary -------------------------------------------------------------------------
def density(t, mu, sd):
    return math.exp(-((t - mu) ** 2) / (2 * sd * sd)) / (sd * math.sqrt(2 * math.pi))


def crossing(mu_pos, sd_pos, mu_neg, sd_neg, alpha):
    """Bisection of N+(t) - alpha N-(t) between the two means."""
    f = lambda t: density(t, mu_pos, sd_pos) - alpha * density(t, mu_neg, sd_neg)  # noqa: E731
    lo, hi = mu_neg, mu_pos
    assert f(lo) < 0 < f(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return lo


@pytest.mark.parametrize("mu_pos, sd_pos, mu_neg, sd_neg", [
    (0.6, 0.10, 0.2, 0.05),  # sd+ > sd-: A > 0
    (0.6, 0.05, 0.2, 0.10),  # sd+ < sd-: A < 0 (the larger root would lie beyond mu+)
    (0.7, 0.08, 0.3, 0.08),  # equal variances: the linear case
    (0.55, 0.12, 0.35, 0.09),  # overlapping
])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_boundary_closed_form_is_the_weighted_density_crossing(mu_pos, sd_pos, mu_neg, sd_neg, alpha):
    t = gaussian_boundary(mu_pos, sd_pos, mu_neg, sd_neg, alpha)
    assert t == pytest.approx(crossing(mu_pos, sd_pos, mu_neg, sd_neg, alpha), abs=1e-9)
    assert mu_neg < t < mu_pos
    assert density(t, mu_pos, sd_pos) == pytest.approx(alpha * density(t, mu_neg, sd_neg), rel=1e-6)


def test_boundary_guard_without_a_real_root():
    # alpha N- lies above N+ everywhere: a much wider, heavily weighted negative density
    assert gaussian_boundary(0.5, 0.1, 0.45, 0.5, alpha=50.0) is None
    est = BoundaryEstimate(init=0.25, alpha=50.0, min_samples=4, window=8)
    moved = est.update(torch.tensor([0.5, 0.6, 0.4, 0.5]), torch.tensor([-0.3, 1.2, 0.45, 0.45]))
    assert not moved and est.value == 0.25 and est.fits == 0  # no crossing: the previous value stays


def test_boundary_estimate_waits_smooths_and_keeps_its_window():
    est = BoundaryEstimate(init=0.0, alpha=2.0, momentum=0.7, window=6, min_samples=4)
    pos, neg = torch.tensor([0.7, 0.8, 0.9]), torch.tensor([0.1, 0.2, 0.3])
    assert not est.update(pos, neg) and est.value == 0.0  # 3 < 4 samples: nothing fitted
    assert est.update(torch.tensor([0.8]), torch.tensor([0.2]))
    p, q = torch.tensor([0.7, 0.8, 0.9, 0.8]), torch.tensor([0.1, 0.2, 0.3, 0.2])
    new = gaussian_boundary(p.mean().item(), p.std().item(), q.mean().item(), q.std().item(), 2.0)
    assert est.value == pytest.approx(0.7 * new) and est.fits == 1  # 0.7 t_new + 0.3 t_old (= 0)
    safe = p.mean().item() - 3 * p.std().item()
    assert est.safe == pytest.approx(0.7 * safe if 0 <= safe <= 1 else 0.0)
    est.update(torch.full((5,), 0.8), torch.full((5,), 0.2))
    assert len(est.positives) == 6 and est.positives[0] == pytest.approx(0.8)  # the oldest samples left the window


def test_boundary_outside_the_unit_interval_keeps_the_previous_value():
    est = BoundaryEstimate(init=0.3, min_samples=3, window=10)
    # both kinds of similarity negative: the crossing falls below 0
    assert not est.update(torch.tensor([-0.2, -0.3, -0.25]), torch.tensor([-0.8, -0.9, -0.85]))
    assert est.value == 0.3 and est.stats["mu_pos"] == pytest.approx(-0.25)


# --- the PNAA branches -----------------------------------------------------------------------
def test_negative_and_positive_branches_on_a_hand_made_similarity_matrix():
    """Regions are the unit axes, so each word's similarities are its own coordinates."""
    regions = torch.eye(3)
    words = torch.tensor([[0.8, 0.6, 0.0],  # s = [0.8, 0.6, 0]: one region above t = 0.7
                          [0.0, 0.6, -0.8],  # s = [0, 0.6, -0.8]: best region below t
                          [0.7, 0.7, 0.1414],  # two regions above t, equally
                          [5.0, 5.0, 5.0]])  # padding: must not count
    mask = torch.tensor([True, True, True, False])
    out = pnaa(words, regions, mask, boundary=0.7, scale=20.0, relevance=False)
    unit = words / words.norm(dim=-1, keepdim=True)
    # n = [0, 0.6 - 0.7, 0.7 - 0.7 (= 0: not below)]; p^f = [cos(w1, e1), 0 (nothing above), cos(w3, (e1 + e2) / 2)]
    p3 = (unit[2, 0] + unit[2, 1]).item() / math.sqrt(2)
    expected = ((0.8 + 0.0) + (-0.1 + 0.0) + (min(0.0, unit[2, 0].item() - 0.7) + p3)) / 3
    assert out.score.item() == pytest.approx(expected, abs=1e-5)
    assert out.below.item() == pytest.approx(1 / 3) and out.negative_mass.item() == pytest.approx(0.1 - min(0.0, unit[2, 0].item() - 0.7), abs=1e-5)
    torch.testing.assert_close(out.word_max[:3], torch.tensor([0.8, 0.6, unit[2, 0].item()]))

    # The relevance term, written out: LeakyReLU(0.1), L2 over the real words of each region, softmax over regions.
    s = unit[:3].numpy().astype(np.float64)
    relu = np.where(s > 0, s, 0.1 * s)
    relu = relu / (np.linalg.norm(relu, axis=0, keepdims=True) + 1e-8)
    soft = np.exp(20 * relu) / np.exp(20 * relu).sum(1, keepdims=True)
    relevance = (soft * s).sum(1).mean()
    full = pnaa(words, regions, mask, boundary=0.7, scale=20.0, relevance=True)
    assert full.score.item() == pytest.approx(expected + relevance, abs=1e-5)


def test_positive_weights_follow_exp_lambda_of_the_excess():
    regions = torch.eye(2)
    word = torch.tensor([[0.8, 0.75]])
    s = (word / word.norm()).squeeze()
    out = pnaa(word, regions, torch.tensor([True]), boundary=0.5, scale=20.0, relevance=False)
    w = torch.softmax(20 * (s - 0.5), dim=0)
    context = w[0] * regions[0] + w[1] * regions[1]
    assert out.score.item() == pytest.approx((s @ context / context.norm()).item(), abs=1e-6)


# --- the scorer ------------------------------------------------------------------------------
def features(n: int, tokens: int, d: int, seed: int, padded: bool = False, dtype=torch.float32) -> Features:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, tokens, d, generator=g, dtype=dtype)
    mask = torch.ones(n, tokens, dtype=torch.bool)
    if padded:
        for i in range(n):
            mask[i, 2 + i % (tokens - 2):] = False
    return Features(t.mean(1), t, mask)


def brute_force(m: pmp.PmpGuard, texts: Features, images: Features) -> torch.Tensor:
    out = torch.empty(len(texts.tokens), len(images.tokens))
    for a in range(len(texts.tokens)):
        words = m.cga.words(texts.tokens[a], texts.mask[a])
        for b in range(len(images.tokens)):
            out[a, b] = m.pair(words, m.cga.regions(images.tokens[b]))[0].score
    return out


def test_chunked_scoring_equals_unchunked_and_the_per_pair_loop(monkeypatch):
    m = method().eval()  # the stub's tokens are 8-d
    texts, images = features(7, 6, 8, 1, padded=True), features(5, 4, 8, 2)
    with torch.no_grad():
        whole = m.score(texts, images)
        monkeypatch.setattr(pmp, "GRID_TEXT_BLOCK", 2)
        monkeypatch.setattr(pmp, "GRID_BLOCK_ELEMENTS", 2 * 6 * 8 * 2)  # 2 texts x 2 images per block
        blocks = m.score(texts, images)
        loop = brute_force(m, texts, images)
    assert whole.shape == (7, 5)
    torch.testing.assert_close(blocks, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loop, whole, atol=1e-5, rtol=1e-5)


def reference_pair(cga: CrossGatedAttention, u: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, boundary: float,
                   scale: float, relevance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_PN, word maxima) of one pair straight from methods.md 5.3-5.4: the gates over the
    concatenations [u ; v~] and [v ; u~], softmaxes as written, normalised copies, the positive
    weights as a softmax over the regions above t, word by word."""
    aff = F.normalize(u, dim=-1) @ cga.affinity @ F.normalize(v, dim=-1).T
    alpha = torch.softmax(cga.scale * aff, dim=1)
    beta = torch.softmax(cga.scale * aff[mask], dim=0)  # over real words only
    v_ctx, u_ctx = alpha @ v, beta.T @ u[mask]
    g_u = torch.sigmoid(cga.word_gate(torch.cat([u, v_ctx], -1)))
    g_v = torch.sigmoid(cga.region_gate(torch.cat([v, u_ctx], -1)))
    un, vn = F.normalize(g_u * u + (1 - g_u) * v_ctx, dim=-1), F.normalize(g_v * v + (1 - g_v) * u_ctx, dim=-1)
    s = un @ vn.T
    word_max = s.max(1).values
    per_word = []
    for i in range(len(s)):
        above = s[i] > boundary
        context = torch.zeros_like(vn[0])
        if above.any():
            context = torch.softmax(scale * (s[i][above] - boundary), dim=0) @ vn[above]
        p = (un[i] @ context) / context.norm().clamp_min(1e-8)
        if relevance:
            relu = F.leaky_relu(s, 0.1) * mask[:, None]
            relu = relu / (relu.norm(dim=0, keepdim=True) + 1e-8)
            p = p + torch.softmax(scale * relu[i], dim=0) @ s[i]
        per_word.append((word_max[i] - boundary).clamp(max=0) + p)
    return torch.stack(per_word)[mask].mean(), word_max


def reference_grid(m: pmp.PmpGuard, texts: Features, images: Features, boundary: float) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, n_t, n_i = m.config, len(texts.tokens), len(images.tokens)
    dtype = texts.tokens.dtype
    score, word_max = torch.empty(n_t, n_i, dtype=dtype), torch.full((n_t, n_i, texts.tokens.shape[1]), math.nan, dtype=dtype)
    for a in range(n_t):
        for b in range(n_i):
            score[a, b], word_max[a, b] = reference_pair(m.cga, texts.tokens[a], texts.mask[a], images.tokens[b], boundary,
                                                         cfg.pnaa_scale, cfg.relevance)
    return score, word_max


@pytest.mark.parametrize("affinity_std, scale", [(0.3, 20.0), (3.0, 50.0)])  # the shared exponential / plain softmaxes
@pytest.mark.parametrize("boundary", [0.0, 0.35])
@pytest.mark.parametrize("relevance", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_grid_equals_the_equations_pair_by_pair(monkeypatch, affinity_std, scale, boundary, relevance, dtype, tol):
    """The optimised all-pairs scorer (length-ordered text blocks cut to their longest text, one
    affinity product, one unshifted exponential for both CGA softmaxes, batched gate products,
    PNAA rearranged) against the equations per pair, in any block size; the larger W_a takes the
    guarded path with the two softmaxes, the larger lambda PNAA's shifted one. In fp64 the two
    agree to 1e-10: what separates them in fp32 is rounding only."""
    m = method(pnaa_scale=scale, relevance=relevance).eval().to(dtype)
    with torch.no_grad():
        nn.init.normal_(m.cga.affinity, std=affinity_std)
        for gate in (m.cga.word_gate, m.cga.region_gate):
            nn.init.normal_(gate.weight, std=0.3)
    m.estimate.safe = boundary  # the evaluation boundary
    texts, images = features(7, 7, 8, 11, padded=True, dtype=dtype), features(5, 5, 8, 12, dtype=dtype)
    texts.mask[4, 1] = False  # a hole inside a caption: padding need not be a tail
    with torch.no_grad():
        words, regions = m.parts(texts, images)  # the words cut to the longest caption (6 of 7 positions)
        shared = 2 * float((m.cga.scale * words.affinity).norm(dim=-1).max()) <= SAFE_EXPONENT
        assert shared == (affinity_std < 1) == m.cga.grid_words(words).shared
        expected, expected_max = reference_grid(m, texts, images, boundary)
        real = words.mask.unsqueeze(1).expand(-1, len(images.tokens), -1)
        for text_block, elements in [(8, 2**20), (2, 2 * 6 * 8 * 2), (1, 6 * 8)]:  # all at once, 2 x 2 and 1 x 1 pairs a block
            monkeypatch.setattr(pmp, "GRID_TEXT_BLOCK", text_block)
            monkeypatch.setattr(pmp, "GRID_BLOCK_ELEMENTS", elements)
            out = m.grid(words, regions, ("score", "word_max"))
            assert out["score"].dtype == dtype
            torch.testing.assert_close(out["score"], expected, atol=tol, rtol=tol)
            torch.testing.assert_close(out["word_max"][real], expected_max[:, :, :real.shape[-1]][real], atol=tol, rtol=tol)
        torch.testing.assert_close(m.score(texts, images), expected, atol=tol, rtol=tol)


def test_grid_scores_each_distinct_text_once(monkeypatch):
    """Copies of a text (same tokens, same mask) are scored once and share its scores and word
    maxima, wherever they sit; the same tokens under another mask are another text."""
    m = method().eval()
    m.estimate.safe = 0.2
    base, images = features(5, 6, 8, 21, padded=True), features(4, 5, 8, 22)
    order = torch.tensor([0, 3, 1, 3, 2, 0, 4, 3])  # 8 rows, 5 texts, copies apart from each other
    mask = base.mask[order].clone()
    mask[-1] = base.mask[4]  # text 3's tokens under text 4's mask: a sixth text
    texts = Features(base.embedding[order], base.tokens[order], mask)
    scored = []

    def counting(words, *args, **kwargs):
        scored.append(len(words))
        return pnaa_scores(words, *args, **kwargs)

    monkeypatch.setattr(pmp, "pnaa_scores", counting)
    monkeypatch.setattr(pmp, "GRID_TEXT_BLOCK", 2)
    with torch.no_grad():
        words, regions = m.parts(texts, images)
        distinct, copies = pmp.distinct_texts(words)
        assert len(distinct.tokens) == 6 and torch.equal(distinct.tokens[copies], words.tokens)
        assert torch.equal(distinct.mask[copies], words.mask)
        out = m.grid(words, regions, ("score", "word_max"))
        expected, expected_max = reference_grid(m, texts, images, 0.2)
    assert sum(scored) == 6 * 4  # pairs: each distinct text against each image, once
    torch.testing.assert_close(out["score"], expected, atol=1e-5, rtol=1e-5)
    real = words.mask.unsqueeze(1).expand(-1, 4, -1)
    torch.testing.assert_close(out["word_max"][real], expected_max[:, :, :real.shape[-1]][real], atol=1e-5, rtol=1e-5)
    for a, b in [(1, 3), (0, 5)]:
        assert torch.equal(out["score"][a], out["score"][b])
        torch.testing.assert_close(out["word_max"][a], out["word_max"][b], rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(out["score"][1], out["score"][7])
    assert pmp.distinct_texts(m.parts(base, images)[0])[1] is None  # all distinct: the words as they are


def softmax_form_pnaa(words, regions, word_mask, boundary, scale, relevance):
    """PNAA as first written: normalised copies, the positive weights a masked softmax."""
    words, regions = F.normalize(words, dim=-1), F.normalize(regions, dim=-1)
    sim = words @ regions.transpose(-1, -2)
    real = word_mask.to(sim.dtype)
    word_max = sim.max(dim=-1).values
    negative = (word_max - boundary).clamp(max=0)
    above = sim - boundary > 0
    weights = torch.softmax(torch.where(above, scale * (sim - boundary), MASKED), dim=-1) * above.any(-1, keepdim=True)
    context = weights @ regions
    per_word = negative + (words * context).sum(-1) / context.norm(dim=-1).clamp_min(1e-8)
    if relevance:
        relu = F.leaky_relu(sim, 0.1) * real.unsqueeze(-1)
        relu = relu / (relu.norm(dim=-2, keepdim=True) + 1e-8)
        per_word = per_word + (torch.softmax(scale * relu, dim=-1) * sim).sum(-1)
    count = real.sum(-1).clamp_min(1.0)
    return (per_word * real).sum(-1) / count, ((word_max < boundary).to(sim.dtype) * real).sum(-1) / count, -(negative * real).sum(-1)


@pytest.mark.parametrize("scale", [20.0, 50.0])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.9])
def test_pnaa_equals_the_softmax_form_in_value_and_gradient(scale, t):
    """The training path's PNAA (no normalised copies, unnormalised positive weights, float
    masks) against the softmax form, gradients included, the learnable boundary's among them."""
    g = torch.Generator().manual_seed(int(10 * t + scale))
    words = torch.randn(6, 7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    regions = torch.randn(6, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 7, generator=g) > 0.3
    mask[:, 0] = True
    boundary = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, generator=g, dtype=torch.float64)
    for relevance in (True, False):
        ours = pnaa(words, regions, mask, boundary, scale, relevance)
        score, below, negative_mass = softmax_form_pnaa(words, regions, mask, boundary, scale, relevance)
        for a, b in [(ours.score, score), (ours.below, below), (ours.negative_mass, negative_mass)]:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        params = [words, regions, boundary]
        for a, b in zip(torch.autograd.grad((ours.score * weight).sum() + ours.negative_mass.sum(), params),
                        torch.autograd.grad((score * weight).sum() + negative_mass.sum(), params)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_fusion_alpha_mixes_in_the_global_cosine():
    m = method(fusion_alpha=0.25).eval()
    plain = method().eval()
    texts, images = features(4, 4, 8, 3), features(3, 3, 8, 4)
    with torch.no_grad():
        g = torch.nn.functional.normalize(texts.embedding, dim=-1) @ torch.nn.functional.normalize(images.embedding, dim=-1).T
        torch.testing.assert_close(m.score(texts, images), 0.25 * g + 0.75 * plain.score(texts, images), atol=1e-5, rtol=1e-5)


def test_top_k_rescores_only_the_first_stage_candidates():
    full_method, top = method().eval(), method(rescore_top_k=2).eval()
    assert [s.tag for s in top.scorers()] == ["top2"] and [s.tag for s in full_method.scorers()] == [""]
    texts, images = features(9, 5, 8, 5), features(6, 4, 8, 6)
    with torch.no_grad():
        full = full_method.score(texts, images)
        partial = torch.cat(list(top.scorers()[0](EncodedSplit(top, texts, images, chunk=4))))  # texts in 3 chunks
    g = torch.nn.functional.normalize(texts.embedding, dim=-1) @ torch.nn.functional.normalize(images.embedding, dim=-1).T
    by_text = g >= g.topk(2, dim=1).values[:, -1:]
    by_image = g >= g.topk(2, dim=0).values[-1:]
    candidate = by_text | by_image
    assert by_image.sum() > 0 and (candidate & ~by_text).any()  # the image side adds pairs of its own
    torch.testing.assert_close(partial[candidate], full[candidate], atol=1e-5, rtol=1e-5)
    assert partial[~candidate].max() < partial[candidate].min()  # re-scored pairs rank first in both directions
    torch.testing.assert_close(partial[~candidate], g[~candidate] - pmp.OUTSIDE_TOP_K)


# --- training ----------------------------------------------------------------------------------
def dense_reference_loss(m: pmp.PmpGuard, batch) -> torch.Tensor:
    """L_IA + lambda L_PA with the whole B x B PNAA matrix under autograd, each pair scored from
    the equations (:func:`reference_pair`)."""
    from rsnc_bench.methods import info_nce

    texts = m.backbone.encode_text(batch.text, tokens=True)
    images = m.backbone.encode_image(batch.images, tokens=True)
    n, boundary = len(texts.tokens), float(m.boundary())
    s = torch.stack([torch.stack([reference_pair(m.cga, texts.tokens[a], texts.mask[a], images.tokens[b], boundary, 20.0, True)[0]
                                  for b in range(n)]) for a in range(n)])
    off = s.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf)
    pos = s.diagonal()
    pa = ((0.2 - pos + off.max(1).values).clamp_min(0) + (0.2 - pos + off.max(0).values).clamp_min(0)).sum()
    return info_nce(texts.embedding, images.embedding, 20.0)[0] + pa


def test_mined_pairs_give_the_full_matrix_gradient():
    a, b = method(rows=8), method(rows=8)
    b.load_state_dict(a.state_dict())
    batch = token_batch(list(range(8)))
    out = a.training_loss(batch)
    reference = dense_reference_loss(b, batch)
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    out.loss.backward()
    reference.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_mining_among_the_top_k_scores_only_the_candidates_and_takes_their_hardest():
    full, mined = method(rows=12), method(rows=12, mine_top_k=2)
    mined.load_state_dict(full.state_dict())
    batch = token_batch(list(range(12)))
    texts, images = full.backbone.encode_text(batch.text, tokens=True), full.backbone.encode_image(batch.images, tokens=True)
    words, regions = full.parts(texts, images)
    with torch.no_grad():
        want = full.batch_grid(words, regions, texts, images)
        got = mined.batch_grid(words, regions, texts, images)
    g = torch.nn.functional.normalize(texts.embedding, dim=-1) @ torch.nn.functional.normalize(images.embedding, dim=-1).T
    off = g.detach().fill_diagonal_(-math.inf)
    candidate = torch.eye(12, dtype=torch.bool) | (off >= off.topk(2, dim=1).values[:, -1:]) | (off >= off.topk(2, dim=0).values[-1:])
    assert torch.equal(~got["score"].isnan(), candidate) and candidate.sum() < 12 * 12 / 2
    torch.testing.assert_close(got["score"][candidate], want["score"][candidate], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["word_max"][candidate], want["word_max"][candidate], atol=1e-5, rtol=1e-5, equal_nan=True)
    out = mined.training_loss(batch)  # the triplet's negatives: the hardest candidates
    out.loss.backward()
    assert torch.isfinite(out.loss) and mined.cga.affinity.grad is not None
    with pytest.raises(ConfigError, match="mine_top_k >= 0"):
        pmp.PmpGuardConfig(mine_top_k=-1)


class WideTokenBackbone(nn.Module):
    """A token stub large enough that the mined pairs' gathered parts exceed the 32,768 elements
    above which the CPU's accumulating index_put_ runs in parallel: 12 word positions (padded by
    row), 16 regions, 32 channels."""

    embed_dim = 32

    def __init__(self, rows: int):
        super().__init__()
        self.text = nn.Parameter(torch.randn(rows, 12, self.embed_dim))
        self.image = nn.Parameter(torch.randn(rows, 16, self.embed_dim))

    def encode_text(self, ids, tokens=False):
        t = self.text[ids[:, 0]]
        mask = torch.arange(t.shape[1]) < (4 + ids[:, :1] % 8)
        return Features(t.mean(1), t, mask)

    def encode_image(self, images, tokens=False):
        v = self.image[images[:, 0, 0, 0].long()]
        return Features(v.mean(1), v, torch.ones(v.shape[:2], dtype=torch.bool))


def train_briefly(steps: int = 4, rows: int = 96, batch: int = 48) -> list[torch.Tensor]:
    torch.manual_seed(0)
    m = pmp.PmpGuard(WideTokenBackbone(rows), pmp.PmpGuardConfig(boundary_min_samples=20, boundary_window=200))
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(1)
    record = []
    for _ in range(steps):
        out = m.training_loss(token_batch(torch.randperm(rows, generator=order)[:batch].tolist()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        record += [out.loss.detach(), torch.tensor(out.logs["boundary"])]
        record += [out.clean, out.flagged.double(), *out.others.values()]
    return record + [p.detach().clone() for p in m.parameters()]


def test_training_repeats_exactly_with_two_threads():
    """Same seed, same thread count: the same losses, boundary and weights, bit for bit. The
    mined pairs' parts used to be gathered by advanced indexing, whose gradient (index_put_ with
    accumulate) adds repeated rows atomically from several threads once a tensor reaches 32,768
    elements, in an order that changed from run to run (a default-grid pmpguard cell gave 25.60
    and 23.82 mR in two runs); they are gathered by index_select now."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = train_briefly(), train_briefly()
    finally:
        torch.set_num_threads(threads)
    assert 3 * 48 * 11 * 32 >= 32768  # the gathered parts are large enough to take the parallel path
    assert first[7] != 0.0  # the boundary was fitted (from step 3), so its samples are part of what repeats
    for a, b in zip(first, second):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_text_ids_are_cut_to_the_longest_caption_for_a_causal_tower():
    from rsnc_bench.backbones import BackboneConfig, build_backbone

    torch.manual_seed(0)
    clip = build_backbone(BackboneConfig("tiny-b32")).eval()
    ids = clip.tokenize(["a harbor with two boats", "three tanks", "a wide river beside a small farmland"])
    cut = pmp.trim_text_ids(clip, ids)
    longest = int((ids != 0).sum(1).max())
    assert ids.shape[1] == 77 and cut.shape[1] == longest and torch.equal(cut, ids[:, :longest])
    with torch.no_grad():
        full, short = clip.encode_text(ids, tokens=True), clip.encode_text(cut, tokens=True)
    torch.testing.assert_close(short.embedding, full.embedding, atol=1e-5, rtol=1e-5)
    real = short.mask
    torch.testing.assert_close(short.tokens[real], full.tokens[:, :longest][real], atol=1e-5, rtol=1e-5)
    stub_ids = torch.tensor([[3, 0, 0], [4, 0, 0]])
    assert pmp.trim_text_ids(TokenBackbone(), stub_ids) is stub_ids  # not a causal tower: unchanged


def test_clean_signal_logs_and_resume_state():
    m = method(rows=10, boundary_min_samples=2, boundary_window=50)
    before = method(rows=10, boundary_min_samples=2, boundary_window=50)
    before.load_state_dict(m.state_dict())  # the boundary the step scores with (it moves after)
    batch = token_batch([1, 3, 5, 7])
    out = m.training_loss(batch)
    assert {"boundary", "boundary_safe", "word_gate_pos", "word_gate_neg", "region_gate_pos", "flagged", "l_ia", "l_pa"} <= set(out.logs)
    assert out.clean.shape == out.flagged.shape == (4,) and set(out.others) == {"negative_mass", "words_above", "word_gate"}
    # methods.md 5.8: S_PN(i, i) and, flagged, more than half the real words below t; others oriented higher = cleaner
    texts = before.backbone.encode_text(batch.text, tokens=True)
    images = before.backbone.encode_image(batch.images, tokens=True)
    with torch.no_grad():
        own, fused = before.pair(*before.parts(texts, images))
    torch.testing.assert_close(out.clean, own.score, atol=1e-5, rtol=1e-5)
    assert out.flagged.tolist() == (own.below > 0.5).tolist()
    torch.testing.assert_close(out.others["words_above"], 1 - own.below.double())
    torch.testing.assert_close(out.others["negative_mass"], -own.negative_mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.others["word_gate"], -fused.word_gate, atol=1e-5, rtol=1e-5)
    restored = method(rows=10)
    restored.load_state_dict(m.state_dict())
    assert restored.estimate.value == m.estimate.value and len(restored.estimate.positives) == len(m.estimate.positives)


def test_boundary_samples_follow_naaf():
    """Matched samples: the real words of captions whose own image ranks first, with that image;
    mismatched: the same words with the caption's lowest-scoring image."""
    m = method(boundary_min_samples=2, boundary_window=100)
    score = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.3, 0.2], [0.1, 0.6, 0.7]])  # rows 0 and 2 rank their own image first
    word_max = torch.arange(27, dtype=torch.float32).reshape(3, 3, 3) / 100
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    m._update_boundary({"score": score, "word_max": word_max}, mask)
    torch.testing.assert_close(m.estimate.positives, torch.tensor([0.00, 0.01, 0.24]))  # (0,0) words 0-1, (2,2) word 0
    torch.testing.assert_close(m.estimate.negatives, torch.tensor([0.03, 0.04, 0.18]))  # (0,1) words 0-1, (2,0) word 0


def test_learnable_boundary_starts_from_the_first_fit_and_learns():
    m = method(rows=10, boundary="learnable", boundary_min_samples=3, boundary_window=100)
    eye = torch.eye(4)
    matched, other = torch.tensor([0.8, 0.75, 0.85, 0.8]).view(4, 1, 1), torch.tensor([0.2, 0.25, 0.15, 0.2]).view(4, 1, 1)
    word_max = matched * eye.unsqueeze(-1) + other * (1 - eye).unsqueeze(-1)
    m._update_boundary({"score": eye + 0.01 * torch.arange(4.0), "word_max": word_max.expand(4, 4, 1).contiguous()}, torch.ones(4, 1, dtype=torch.bool))
    assert m.estimate.fits == 1 and 0.2 < m.estimate.value < 0.8
    assert m.learned_boundary.item() == pytest.approx(m.estimate.value)
    out = m.training_loss(token_batch(list(range(10))))
    out.loss.backward()
    assert m.learned_boundary.grad is not None and m.learned_boundary.grad != 0
    head = m.param_groups()[1]
    assert head["lr_scale"] == 10.0 and any(p is m.learned_boundary for p in head["params"])


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="boundary='gauss'; choose one of estimated, learnable"):
        pmp.PmpGuardConfig(boundary="gauss")
    with pytest.raises(ConfigError, match="eval_boundary"):
        pmp.PmpGuardConfig(eval_boundary="test")
    assert "reconstructed" in METHODS.get("pmpguard").__doc__


SYNTHETIC_300 = ("n_train=300", "n_val=40", "n_test=60", "image_size=48")


# The summed hardest-negative hinge at lambda = 1 collapses S_PN to a constant on random-init tiny
# towers (docs/methods/pmpguard.md); at lambda = 0.02 (about the batch mean) they learn.
@pytest.mark.slow
def test_noisy_rows_get_lower_pair_scores_on_synthetic_at_noise_0_6(tmp_path):
    key = CellKey("pmpguard", "synthetic", "tiny-vit", "shuffle", 0.6, 42, 3)
    spec = CellSpec(key, data_root=str(tmp_path / "data"), dataset_options=SYNTHETIC_300, method_options=("loss_weight=0.02",))
    doc = run_cell(spec, ResultStore(tmp_path / "runs"))
    assert doc["status"] == "complete", doc.get("traceback")
    last = doc["history"][-1]
    assert last["detection"]["auroc"] > 0.55 and last["detection"]["n_scored"] > 0.9 * doc["noise"]["n_rows"]
    assert 0 < last["logs"]["boundary"] < 1 and {"word_gate_pos", "word_gate_neg", "mu_pos", "mu_neg"} <= set(last["logs"])
