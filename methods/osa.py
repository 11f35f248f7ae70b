"""OSA, One-step Anti-noise (Li et al., arXiv 2410.01944; leolee99/OSA@d64645b), on the harness
(methods-npc-osa.md section 3).

A frozen copy of the initial model, the estimator, scores every training pair by its cosine s_i.
The "cone effect" shifts the orthogonal boundary to beta, the mean estimator cosine of random
input pairs; d_i = s_i - beta maps to a weight on the pair's loss in the target's training:

- ``scoring="code"`` (default, the released code, ``main_clip.py:36-41``): x_i = max(0, d_i) /
  max_j max(0, d_j), w_i = x_i^2 (1 - x_i^2). The most similar pair of every batch gets 0.
- ``scoring="paper"`` (eq. 5 of the paper): w_i = d_i^2 (1 - d_i) for d_i > 0, else 0.

Loss (``main_clip.py:154-158``): 1/2 [mean_i w_i CE_i2t(i) + mean_i w_i CE_t2i(i)] on the target's
logits, CLIP's learnable logit scale times the cosine. Beta follows the code's recipe
(``main_clip.py:123-129``): 256 uniform-noise images (not normalised) against 256 captions of
random token ids 0-99, the mean over all 65,536 estimator cosines, from a generator seeded with
``beta_seed``. Deviation, named: a batch with no pair above beta gets weight 0 everywhere (loss 0),
where the reference divides 0 by 0 and trains on NaN (section 3.10, item 2).

The estimator is copied from the backbone when the method is built, before any checkpoint is
loaded, so a resumed cell still scores with the initial model (the reference copies it after
``--resume``, section 3.10 item 4). It is kept outside the module's parameters and state dict.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rsnc_bench.engine.retrieval import cosine
from rsnc_bench.engine.scoring import full_precision
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, REFERENCE_LOG_SCALE, Batch, EpochContext, LossOutput, Method, MethodConfig, learnable_log_scale

SCORINGS = ("code", "paper")


@dataclass(frozen=True)
class OsaConfig(MethodConfig):
    scoring: str = "code"  # "code": the released rule; "paper": eq. 5
    beta: float = math.nan  # NaN: the code's random-pair recipe; a number sets it (0: no debiasing)
    beta_pairs: int = 256  # random images and random captions in the recipe (B = 256)
    beta_seed: int = 99  # the reference's seed (params.py:118-122)

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ConfigError(f"osa option scoring={self.scoring!r}; choose one of {', '.join(SCORINGS)}")
        if self.beta_pairs < 2:
            raise ConfigError(f"osa option beta_pairs={self.beta_pairs}; give at least 2, e.g. beta_pairs=256")


def code_weights(d: torch.Tensor) -> torch.Tensor:
    """The released rule: x = max(0, d) / max(max(0, d)), w = x^2 (1 - x^2); all 0 when no d > 0."""
    positive = d.clamp_min(0)
    top = positive.max()
    if top <= 0:  # the reference's 0 / 0 (NaN); guarded
        return torch.zeros_like(d)
    x = positive / top
    return x.square() * (1 - x.square())


def paper_weights(d: torch.Tensor) -> torch.Tensor:
    """Eq. 5: w = d^2 (1 - d) for d > 0, else 0."""
    return torch.where(d > 0, d.square() * (1 - d), torch.zeros_like(d))


WEIGHTS = {"code": code_weights, "paper": paper_weights}


def osa_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """1/2 [mean_i w_i CE_i2t(i) + mean_i w_i CE_t2i(i)]; ``logits`` rows = texts (main_clip.py:154-158)."""
    target = torch.arange(len(logits), device=logits.device)
    t2i = F.cross_entropy(logits, target, reduction="none")
    i2t = F.cross_entropy(logits.T, target, reduction="none")
    return ((weights * i2t).mean() + (weights * t2i).mean()) / 2


@torch.no_grad()
def random_pair_beta(encoder, pairs: int, seed: int, device: torch.device) -> float:
    """The mean estimator cosine of ``pairs`` uniform-noise images (in [0, 1], not normalised)
    against ``pairs`` captions of random token ids 0-99 with no start or end token, all pairs."""
    generator = torch.Generator().manual_seed(seed)
    size, length = encoder.image_size, encoder.tokenize([""]).shape[1]
    images = torch.rand(pairs, 3, size, size, generator=generator)
    text = torch.randint(0, 100, (pairs, length), generator=generator)
    with full_precision(device):
        image = encoder.encode_image(images.to(device)).embedding
        caption = encoder.encode_text(text.to(device)).embedding
        return float(cosine(caption, image).mean())


@METHODS.register("osa")
class Osa(Method):
    """OSA (arXiv 2410.01944): a frozen estimator's debiased cosine weights each pair's InfoNCE (code rule by default)."""

    config_type = OsaConfig
    # the released recipe (README.md:109; params.py:79-86; main_clip.py:111): no gradient clipping
    # there (a bound no step reaches here), no augmentation, AdamW (0.9, 0.98), eps 1e-6
    train_defaults = {"epochs": 5, "batch_size": 256, "lr": 1e-5, "warmup_steps": 500, "weight_decay": 0.2, "grad_clip": 1e6,
                      "augment": False, "adam_beta2": 0.98, "adam_eps": 1e-6}

    def __init__(self, backbone, config: OsaConfig | None = None):
        super().__init__(backbone, config)
        estimator = copy.deepcopy(backbone).eval().requires_grad_(False)
        object.__setattr__(self, "estimator", estimator)  # not a submodule: no parameters, no state dict, never trained
        # CLIP's learnable log logit scale (the reference's model.logit_scale); its own when the backbone has none
        self.own_logit_scale = None if learnable_log_scale(backbone) is not None else torch.nn.Parameter(torch.tensor(REFERENCE_LOG_SCALE))
        self.beta: float | None = None if math.isnan(self.config.beta) else self.config.beta

    def logit_scale(self) -> torch.Tensor:
        return self.own_logit_scale if self.own_logit_scale is not None else learnable_log_scale(self.backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        self.estimator.eval()  # frozen: always in evaluation mode
        return self

    def start_epoch(self, ctx: EpochContext) -> None:
        self.estimator.to(ctx.device)
        if self.beta is None:
            self.beta = random_pair_beta(self.estimator, self.config.beta_pairs, self.config.beta_seed, ctx.device)

    def training_loss(self, batch: Batch) -> LossOutput:
        with torch.no_grad(), full_precision(batch.images.device):
            s = cosine(self.estimator.encode_text(batch.text).embedding, self.estimator.encode_image(batch.images).embedding).diagonal()
            d = s - self.beta
        weights = WEIGHTS[self.config.scoring](d)
        text = self.backbone.encode_text(batch.text).embedding
        image = self.backbone.encode_image(batch.images).embedding
        logits = self.logit_scale().exp() * cosine(text, image)
        logs = {"beta": self.beta, "below_beta": (d <= 0).float().mean().item(), "weight": weights.mean().item(),
                "logit_scale": self.logit_scale().exp().item()}
        # clean-ness signal (methods-npc-osa.md 3.5): d (fixed per pair), flagged at d <= 0, the weight used
        return LossOutput(osa_loss(logits, weights), d, d <= 0, {"train_weight": weights}, logs)

    # Resume and best.pt carry beta.
    def get_extra_state(self):
        return {"beta": self.beta}

    def set_extra_state(self, state) -> None:
        self.beta = state["beta"]
