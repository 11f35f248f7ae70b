"""The ITRA / EBAKER CLIP pipeline that RRSITR and (i)EBAKER share (methods.md section 2):
global cosine plus a local token-level Frobenius similarity, fused at evaluation.

Local similarity (methods.md 2.4): for text a with row-normalised token features T_a and image b
with row-normalised patch features V_b, ``local(a, b) = kappa * ||T_a V_b^T||_F``, kappa = 20
while training and 1 at evaluation. It is computed with the exact Gram identity
``||T V^T||_F^2 = <T^T T, V^T V>_F``: one D x D Gram matrix per text and per image, then a plain
matrix product, always in fp32 (Gram entries lose precision in half precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rsnc_bench.backbones import Features
from rsnc_bench.methods import Method, MethodConfig

CLIP_SCALE = math.exp(2.996)  # fixed logit scale, tau = 0.05 (methods.md 2.5)
GRAM_BLOCK_ELEMENTS = 2**26  # Gram rows per block: at most 256 MB of fp32 per block


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
        raise ValueError("this method needs token features; the backbone returned none (needs_tokens must be set)")
    tokens = F.normalize(features.tokens.float(), dim=-1)
    if not keep_padding and features.mask is not None:
        tokens = tokens * features.mask.unsqueeze(-1).to(tokens.dtype)
    return tokens


def token_grams(tokens: torch.Tensor) -> torch.Tensor:
    """[N, T, D] -> [N, D*D]: the flattened Gram matrix sum_p t_p t_p^T of each row's tokens."""
    tokens = tokens.float()
    return (tokens.transpose(1, 2) @ tokens).flatten(1)


def frobenius_scores(text: torch.Tensor, image: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """[n_t, n_i] ||T_a V_b^T||_F for every text a and image b (normalised tokens), in fp32 and
    in blocks whose Gram matrices stay within GRAM_BLOCK_ELEMENTS each."""
    block = max(1, GRAM_BLOCK_ELEMENTS // (text.shape[-1] ** 2))
    with torch.autocast(text.device.type, enabled=False):
        rows = []
        for t in range(0, len(text), block):
            text_grams = token_grams(text[t: t + block])
            rows.append(torch.cat([text_grams @ token_grams(image[i: i + block]).T for i in range(0, len(image), block)], dim=1))
        squared = torch.cat(rows)
    return (squared.clamp_min(0) + eps).sqrt()


def cosine_matrix(texts: Features, images: Features) -> torch.Tensor:
    """[n_t, n_i] cosine of the global embeddings, rows = texts (methods.md notation)."""
    return F.normalize(texts.embedding.float(), dim=-1) @ F.normalize(images.embedding.float(), dim=-1).T


class ClipPipeline(Method):
    """Base of the methods built on the shared pipeline: token features, the kappa switch on the
    module's training flag, and the fused evaluation score."""

    config_type = ClipPipelineConfig
    needs_tokens = True

    def encode_pair(self, text: torch.Tensor, images: torch.Tensor) -> tuple[Features, Features]:
        return self.backbone.encode_text(text, tokens=True), self.backbone.encode_image(images, tokens=True)

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
