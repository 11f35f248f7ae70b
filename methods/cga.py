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
:meth:`CrossGatedAttention.grid` is the same computation for every text of a block against every
image of a block, without autograd and without broadcast copies (the evaluation and mining path),
from text-side operands made once per block of texts (:meth:`CrossGatedAttention.grid_words`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from rsnc_builtin_methods.pnaa import LOG2E, MASKED, SAFE_EXPONENT, Scratch


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
class GridWords:
    """The text side of :meth:`CrossGatedAttention.grid` for a block of T texts, made once by
    :meth:`CrossGatedAttention.grid_words` and reused against every block of images."""

    words: Words
    affinity: torch.Tensor  # [T m, d]: s u W_a / |u|; times log2 e when shared, so that 2^(affinity . v / |v|) = e^(s a)
    real: torch.Tensor  # [T, m]: the word mask as floats
    gate_context: torch.Tensor  # [T, m, d]: u W^v_ctx^T at real words, 0 at padding
    tokens: torch.Tensor  # [T, m, d]: u at real words, 0 at padding
    shared: bool  # one exponential, unshifted, for both softmaxes (see grid)


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
        to_regions = torch.softmax(logits, dim=-1)  # alpha_ij, over regions j
        padding = torch.where(words.mask, 0.0, MASKED).unsqueeze(-1)  # added, not filled in: exp(a - 1e4 - max) = 0 all the same
        to_words = torch.softmax(logits + padding, dim=-2).transpose(-1, -2)  # beta_ji, over real words i
        word_gate = torch.sigmoid((to_regions @ regions.gate_context).add_(words.gate_self))
        region_gate = torch.sigmoid((to_words @ words.gate_context).add_(regions.gate_self))
        fused_words = torch.lerp(to_regions @ regions.tokens, words.tokens, word_gate)  # g u + (1 - g) v~
        fused_regions = torch.lerp(to_words @ words.tokens, regions.tokens, region_gate)
        weight = words.mask.to(word_gate.dtype)
        mean_word_gate = (word_gate.mean(-1) * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)
        return Fused(fused_words, fused_regions, mean_word_gate, region_gate.mean((-1, -2)))

    @torch.no_grad()
    def grid_words(self, words: Words) -> GridWords:
        """The text-side operands of :meth:`grid` for the texts of ``words`` (parts [T, m, .]).

        Each logit s a_ij lies within +-c, c = s max_i |u_i W_a| / |u_i| over the text's words
        (|v_j / |v_j|| = 1). While 2c <= SAFE_EXPONENT the exponentials of every logit of the block
        are normal numbers without the softmax's shift (e^-30 to e^30), so :meth:`grid` takes one
        exponential for both softmaxes, as 2^(logit log2 e), log2 e folded into the text side
        (torch's exp2 is several times faster than its exp on the CPU). Otherwise :meth:`grid`
        takes the two softmaxes as :meth:`forward` does."""
        t, m, d = words.tokens.shape
        logits = self.scale * words.affinity
        bound = float(torch.linalg.vector_norm(logits, dim=-1).max()) if logits.numel() else 0.0  # c over the block
        shared = logits.dtype in (torch.float32, torch.float64) and 2 * bound <= SAFE_EXPONENT
        real = words.mask.to(logits.dtype)
        keep = real.unsqueeze(-1)
        return GridWords(words, (logits * LOG2E if shared else logits).reshape(t * m, d), real,
                         words.gate_context * keep, words.tokens * keep, shared)

    @torch.no_grad()
    def grid(self, words: GridWords | Words, regions: Regions, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u^ [T, I, m, d], v^ [T, I, n, d]) of every text in ``words`` (parts [T, m, .], or
        their :meth:`grid_words`) against every image in ``regions`` (parts [I, n, .]):
        :meth:`forward` on ``words[:, None]`` and ``regions[None]`` up to float rounding, without
        the gate means and without autograd.

        - One product gives every pair's affinities, [T m, d] @ [d, I n].
        - Both softmaxes share one exponential when it is safe (:meth:`grid_words`): alpha and beta
          are its row and column normalisations (beta's over real words: a bmm with the mask).
          Otherwise, the two softmaxes as :meth:`forward` takes them.
        - Each side's gate and context come from batched products over images (words) and over
          texts (regions), the gate's own term added inside the product (``baddbmm``), the text
          side's operands zero at padding (so beta needs no mask of its own).

        ``scratch``: buffers shared with the other blocks of a grid (:class:`methods.pnaa.Scratch`);
        the results live in it until the next call with the same scratch.
        """
        scratch = scratch or Scratch()
        side = words if isinstance(words, GridWords) else self.grid_words(words)
        words = side.words
        (t, m, d), (i, n) = words.tokens.shape, regions.tokens.shape[:2]
        logits = torch.mm(side.affinity, regions.unit.reshape(i * n, d).T,
                          out=scratch.take("logits", (t * m, i * n), side.affinity)).view(t, m, i, n)
        if side.shared:
            weights = logits.exp2_()  # e^(s a_ij), unshifted
            to_regions = torch.mul(weights, weights.sum(-1, keepdim=True).reciprocal_(),
                                   out=scratch.take("alpha", (t, m, i, n), weights))  # alpha, over the regions of each image
            column = torch.bmm(side.real.view(t, 1, m), weights.view(t, m, i * n))  # over the real words of each region
            # beta at real words (padding: zeroed operands below). A real word's weight is at least e^-30, so the floor
            # only meets a text without real words, whose weights (at most e^30) it keeps finite.
            to_words = weights.view(t, m, i * n).mul_(column.clamp_min_(1e-20).reciprocal_())
        else:
            to_regions = torch.softmax(logits, dim=-1)
            to_words = torch.softmax(logits.add_(torch.where(words.mask, 0.0, MASKED).view(t, m, 1, 1)), dim=1).view(t, m, i * n)
        # Word side, per image: alpha [T m, n] @ [n, d], twice (alpha read in place: a strided view).
        alpha = to_regions.view(t * m, i, n).transpose(0, 1)
        gate = torch.baddbmm(words.gate_self.reshape(1, t * m, d), alpha, regions.gate_context,
                             out=scratch.take("word_gate", (i, t * m, d), alpha)).sigmoid_()
        context = torch.bmm(alpha, regions.tokens, out=scratch.take("word_context", (i, t * m, d), alpha))
        fused_words = scratch.take("fused_words", (t, i, m, d), alpha)
        torch.lerp(context.view(i, t, m, d), words.tokens, gate.view(i, t, m, d), out=fused_words.transpose(0, 1))  # g u + (1 - g) v~
        # Region side, per text: beta^T [I n, m] @ [m, d], twice, over the real words' parts only.
        beta = to_words.transpose(1, 2)
        gate = torch.baddbmm(regions.gate_self.reshape(1, i * n, d), beta, side.gate_context,
                             out=scratch.take("region_gate", (t, i * n, d), beta)).sigmoid_()
        fused_regions = torch.bmm(beta, side.tokens, out=scratch.take("fused_regions", (t, i * n, d), beta))
        fused_regions.lerp_(regions.tokens.reshape(1, i * n, d), gate)  # g v + (1 - g) u~
        return fused_words, fused_regions.view(t, i, n, d)
