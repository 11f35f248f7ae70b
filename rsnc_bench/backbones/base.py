"""The dual-encoder contract every backbone family implements, and the backbone registry.

A backbone is built from a :class:`BackboneConfig` by the builder registered under its name
(``tiny-vit``, ``minilm``, ``timm-hf``); any other name is handed to open_clip as an
architecture (``ViT-B-32-quickgelu``, ``local-dir:/path``). Builders never download: weights
come from local files named in the config, and a missing file is a ``WeightsNotFoundError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rsnc_bench.errors import RsncError
from rsnc_bench.registry import Registry

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # protocol.md section 7.4
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# Training budgets of the presets that need their own (non-paper: a pretrained model's paper
# learning rate, 7e-6, would leave a tower trained from scratch where it started): a preset
# folder's ``open_clip_config.json`` ("train"), and the builder-made presets below. They are read
# here, without importing the builders, so that `run --help` and every cell see all of them
# whatever was imported first. Every value is listed in the README and `run --help`, and each
# result records them under config.train_sources.
PRESET_DIR = Path(__file__).with_name("presets")
PRESET_FILE = "open_clip_config.json"
PRESETS = {path.parent.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(PRESET_DIR.glob(f"*/{PRESET_FILE}"))}
TRAIN_HINTS: dict[str, dict] = {name: preset["train"] for name, preset in PRESETS.items() if "train" in preset}
# tiny-clip (openclip.py): a pretrained start needs a fine-tuning budget, tiny-vit's from-scratch lr would erase what it learnt
TRAIN_HINTS["tiny-clip"] = dict(lr=5e-4, weight_decay=0.1, warmup_steps=20, batch_size=64, epochs=5)
# minilm (timm_hf.py): its image tower starts at random
TRAIN_HINTS["minilm"] = dict(lr=5e-4, weight_decay=0.1, warmup_steps=20, batch_size=64, epochs=6)


def train_hints(name: str) -> dict:
    """Train-config values a backbone preset needs (empty for pretrained backbones)."""
    return dict(TRAIN_HINTS.get(name, {}))


def trim_padding_columns(ids: torch.Tensor) -> torch.Tensor:
    """Token ids [B, L] without the trailing columns that are padding (0) in every row."""
    used = (ids != 0).any(0)
    return ids[:, : int(used.nonzero().max()) + 1] if bool(used.any()) else ids


class WeightsNotFoundError(RsncError):
    """A weights file or folder named in the config is absent or unusable."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone to build; stored verbatim in every result.

    ``options`` holds family-specific ``name=value`` strings (``text=/models/bert``), parsed
    into the family's own typed options by its builder.
    """

    name: str = "tiny-vit"
    pretrained: str | None = None  # local weights file (open_clip: the .pt/.safetensors file)
    quick_gelu: bool = False  # force QuickGELU (OpenAI-initialised weights: RemoteCLIP, GeoRSCLIP)
    freeze_image: bool = False
    freeze_text: bool = False
    options: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class FrozenTrunks:
    """A backbone's frozen, memoised trunks (trunk_memo.TrunkMemo): ``image`` takes normalised
    pixels, ``text`` token ids."""

    image: Callable[[torch.Tensor], torch.Tensor]
    text: Callable[[torch.Tensor], torch.Tensor]


def is_pixels(images: torch.Tensor) -> bool:
    """Pixels are [B, 3, S, S]; anything else given to ``encode_image`` is a frozen trunk's output."""
    return images.ndim == 4 and images.shape[1] == 3


@dataclass
class Features:
    """Encoder output. ``embedding``: [B, D] projected, not normalised.

    With ``tokens=True``: ``tokens`` [B, T, D] projected into the same space, and ``mask``
    [B, T] bool, True at real positions (image patches are all real; text padding is False).
    """

    embedding: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class DualEncoder(nn.Module):
    """Image tower + text tower projected into one ``embed_dim`` space.

    Subclasses set ``embed_dim``, ``image_size``, ``mean``, ``std`` and implement the three
    methods below. Images arrive normalised, float, [B, 3, image_size, image_size]. Text
    arrives as the long tensor [B, L] that :meth:`tokenize` produced.
    """

    embed_dim: int
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    provenance: dict | None = None  # where built-in weights came from (checkpoint, sha256), recorded in results

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor, tokens: bool = False) -> Features:
        raise NotImplementedError

    def encode_text(self, text: torch.Tensor, tokens: bool = False) -> Features:
        raise NotImplementedError

    def frozen_trunks(self) -> FrozenTrunks | None:
        """The trunks that neither train nor change (``frozen_trunks``): a cell may then hand
        ``encode_image`` their outputs in place of pixels (trunk_outputs.py). None: they train."""
        return None

    def causal_text(self) -> bool:
        """True when no real text position depends on the padding after it (a causal text tower
        with EOT pooling), so the all-padding tail columns may be cut; False unless a family says so."""
        return False

    def image_parameters(self) -> list[nn.Parameter]:
        """Parameters of the image tower (including its projection)."""
        raise NotImplementedError

    def text_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def freeze(self, image: bool = False, text: bool = False) -> None:
        for flag, params in ((image, self.image_parameters()), (text, self.text_parameters())):
            if flag:
                for p in params:
                    p.requires_grad_(False)


Builder = Callable[[BackboneConfig], DualEncoder]
BACKBONES: Registry[Builder] = Registry("backbone")
