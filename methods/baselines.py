"""Baselines that bound every plot: ``zeroshot`` (no training), ``clip-ft`` (plain CLIP
fine-tune on the noisy rows) and ``oracle`` (clip-ft on the rows the manifest marks clean:
what a perfect noise filter would reach)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rsnc_bench.methods import METHODS, Batch, LossOutput, Method, MethodConfig, info_nce


@METHODS.register("zeroshot")
class ZeroShot(Method):
    """No training: the backbone as given, scored by cosine of global embeddings."""

    trains = False


@dataclass(frozen=True)
class ClipFtConfig(MethodConfig):
    # Fixed global logit scale e^2.996 ~ 20 (tau = 0.05) of the shared pipeline (methods.md 2.5).
    logit_scale: float = math.exp(2.996)


@METHODS.register("clip-ft")
class ClipFineTune(Method):
    """Symmetric InfoNCE fine-tune of both towers: the shared CLIP pipeline of methods.md section 2."""

    config_type = ClipFtConfig
    baseline = True  # the report's paired test compares every method with the plain fine-tune
    # RRSITR's budget for the shared pipeline (methods.md 3.9), so clip-ft is its like-for-like baseline.
    train_defaults = {"epochs": 50, "batch_size": 100, "lr": 7e-6, "warmup_steps": 200, "weight_decay": 0.7, "grad_clip": 50.0}

    def training_loss(self, batch: Batch) -> LossOutput:
        text = self.backbone.encode_text(batch.text).embedding
        image = self.backbone.encode_image(batch.images).embedding
        loss, per_row = info_nce(text, image, self.config.logit_scale)
        return LossOutput(loss, per_row.detach())


@METHODS.register("oracle")
class Oracle(ClipFineTune):
    """clip-ft trained only on the rows the noise manifest marks clean (an upper bound; uses the labels)."""

    uses_clean_labels = True

    def select_train_rows(self, clean: np.ndarray) -> np.ndarray:
        return np.flatnonzero(clean)
