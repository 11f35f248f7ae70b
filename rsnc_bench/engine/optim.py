"""The shared pipeline's optimiser and schedule (methods.md 2.8)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, groups: list[dict] | None = None) -> list[dict]:
    """AdamW groups: weight decay on >= 2-D weights only; biases and 1-D parameters (norm gains,
    logit scales) get none. ``groups`` (from a method) may give ``params`` with an ``lr_scale``."""
    sources = groups or [{"params": [p for p in model.parameters()]}]
    out = []
    for group in sources:
        params = [p for p in group["params"] if p.requires_grad]
        scale = group.get("lr_scale", 1.0)
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        out += [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale},
        ]
    return [g for g in out if g["params"]]


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, multiplier: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_scale", 1.0) * multiplier
    return base_lr * multiplier


def adamw(groups: list[dict], lr: float, beta2: float = 0.999, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW (beta1 0.9), fused where torch supports it (several times faster on CPU)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=eps)
