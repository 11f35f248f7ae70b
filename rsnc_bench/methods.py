"""The method contract and registry (architecture.md, "The method contract").

A method is a :class:`Method` subclass registered under a short name with a typed config
whose defaults are the paper's::

    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        margin: float = 0.2

    @METHODS.register("my-method")
    class MyMethod(Method):
        \"\"\"One line for `rsnc-bench list methods`.\"\"\"
        config_type = MyConfig

        def training_loss(self, batch):
            ...
            return LossOutput(loss, per_row)

The harness never imports a method by name: the registry loads the ``rsnc_bench.methods``
entry-point group (the built-in ``methods`` package is one entry) on first use. The trainer
owns data, devices, precision, the optimiser loop, checkpoints and evaluation; a method owns its
heads, its loss, its scorer and its clean-ness signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsnc_bench.backbones.base import DualEncoder, Features
from rsnc_bench.engine.retrieval import Reranked, cosine
from rsnc_bench.registry import Registry


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses add fields whose defaults are the paper's."""


@dataclass
class Batch:
    """One training batch. ``rows`` are train-split row indices (the noise manifest's rows),
    ``image_ids`` the index of each row's (possibly noisy) image in the train split."""

    images: torch.Tensor  # [B, 3, S, S] normalised float
    text: torch.Tensor  # [B, L] token ids
    rows: torch.Tensor  # [B] long
    image_ids: torch.Tensor  # [B] long


@dataclass
class LossOutput:
    """The batch loss to minimise and, per row, the loss or score the method computed for it."""

    loss: torch.Tensor
    per_row: torch.Tensor | None = None  # [B], detached by the trainer
    logs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PairScores:
    """A clean-ness score per train row (higher = cleaner; NaN = not scored) and, when the method
    has one, its own binary decision that a row is noisy. ``others`` holds further named
    clean-ness scores (same convention), each scored against the manifest as well."""

    clean_score: np.ndarray
    flagged_noisy: np.ndarray | None = None
    others: dict[str, np.ndarray] = field(default_factory=dict)


class RowSignals:
    """Named values per train row that a method records as it sees the rows (NaN: not seen yet),
    the raw material of its clean-ness signal: grown on demand, written by row index, carried in
    the method's extra state (``state`` / ``load``) so that resume and ``best.pt`` keep them."""

    def __init__(self, *names: str):
        self.values = {name: torch.empty(0) for name in names}

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def ensure(self, n_rows: int) -> None:
        for name, values in self.values.items():
            if len(values) < n_rows:
                self.values[name] = torch.cat([values, torch.full((n_rows - len(values),), math.nan)])

    def record(self, rows: torch.Tensor, **values: torch.Tensor) -> None:
        rows = rows.cpu()
        self.ensure(int(rows.max()) + 1)
        for name, value in values.items():
            self.values[name][rows] = value.detach().float().cpu()

    def numpy(self, name: str) -> np.ndarray:
        return self.values[name].numpy().astype(np.float64)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: values.clone() for name, values in self.values.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.values = {name: values.clone() for name, values in state.items()}


@dataclass(frozen=True)
class EpochContext:
    epoch: int  # 1-based
    epochs: int
    n_rows: int  # train rows (after any row selection)
    steps_per_epoch: int
    device: torch.device


