"""KER (Keyword Explicit Reasoning) building blocks for the iEBAKER / EBAKER plugins (methods.md 4.2).

* ``keyword_vocabulary``: the top-N content words of the training captions (function words
  removed, spatial-relation words kept), the statistics of the released iEBAKER lists.
* ``mask_keywords``: a masked copy of each caption's token sequence plus MLM labels, for
  open_clip's CLIP BPE (the papers') or a Hugging Face WordPiece tokenizer (non-paper: the
  ``timm-hf`` backbones). The default ("corrected") masks every sub-token of every keyword;
  ``faithful_offset=True`` reproduces the original code's off-by-one position bug.
* ``KerHead``: the reference structure: text-to-image cross-attention (no residual), CLIP
  residual blocks with QuickGELU, an MLM head; the reference's initialisation.
* ``mlm_loss``: mean cross-entropy over the labelled positions (the reference); ``ker_loss``: the
  same loss computed where it is needed, with ``vocab_cross_entropy`` for the 49,408-way projection.

Labels use 0 as "ignore" (id 0 is CLIP's "!" token and BERT's [PAD], never a keyword piece).
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsnc_bench.errors import ConfigError
from rsnc_builtin_methods.linear_ce import LogitWorkspace, vocab_cross_entropy

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

# Relation words the released lists keep as keywords (beside, near, next, ...): captions state
# layouts with them, and they are not in the standard stop-word lists the lists were filtered with.
SPATIAL_WORDS = frozenset("""
near beside besides next along alongside around behind across among amongst inside outside opposite
beyond surrounding adjacent""".split())
# English function words: articles, determiners, pronouns, auxiliaries, conjunctions, particles,
# prepositions, plus the relation words above. Used to build the content vocabulary and to
# measure a vocabulary's function-word share.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every either neither no all both few more most other such own same
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom whose
am is are was were be been being have has had having do does did doing will would shall should can could may
might must and but or nor if because as until while so than too very just only also not
of at by for with about against between into through during before after above below to from up down in out on
off over under again further then once here there when where why how""".split()) | SPATIAL_WORDS
KEYWORD_SOURCES = ("content", "frequency")


def keyword_vocabulary(captions: Iterable[str], size: int = 512, source: str = "content") -> list[str]:
    """The ``size`` most frequent words of the (training) captions, most frequent first, ties broken
    alphabetically; words are runs of a-z after lower-casing (methods.md 4.2).

    ``content`` (default): function words are skipped and spatial-relation words kept, which gives
    the released iEBAKER lists' statistics (per-dataset top-512 tag lists of content words; on the
    RSICD subset's train captions both mask about 57 % of words, under 7 % of them function
    words). ``frequency`` (non-paper): raw counts, whose top entries are a, the, of, is, ...
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"keyword vocabulary size must be a non-negative integer, got {size!r}")
    if source not in KEYWORD_SOURCES:
        raise ConfigError(f"keyword source {source!r}; choose one of {', '.join(KEYWORD_SOURCES)}")
    skip = FUNCTION_WORDS - SPATIAL_WORDS if source == "content" else frozenset()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word in _WORD.findall(caption.lower()) if word not in skip)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:size]]


def keyword_statistics(captions: Iterable[str], keywords: Iterable[str]) -> tuple[float, float]:
    """(share of caption words that are keywords, share of those that are function words), over
    word occurrences: what a vocabulary masks, and how much of it carries no content."""
    keys = set(keywords)
    words = [w for caption in captions for w in _WORD.findall(caption.lower())]
    masked = [w for w in words if w in keys]
    function = sum(w in FUNCTION_WORDS for w in masked)
    return len(masked) / max(1, len(words)), function / max(1, len(masked))


# ----------------------------------------------------------------------------- masking

def _clip_problem(tokenizer: Any) -> str | None:
    """Why ``tokenizer`` is not open_clip's CLIP BPE SimpleTokenizer (None when it is, or quacks like it)."""
    missing = [name for name in _CLIP_TOKENIZER_ATTRS if not hasattr(tokenizer, name)]
    if missing:
        return f"missing {', '.join(missing)}"
    ids = (len(tokenizer.encoder), tokenizer.sot_token_id, tokenizer.eot_token_id)
    if ids != (CLIP_VOCAB_SIZE, CLIP_SOT_ID, CLIP_EOT_ID):
        return f"vocabulary / SOT / EOT are {ids}, expected {(CLIP_VOCAB_SIZE, CLIP_SOT_ID, CLIP_EOT_ID)}"
    if getattr(tokenizer, "reduction_fn", None) is not None:
        return "it uses a reduction_mask instead of plain truncation"
    return None


