"""PMPGuard (Ouyang, Ma, Wang, Bai; arXiv 2512.18660, AAAI 2026), RECONSTRUCTED: no code is
public and its method section is not readable, so this follows methods.md section 5 and its
decision 8.1: cross-gated attention (CGA, :mod:`methods.cga`) as restated by a third party, and
positive-negative awareness attention (PNAA, :mod:`methods.pnaa`) reconstructed from NAAF. Every
constant the spec marks unknown is a field of :class:`PmpGuardConfig`.

Scoring is pair-specific cross-attention. Training scores the whole B x B batch without gradients
to find each row's hardest negatives, then re-scores only the 3B pairs the triplet loss uses with
gradients: the same gradient as the full matrix (a max passes its gradient to the argmax only) at
a fraction of the memory. Evaluation scores every text against every image in blocks of bounded
size, or, with ``rescore_top_k``, only each text's and each image's top K under the global cosine.

The all-pairs scorer (:meth:`PmpGuard.grid`: evaluation and the batch matrix) is the pair-wise
one rearranged for speed, exactly (docs/methods/pmpguard.md, "Cost"): each distinct text once,
texts in length order, their side of CGA made once per block of texts, one affinity product per
block, one exponential for both CGA softmaxes, batched gate products
(:meth:`CrossGatedAttention.grid`) and PNAA without normalised copies
(:func:`methods.pnaa.pnaa_scores`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsnc_bench.backbones import Features
from rsnc_bench.backbones.base import trim_padding_columns
from rsnc_bench.engine.scoring import EncodedSplit, FullScore, Scorer, full_precision
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, Batch, Capabilities, LossOutput, Method, MethodConfig, info_nce
from rsnc_builtin_methods.cga import CrossGatedAttention, Fused, Regions, Words
from rsnc_builtin_methods.clip_pipeline import cosine_matrix
from rsnc_builtin_methods.pnaa import BoundaryEstimate, PnaaOutput, Scratch, pnaa, pnaa_scores

BOUNDARY_MODES = ("estimated", "learnable")
EVAL_BOUNDARIES = ("safe", "train")
PAIR_BLOCK_ELEMENTS = 2**24  # the largest per-block intermediate ([pairs, words, d]): 64 MB in fp32
GRID_TEXT_BLOCK = 8  # texts per block of the all-pairs grid, in order of length
GRID_BLOCK_ELEMENTS = 2**20  # on the CPU, the grid's largest per-block intermediate ([pairs, regions, d]): 4 MB
OUTSIDE_TOP_K = 10.0  # pairs outside the top K sit below every re-scored one (|S_PN| <= 4)


@dataclass(frozen=True)
class PmpGuardConfig(MethodConfig):
    """Defaults: methods.md 5.7 and decision 8.1, all [I] (no source gives them)."""

    attention_scale: float = 10.0  # CGA softmax scale on a_ij
    gate_bias: float = 2.0  # initial gate bias: sigmoid(2) = 0.88 starts the fused features near the originals
    pnaa_scale: float = 20.0  # lambda of the positive branch (NAAF default)
    relevance: bool = True  # add NAAF's relevance-level term p^r to the positive branch
    boundary: str = "estimated"  # t_k from Gaussian fits, or "learnable": a scalar initialised by the first fit
    boundary_init: float = 0.0  # t_k before the first fit (NAAF starts at 0)
    boundary_alpha: float = 2.0  # penalty alpha in the crossing N+ = alpha N-
    boundary_momentum: float = 0.7  # t <- 0.7 t_new + 0.3 t_old
    boundary_min_samples: int = 200  # words of each kind before the first fit (NAAF: 200)
    boundary_window: int = 1000  # most recent words of each kind the fit uses (NAAF: one batch's)
    eval_boundary: str = "safe"  # at evaluation: NAAF's mu+ - 3 sd+ ("safe") or the training t ("train")
    temperature: float = 0.05  # tau of the InfoNCE aggregation loss L_IA on global features
    margin: float = 0.2  # m of the hardest-negative triplet L_PA (NAAF / VSE++)
    loss_weight: float = 1.0  # lambda: L = L_IA + lambda L_PA
    fusion_alpha: float = 0.0  # evaluation: alpha cos(global) + (1 - alpha) S_PN
    rescore_top_k: int = 0  # > 0: score only each text's / image's top K under the global cosine (tagged)
    # > 0 (non-paper, for CPU budgets): training looks for hardest negatives and boundary samples among each
    # text's / image's top K others under the global cosine instead of the whole batch (docs/methods/pmpguard.md)
    mine_top_k: int = 0
    head_lr_scale: float = 10.0  # CGA (and a learnable t) at 10x the backbone lr (1e-4 vs 1e-5)

    def __post_init__(self):
        if self.boundary not in BOUNDARY_MODES:
            raise ConfigError(f"pmpguard option boundary={self.boundary!r}; choose one of {', '.join(BOUNDARY_MODES)}")
        if self.eval_boundary not in EVAL_BOUNDARIES:
            raise ConfigError(f"pmpguard option eval_boundary={self.eval_boundary!r}; choose one of {', '.join(EVAL_BOUNDARIES)}")
        if not 0 <= self.fusion_alpha <= 1:
            raise ConfigError("pmpguard option fusion_alpha must lie in [0, 1]")
        if self.rescore_top_k < 0 or self.mine_top_k < 0 or self.boundary_min_samples < 2 or self.boundary_window < self.boundary_min_samples:
            raise ConfigError("pmpguard options need rescore_top_k >= 0, mine_top_k >= 0 and 2 <= boundary_min_samples <= boundary_window")


def trim_words(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask) without the trailing positions that are padding in every row."""
    if features.tokens is None:
        raise ValueError("pmpguard needs token features; the backbone returned none")
    mask = features.mask if features.mask is not None else torch.ones(features.tokens.shape[:2], dtype=torch.bool, device=features.tokens.device)
    length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return features.tokens[:, :length], mask[:, :length]


