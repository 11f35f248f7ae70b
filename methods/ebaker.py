"""EBAKER (Ji et al., ACM MM 2024) and iEBAKER (Zhang et al., arXiv 2504.05644): eliminate before
align, keyword explicit reasoning and, optionally, sort after reversed retrieval (methods.md
section 4), on the shared CLIP pipeline.

- EBA: a bank of recent positive-pair similarities; at each epoch start a threshold at the drop
  ratio; from the drop epoch on, pairs at or below it stop being anchors but stay in the batch as
  negatives. ``split`` (iEBAKER) keeps separate global and local banks and masks, ``joint``
  (EBAKER) masks both losses with the global one.
- Bank size (methods.md 4.4): the papers' 200,000-entry bank starts full of N(0, 1) numbers, and on
  a single dataset it never fills with real values, so nothing is eliminated. Here the bank holds
  one epoch of training pairs and thresholds only real values by default. ``bank_size=200000``
  keeps the papers' size, and ``bank_init=normal`` reproduces their random start. The share of
  real entries is logged every step, so a silent no-op shows.
- KER (methods.md 4.2): masked-keyword language modelling through the same text tower, conditioned
  on the image patches (``methods/keywords.py``).
- SAR (methods.md 4.5, reconstructed): an evaluation-time reverse-rank re-ranker, off by default;
  results carry the ``+sar`` tag.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from rsnc_bench.engine.scoring import FullScore, Rerank, Scorer
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, Batch, EpochContext, LossOutput
from rsnc_builtin_methods.clip_pipeline import ClipPipeline, ClipPipelineConfig, cosine_matrix
from rsnc_builtin_methods.keywords import IGNORE_LABEL, KEYWORD_SOURCES, KerHead, ker_loss, ker_vocab_size, keyword_vocabulary, mask_keywords
from rsnc_builtin_methods.sar import sar_rerank

EBA_MODES = ("split", "joint")
BANK_INITS = ("empty", "normal")
EMPTY_MASKS = ("skip", "keep_best")
KER_VOCABS = ("full", "labels")
PAPER_BANK_SIZE = 200_000


@dataclass(frozen=True)
class EbakerConfig(ClipPipelineConfig):
    fusion_alpha: float = 0.6  # S_f = 0.6 S^g + 0.4 S^l (methods.md 4.6)
    eba: str = "joint"  # EBAKER: one global mask for both losses
    drop_ratio: float = 0.01
    drop_epoch: int = 4  # 0-based epoch index from which pairs are eliminated (the 5th epoch)
    bank_size: int = 0  # 0: one epoch of training pairs; the papers use 200000
    bank_init: str = "empty"  # "normal": start full of N(0, 1) entries, as the papers' code
    noise_estimate: float = 0.0  # NON-PAPER variant: when > 0, drop_ratio is this estimate of the noise rate
    # A batch whose every pair is eliminated: EBAKER's code has no fallback (a mean over zero rows,
    # which AMP skips); "skip" drops the batch's alignment loss. iEBAKER keeps the best pair.
    empty_mask: str = "skip"
    ker_weight: float = 0.5  # 0 turns KER off (needed for backbones with neither CLIP's BPE nor a WordPiece tokenizer)
    keywords: int = 512  # size of the keyword vocabulary built from the training captions
    keyword_source: str = "content"  # content words, as the released lists; "frequency": NON-PAPER raw counts
    ker_faithful_offset: bool = False  # True: the original code's word-index-as-token-index masking
    ker_heads: int = 0  # 0: width // 64, the reference's rule (8 at 512)
    ker_layers: int = 2
    # "full": the MLM softmax over CLIP's whole 49,408-token vocabulary (the papers). "labels": NON-PAPER,
    # over the token ids that occur as KER labels in the training captions only (a restricted softmax)
    ker_vocab: str = "full"
    sar: bool = False  # evaluation-time SAR re-rank (reconstructed), reported as <method>+sar
    sar_k: int = 10

    def __post_init__(self):
        if self.eba not in EBA_MODES:
            raise ConfigError(f"eba={self.eba!r}; choose one of {', '.join(EBA_MODES)}")
        if self.bank_init not in BANK_INITS:
            raise ConfigError(f"bank_init={self.bank_init!r}; choose one of {', '.join(BANK_INITS)}")
        if self.keyword_source not in KEYWORD_SOURCES:
            raise ConfigError(f"keyword_source={self.keyword_source!r}; choose one of {', '.join(KEYWORD_SOURCES)}")
        if self.ker_vocab not in KER_VOCABS:
            raise ConfigError(f"ker_vocab={self.ker_vocab!r}; choose one of {', '.join(KER_VOCABS)}")
        if self.empty_mask not in EMPTY_MASKS:
            raise ConfigError(f"empty_mask={self.empty_mask!r}; choose one of {', '.join(EMPTY_MASKS)}")
        if not 0 <= self.drop_ratio < 1 or not 0 <= self.noise_estimate < 1:
            raise ConfigError("drop_ratio and noise_estimate must lie in [0, 1)")
        if self.bank_size < 0 or self.sar_k < 1:
            raise ConfigError("bank_size must be >= 0 (0: one epoch of pairs) and sar_k >= 1")

    @property
    def effective_drop_ratio(self) -> float:
        return self.noise_estimate if self.noise_estimate > 0 else self.drop_ratio


class SimilarityBank:
    """A FIFO bank of recent positive-pair similarities (methods.md 4.3) that knows which of its
    entries are real."""

    def __init__(self, size: int, random_init: bool = False, generator: torch.Generator | None = None):
        self.values = torch.randn(size, generator=generator) if random_init else torch.zeros(size)
        self.filled = size if random_init else 0  # entries holding a value (real or initial)
        self.real = 0  # entries holding a real similarity
        self.next = 0

    def push(self, values: torch.Tensor) -> None:
        values = values.detach().float().cpu().flatten()[-len(self.values):]
        index = (self.next + torch.arange(len(values))) % len(self.values)
        self.values[index] = values
        self.next = int(index[-1] + 1) % len(self.values) if len(values) else self.next
        self.filled = min(len(self.values), self.filled + len(values))
        self.real = min(len(self.values), self.real + len(values))

    def threshold(self, ratio: float) -> float | None:
        """ascending(bank)[floor(ratio * n)] over the entries that hold a value; None when empty."""
        if self.filled == 0:
            return None
        held = self.values if self.filled == len(self.values) else self.values[: self.filled]
        ordered = torch.sort(held).values
        return float(ordered[min(len(ordered) - 1, math.floor(ratio * len(ordered)))])

    def state(self) -> dict:
        return {"values": self.values.clone(), "filled": self.filled, "real": self.real, "next": self.next}

    @classmethod
    def from_state(cls, state: dict) -> SimilarityBank:
        bank = cls(0)
        bank.values, bank.filled, bank.real, bank.next = state["values"].clone(), state["filled"], state["real"], state["next"]
        return bank


def keep_anchors(positive: torch.Tensor, threshold: float | None, keep_best: bool = True) -> torch.Tensor:
    """Pairs above the threshold stay anchors; if none does and ``keep_best`` (iEBAKER's code), the
    highest-scoring one is kept, else (EBAKER's code) none is."""
    if threshold is None:
        return torch.ones_like(positive, dtype=torch.bool)
    keep = positive > threshold
    if keep_best and not keep.any():
        keep[positive.argmax()] = True
    return keep


def anchored_ce(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean CE of the kept rows against their own column; every column stays a candidate, so an
    eliminated pair still serves as a negative for the others. No kept row: a zero that keeps the
    graph (the reference's mean over zero rows is NaN, a step AMP's scaler skips)."""
    if not bool(keep.any()):
        return logits.sum() * 0.0
    target = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits[keep], target[keep])


def eba_loss(s_global: torch.Tensor, s_local: torch.Tensor, keep_global: torch.Tensor, keep_local: torch.Tensor, scale: float) -> torch.Tensor:
    """CE_rows(s S^g) + CE_rows(s S^g^T) over global anchors + the same on S^l over local anchors (methods.md 4.3)."""
    g = scale * s_global
    return anchored_ce(g, keep_global) + anchored_ce(g.T, keep_global) + anchored_ce(s_local, keep_local) + anchored_ce(s_local.T, keep_local)


@METHODS.register("ebaker")
class Ebaker(ClipPipeline):
    """EBAKER (ACM MM 2024): eliminate-before-align (joint mask) + keyword reasoning, global + local Frobenius."""

    config_type = EbakerConfig
    train_defaults = {"epochs": 7, "batch_size": 100, "lr": 1.5e-5, "warmup_steps": 200, "weight_decay": 0.7, "grad_clip": 50.0}

    def __init__(self, backbone, config: EbakerConfig | None = None):
        super().__init__(backbone, config)
        self.banks: dict[str, SimilarityBank] = {}
        self.thresholds: dict[str, float | None] = {"global": None, "local": None}
        self.eliminating = False
        self.ker = None
        if self.config.ker_weight > 0:
            vocab = ker_vocab_size(getattr(backbone, "tokenizer", None))  # the backbone's token ids are what KER predicts
            self.ker = KerHead(backbone.embed_dim, vocab, heads=self.config.ker_heads, layers=self.config.ker_layers)
        self.register_buffer("ker_ids", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("ker_labels", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("ker_vocab_ids", torch.zeros(0, dtype=torch.long), persistent=False)  # ker_vocab="labels"
        self.keywords: list[str] = []

    @property
    def split(self) -> bool:
        return self.config.eba == "split"

    # --- set-up -------------------------------------------------------------------------
    def _build_keywords(self, captions: Sequence[str], tokenizer) -> None:
        """KER's keyword vocabulary and masked sequences, from the training captions."""
        self.keywords = keyword_vocabulary(captions, self.config.keywords, self.config.keyword_source)
        width = self.backbone.tokenize([""]).shape[-1]  # the masked rows are as wide as the backbone's token rows
        ids, labels = mask_keywords(captions, self.keywords, tokenizer, width, faithful_offset=self.config.ker_faithful_offset)
        device = next(self.parameters()).device
        self.ker_ids, self.ker_labels = ids.to(device), labels.to(device)
        if self.config.ker_vocab == "labels":
            self.ker_vocab_ids = torch.unique(self.ker_labels[self.ker_labels != IGNORE_LABEL])

    def derived_texts(self, captions: Sequence[str], tokenizer) -> torch.Tensor | None:
        """KER's masked captions, built here if start_epoch has not built them yet."""
        if self.ker is None:
            return None
        if not len(self.ker_ids):
            self._build_keywords(captions, tokenizer)
        return self.ker_ids

    def start_epoch(self, ctx: EpochContext) -> None:
        cfg = self.config
        if self.ker is not None and not len(self.ker_ids):  # first epoch, or resumed (the masked ids are not saved)
            self._build_keywords(ctx.captions, ctx.tokenizer)
        if not self.banks:
            size = cfg.bank_size or ctx.n_rows
            if size > 2 * ctx.n_rows:
                warnings.warn(f"EBA bank of {size} entries holds {size / ctx.n_rows:.1f} epochs of this {ctx.n_rows}-pair training set; "
                              "its threshold lags the model (methods.md 4.4); bank_size=0 sizes it to one epoch", stacklevel=2)
            gen = torch.Generator().manual_seed(0)
            self.banks = {name: SimilarityBank(size, cfg.bank_init == "normal", gen) for name in (("global", "local") if self.split else ("global",))}
        if not ctx.resumed_steps:  # within an epoch the bank has moved on: its start's thresholds are in the saved state
            for name, bank in self.banks.items():
                self.thresholds[name] = bank.threshold(cfg.effective_drop_ratio)
        self.eliminating = ctx.epoch - 1 >= cfg.drop_epoch

    # --- training -----------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> LossOutput:
        cfg = self.config
        if self.ker is not None:  # the caption and its keyword-masked copy go through the text tower together
            texts, masked = self.encode_text_batches(batch.text, self._masked_ids(batch))
            images = self.backbone.encode_image(batch.images, tokens=True)
        else:
            texts, images = self.encode_pair(batch.text, batch.images)
        s_global = cosine_matrix(texts, images)
        s_local = self.local_matrix(texts, images)
        positive = {"global": s_global.diagonal().detach(), "local": s_local.diagonal().detach()}
        for name, bank in self.banks.items():
            bank.push(positive[name])
        keep_best = cfg.empty_mask == "keep_best"
        keep_global = keep_anchors(positive["global"], self.thresholds["global"] if self.eliminating else None, keep_best)
        keep_local = keep_anchors(positive["local"], self.thresholds["local"] if self.eliminating else None, keep_best) if self.split else keep_global
        loss = eba_loss(s_global, s_local, keep_global, keep_local, cfg.logit_scale)
        logs = {"eliminated": 1 - keep_global.float().mean().item(), "bank_real": self.banks["global"].real / len(self.banks["global"].values)}
        if self.split:
            logs["eliminated_local"] = 1 - keep_local.float().mean().item()
        if self.ker is not None:
            vocab = self.ker_vocab_ids if cfg.ker_vocab == "labels" else None
            mlm = ker_loss(self.ker, masked.tokens, images.tokens, self.ker_labels[batch.rows.to(self.ker_labels.device)], vocab)
            loss = loss + cfg.ker_weight * mlm
            logs["mlm"] = mlm.item()
        # clean-ness signal (methods.md 4.9): the positive's global similarity, flagged when eliminated
        return LossOutput(loss, positive["global"], ~keep_global, {"local": positive["local"]} if self.split else {}, logs)

    def _masked_ids(self, batch: Batch) -> torch.Tensor:
        """The batch rows' keyword-masked token ids, built from the train captions at the first ``start_epoch``."""
        if not len(self.ker_ids):
            raise ConfigError("KER has no masked captions: start_epoch was not called with the train captions before training")
        return self.ker_ids[batch.rows.to(self.ker_ids.device)].to(batch.text.device)

    # --- evaluation ---------------------------------------------------------------------
    def scorers(self) -> list[Scorer]:
        """The fused score, and with ``sar`` its SAR re-ranking (methods.md 4.5) as a row of its own."""
        if not self.config.sar:
            return [FullScore()]
        return [FullScore(), Rerank("sar", functools.partial(sar_rerank, k=self.config.sar_k))]

    # Resume and best.pt carry the similarity banks and their thresholds.
    def get_extra_state(self):
        return {"banks": {name: bank.state() for name, bank in self.banks.items()}, "thresholds": dict(self.thresholds)}

    def set_extra_state(self, state) -> None:
        self.banks = {name: SimilarityBank.from_state(s) for name, s in state["banks"].items()}
        self.thresholds = dict(state["thresholds"])


@dataclass(frozen=True)
class IebakerConfig(EbakerConfig):
    eba: str = "split"  # iEBAKER: separate global and local masks
    empty_mask: str = "keep_best"  # iEBAKER's code keeps the highest-scoring pair when none survives


@METHODS.register("iebaker")
class Iebaker(Ebaker):
    """iEBAKER (arXiv 2504.05644): eliminate-before-align (split masks) + keyword reasoning; SAR re-rank optional."""

    config_type = IebakerConfig
