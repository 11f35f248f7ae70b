"""The ITRA / EBAKER CLIP pipeline that RRSITR and (i)EBAKER share (methods.md section 2):
global cosine plus a local token-level Frobenius similarity, fused at evaluation.

Local similarity (methods.md 2.4): for text a with row-normalised token features T_a and image b
with row-normalised patch features V_b, ``local(a, b) = kappa * ||T_a V_b^T||_F``, kappa = 20
while training and 1 at evaluation. It is computed with the exact Gram identity
``||T V^T||_F^2 = <T^T T, V^T V>_F``: one D x D Gram matrix per text and per image, then a plain
matrix product, always in fp32 (Gram entries lose precision in half precision). The Gram matrices
are symmetric, so only their upper triangles enter the product (D (D + 1) / 2 entries, the text
side's off-diagonal entries doubled, an exact scaling): half the multiply-adds of the full D^2 form.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from rsnc_bench.backbones import Features
from rsnc_bench.engine.retrieval import cosine
from rsnc_bench.methods import Capabilities, Method, MethodConfig

CLIP_SCALE = math.exp(2.996)  # fixed logit scale, tau = 0.05 (methods.md 2.5)
GRAM_BLOCK_ELEMENTS = 2**26  # Gram rows per block: at most 256 MB of fp32 per block
GRAM_CACHE_ELEMENTS = 2**28  # the images' packed Gram matrices are computed once when they fit in 1 GB of fp32


@dataclass(frozen=True)
class ClipPipelineConfig(MethodConfig):
    logit_scale: float = CLIP_SCALE  # global logits: cosine x 20, fixed
    local_scale: float = CLIP_SCALE  # kappa while training (1 at evaluation)
    fusion_alpha: float = 0.9  # evaluation score: alpha * global + (1 - alpha) * unscaled local
    text_padding: bool = True  # include text positions after EOT in the local score (faithful, methods.md 2.3)
    gram_eps: float = 1e-6  # inside the square root while training, so the gradient stays finite


def local_tokens(features: Features, keep_padding: bool = True) -> torch.Tensor:
    """[N, T, D] L2-normalised token features; masked-out (padding) positions zeroed unless kept."""
    if features.tokens is None:
        raise ValueError("this method needs token features; the backbone returned none (declare Capabilities(needs_tokens=True))")
    tokens = F.normalize(features.tokens.float(), dim=-1)
    if not keep_padding and features.mask is not None:
        tokens = tokens * features.mask.unsqueeze(-1).to(tokens.dtype)
    return tokens


def token_grams(tokens: torch.Tensor) -> torch.Tensor:
    """[N, T, D] -> [N, D*D]: the flattened Gram matrix sum_p t_p t_p^T of each row's tokens."""
    tokens = tokens.float()
    return (tokens.transpose(1, 2) @ tokens).flatten(1)