def trim_text_ids(backbone, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` without the trailing columns that are padding (0) in every row, when the text tower
    is causal with argmax (EOT) pooling, as open_clip's CLIP is: no real position attends to a later
    one, so the token features PMPGuard uses (real positions only) and the pooled embedding are the
    full-length ones up to float rounding, for a fraction of the text tower's work. Other towers
    get the ids unchanged."""
    return trim_padding_columns(ids) if getattr(backbone, "causal_text", bool)() else ids


def distinct_texts(words: Words) -> tuple[Words, torch.Tensor | None]:
    """(the texts of ``words`` with distinct tokens and mask, the index of each text's copy among
    them), or (``words``, None) when every text is distinct."""
    key = torch.cat([words.tokens.flatten(1), words.mask.to(words.tokens.dtype)], 1)
    distinct, copies = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(key):
        return words, None
    first = torch.full((len(distinct),), len(key), device=key.device).scatter_reduce_(
        0, copies, torch.arange(len(key), device=key.device), "amin")  # each distinct text's first row
    return words.map(lambda x: x[first]), copies


def pairs_per_block(words: Words, regions: Regions) -> int:
    """Pairs per block so that the largest intermediate ([pairs, m, d], [pairs, m, n], ...) stays
    within PAIR_BLOCK_ELEMENTS, or on the CPU within GRID_BLOCK_ELEMENTS: blocks that stay in cache
    (1,043 pairs of 22 words, 49 regions, d = 256: 0.28 s in 83-pair blocks, 1.6 s in one block)."""
    (m, d), n = words.tokens.shape[1:], regions.tokens.shape[1]
    budget = GRID_BLOCK_ELEMENTS if words.tokens.device.type == "cpu" else PAIR_BLOCK_ELEMENTS
    return max(1, budget // (max(m, n) * max(d, n)))


def fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision parts in fp32; fp32 and fp64 parts as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def unscored_as(score: torch.Tensor, value: float) -> torch.Tensor:
    """``score`` with its unscored (NaN) pairs set to ``value``, e.g. -inf before an argmax."""
    return score.masked_fill(score.isnan(), value)


def triplet(positive: torch.Tensor, hardest_image: torch.Tensor, hardest_text: torch.Tensor, margin: float) -> torch.Tensor:
    """Per row i: [m - S(i,i) + max_j S(i,j)]_+ + [m - S(i,i) + max_k S(k,i)]_+ (VSE++; methods.md 5.5)."""
    return (margin - positive + hardest_image).clamp_min(0) + (margin - positive + hardest_text).clamp_min(0)


@METHODS.register("pmpguard")
class PmpGuard(Method):
    """PMPGuard (AAAI 2026), reconstructed: cross-gated attention + positive-negative awareness attention, pair-wise scorer."""

    config_type = PmpGuardConfig
    capabilities = Capabilities(needs_tokens=True)
    # [I] methods.md 5.2 / 5.5: AdamW lr 1e-5 (new layers 1e-4), batch 64-128, 30 epochs, cosine;
    # weight decay 0.01 (PIR's Swin + BERT recipe), gradient clip 2 (NAAF).
    train_defaults = {"epochs": 30, "batch_size": 128, "lr": 1e-5, "warmup_steps": 200, "weight_decay": 0.01, "grad_clip": 2.0}

    def __init__(self, backbone, config: PmpGuardConfig | None = None):
        super().__init__(backbone, config)
        cfg = self.config
        self.cga = CrossGatedAttention(backbone.embed_dim, cfg.attention_scale, cfg.gate_bias)
        self.estimate = BoundaryEstimate(cfg.boundary_init, cfg.boundary_alpha, cfg.boundary_momentum, cfg.boundary_window, cfg.boundary_min_samples)
        self.learned_boundary = torch.nn.Parameter(torch.tensor(float(cfg.boundary_init)), requires_grad=cfg.boundary == "learnable")

    # --- the pair scorer ----------------------------------------------------------------
    def boundary(self) -> float | torch.Tensor:
        """t_k in use: the learnable scalar, else the estimate (its safe variant at evaluation)."""
        if self.config.boundary == "learnable":
            return self.learned_boundary
        if not self.training and self.config.eval_boundary == "safe":
            return self.estimate.safe
        return self.estimate.value

    def parts(self, texts: Features, images: Features) -> tuple[Words, Regions]:
        tokens, mask = trim_words(texts)
        if images.tokens is None:
            raise ValueError("pmpguard needs image token features; the backbone returned none")
        return self.cga.words(tokens, mask), self.cga.regions(images.tokens)

    def pair(self, words: Words, regions: Regions) -> tuple[PnaaOutput, Fused]:
        """PNAA over CGA-fused features for broadcastable pairs of texts and images."""
        fused = self.cga(words, regions)
        out = pnaa(fused.words, fused.regions, words.mask, self.boundary(), self.config.pnaa_scale, self.config.relevance)
        return out, fused

    def grid(self, words: Words, regions: Regions, want=("score",)) -> dict[str, torch.Tensor]:
        """Every text against every image, without autograd: {name: [n_t, n_i(, m)]} for ``want``
        among "score" and "word_max" (at padding positions NaN or a value to ignore).

        Texts with the same tokens and mask have the same scores: each distinct text is scored once
        (RSICD's test split repeats captions: 3,330 distinct among 5,465). The texts go in order of
        length, in blocks of GRID_TEXT_BLOCK, each cut to its own longest text, their side of CGA
        made once (:meth:`CrossGatedAttention.grid_words`); each block of texts meets the images in
        blocks whose largest intermediate stays within GRID_BLOCK_ELEMENTS (on the CPU;
        PAIR_BLOCK_ELEMENTS elsewhere). Each block is scored by :meth:`CrossGatedAttention.grid` and
        :func:`pnaa_scores`: the pair-wise :meth:`pair` up to float rounding, in fp32 whatever
        autocast the caller is in (fp64 parts stay fp64), the blocks sharing one :class:`Scratch`."""
        unknown = set(want) - {"score", "word_max"}
        if unknown:
            raise ValueError(f"grid computes score and word_max, not {', '.join(sorted(unknown))}")
        (n_t, m, d), (n_i, n) = words.tokens.shape, regions.tokens.shape[:2]
        device = words.tokens.device
        if not n_t or not n_i:
            return {name: torch.full((n_t, n_i) + ((m,) if name == "word_max" else ()), math.nan, device=device) for name in want}
        boundary, cfg = float(self.boundary()), self.config
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # fp32 under any training autocast, as evaluation
            words, copies = distinct_texts(words.map(fp32))
            regions = regions.map(fp32)
            n_distinct = len(words.tokens)
            out = {name: torch.full((n_distinct, n_i) + ((m,) if name == "word_max" else ()), math.nan, device=device,
                                    dtype=words.tokens.dtype) for name in want}
            lengths = (words.mask * torch.arange(1, m + 1, device=device)).amax(1)  # last real position + 1
            order = torch.argsort(lengths, stable=True)
            text_block = min(n_distinct, GRID_TEXT_BLOCK)
            budget = GRID_BLOCK_ELEMENTS if device.type == "cpu" else PAIR_BLOCK_ELEMENTS  # accelerators: fewer, larger blocks
            image_block = min(n_i, max(1, budget // (text_block * max(m, n) * max(d, n))))
            image_block = -(-n_i // -(-n_i // image_block))  # as many blocks, of equal sizes
            scratch = Scratch()  # the blocks' intermediates, reused from block to block
            for start in range(0, n_distinct, text_block):
                rows = order[start: start + text_block]
                t, length = len(rows), max(1, int(lengths[rows].max()))
                side = self.cga.grid_words(words.map(lambda x: x[rows, :length]))  # the text side, once for all images
                for i in range(0, n_i, image_block):
                    fused_words, fused_regions = self.cga.grid(side, regions.map(lambda x: x[i: i + image_block]), scratch)
                    c = fused_words.shape[1]
                    mask = side.words.mask.unsqueeze(1).expand(t, c, length).reshape(t * c, length)
                    score, word_max = pnaa_scores(fused_words.view(t * c, length, d), fused_regions.view(t * c, n, d), mask,
                                                  boundary, cfg.pnaa_scale, cfg.relevance, scratch)
                    if "score" in out:
                        out["score"][rows, i: i + c] = score.view(t, c)
                    if "word_max" in out:
                        out["word_max"][rows, i: i + c, :length] = word_max.view(t, c, length)
        return out if copies is None else {name: x[copies] for name, x in out.items()}

    def batch_grid(self, words: Words, regions: Regions, texts: Features, images: Features) -> dict[str, torch.Tensor]:
        """``grid(words, regions, ("score", "word_max"))`` over the training batch; with ``mine_top_k``
        = K only at the diagonal and at each text's and each image's K most similar others under the
        global cosine (NaN elsewhere): about 3K + 1 pairs per row instead of the batch size."""
        n, k = len(words.tokens), self.config.mine_top_k
        if not k or k >= n - 1:
            return self.grid(words, regions, ("score", "word_max"))
        g = cosine_matrix(texts, images).detach().float().fill_diagonal_(math.inf)  # rows = texts; the diagonal always in
        chosen = torch.zeros(n, n, dtype=torch.bool, device=g.device)
        chosen.scatter_(1, g.topk(k + 1, dim=1).indices, True).scatter_(0, g.topk(k + 1, dim=0).indices, True)
        text_idx, image_idx = chosen.nonzero(as_tuple=True)
        m = words.tokens.shape[1]
        out = {"score": torch.full((n, n), math.nan, device=g.device), "word_max": torch.full((n, n, m), math.nan, device=g.device)}
        block = pairs_per_block(words, regions)
        with torch.no_grad(), full_precision(g.device):  # fp32, as the grid
            words, regions = words.map(fp32), regions.map(fp32)
            for start in range(0, len(text_idx), block):
                t, i = text_idx[start: start + block], image_idx[start: start + block]
                scored = self.pairs(words, regions, t, i)[0]
                out["score"][t, i], out["word_max"][t, i] = scored.score.float(), scored.word_max.float()
        return out

    def pairs(self, words: Words, regions: Regions, text_idx: torch.Tensor, image_idx: torch.Tensor) -> tuple[PnaaOutput, Fused]:
        """The listed (text, image) pairs only. The parts are gathered with ``index_select``: its
        gradient (``index_add_``) sums repeated indices in a fixed order, where advanced indexing's
        (``index_put_`` with accumulate) adds them atomically from several threads on the CPU once
        a tensor reaches 32,768 elements, in an order that changes from run to run."""
        return self.pair(words.map(lambda x: x.index_select(0, text_idx)), regions.map(lambda x: x.index_select(0, image_idx)))

    # --- training -----------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> LossOutput:
        cfg = self.config
        texts = self.backbone.encode_text(trim_text_ids(self.backbone, batch.text), tokens=True)
        images = self.backbone.encode_image(batch.images, tokens=True)
        ia, ia_rows = info_nce(texts.embedding, images.embedding, 1 / cfg.temperature)  # L_IA
        words, regions = self.parts(texts, images)
        n = len(batch.rows)
        eye = torch.eye(n, dtype=torch.bool, device=ia.device)
        with torch.no_grad():  # find the hardest negatives on the batch matrix
            full = self.batch_grid(words, regions, texts, images)
            off = unscored_as(full["score"], -math.inf).masked_fill(eye, -math.inf)
            hard_image, hard_text = off.argmax(1), off.argmax(0)
        # the 3B pairs (i, i), (i, hardest image), (hardest text, i): only the hardest are gathered (index_select, see pairs)
        out, fused = self.pair(words.map(lambda x: torch.cat([x, x, x.index_select(0, hard_text)])),
                               regions.map(lambda x: torch.cat([x, x.index_select(0, hard_image), x])))
        positive, neg_image, neg_text = out.score.split(n)
        pa_rows = triplet(positive, neg_image, neg_text, cfg.margin)
        loss = ia + cfg.loss_weight * pa_rows.sum()  # L_PA sums over the batch (VSE++ / NAAF)
        self._update_boundary(full, words.mask)
        logs = {"boundary": float(torch.as_tensor(self.boundary()).detach()), "boundary_safe": self.estimate.safe, "boundary_fits": float(self.estimate.fits),
                "flagged": (out.below[:n] > 0.5).float().mean().item(),
                "word_gate_pos": fused.word_gate[:n].mean().item(), "word_gate_neg": fused.word_gate[n:].mean().item(),
                "region_gate_pos": fused.region_gate[:n].mean().item(), "region_gate_neg": fused.region_gate[n:].mean().item(),
                "l_ia": ia.item(), "l_pa": pa_rows.sum().item(), **self.estimate.stats}
        return LossOutput(loss, *self._clean_signal(out, fused, n), logs=logs)

    @staticmethod
    def _clean_signal(out: PnaaOutput, fused: Fused, n: int):
        """Methods.md 5.8: S_PN(i, i); flagged when more than half its real words have their best
        region below t. Others: the negative mass, the share of words above t and the mean word
        gate, each oriented higher = cleaner."""
        below = out.below[:n].detach().double()
        others = {"negative_mass": -out.negative_mass[:n].detach(), "words_above": 1 - below, "word_gate": -fused.word_gate[:n].detach()}
        return out.score[:n].detach(), below > 0.5, others

    def _update_boundary(self, full: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        """Boundary samples as NAAF takes them: for each caption whose own image ranks first, the
        best-region similarity of its real words with that image (matched) and with its
        lowest-scoring image (mismatched)."""
        score, word_max = full["score"], full["word_max"]
        rows = torch.arange(len(score), device=score.device)
        first = unscored_as(score, -math.inf).argmax(1) == rows
        if not first.any():
            return
        worst = unscored_as(score, math.inf).argmin(1)  # among the scored pairs (mine_top_k)
        keep = mask[first]
        moved = self.estimate.update(word_max[rows[first], rows[first]][keep], word_max[rows[first], worst[first]][keep])
        if moved and self.config.boundary == "learnable" and self.estimate.fits == 1:  # initialise t from the first fit
            with torch.no_grad():
                self.learned_boundary.fill_(self.estimate.value)

    def param_groups(self):
        head = [*self.cga.parameters(), self.learned_boundary]
        ids = {id(p) for p in head}
        return [{"params": [p for p in self.parameters() if id(p) not in ids]}, {"params": head, "lr_scale": self.config.head_lr_scale}]

    # --- evaluation ---------------------------------------------------------------------
    def score(self, texts: Features, images: Features) -> torch.Tensor:
        """[n_texts, n_images]: S_PN of every pair, fused with the global cosine by ``fusion_alpha``."""
        s = self.grid(*self.parts(texts, images))["score"]
        alpha = self.config.fusion_alpha
        return alpha * cosine_matrix(texts, images) + (1 - alpha) * s if alpha else s

    def scorers(self) -> list[Scorer]:
        return [TopKRescore(self.config.rescore_top_k)] if self.config.rescore_top_k else [FullScore()]

    def score_candidates(self, texts: Features, images: Features, image_kth: torch.Tensor | None) -> torch.Tensor:
        """[n_texts, n_images]: the fused S_PN for each text's top K images under the global cosine
        and, given ``image_kth`` (each image's K-th best text cosine over the whole split), each
        image's top K texts; every other pair keeps its cosine, below all of those."""
        words, regions = self.parts(texts, images)
        alpha, k = self.config.fusion_alpha, self.config.rescore_top_k
        g = cosine_matrix(texts, images)
        candidate = g >= g.topk(min(k, g.shape[1]), dim=1).values[:, -1:]
        if image_kth is not None:
            candidate |= g >= image_kth
        out = g - OUTSIDE_TOP_K
        text_idx, image_idx = candidate.nonzero(as_tuple=True)
        block = pairs_per_block(words, regions)
        for start in range(0, len(text_idx), block):
            t, i = text_idx[start: start + block], image_idx[start: start + block]
            s = self.pairs(words, regions, t, i)[0].score
            out[t, i] = alpha * g[t, i] + (1 - alpha) * s.float()
        return out

    # Resume and best.pt carry the boundary estimate.
    def get_extra_state(self):
        return {"estimate": self.estimate.state()}

    def set_extra_state(self, state) -> None:
        self.estimate.load(state["estimate"])


@dataclass(frozen=True)
class TopKRescore(Scorer):
    """A two-stage scorer (tag ``top<K>``): the global cosine picks each text's top K images and
    each image's top K texts over the whole split, and only those pairs get S_PN."""

    k: int

    @property
    def tag(self) -> str:
        return f"top{self.k}"

    def __call__(self, split: EncodedSplit):
        image_kth = None
        if self.k < len(split.texts.embedding):
            with full_precision(split.device):
                image_kth = cosine_matrix(split.texts, split.images).topk(self.k, dim=0).values[-1]
        for texts in split.text_chunks():
            with full_precision(split.device):
                yield split.method.score_candidates(texts, split.images, image_kth).float().cpu()
