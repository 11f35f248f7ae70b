"""Positive-negative awareness attention (PNAA) for PMPGuard, reconstructed from NAAF (Zhang et
al., CVPR 2022; methods.md 5.4): a boundary t between matched and mismatched word-region
similarities, estimated from Gaussian fits, a negative branch for words whose best region stays
below it, and a positive branch that aggregates only the regions above it.

All functions broadcast over leading pair dimensions: similarities ``[..., m, n]`` (m words, n
regions), word masks ``[..., m]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASKED = -1e4  # a finite "minus infinity" for softmax logits (finite in fp16 / bf16 as well)
SAFE_EXPONENT = 60.0  # exp(-60) = 8.8e-27: exponentials of fp32 logits shifted by at most this stay normal numbers
SAFE_SCALE = 40.0  # exp(40) = 2.4e17: unshifted exponentials of lambda x, |x| <= 1, neither overflow nor underflow
LOG2E = 1 / math.log(2)  # e^x = 2^(x log2 e): torch's exp2 is several times faster than its exp on the CPU


def gaussian_boundary(mu_pos: float, sd_pos: float, mu_neg: float, sd_neg: float, alpha: float) -> float | None:
    """t where N(t; mu+, sd+^2) = alpha N(t; mu-, sd-^2), or None when the densities never cross.

    A t^2 + B t + C = 0 with A = sd+^2 - sd-^2, B = 2 (mu+ sd-^2 - mu- sd+^2),
    C = mu-^2 sd+^2 - mu+^2 sd-^2 + 2 sd+^2 sd-^2 ln(sd- / (alpha sd+)) (methods.md 5.4(a)).
    The root taken is NAAF's (-B + sqrt(B^2 - 4AC)) / 2A: the crossing between the two means
    whichever variance is larger (the larger root lies beyond mu+ when sd+ < sd-). Equal
    variances leave the linear equation's single root.
    """
    a = sd_pos**2 - sd_neg**2
    b = 2 * (mu_pos * sd_neg**2 - mu_neg * sd_pos**2)
    c = mu_neg**2 * sd_pos**2 - mu_pos**2 * sd_neg**2 + 2 * sd_pos**2 * sd_neg**2 * math.log(sd_neg / (alpha * sd_pos))
    if abs(a) < 1e-12 * max(sd_pos, sd_neg) ** 2:
        return None if b == 0 else -c / b
    disc = b * b - 4 * a * c
    if disc < 0:
        return None
    return (-b + math.sqrt(disc)) / (2 * a)


class BoundaryEstimate:
    """t_k from the most recent matched / mismatched word samples (methods.md 5.4(a)).

    Each update appends samples to two windows of at most ``window`` values; once both hold
    ``min_samples``, Gaussians are fitted and the new crossing t_new smoothed into
    t <- momentum t_new + (1 - momentum) t. A crossing that does not exist or falls outside
    [0, 1] keeps the previous value. ``safe`` is NAAF's test-time boundary mu+ - 3 sd+, under the
    same guard and smoothing.
    """

    def __init__(self, init: float = 0.0, alpha: float = 2.0, momentum: float = 0.7, window: int = 1000, min_samples: int = 200):
        self.alpha, self.momentum, self.window, self.min_samples = alpha, momentum, window, min_samples
        self.value = self.safe = init
        self.fits = 0  # successful boundary fits so far
        self.stats: dict[str, float] = {}
        self.positives = torch.empty(0)
        self.negatives = torch.empty(0)

    def update(self, positives: torch.Tensor, negatives: torch.Tensor) -> bool:
        """Add samples and refit; True when the boundary moved."""
        self.positives = torch.cat([self.positives, positives.detach().float().cpu()])[-self.window:]
        self.negatives = torch.cat([self.negatives, negatives.detach().float().cpu()])[-self.window:]
        if min(len(self.positives), len(self.negatives)) < self.min_samples:
            return False
        mu_pos, sd_pos = self.positives.mean().item(), self.positives.std().item()
        mu_neg, sd_neg = self.negatives.mean().item(), self.negatives.std().item()
        self.stats = {"mu_pos": mu_pos, "sd_pos": sd_pos, "mu_neg": mu_neg, "sd_neg": sd_neg}
        if min(sd_pos, sd_neg) <= 0:
            return False
        moved = False
        crossing = gaussian_boundary(mu_pos, sd_pos, mu_neg, sd_neg, self.alpha)
        if crossing is not None and 0.0 <= crossing <= 1.0:
            self.value = self.momentum * crossing + (1 - self.momentum) * self.value
            self.fits += 1
            moved = True
        safe = mu_pos - 3 * sd_pos
        if 0.0 <= safe <= 1.0:
            self.safe = self.momentum * safe + (1 - self.momentum) * self.safe
        return moved

    def state(self) -> dict:
        return {"value": self.value, "safe": self.safe, "fits": self.fits, "stats": dict(self.stats),
                "positives": self.positives.clone(), "negatives": self.negatives.clone()}

    def load(self, state: dict) -> None:
        self.value, self.safe, self.fits, self.stats = state["value"], state["safe"], state["fits"], dict(state["stats"])
        self.positives, self.negatives = state["positives"].clone(), state["negatives"].clone()


@dataclass
class PnaaOutput:
    """Per pair: the score S_PN, the share of real words whose best region is below t, the
    negative mass -sum_i n_i; per word: the best region's similarity (boundary samples)."""

    score: torch.Tensor  # [...]
    below: torch.Tensor  # [...]
    negative_mass: torch.Tensor  # [...]
    word_max: torch.Tensor  # [..., m]