@functools.lru_cache(maxsize=16)
def _upper_triangle(dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices of the upper triangle of a dim x dim matrix, weight 1 on its diagonal and 2 off it)."""
    rows, cols = torch.triu_indices(dim, dim, device=device)
    return rows * dim + cols, torch.where(rows == cols, 1.0, 2.0).to(device)


def packed_grams(tokens: torch.Tensor, doubled: bool = False) -> torch.Tensor:
    """[N, T, D] -> [N, D (D + 1) / 2]: the upper triangle of each row's Gram matrix, its
    off-diagonal entries doubled when ``doubled``, so that for symmetric Gram matrices
    ``<G_t, G_v>_F = packed_grams(T, doubled=True) . packed_grams(V)`` (doubling is exact in
    floating point). Full D x D Gram matrices are formed GRAM_BLOCK_ELEMENTS at a time; without
    autograd the result is written in place (no concatenation, no second buffer)."""
    dim = tokens.shape[-1]
    index, weight = _upper_triangle(dim, tokens.device)
    step = max(1, GRAM_BLOCK_ELEMENTS // (dim * dim))
    if torch.is_grad_enabled() and tokens.requires_grad:
        parts = [token_grams(tokens[r: r + step]).index_select(1, index) for r in range(0, len(tokens), step)]
        packed = parts[0] if len(parts) == 1 else torch.cat(parts)
        return packed * weight if doubled else packed
    packed = torch.empty(len(tokens), len(index), dtype=torch.float32, device=tokens.device)
    for r in range(0, len(tokens), step):
        torch.index_select(token_grams(tokens[r: r + step]), 1, index, out=packed[r: r + step])
    return packed.mul_(weight) if doubled else packed


def frobenius_scores(text: torch.Tensor, image: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """[n_t, n_i] ||T_a V_b^T||_F for every text a and image b (normalised tokens), in fp32 and
    in blocks whose packed Gram matrices stay within GRAM_BLOCK_ELEMENTS each. The images' blocks
    are computed once when all of them fit in GRAM_CACHE_ELEMENTS, else again for each text block."""
    dim = text.shape[-1]
    packed = dim * (dim + 1) // 2
    block = max(1, GRAM_BLOCK_ELEMENTS // packed)
    starts = range(0, len(image), block)
    with torch.autocast(text.device.type, enabled=False):
        image_grams = lambda i: packed_grams(image[i: i + block])  # noqa: E731
        if len(image) * packed <= max(GRAM_CACHE_ELEMENTS, GRAM_BLOCK_ELEMENTS):
            cached = [image_grams(i) for i in starts]
            image_grams = lambda i: cached[i // block]  # noqa: E731
        rows = []
        for t in range(0, len(text), block):
            text_grams = packed_grams(text[t: t + block], doubled=True)
            blocks = [text_grams @ image_grams(i).T for i in starts]
            rows.append(blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1))
        squared = rows[0] if len(rows) == 1 else torch.cat(rows)
    return (squared.clamp_min(0) + eps).sqrt()


def split_features(features: Features, sizes: Sequence[int]) -> list[Features]:
    """Split one Features batch along the batch dimension into consecutive parts of ``sizes``."""
    parts = [t.split(list(sizes)) if t is not None else [None] * len(sizes) for t in (features.embedding, features.tokens, features.mask)]
    return [Features(*fields) for fields in zip(*parts)]


def cosine_matrix(texts: Features, images: Features) -> torch.Tensor:
    """[n_t, n_i] cosine of the global embeddings, rows = texts (methods.md notation)."""
    return cosine(texts.embedding, images.embedding)


class ClipPipeline(Method):
    """Base of the methods built on the shared pipeline: token features, the kappa switch on the
    module's training flag, and the fused evaluation score."""

    config_type = ClipPipelineConfig
    capabilities = Capabilities(needs_tokens=True)

    def encode_pair(self, text: torch.Tensor, images: torch.Tensor) -> tuple[Features, Features]:
        return self.backbone.encode_text(text, tokens=True), self.backbone.encode_image(images, tokens=True)

    def encode_text_batches(self, *texts: torch.Tensor) -> list[Features]:
        """Token features of several id batches, through one text-tower call when their sequence
        lengths agree (the tower treats each row on its own, so this is the separate calls'
        result up to float rounding, in fewer and larger matrix products)."""
        if len(texts) > 1 and len({t.shape[1:] for t in texts}) == 1:
            return split_features(self.backbone.encode_text(torch.cat(texts), tokens=True), [len(t) for t in texts])
        return [self.backbone.encode_text(t, tokens=True) for t in texts]

    def local_matrix(self, texts: Features, images: Features) -> torch.Tensor:
        """kappa * Frobenius local similarity; kappa = local_scale while training, 1 at evaluation."""
        cfg = self.config
        kappa, eps = (cfg.local_scale, cfg.gram_eps) if self.training else (1.0, 0.0)
        text = local_tokens(texts, cfg.text_padding)
        return kappa * frobenius_scores(text, local_tokens(images), eps)

    def score(self, texts: Features, images: Features) -> torch.Tensor:
        """S_f = alpha * cosine + (1 - alpha) * unscaled Frobenius (methods.md 3.8, 4.6)."""
        alpha = self.config.fusion_alpha
        return alpha * cosine_matrix(texts, images) + (1 - alpha) * self.local_matrix(texts, images)
