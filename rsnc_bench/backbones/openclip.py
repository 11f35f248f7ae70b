"""open_clip backbones, offline.

Weights come from (protocol.md section 7.1):
- ``pretrained=FILE``: a local state dict, loaded non-strictly (GeoRSCLIP's files carry extra
  keys); a missing tower parameter is an error, extra keys are reported;
- ``local-dir:DIR``: a folder with ``open_clip_config.json`` and one weights file;
- a pretrained tag (``openai``) or ``hf-hub:`` name, only from an already-populated Hugging Face
  cache (the hub is forced offline).

QuickGELU pitfall (protocol.md section 7.2): OpenAI-initialised weights (OpenAI CLIP, RemoteCLIP,
GeoRSCLIP ViT-B-32) need QuickGELU, but a file carries no tag, so ``ViT-B-32`` + file builds GELU
and loads without complaint while every feature is wrong. Use the ``-quickgelu`` architecture or
``quick_gelu=True``; a warning fires when a file whose name suggests OpenAI initialisation is
loaded into a GELU architecture.

The CPU architectures (``tiny-vit``, ``tiny-b32``) are presets: one folder each in ``presets/``
holding an ``open_clip_config.json`` in open_clip's local-dir format (``model_cfg``, random
init), with the preset's one-line ``doc`` and, when it needs one, its training budget
(``train``) beside the architecture; adding a preset is adding a folder. ``tiny-clip`` is
``tiny-b32`` with the built-in pretrained weights of ``rsnc_bench.pretrain``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import VisionTransformer, text_global_pool

from rsnc_bench.backbones.base import (
    BACKBONES,
    PRESET_DIR,
    PRESETS,
    BackboneConfig,
    DualEncoder,
    Features,
    WeightsNotFoundError,
    trim_padding_columns,
)
from rsnc_bench.config import parse_assignments
from rsnc_bench.errors import ConfigError, UnknownNameError

NORMS = {  # protocol.md section 7.4
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "rs5m": ((0.406, 0.423, 0.390), (0.188, 0.175, 0.185)),
    "pub11": ((0.445, 0.469, 0.441), (0.208, 0.193, 0.213)),
}
_OPENAI_INIT = re.compile(r"remoteclip|rs5m|georsclip|openai", re.IGNORECASE)


@dataclass(frozen=True)
class OpenClipOptions:
    norm: str = "model"  # "model" (the architecture's own) or one of NORMS


class OpenClipEncoder(DualEncoder):
    """An open_clip CLIP model with token features on request (methods.md section 2.3)."""

    def __init__(self, model: open_clip.CLIP, tokenizer, norm: tuple | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer  # public: methods that re-tokenize (KER) use it
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean, self.std = norm or (tuple(cfg["mean"]), tuple(cfg["std"]))
        self.embed_dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else model.visual.output_dim

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return _tokenized(self.tokenizer, tuple(texts))

    def encode_image(self, images: torch.Tensor, tokens: bool = False) -> Features:
        visual = self.model.visual
        if not tokens:
            return Features(visual(images))
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(f"token features need a ViT image tower; this model's is {type(visual).__name__}")
        visual.output_tokens = True
        try:
            pooled, patches = visual(images)  # patches: after ln_post, CLS excluded, not projected
        finally:
            visual.output_tokens = False
        if visual.proj is not None:
            patches = patches @ visual.proj
        mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        return Features(pooled, patches, mask)

    def encode_text(self, text: torch.Tensor, tokens: bool = False) -> Features:
        m = self.model
        if not hasattr(m, "token_embedding"):
            if tokens:
                raise ConfigError("text token features need open_clip's built-in text transformer (CLIP, not CustomTextCLIP)")
            return Features(m.encode_text(text))
        if not tokens and self.causal_text():
            # Exact speed-up: under a causal mask no position sees the padding after it, so the
            # pooled EOT embedding is the same when the all-padding tail columns are never computed.
            text = trim_padding_columns(text)
        # open_clip's CLIP.encode_text, keeping every position of the final-normalised sequence
        cast, length = m.transformer.get_cast_dtype(), text.shape[1]
        mask = None if m.attn_mask is None else m.attn_mask[:length, :length]
        x = m.token_embedding(text).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        pooled = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        project = (lambda t: t) if m.text_projection is None else (
            m.text_projection if isinstance(m.text_projection, torch.nn.Linear) else (lambda t: t @ m.text_projection))
        if not tokens:
            return Features(project(pooled))
        return Features(project(pooled), project(x), text != 0)  # 0 pads after EOT in open_clip's tokenizers

    def causal_text(self) -> bool:
        """True when the text tower is causal with EOT (argmax) pooling, as CLIP's is: real positions
        never see the padding after them, so callers may cut the all-padding tail columns."""
        return self.model.attn_mask is not None and self.model.text_pool_type == "argmax"

    def image_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.visual.parameters())

    def text_parameters(self) -> list[torch.nn.Parameter]:
        image = {id(p) for p in self.image_parameters()}
        return [p for n, p in self.model.named_parameters() if id(p) not in image and not n.startswith("logit_")]


def architectures() -> list[str]:
    return [*PRESETS, *open_clip.list_models()]


def _open_clip_name(arch: str) -> str:
    """The name open_clip builds ``arch`` by: a preset is its folder (local-dir format)."""
    return f"local-dir:{PRESET_DIR / arch}" if arch in PRESETS else arch


def model_config(arch: str) -> dict | None:
    """open_clip's architecture config of ``arch`` (a preset's ``model_cfg``), None if unknown."""
    return open_clip.get_model_config(_open_clip_name(arch))


def build_open_clip(config: BackboneConfig) -> OpenClipEncoder:
    options = OpenClipOptions(**parse_assignments(OpenClipOptions, list(config.options)))
    if options.norm != "model" and options.norm not in NORMS:
        raise ConfigError(f"unknown norm {options.norm!r}; choose model, {', '.join(NORMS)}")
    name = config.name
    if name.startswith("local-dir:"):
        model = _from_local_dir(name, config)
    else:
        arch = name.replace("/", "-")  # "ViT-B/32" as in the official scripts
        if arch not in architectures():
            close = difflib.get_close_matches(arch, architectures(), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see `rsnc-bench list backbones`"
            raise UnknownNameError(f"unknown backbone {name!r}; {hint}")
        model = _from_architecture(arch, config)
    model.eval()
    norm = NORMS.get(options.norm)
    return OpenClipEncoder(model, _tokenizer(_tokenizer_name(name)), norm)


@BACKBONES.register("tiny-clip")
def build_tiny_clip(config: BackboneConfig) -> OpenClipEncoder:
    """CPU preset: tiny-b32 (ViT-B/32's 49 patches and 77 text positions) pretrained on the synthetic source domain.

    Built by `rsnc-bench pretrain` on first use and cached."""
    from rsnc_bench.pretrain import WEIGHTS_NAME, checkpoint_record, ensure_checkpoint

    if config.pretrained:
        raise ConfigError("tiny-clip brings its own weights; to load a file, use --backbone tiny-b32 --pretrained FILE")
    folder = ensure_checkpoint(config.name)
    record = checkpoint_record(folder)
    encoder = build_open_clip(dataclasses.replace(config, name=record["recipe"]["arch"], pretrained=str(folder / WEIGHTS_NAME)))
    encoder.provenance = {"checkpoint": str(folder), "sha256": record["sha256"], "recipe": record["recipe"]}
    return encoder


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str):
    """One tokenizer per name and process: its word-level BPE cache stays warm across the cells of
    a grid (re-tokenising a split took about 0.2 s per cell)."""
    return open_clip.get_tokenizer(name)


TOKEN_CACHE_SIZE = 1 << 18  # captions whose ids a tokenizer keeps (about 160 MB); beyond it, tokenised each time
_TOKEN_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {caption: ids}


def _tokenized(tokenizer, texts: tuple[str, ...]) -> torch.Tensor:
    """Token ids of ``texts``, each caption tokenised once per tokenizer and process: every cell of
    a grid tokenises the same captions (a noise rate only permutes them), and ftfy's text cleaning
    made that about 6 s per cell on RSICD's 15,295 captions."""
    rows = _TOKEN_ROWS.setdefault(tokenizer, {})
    missing = [t for t in dict.fromkeys(texts) if t not in rows]
    if len(rows) + len(missing) > TOKEN_CACHE_SIZE:
        return tokenizer(list(texts)).long()
    if missing:
        rows.update(zip(missing, tokenizer(missing).long()))
    return torch.stack([rows[t] for t in texts]) if texts else tokenizer([]).long()


def _tokenizer_name(name: str) -> str:
    return name if name.startswith("local-dir:") else _open_clip_name(name.replace("/", "-"))


def _from_local_dir(name: str, config: BackboneConfig) -> open_clip.CLIP:
    folder = Path(name.removeprefix("local-dir:"))
    if not (folder / "open_clip_config.json").is_file():
        raise WeightsNotFoundError(f"{folder}: no open_clip_config.json; a local-dir: folder holds open_clip_config.json and one .safetensors/.bin/.pth file")
    if config.pretrained:
        raise ConfigError("local-dir: backbones take their weights from the folder; drop --pretrained")
    with _offline():
        return open_clip.create_model(name, force_quick_gelu=config.quick_gelu)


def _from_architecture(arch: str, config: BackboneConfig) -> open_clip.CLIP:
    source = config.pretrained
    quick = config.quick_gelu
    if source is None or os.path.isfile(source):
        with _quiet_open_clip():
            model = open_clip.create_model(_open_clip_name(arch), pretrained=None, force_quick_gelu=quick)
        if source is not None:
            _warn_if_gelu_mismatch(arch, source, quick)
            _load_file(model, source)
        return model
    if source in open_clip.list_pretrained_tags_by_model(arch):
        try:
            with _offline():
                return open_clip.create_model(arch, pretrained=source, force_quick_gelu=quick)
        except Exception as exc:  # a cache miss surfaces as a hub error
            raise WeightsNotFoundError(
                f"pretrained tag {source!r} of {arch} is not in the local Hugging Face cache ({type(exc).__name__}); "
                "nothing is downloaded: give --pretrained FILE with a local weights file"
            ) from None
    raise WeightsNotFoundError(f"weights file {source} not found; give --pretrained an existing open_clip weights file (.pt, .bin, .safetensors)")


def _load_file(model: torch.nn.Module, path: str) -> None:
    try:
        result = open_clip.load_checkpoint(model, path, strict=False)
    except Exception as exc:
        raise WeightsNotFoundError(f"{path}: cannot load as open_clip weights for this architecture ({str(exc).splitlines()[0][:200]}); "
                                   "check the architecture name") from None
    missing = [k for k in result.missing_keys if not k.startswith("logit_")]
    if missing:
        raise WeightsNotFoundError(f"{path}: {len(missing)} parameters of the architecture are missing from the file "
                                   f"(first: {missing[0]}); check the architecture name")
    if result.unexpected_keys:
        warnings.warn(f"{path}: ignored {len(result.unexpected_keys)} keys not in the architecture (first: {result.unexpected_keys[0]})", stacklevel=3)


def _warn_if_gelu_mismatch(arch: str, path: str, quick_gelu: bool) -> None:
    if not quick_gelu and "quickgelu" not in arch.lower() and _OPENAI_INIT.search(Path(path).name):
        warnings.warn(
            f"{Path(path).name} looks OpenAI-initialised but {arch} builds GELU; use {arch}-quickgelu or quick_gelu "
            "(protocol.md 7.2: the weights load either way, the features differ)",
            stacklevel=3,
        )


class _quiet_open_clip:
    """Silence open_clip's root-logger warning that a model without weights was initialised
    randomly: that is what a preset or a later file load means."""

    def __enter__(self):
        self._level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.root.setLevel(self._level)


class _offline:
    """Force the Hugging Face hub offline for the duration of a build."""

    def __enter__(self):
        from huggingface_hub import constants  # read at call time by the hub's download functions

        self._constants, self._flag = constants, constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        self._saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def __exit__(self, *exc):
        self._constants.HF_HUB_OFFLINE = self._flag
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