def _is_wordpiece(tokenizer: Any) -> bool:
    """A Hugging Face fast tokenizer with a mask token (BERT's WordPiece, MiniLM's): its encodings
    map each token to the word it came from."""
    return bool(getattr(tokenizer, "is_fast", False)) and getattr(tokenizer, "mask_token_id", None) is not None


def _masker(tokenizer: Any) -> "_ClipMasker | _WordPieceMasker":
    """The masking rules of ``tokenizer``'s kind, or a ConfigError naming what KER accepts."""
    if _is_wordpiece(tokenizer):
        return _WordPieceMasker(tokenizer)
    problem = _clip_problem(tokenizer)
    if problem:
        raise ConfigError(
            f"KER keyword masking needs open_clip's CLIP BPE tokenizer (SimpleTokenizer) or a Hugging Face fast "
            f"tokenizer with a mask token; got {type(tokenizer).__name__} ({problem}); use such a backbone, or set ker_weight=0 to turn KER off"
        )
    return _ClipMasker(tokenizer)


def _clean_fn(tokenizer: Any) -> Callable[[str], str]:
    """The tokenizer's own text cleaning (ftfy + html unescape + whitespace + lower-case by default)."""
    clean = getattr(tokenizer, "clean_fn", None)
    if callable(clean):
        return clean
    from open_clip.tokenizer import basic_clean, whitespace_clean  # older open_clip: fixed 'lower' cleaning

    return lambda text: whitespace_clean(basic_clean(text)).lower()


def ker_vocab_size(tokenizer: Any) -> int:
    """The MLM head's output size for ``tokenizer``: its vocabulary (CLIP's 49,408 unless it is a WordPiece one)."""
    return len(tokenizer) if _is_wordpiece(tokenizer) else CLIP_VOCAB_SIZE


def _truncate(ids: list[int], flags: list[bool], length: int, eot: int) -> tuple[list[int], list[bool]]:
    """Truncate like open_clip: keep the first ``length`` tokens and force EOT (never masked) last."""
    if len(ids) <= length:
        return ids, flags
    ids, flags = ids[:length], flags[:length]
    ids[-1], flags[-1] = eot, False
    return ids, flags


def _offset_flags(caption: str, keys: set[str], n_ids: int) -> list[bool]:
    """Original-code bug (methods.md 4.2): whitespace word i is a keyword -> mask sequence position i.

    The raw whitespace word is compared as is (no lower-casing, no punctuation stripping), so
    "airport." or "Airport" is not the keyword "airport". Positions at or past the last token
    (EOT, which the text encoder pools) are skipped."""
    flags = [False] * n_ids
    for index, word in enumerate(caption.split()[: n_ids - 1]):
        flags[index] = word in keys
    return flags


