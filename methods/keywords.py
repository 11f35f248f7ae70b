"""KER (Keyword Explicit Reasoning) building blocks for the iEBAKER / EBAKER plugins (methods.md 4.2).

* ``keyword_vocabulary``: the top-N words of the training captions, computed from the data.
* ``mask_keywords``: a masked copy of each caption's CLIP token sequence plus MLM labels.
  The default ("corrected") masks every BPE sub-token of every keyword; ``faithful_offset=True``
  reproduces the original code's off-by-one position bug.
* ``KerHead``: text-to-image cross-attention, a small pre-norm transformer and an MLM head.
* ``mlm_loss``: mean cross-entropy over the labelled positions.

Labels use 0 as "ignore" (id 0 is CLIP's "!" token, never a keyword piece).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsnc_bench.errors import ConfigError

# The original code drops CLIP's last BPE merge so that id 49405 becomes <|mask|>, keeping the
# 49,408-entry vocabulary with SOT / EOT at 49406 / 49407 (methods.md 4.2).
MASK_ID = 49405
CLIP_VOCAB_SIZE = 49408
CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407
IGNORE_LABEL = 0

_WORD = re.compile(r"[a-z]+")
_CLIP_TOKENIZER_ATTRS = ("encoder", "bpe", "byte_encoder", "pat", "sot_token_id", "eot_token_id")


# ----------------------------------------------------------------------------- vocabulary

def keyword_vocabulary(captions: Iterable[str], size: int = 512) -> list[str]:
    """The ``size`` most frequent words of the (training) captions, most frequent first, ties broken
    alphabetically. Words are runs of a-z after lower-casing (methods.md 4.2)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"keyword vocabulary size must be a non-negative integer, got {size!r}")
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(_WORD.findall(caption.lower()))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:size]]


# ----------------------------------------------------------------------------- masking

def _require_clip_tokenizer(tokenizer: Any) -> None:
    """ConfigError unless ``tokenizer`` is open_clip's CLIP BPE SimpleTokenizer (or quacks like it)."""
    missing = [name for name in _CLIP_TOKENIZER_ATTRS if not hasattr(tokenizer, name)]
    problem = f"missing {', '.join(missing)}" if missing else ""
    if not missing:
        ids = (len(tokenizer.encoder), tokenizer.sot_token_id, tokenizer.eot_token_id)
        if ids != (CLIP_VOCAB_SIZE, CLIP_SOT_ID, CLIP_EOT_ID):
            problem = f"vocabulary / SOT / EOT are {ids}, expected {(CLIP_VOCAB_SIZE, CLIP_SOT_ID, CLIP_EOT_ID)}"
        elif getattr(tokenizer, "reduction_fn", None) is not None:
            problem = "it uses a reduction_mask instead of plain truncation"
    if problem:
        raise ConfigError(
            f"KER keyword masking needs open_clip's CLIP BPE tokenizer (SimpleTokenizer); got "
            f"{type(tokenizer).__name__} ({problem}); use an open_clip CLIP backbone, or set ker_weight=0 to turn KER off"
        )


def _clean_fn(tokenizer: Any) -> Callable[[str], str]:
    """The tokenizer's own text cleaning (ftfy + html unescape + whitespace + lower-case by default)."""
    clean = getattr(tokenizer, "clean_fn", None)
    if callable(clean):
        return clean
    from open_clip.tokenizer import basic_clean, whitespace_clean  # older open_clip: fixed 'lower' cleaning

    return lambda text: whitespace_clean(basic_clean(text)).lower()


def _word_ids(tokenizer: Any, word: str) -> list[int]:
    """BPE ids of one pre-tokenised word, exactly as ``SimpleTokenizer.encode`` computes them."""
    unicode_word = "".join(tokenizer.byte_encoder[b] for b in word.encode("utf-8"))
    return [tokenizer.encoder[piece] for piece in tokenizer.bpe(unicode_word).split(" ")]


def _truncate(ids: list[int], flags: list[bool], length: int, eot: int) -> tuple[list[int], list[bool]]:
    """Truncate like open_clip: keep the first ``length`` tokens and force EOT (never masked) last."""
    if len(ids) <= length:
        return ids, flags
    ids, flags = ids[:length], flags[:length]
    ids[-1], flags[-1] = eot, False
    return ids, flags


def _corrected_row(caption: str, keys: set[str], tokenizer: Any, clean: Callable[[str], str], length: int):
    """Corrected mapping (methods.md 4.2): every sub-token of every keyword word is masked."""
    ids, flags = [tokenizer.sot_token_id], [False]
    for word in tokenizer.pat.findall(clean(caption)):
        pieces = _word_ids(tokenizer, word)
        ids += pieces
        flags += [word.lower() in keys] * len(pieces)
    ids.append(tokenizer.eot_token_id)
    flags.append(False)
    return _truncate(ids, flags, length, tokenizer.eot_token_id)


def _faithful_row(caption: str, keys: set[str], tokenizer: Any, clean: Callable[[str], str], length: int):
    """Original-code bug (methods.md 4.2): whitespace word i is a keyword -> mask sequence position i.

    The raw whitespace word is compared as is (no lower-casing, no punctuation stripping), so
    "airport." or "Airport" is not the keyword "airport". Positions at or past EOT are skipped,
    so EOT (which the text encoder pools) is never masked."""
    ids = [tokenizer.sot_token_id] + tokenizer.encode(caption) + [tokenizer.eot_token_id]
    ids, _ = _truncate(ids, [False] * len(ids), length, tokenizer.eot_token_id)
    eot_position = len(ids) - 1
    flags = [False] * len(ids)
    for index, word in enumerate(caption.split()):
        if index >= eot_position:
            break
        if word in keys:
            flags[index] = True
    return ids, flags