class Method(nn.Module):
    """Base class: the plain CLIP pipeline's pieces, each one overridable.

    Capability flags (class variables) tell the trainer what a method needs:
    ``trains`` (False: evaluate the backbone as given), ``needs_tokens`` (token features at
    encode time), ``uses_clean_labels`` (sees the manifest's clean flags: only the oracle).
    ``train_defaults`` holds the paper's training budget (epochs, lr, ...), applied over the
    harness defaults and under the user's overrides. ``baseline`` marks the plain fine-tune that
    the report tests every other method against (declared by the class itself, not inherited).
    Every result records ``capabilities()``, and the report finds its reference rows by them.
    """

    name: ClassVar[str] = ""
    config_type: ClassVar[type[MethodConfig]] = MethodConfig
    train_defaults: ClassVar[dict[str, Any]] = {}
    trains: ClassVar[bool] = True
    needs_tokens: ClassVar[bool] = False
    uses_clean_labels: ClassVar[bool] = False
    rerank_tag: ClassVar[str] = "rerank"  # leaderboard suffix of the re-ranked results ("iebaker+sar")
    baseline: ClassVar[bool] = False

    @classmethod
    def role(cls) -> str | None:
        """How a report treats the method: "upper-bound" (sees the clean labels: shown, never
        ranked), "baseline" (what the paired test compares with), or None (a competitor)."""
        if cls.uses_clean_labels:
            return "upper-bound"
        return "baseline" if cls.__dict__.get("baseline", False) else None

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What the method declares, recorded in every result it produces."""
        return {"trains": cls.trains, "needs_tokens": cls.needs_tokens, "uses_clean_labels": cls.uses_clean_labels,
                "scores_rows": cls.pair_scores is not Method.pair_scores, "reranks": cls.rerank is not Method.rerank,
                "role": cls.role()}

    def __init__(self, backbone: DualEncoder, config: MethodConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.config_type()

    # --- training -----------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} trains but defines no training_loss")

    def prepare(self, captions: Sequence[str]) -> None:
        """Called once before training with the train captions in row order, as paired (noise
        included): e.g. to build a keyword vocabulary. Default: nothing."""

    def start_epoch(self, ctx: EpochContext) -> None:
        """Bookkeeping before each epoch (self-paced splits, queues). Default: nothing."""

    def select_train_rows(self, clean: np.ndarray) -> np.ndarray | None:
        """Train rows to keep, given the manifest's clean flags; only called when
        ``uses_clean_labels``. None keeps every row."""
        return None

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups with their own ``lr_scale`` (e.g. new heads at 10x).
        None: the trainer's default groups over all trainable parameters."""
        return None

    # --- evaluation ---------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> Features:
        return self.backbone.encode_image(images, tokens=self.needs_tokens)

    def encode_texts(self, text: torch.Tensor) -> Features:
        return self.backbone.encode_text(text, tokens=self.needs_tokens)

    def score(self, texts: Features, images: Features) -> torch.Tensor:
        """[n_texts, n_images] similarity for a chunk of texts against all images.
        Default: cosine of the global embeddings."""
        return cosine(texts.embedding, images.embedding)

    def begin_scoring(self, texts: Features, images: Features) -> None:
        """Called once per evaluation with every text and image feature, before the chunked
        ``score`` calls: e.g. to pick a first stage's candidates over the whole split. Default: nothing."""

    def score_tag(self) -> str:
        """A tag for results whose scorer departs from the method's full score (e.g. "top100"
        when only a first stage's top 100 are re-scored); the leaderboard shows ``<method>@<tag>``.
        Empty: the full score."""
        return ""

    def rerank(self, scores: torch.Tensor) -> torch.Tensor | Reranked | None:
        """An evaluation-time re-ranker over the full [n_texts, n_images] matrix: a re-scored
        matrix, or a ``Reranked`` pair when text->image and image->text re-rank differently
        (SAR). Reported separately, tagged ``rerank_tag``. None: no re-ranker."""
        return None

    def pair_scores(self) -> PairScores | None:
        """The method's clean-ness signal for every train row, scored against the manifest."""
        return None


class _MethodRegistry(Registry):
    def register(self, name: str):
        add = super().register(name)

        def decorator(cls: type[Method]) -> type[Method]:
            cls.name = name
            return add(cls)

        return decorator


METHODS: Registry[type[Method]] = _MethodRegistry("method", entry_point_group="rsnc_bench.methods")


def info_nce(text: torch.Tensor, image: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE on L2-normalised embeddings with a fixed logit scale (CLIP; methods.md 2.5).

    Returns the mean loss and the per-row loss, (CE(text->images) + CE(image->texts)) / 2.
    """
    logits = scale * F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T  # rows = texts
    target = torch.arange(len(logits), device=logits.device)
    per_row = (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2
    return per_row.mean(), per_row
