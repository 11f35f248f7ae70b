"""Backbones: dual encoders built from a :class:`BackboneConfig`.

The builders import open_clip, timm and transformers (seconds); they load on first use so that
light commands stay fast.
"""

from rsnc_bench.backbones.base import (
    BACKBONES,
    TRAIN_HINTS,
    BackboneConfig,
    DualEncoder,
    Features,
    WeightsNotFoundError,
    train_hints,
)

_BUILD_NAMES = ("build_backbone", "describe_backbones")

__all__ = ["BACKBONES", "TRAIN_HINTS", "BackboneConfig", "DualEncoder", "Features", "WeightsNotFoundError", "train_hints", *_BUILD_NAMES]


def __getattr__(name: str):
    if name in _BUILD_NAMES:
        from rsnc_bench.backbones import build

        return getattr(build, name)
    raise AttributeError(f"module 'rsnc_bench.backbones' has no attribute {name!r}")