class _ClipMasker:
    """open_clip's CLIP BPE: rows [SOT, bpe ids..., EOT], masked with MASK_ID."""

    mask_id = MASK_ID

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.clean = tokenizer, _clean_fn(tokenizer)
        self.default_length = getattr(tokenizer, "context_length", None)

    def _word_ids(self, word: str) -> list[int]:
        """BPE ids of one pre-tokenised word, exactly as ``SimpleTokenizer.encode`` computes them."""
        tok = self.tokenizer
        return [tok.encoder[piece] for piece in tok.bpe("".join(tok.byte_encoder[b] for b in word.encode("utf-8"))).split(" ")]

    def corrected(self, caption: str, keys: set[str], length: int) -> tuple[list[int], list[bool]]:
        """Every sub-token of every keyword word (a match of the tokenizer's ``pat``) is masked."""
        tok = self.tokenizer
        ids, flags = [tok.sot_token_id], [False]
        for word in tok.pat.findall(self.clean(caption)):
            pieces = self._word_ids(word)
            ids += pieces
            flags += [word.lower() in keys] * len(pieces)
        return _truncate(ids + [tok.eot_token_id], flags + [False], length, tok.eot_token_id)

    def faithful(self, caption: str, keys: set[str], length: int) -> tuple[list[int], list[bool]]:
        tok = self.tokenizer
        ids = [tok.sot_token_id] + tok.encode(caption) + [tok.eot_token_id]
        ids, _ = _truncate(ids, [False] * len(ids), length, tok.eot_token_id)
        return ids, _offset_flags(caption, keys, len(ids))


