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
    """
    words, regions = F.normalize(words, dim=-1), F.normalize(regions, dim=-1)
    sim = words @ regions.transpose(-1, -2)  # [..., m, n]
    real = word_mask.to(sim.dtype)
    word_max = sim.max(dim=-1).values
    negative = (word_max - boundary).clamp(max=0)  # (b)
    shifted = sim - boundary  # t is a float or a 0-d tensor (the learnable variant)
    above = shifted > 0
    weights = torch.softmax(torch.where(above, scale * shifted, MASKED), dim=-1) * above.any(-1, keepdim=True)
    context = weights @ regions  # (c): zero for a word with no region above t
    positive = (words * context).sum(-1) / context.norm(dim=-1).clamp_min(1e-8)
    per_word = negative + positive
    if relevance:  # SCAN's normalisation: over the (real) words of each region
        relu = F.leaky_relu(sim, 0.1) * real.unsqueeze(-1)
        relu = relu / (relu.norm(dim=-2, keepdim=True) + 1e-8)
        per_word = per_word + (torch.softmax(scale * relu, dim=-1) * sim).sum(-1)
    count = real.sum(-1).clamp_min(1.0)
    return PnaaOutput(
        score=(per_word * real).sum(-1) / count,  # (d)
        below=((word_max < boundary).to(sim.dtype) * real).sum(-1) / count,
        negative_mass=-(negative * real).sum(-1),
        word_max=word_max,
    )