def pnaa(words: torch.Tensor, regions: torch.Tensor, word_mask: torch.Tensor, boundary: float | torch.Tensor,
         scale: float = 20.0, relevance: bool = True) -> PnaaOutput:
    """S_PN = mean over real words i of n_i + p_i^f (+ p_i^r) (methods.md 5.4(b)-(d); NAAF).

    ``words`` [..., m, d] and ``regions`` [..., n, d] are the fused (gated) features; s_ij is
    their cosine. n_i = min(0, max_j s_ij - t); p_i^f = cos(u_i, sum_j w_ij v_j) with
    w_ij proportional to exp(scale (s_ij - t)) over the regions above t (0 when none is);
    p_i^r = sum_j softmax_j(scale * l2norm_over_words(LeakyReLU_0.1(s_ij))) s_ij.

    Computed as written up to float rounding, value and gradient, rearranged: s_ij from the
    unnormalised features and their norms (no normalised copies); p_i^f = sum_j e_ij s_ij /
    |sum_j e_ij v_j / |v_j|| for any e_ij proportional to w_ij (the weights' normalisation and any
    constant factor cancel; e_ij = [s_ij > t] exp(scale s_ij) while scale <= SAFE_SCALE in fp32,
    else shifted by the row's max); masks as float products, not boolean selections. t enters p^f
    only through the mask, as in the softmax form, which is invariant to the shift by t.
    """
    # s_ij = (u_i . v_j) / (|u_i| |v_j|): F.normalize's x / max(|x|, 1e-12), without normalised copies of the features
    inv_regions = 1 / torch.linalg.vector_norm(regions, dim=-1).clamp_min(1e-12)
    sim = (words @ regions.transpose(-1, -2)) * (1 / torch.linalg.vector_norm(words, dim=-1).clamp_min(1e-12)).unsqueeze(-1) \
        * inv_regions.unsqueeze(-2)  # [..., m, n]
    real = word_mask.to(sim.dtype)
    word_max = sim.max(dim=-1).values
    negative = (word_max - boundary).clamp(max=0)  # (b); t is a float or a 0-d tensor (the learnable variant)
    threshold = boundary.detach() if isinstance(boundary, torch.Tensor) else boundary
    above = torch.gt(sim.detach(), threshold, out=torch.empty_like(sim, requires_grad=False))
    if scale <= SAFE_SCALE and sim.dtype in (torch.float32, torch.float64):  # (exp(40) overflows half precision)
        weights = torch.exp(sim * scale) * above
        floor = (1e-8 * weights.detach().sum(-1)).clamp_min_(torch.finfo(sim.dtype).tiny)
    else:
        weights = torch.exp((sim - word_max.detach().unsqueeze(-1)) * scale) * above
        floor = 1e-8 * weights.detach().sum(-1).clamp_min_(1.0)  # >= 1 when a region is above t
    context = (weights * inv_regions.unsqueeze(-2)) @ regions  # (c): sum_j e_ij v_j / |v_j|, zero for a word with no region above t
    positive = (weights * sim).sum(-1) / context.norm(dim=-1).clamp_min(floor)  # |context| / sum_j e_ij clamped at 1e-8
    per_word = negative + positive
    if relevance:  # SCAN's normalisation: over the (real) words of each region
        relu = F.leaky_relu(sim, 0.1) * real.unsqueeze(-1)
        # the norm over words as a sum of squares (linalg's norm over dim -2 is slow on the CPU); the floor keeps the
        # gradient finite where a whole column is 0, as the norm's is
        norm = relu.square().sum(-2, keepdim=True).clamp_min(1e-30).sqrt()
        per_word = per_word + (torch.softmax(relu * (scale / (norm + 1e-8)), dim=-1) * sim).sum(-1)
    count = real.sum(-1).clamp_min(1.0)
    return PnaaOutput(
        score=(per_word * real).sum(-1) / count,  # (d)
        below=((word_max < boundary).to(sim.dtype) * real).sum(-1) / count,
        negative_mass=-(negative * real).sum(-1),
        word_max=word_max,
    )


