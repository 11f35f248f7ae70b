"""Build a backbone from its config: a registered family or preset, else an open_clip architecture."""

from __future__ import annotations

import fnmatch

from rsnc_bench.backbones import openclip, timm_hf  # noqa: F401  (registers the families)
from rsnc_bench.backbones.base import BACKBONES, BackboneConfig, DualEncoder
from rsnc_bench.registry import first_line


def build_backbone(config: BackboneConfig) -> DualEncoder:
    """The encoder named by ``config.name``, with weights loaded and towers frozen as asked."""
    if config.name in BACKBONES:
        encoder = BACKBONES.get(config.name)(config)
    else:
        encoder = openclip.build_open_clip(config)
    encoder.freeze(image=config.freeze_image, text=config.freeze_text)
    return encoder


def describe_backbones(pattern: str = "*") -> list[tuple[str, str]]:
    """(name, one-line description) of every backbone matching a wildcard."""
    rows = [(name, first_line(builder.__doc__)) for name, builder in BACKBONES.items()]
    rows += [(name, preset.get("doc") or "CPU preset shipped with rsnc-bench, random init") for name, preset in openclip.PRESETS.items()]
    rows += [(name, "open_clip architecture") for name in openclip.architectures() if name not in openclip.PRESETS]
    return [(n, d) for n, d in rows if fnmatch.fnmatch(n, pattern)]
