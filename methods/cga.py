"""Cross-gated attention (CGA) for PMPGuard (Ouyang et al., AAAI 2026, as restated by a third
party; methods.md 5.3), for every (text, image) pair:

    a_ij = u_i^T W_a v_j / (|u_i| |v_j|)
    v~_i = sum_j softmax_j(s a_ij) v_j          u~_j = sum_i softmax_i(s a_ij) u_i
    g^u_i = sigmoid(W^u [u_i ; v~_i] + b^u)     g^v_j = sigmoid(W^v [v_j ; u~_j] + b^v)
    u^_i = g^u_i * u_i + (1 - g^u_i) * v~_i     v^_j = g^v_j * v_j + (1 - g^v_j) * u~_j

The gates are linear in the attended context, so W^u [u; v~] = W^u_self u + softmax(.) (V W^u_ctx^T):
the projections are made once per text and per image (:meth:`words` / :meth:`regions`) and each
pair costs only products of size m x n x d. Pair tensors broadcast: text parts [Ct, 1, m, .] against
image parts [1, Ci, n, .] score a grid; gathered [P, m, .] and [P, n, .] score a list of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from methods.pnaa import MASKED


@dataclass
class Words:
    """Per-text parts of CGA: tokens u [.., m, d], real-word mask [.., m], u W_a / |u|, the
    word gate's own term W^u_self u + b^u, and u W^v_ctx^T (the region gate's context term)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    affinity: torch.Tensor
    gate_self: torch.Tensor
    gate_context: torch.Tensor

    def map(self, fn) -> "Words":
        return Words(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass
class Regions:
    """Per-image parts: tokens v [.., n, d], v / |v|, W^v_self v + b^v and v W^u_ctx^T."""

    tokens: torch.Tensor
    unit: torch.Tensor
    gate_self: torch.Tensor
    gate_context: torch.Tensor

    def map(self, fn) -> "Regions":
        return Regions(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass
class Fused:
    words: torch.Tensor  # u^ [..., m, d]
    regions: torch.Tensor  # v^ [..., n, d]
    word_gate: torch.Tensor  # mean of g^u over real words and channels [...]
    region_gate: torch.Tensor  # mean of g^v over regions and channels [...]


class CrossGatedAttention(nn.Module):
    def __init__(self, dim: int, scale: float = 10.0, gate_bias: float | None = None):
        super().__init__()
        self.scale = scale  # softmax scale on a_ij (SCAN / NAAF range 10-20; methods.md 5.3)
        self.affinity = nn.Parameter(torch.eye(dim))  # W_a, starting as plain cosine attention
        self.word_gate = nn.Linear(2 * dim, dim)  # W^u over [u ; v~]
        self.region_gate = nn.Linear(2 * dim, dim)  # W^v over [v ; u~]
        if gate_bias is not None:
            for gate in (self.word_gate, self.region_gate):
                nn.init.constant_(gate.bias, gate_bias)

    def words(self, tokens: torch.Tensor, mask: torch.Tensor) -> Words:
        d = tokens.shape[-1]
        own, ctx = self.word_gate.weight[:, :d], self.region_gate.weight[:, d:]
        return Words(tokens, mask, F.normalize(tokens, dim=-1) @ self.affinity,
                     F.linear(tokens, own, self.word_gate.bias), tokens @ ctx.T)

    def regions(self, tokens: torch.Tensor) -> Regions:
        d = tokens.shape[-1]
        own, ctx = self.region_gate.weight[:, :d], self.word_gate.weight[:, d:]
        return Regions(tokens, F.normalize(tokens, dim=-1), F.linear(tokens, own, self.region_gate.bias), tokens @ ctx.T)

    def forward(self, words: Words, regions: Regions) -> Fused:
        logits = self.scale * (words.affinity @ regions.unit.transpose(-1, -2))  # [..., m, n]
        real = words.mask.unsqueeze(-1)
        to_regions = torch.softmax(logits, dim=-1)  # alpha_ij, over regions j
        to_words = torch.softmax(logits.masked_fill(~real, MASKED), dim=-2).transpose(-1, -2)  # beta_ji, over real words i
        word_gate = torch.sigmoid((to_regions @ regions.gate_context).add_(words.gate_self))
        region_gate = torch.sigmoid((to_words @ words.gate_context).add_(regions.gate_self))
        fused_words = torch.lerp(to_regions @ regions.tokens, words.tokens, word_gate)  # g u + (1 - g) v~
        fused_regions = torch.lerp(to_words @ words.tokens, regions.tokens, region_gate)
        weight = words.mask.to(word_gate.dtype)
        mean_word_gate = (word_gate.mean(-1) * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)
        return Fused(fused_words, fused_regions, mean_word_gate, region_gate.mean((-1, -2)))
