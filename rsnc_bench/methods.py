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
            return LossOutput(loss, clean=-per_row_loss)

Eight members, all optional but ``training_loss``: ``config_type``, ``train_defaults``,
``capabilities``, ``training_loss``, ``start_epoch``, ``param_groups``, ``score`` and
``scorers``. The trainer owns data, devices, precision, the optimiser loop, checkpoints,
evaluation and the per-row clean-ness signals the losses hand back; a method owns its heads,
its loss and its scorer. The harness never imports a method by name: the registry loads the
``rsnc_bench.methods`` entry-point group (the built-ins are one entry) on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsnc_bench.backbones.base import DualEncoder, Features
from rsnc_bench.engine.retrieval import cosine
from rsnc_bench.engine.scoring import FullScore, Scorer
from rsnc_bench.engine.signals import RowSignals
from rsnc_bench.errors import ConfigError
from rsnc_bench.registry import Registry


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses add fields whose defaults are the paper's."""


@dataclass(frozen=True)
class Capabilities:
    """What a method declares; every result records it.

    ``trains`` False: evaluate the backbone as given. ``needs_tokens``: encoders return token
    features too. ``baseline``: the plain fine-tune the report's paired test compares every
    other method with; it counts only where the class declares its own ``capabilities``."""

    trains: bool = True
    needs_tokens: bool = False
    baseline: bool = False


@dataclass
class Batch:
    """One training batch. ``rows`` are train-split row indices (the noise manifest's rows),
    ``image_ids`` the index of each row's (possibly noisy) image in the train split."""

    images: torch.Tensor  # [B, 3, S, S] normalised float
    text: torch.Tensor  # [B, L] token ids
    rows: torch.Tensor  # [B] long
    image_ids: torch.Tensor  # [B] long
    lr: float = 0.0  # the step's learning rate (after warm-up and schedule), for a method's own inner optimiser


@dataclass
class LossOutput:
    """The batch loss to minimise and, per batch row, the method's clean-ness signal: ``clean``
    (higher = cleaner), its own decision ``flagged`` that a row is noisy, and further named
    clean-ness scores in ``others``. The harness keeps each row's latest values, checkpoints
    them and scores the selected epoch's against the noise manifest. ``logs``: floats per step."""

    loss: torch.Tensor
    clean: torch.Tensor | None = None  # [B]
    flagged: torch.Tensor | None = None  # [B] bool
    others: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B]
    logs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochContext:
    """What ``start_epoch`` sees. ``signals`` holds the clean-ness signals of every train row so
    far (:class:`RowSignals`, NaN = not seen yet), e.g. to calibrate thresholds on epoch 1's."""

    epoch: int  # 1-based
    epochs: int
    n_rows: int  # train rows it trains on this epoch
    steps_per_epoch: int
    device: torch.device
    captions: Sequence[str] = ()  # train captions in row order, as paired (noise included)
    tokenizer: Callable | None = None  # the backbone's
    signals: RowSignals = field(default_factory=RowSignals)
    # any train rows (as paired) as a Batch on the device, images by the evaluation transform
    # (no augmentation): a memory bank's entries, a pass over the train set
    batch_of: Callable[[torch.Tensor], Batch] | None = None
    # steps of this epoch taken before the cell was interrupted and resumed from within the epoch: the
    # epoch-start decisions were made then, and come back in the method's saved state
    resumed_steps: int = 0