class _WordPieceMasker:
    """A Hugging Face fast tokenizer (non-paper: the papers use CLIP's BPE): rows as the backbone
    tokenises them ([CLS], pieces..., [SEP], truncated with [SEP] kept), masked with its [MASK]."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.mask_id = tokenizer, int(tokenizer.mask_token_id)
        self.default_length = getattr(tokenizer, "model_max_length", None)

    def _encode(self, caption: str, length: int):
        return self.tokenizer(caption, truncation=True, max_length=length)

    def corrected(self, caption: str, keys: set[str], length: int) -> tuple[list[int], list[bool]]:
        """Every piece of every keyword word (a word of the tokenizer's pre-tokeniser, which splits
        punctuation off) is masked; special tokens never are."""
        enc = self._encode(caption, length)
        words = {w: caption[slice(*enc.word_to_chars(w))].lower() for w in set(enc.word_ids()) if w is not None}
        return list(enc["input_ids"]), [w is not None and words[w] in keys for w in enc.word_ids()]

    def faithful(self, caption: str, keys: set[str], length: int) -> tuple[list[int], list[bool]]:
        ids = list(self._encode(caption, length)["input_ids"])
        return ids, _offset_flags(caption, keys, len(ids))


def mask_keywords(
    captions: Sequence[str],
    keywords: Iterable[str],
    tokenizer: Any,
    context_length: int | None = None,
    faithful_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked_ids [N, L], labels [N, L]), both long (methods.md 4.2).

    Rows are the tokenizer's [start, ids..., end, 0...] truncated to L = ``context_length``
    (default the tokenizer's) with the end token kept last. Masked positions hold the mask id
    (CLIP: MASK_ID; WordPiece: [MASK]) and their label is the original id; every other label is 0
    (ignored). Corrected (default): a pre-tokenised word whose lower-cased form is a keyword has all
    of its sub-tokens masked. ``faithful_offset=True``: see ``_offset_flags``.
    """
    masker = _masker(tokenizer)
    if isinstance(captions, str):
        captions = [captions]
    length = context_length if context_length is not None else masker.default_length
    if not isinstance(length, int) or length < 2:
        raise ConfigError(f"KER context_length must be an integer >= 2 (room for SOT and EOT), got {length!r}")
    row_fn = masker.faithful if faithful_offset else masker.corrected
    keys = set(keywords) if faithful_offset else {k.lower() for k in keywords}
    masked = torch.zeros(len(captions), length, dtype=torch.long)
    labels = torch.zeros(len(captions), length, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids, flags = row_fn(caption, keys, length)
        original = torch.tensor(ids, dtype=torch.long)
        where = torch.tensor(flags, dtype=torch.bool)
        masked[row, : len(ids)] = torch.where(where, torch.full_like(original, masker.mask_id), original)
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


def attend(attn: nn.MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
    """``attn(query, key_value, key_value, need_weights=False)[0]`` for a batch-first module on
    [B, Lq, D] queries and [B, Lk, D] keys / values, computed batch-first: the module's own
    projections and ``scaled_dot_product_attention``, without the sequence-first transposes and
    the copies of the packed projection that ``nn.MultiheadAttention`` makes (the same math; equal
    up to float rounding, tested). ``query is key_value``: one packed projection, as the module.
    Configurations this does not cover (dropout while training, bias_k, add_zero_attn, separate
    projection weights) go through the module itself."""
    if (not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn
            or (attn.dropout > 0 and attn.training)):
        return attn(query, key_value, key_value, need_weights=False)[0]
    dim, heads = query.shape[-1], attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if query is key_value:
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:
        q = F.linear(query, weight[:dim], None if bias is None else bias[:dim])
        k, v = F.linear(key_value, weight[dim:], None if bias is None else bias[dim:]).chunk(2, dim=-1)
    split = lambda t: t.unflatten(-1, (heads, dim // heads)).transpose(1, 2)  # noqa: E731  [B, H, L, D / H]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return F.linear(out.transpose(1, 2).flatten(2), attn.out_proj.weight, attn.out_proj.bias)


def query_slots(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, k], valid [B, k]) for a [B, L] bool mask, k its largest row count: row b's True
    positions in ascending order, padded; ``t.gather(1, index)[valid]`` lists the True entries in
    the order of ``t[positions]`` (row-major)."""
    counts = positions.sum(1)
    k = int(counts.max()) if len(counts) else 0
    index = torch.argsort((~positions).to(torch.uint8), dim=1, stable=True)[:, :k]
    return index, torch.arange(k, device=positions.device) < counts[:, None]


class ResidualBlock(nn.Module):
    """CLIP's pre-norm residual attention block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), the MLP
    c_fc (4x) -> QuickGELU -> c_proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(dim, 4 * dim), gelu=QuickGELU(), c_proj=nn.Linear(4 * dim, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + attend(self.attn, h, h)
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` at the query slots of ``query_slots`` only, as [n, D] rows: every position
        still serves as a key and value, but the queries, the residual and the MLP are computed at
        the n valid slots alone. Every step after the attention is per position, so the rows equal
        ``forward(x)[positions]`` up to float rounding (tested)."""
        h = self.ln_1(x)
        pick = lambda t: t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        y = (pick(x) + attend(self.attn, pick(h), h))[valid]
        return y + self.mlp(self.ln_2(y))


class KerHead(nn.Module):
    """KER head (methods.md 4.2), the reference code's structure: masked-text tokens attend to image
    tokens (LayerNorm on both sides; the attention output replaces the text, no residual, so the
    prediction has to go through the image), then CLIP residual blocks, a LayerNorm and the MLM
    head Linear -> QuickGELU -> LayerNorm -> Linear(vocabulary).

    Heads: ``heads``, or width // 64 when 0 (the reference's rule: 8 at 512). Initialisation as
    the reference (CLIP's scheme): attention in-projections ~ N(0, w^-1/2); attention out- and MLP
    c_proj weights and the vocabulary projection ~ N(0, w^-1/2 (2 layers)^-1/2); MLP c_fc and the
    MLM dense layer ~ N(0, (2w)^-1/2); biases and LayerNorms as PyTorch initialises them.

    With ``positions``, only what the labelled positions need is computed: the last block's
    queries, residual and MLP, the MLM head and the vocabulary projection run at those positions
    alone (the blocks attend both ways, so every earlier layer runs at every position).
    """

    def __init__(self, dim: int, vocab_size: int = CLIP_VOCAB_SIZE, heads: int = 0, layers: int = 2):
        super().__init__()
        if layers < 1:
            raise ConfigError(f"KER head needs at least one transformer layer, got layers={layers}")
        self.heads = head_count(dim, heads or max(1, dim // 64))
        self.ln_pre_t = nn.LayerNorm(dim)
        self.ln_pre_i = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, self.heads, batch_first=True)
        self.blocks = nn.ModuleList(ResidualBlock(dim, self.heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(dim)
        self.mlm = nn.Sequential(OrderedDict(dense=nn.Linear(dim, dim), gelu=QuickGELU(), ln=nn.LayerNorm(dim), fc=nn.Linear(dim, vocab_size)))
        self.logit_workspace = LogitWorkspace()  # not state: a reusable buffer for the vocabulary logits
        self._init_weights(dim, layers)

    def _init_weights(self, dim: int, layers: int) -> None:
        attn_std, proj_std, fc_std = dim**-0.5, dim**-0.5 * (2 * layers) ** -0.5, (2 * dim) ** -0.5
        for attn in [self.cross_attn] + [block.attn for block in self.blocks]:
            nn.init.normal_(attn.in_proj_weight, std=attn_std)
            nn.init.normal_(attn.out_proj.weight, std=proj_std)
        for block in self.blocks:
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm.fc.weight, std=proj_std)

    def features(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the vocabulary projection: [B, L, D], or [n, D] at the n True entries of
        ``positions`` [B, L] (row-major, as ``t[positions]``)."""
        image = self.ln_pre_i(image_tokens)
        x = attend(self.cross_attn, self.ln_pre_t(text_tokens), image)
        if positions is None:
            for block in self.blocks:
                x = block(x)
        else:
            for block in self.blocks[:-1]:
                x = block(x)
            index, valid = query_slots(positions)
            x = self.blocks[-1].forward_at(x, index, valid) if index.shape[1] else x[positions]
        m = self.mlm
        return m.ln(m.gelu(m.dense(self.ln_post(x))))

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] text tokens, [B, P, D] image tokens -> [B, L, vocab_size] logits, or [n, vocab_size]
        at the n True entries of ``positions`` [B, L] only (the vocabulary projection dominates memory)."""
        return self.mlm.fc(self.features(text_tokens, image_tokens, positions))


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over positions whose label != 0 (methods.md 4.2); a zero that keeps
    the graph (so backward still works) when nothing is labelled. The reference for ``ker_loss``."""
    labelled = labels != IGNORE_LABEL
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled].float(), labels[labelled])


def ker_loss(head: KerHead, text_tokens: torch.Tensor, image_tokens: torch.Tensor, labels: torch.Tensor,
             vocab: torch.Tensor | None = None) -> torch.Tensor:
    """mlm_loss(head(text, image), labels), computing the head only where the labelled positions
    need it and the vocabulary cross-entropy fused (``vocab_cross_entropy``).

    ``vocab`` (NON-PAPER, EbakerConfig.ker_vocab="labels"): sorted token ids that hold every label;
    the softmax then runs over these ids alone instead of the whole vocabulary."""
    labelled = labels != IGNORE_LABEL
    if not bool(labelled.any()):
        return sum(p.sum() for p in head.parameters()) * 0.0 + text_tokens.sum() * 0.0
    fc, targets = head.mlm.fc, labels[labelled]
    weight, bias, workspace = fc.weight, fc.bias, head.logit_workspace
    if vocab is not None:
        index = torch.searchsorted(vocab, targets).clamp_max(len(vocab) - 1)
        if not bool((vocab[index] == targets).all()):
            raise ConfigError("KER restricted vocabulary: a label is not among the vocabulary ids collected from the train captions")
        weight, bias, targets, workspace = weight[vocab], None if bias is None else bias[vocab], index, None
    return vocab_cross_entropy(head.features(text_tokens, image_tokens, labelled), weight, bias, targets, workspace)


__all__ = [
    "FUNCTION_WORDS", "MASK_ID", "IGNORE_LABEL", "KerHead", "QuickGELU", "ResidualBlock", "attend", "head_count",
    "keyword_statistics", "keyword_vocabulary", "ker_loss", "ker_vocab_size", "mask_keywords", "mlm_loss", "query_slots",
]