def mask_keywords(
    captions: Sequence[str],
    keywords: Iterable[str],
    tokenizer: Any,
    context_length: int | None = None,
    faithful_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked_ids [N, L], labels [N, L]), both long (methods.md 4.2).

    Rows are [SOT, bpe ids..., EOT, 0...] truncated to L = ``context_length`` (default the
    tokenizer's) with EOT kept last. Masked positions hold MASK_ID and their label is the original
    id; every other label is 0 (ignored). Corrected (default): a pre-tokenised word (a match of the
    tokenizer's ``pat`` on the cleaned caption) whose lower-cased form is a keyword has all of its
    sub-tokens masked. ``faithful_offset=True``: see ``_faithful_row``.
    """
    _require_clip_tokenizer(tokenizer)
    if isinstance(captions, str):
        captions = [captions]
    length = context_length if context_length is not None else getattr(tokenizer, "context_length", None)
    if not isinstance(length, int) or length < 2:
        raise ConfigError(f"KER context_length must be an integer >= 2 (room for SOT and EOT), got {length!r}")
    row_fn = _faithful_row if faithful_offset else _corrected_row
    keys = set(keywords) if faithful_offset else {k.lower() for k in keywords}
    clean = _clean_fn(tokenizer)
    masked = torch.zeros(len(captions), length, dtype=torch.long)
    labels = torch.zeros(len(captions), length, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids, flags = row_fn(caption, keys, tokenizer, clean, length)
        original = torch.tensor(ids, dtype=torch.long)
        where = torch.tensor(flags, dtype=torch.bool)
        masked[row, : len(ids)] = torch.where(where, torch.full_like(original, MASK_ID), original)
        labels[row, : len(ids)] = torch.where(where, original, torch.zeros_like(original))
    return masked, labels


# ----------------------------------------------------------------------------- head

class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def head_count(dim: int, heads: int) -> int:
    """``heads`` if it divides ``dim``, else the largest divisor of ``dim`` below it (tiny CPU
    backbones have widths such as 24 or 64, which not every head count divides)."""
    if dim < 1 or heads < 1:
        raise ConfigError(f"KER head needs dim >= 1 and heads >= 1, got dim={dim}, heads={heads}")
    return max(h for h in range(1, min(heads, dim) + 1) if dim % h == 0)


class KerHead(nn.Module):
    """KER head (methods.md 4.2): text tokens attend to image tokens, then a pre-norm transformer
    and a BERT-style MLM head predict the masked keyword tokens.

    Init, CLIP-like and kept simple: every Linear / attention projection weight ~ N(0, dim^-0.5),
    except the MLP's first (fc) layer ~ N(0, (2 dim)^-0.5); all biases zero; LayerNorms (1, 0).
    """

    def __init__(self, dim: int, vocab_size: int = CLIP_VOCAB_SIZE, heads: int = 8, layers: int = 2):
        super().__init__()
        self.heads = head_count(dim, heads)
        self.norm_text = nn.LayerNorm(dim)
        self.norm_image = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, self.heads, batch_first=True)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, self.heads, dim_feedforward=4 * dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.mlm = nn.Sequential(nn.Linear(dim, dim), QuickGELU(), nn.LayerNorm(dim), nn.Linear(dim, vocab_size))
        self._init_weights(dim)

    def _init_weights(self, dim: int) -> None:
        std, fc_std = dim**-0.5, (2 * dim) ** -0.5
        fc_layers = {id(block.linear1) for block in self.blocks}
        for module in self.modules():
            if isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=std)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.Linear):  # includes attention out_proj
                nn.init.normal_(module.weight, std=fc_std if id(module) in fc_layers else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] text tokens, [B, P, D] image tokens -> [B, L, vocab_size] logits, or [n, vocab_size]
        at the n True entries of ``positions`` [B, L] only (the vocabulary projection dominates memory)."""
        keys = self.norm_image(image_tokens)
        attended, _ = self.cross_attn(self.norm_text(text_tokens), keys, keys, need_weights=False)
        x = text_tokens + attended
        for block in self.blocks:
            x = block(x)
        x = self.norm_out(x)
        return self.mlm(x if positions is None else x[positions])


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over positions whose label != 0 (methods.md 4.2); a zero that keeps
    the graph (so backward still works) when nothing is labelled."""
    labelled = labels != IGNORE_LABEL
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled].float(), labels[labelled])


def ker_loss(head: KerHead, text_tokens: torch.Tensor, image_tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mlm_loss(head(text, image), labels), projecting to the vocabulary only at labelled positions."""
    labelled = labels != IGNORE_LABEL
    if not bool(labelled.any()):
        return sum(p.sum() for p in head.parameters()) * 0.0 + text_tokens.sum() * 0.0
    return F.cross_entropy(head(text_tokens, image_tokens, labelled).float(), labels[labelled])


__all__ = [
    "MASK_ID", "IGNORE_LABEL", "KerHead", "QuickGELU", "head_count", "keyword_vocabulary", "ker_loss", "mask_keywords", "mlm_loss",
]