class Scratch:
    """Output buffers that the blocks of one all-pairs grid reuse (``out=``), one per role, grown
    when a block needs more: fresh multi-megabyte temporaries per block cost more in page faults
    than the arithmetic that fills them. Each tensor handed out is overwritten whole by the
    operation it is the output of; hand-outs under one name alias, so a name is reused only once
    its previous tensor is no longer needed."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


@torch.no_grad()
def pnaa_scores(words: torch.Tensor, regions: torch.Tensor, word_mask: torch.Tensor, boundary: float,
                scale: float = 20.0, relevance: bool = True, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_PN [P], word_max [P, m]) of :func:`pnaa` for P pairs of unnormalised fused features
    ``words`` [P, m, d] and ``regions`` [P, n, d], ``word_mask`` [P, m], boundary t a float: the
    same quantities up to float rounding (word_max is 0 at padding), without autograd, rearranged
    so that no normalised copy of the features is made and no softmax is taken over the short
    region axis:

    - s_ij = (u_i . v_j) / (|u_i| |v_j|): one product, then the row and column scales; the row
      scale is 0 at padding words, so their rows of s are 0 and need no mask further on;
    - p_i^f = cos(u_i, sum_j w_ij v_j / |v_j|) = sum_j e_ij s_ij / |sum_j e_ij v_j / |v_j||, for any
      e_ij proportional to w_ij: the softmax's normalisation (and any constant factor) cancels.
      e_ij = [s_ij > t] exp(lambda s_ij) while 0 < lambda <= SAFE_SCALE (|lambda s_ij| <= lambda, no
      overflow), taken as 2^(lambda log2 e s_ij) of s thresholded at t (-inf below: weight 0);
      else exp(lambda (s_ij - max_j s_ij)), the softmax's own shift;
    - p_i^r's softmax is exp(x) / sum exp(x) without the shift, as |x| <= lambda (the relu's
      entries are at most its norm over words), under the same bound, again as a power of 2.

    ``scratch``: buffers shared with the other blocks of a grid (:class:`Scratch`).
    """
    scratch = scratch or Scratch()
    (p, m, d), n = words.shape, regions.shape[1]
    real = word_mask.to(words.dtype)
    inv_words = torch.linalg.vector_norm(words, dim=-1).clamp_min_(1e-12).reciprocal_().mul_(real)  # F.normalize's eps; 0 at padding
    inv_regions = torch.linalg.vector_norm(regions, dim=-1).clamp_min_(1e-12).reciprocal_()
    sim = torch.bmm(words, regions.transpose(1, 2), out=scratch.take("sim", (p, m, n), words))
    sim.mul_(inv_words.unsqueeze(-1)).mul_(inv_regions.unsqueeze(-2))  # [P, m, n]
    word_max = sim.amax(dim=-1)
    per_word = (word_max - boundary).clamp_(max=0)  # (b) n_i
    plain = 0 < scale <= SAFE_SCALE and sim.dtype in (torch.float32, torch.float64)
    weights = scratch.take("weights", (p, m, n), sim)
    if plain:  # (c): regions above t, 2^(lambda log2 e s); threshold is [s > t] exactly
        torch.threshold(sim, boundary, -math.inf, out=weights).mul_(scale * LOG2E).exp2_()
    else:
        torch.sub(sim, word_max.unsqueeze(-1), out=weights).mul_(scale).exp_()
        weights.mul_(torch.gt(sim, boundary, out=scratch.take("mask", (p, m, n), sim)))  # (float: bool is slow here)
    total = weights.sum(-1)
    agreement = torch.linalg.vecdot(weights, sim)
    context = torch.bmm(weights.mul_(inv_regions.unsqueeze(-2)), regions, out=scratch.take("context", (p, m, d), sim))  # sum_j e_ij v_j / |v_j|
    # |context| / sum_j e_ij is the normalised context's norm, clamped at 1e-8 as pnaa clamps it; no region above t: p = 0
    floor = (1e-8 * total).clamp_min_(torch.finfo(sim.dtype).tiny) if plain else 1e-8 * total.clamp_min_(1.0)
    per_word += agreement.div_(torch.linalg.vector_norm(context, dim=-1).clamp_min_(floor))  # p_i^f
    if relevance:  # SCAN's normalisation over the (real: the others' rows are 0) words of each region, then lambda-softmax over regions
        relu = torch.ops.aten.leaky_relu.out(sim, 0.1, out=weights)
        norm = torch.mul(relu, relu, out=scratch.take("mask", (p, m, n), sim)).sum(-2, keepdim=True).sqrt_()  # (a norm over dim -2 is slow on the CPU)
        if plain:
            relu.mul_((scale * LOG2E) / (norm + 1e-8)).exp2_()
            per_word += torch.linalg.vecdot(relu, sim).div_(relu.sum(-1))  # p_i^r
        else:
            per_word += torch.linalg.vecdot(torch.softmax(relu.mul_(scale / (norm + 1e-8)), dim=-1), sim)
    score = torch.linalg.vecdot(per_word, real) / real.sum(-1).clamp_min(1.0)  # (d)
    return score, word_max
