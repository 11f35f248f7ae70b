"""Baselines that bound every plot: ``zeroshot`` (no training), ``clip-ft`` (plain CLIP
fine-tune on the noisy rows) and ``oracle`` (a data variant: clip-ft on the rows the manifest
marks clean, what a perfect noise filter would reach)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rsnc_bench.methods import METHODS, Batch, Capabilities, LossOutput, Method, MethodConfig, info_nce


@METHODS.register("zeroshot")
class ZeroShot(Method):
    """No training: the backbone as given, scored by cosine of global embeddings."""

    capabilities = Capabilities(trains=False)


@dataclass(frozen=True)
class ClipFtConfig(MethodConfig):
    # Fixed global logit scale e^2.996 ~ 20 (tau = 0.05) of the shared pipeline (methods.md 2.5).
    logit_scale: float = math.exp(2.996)


@METHODS.register("oracle", rows="clean", doc="clip-ft trained only on the rows the noise manifest marks clean (an upper bound; uses the labels).")
@METHODS.register("clip-ft")
class ClipFineTune(Method):
    """Symmetric InfoNCE fine-tune of both towers: the shared CLIP pipeline of methods.md section 2."""

    config_type = ClipFtConfig
    capabilities = Capabilities(baseline=True)  # the report's paired test compares every method with the plain fine-tune
    # RRSITR's budget for the shared pipeline (methods.md 3.9), so clip-ft is its like-for-like baseline.
    train_defaults = {"epochs": 50, "batch_size": 100, "lr": 7e-6, "warmup_steps": 200, "weight_decay": 0.7, "grad_clip": 50.0}

    def training_loss(self, batch: Batch) -> LossOutput:
        text = self.backbone.encode_text(batch.text).embedding
        image = self.backbone.encode_image(batch.images).embedding
        return LossOutput(info_nce(text, image, self.config.logit_scale)[0])