class Method(nn.Module):
    """Base class: the plain CLIP pipeline's pieces, each one overridable.

    State outside parameters and buffers (queues, calibrated thresholds) goes through
    ``nn.Module.get_extra_state`` / ``set_extra_state``, so checkpoints carry it."""

    config_type: ClassVar[type[MethodConfig]] = MethodConfig
    # the paper's budget (epochs, lr, ...): over the harness defaults, under the user's overrides
    train_defaults: ClassVar[dict[str, Any]] = {}
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, backbone: DualEncoder, config: MethodConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.config_type()

    def training_loss(self, batch: Batch) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} trains but defines no training_loss")

    def start_epoch(self, ctx: EpochContext) -> None:
        """Bookkeeping before each epoch: a vocabulary from ``ctx.captions``, self-paced splits."""

    def derived_texts(self, captions: Sequence[str], tokenizer: Callable | None) -> torch.Tensor | None:
        """Token rows the method will encode besides the train captions (KER's masked copies), or
        None. With frozen trunks the cell computes the text trunk's outputs for them once per grid."""
        return None

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups with their own ``lr_scale`` (e.g. new heads at 10x).
        None: the trainer's default groups over all trainable parameters."""
        return None

    def score(self, texts: Features, images: Features) -> torch.Tensor:
        """[n_texts, n_images] similarity for a chunk of texts against all images.
        Default: cosine of the global embeddings."""
        return cosine(texts.embedding, images.embedding)

    def scorers(self) -> list[Scorer]:
        """How the evaluator ranks a split: the first scorer gives the method's own row (named
        ``<method>@<tag>`` when tagged, e.g. a top-K first stage), each further one a row
        ``<method>+<tag>`` (a re-ranker such as SAR). Default: ``score`` over every pair."""
        return [FullScore()]


# Data variants: which train rows a registered name trains on, given the manifest's clean flags.
TRAIN_ROWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "all": lambda clean: np.arange(len(clean)),
    "clean": np.flatnonzero,  # an oracle: it sees the labels, so reports show it and never rank it
}


@dataclass(frozen=True)
class Registered:
    """What a method name stands for: a class, the train rows it sees, its listing line."""

    cls: type[Method]
    rows: str
    doc: str

    @property
    def role(self) -> str | None:
        """"upper-bound" (trains on the clean rows), "baseline" (the class itself declares it) or None."""
        if self.rows != "all":
            return "upper-bound"
        return "baseline" if "capabilities" in vars(self.cls) and self.cls.capabilities.baseline else None

    def record(self) -> dict[str, Any]:
        """The capabilities every result records; the report finds its reference rows by ``role``."""
        caps = self.cls.capabilities
        return {"trains": caps.trains, "needs_tokens": caps.needs_tokens, "train_rows": self.rows, "role": self.role}


class _MethodRegistry(Registry):
    """Method classes by name. ``register(name, rows="clean")`` adds a data variant: a class
    trained only on the rows the noise manifest marks clean (the oracle)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.variants: dict[str, Registered] = {}

    def register(self, name: str, *, rows: str = "all", doc: str | None = None):
        if rows not in TRAIN_ROWS:
            raise ConfigError(f"method {name!r}: rows={rows!r}; choose one of {', '.join(TRAIN_ROWS)}")
        add = super().register(name)

        def decorator(cls: type[Method]) -> type[Method]:
            self.variants[name] = Registered(cls, rows, doc or (cls.__doc__ or ""))
            return add(cls)

        return decorator

    def entry(self, name: str) -> Registered:
        self.get(name)  # discovers, or raises with a suggestion
        return self.variants[name]


METHODS: _MethodRegistry = _MethodRegistry("method", entry_point_group="rsnc_bench.methods")


REFERENCE_LOG_SCALE = math.log(100.0)  # OpenAI CLIP's initial log logit scale


def learnable_log_scale(encoder) -> torch.nn.Parameter | None:
    """CLIP's learnable log logit scale of ``encoder`` (open_clip's ``model.logit_scale``), trained
    with the backbone; None when the encoder has none (then a method keeps its own)."""
    scale = getattr(getattr(encoder, "model", None), "logit_scale", None)
    return scale if isinstance(scale, torch.nn.Parameter) else None


def info_nce(text: torch.Tensor, image: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE on L2-normalised embeddings with a fixed logit scale (CLIP; methods.md 2.5).

    Returns the mean loss and the per-row loss, (CE(text->images) + CE(image->texts)) / 2.
    """
    logits = cosine(text, image, scale)  # rows = texts
    target = torch.arange(len(logits), device=logits.device)
    per_row = (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2
    return per_row.mean(), per_row
