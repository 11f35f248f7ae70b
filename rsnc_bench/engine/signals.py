"""The clean-ness signals the harness keeps per train row.

Each step's ``LossOutput`` may carry, per batch row, a clean-ness score (``clean``, higher =
cleaner), the method's own noisy flag and further named scores. The trainer records them here
by train row (the latest value wins), saves them in every checkpoint, and hands the detection
metrics a :class:`PairScores` view each epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from rsnc_bench.errors import ConfigError

if TYPE_CHECKING:
    from rsnc_bench.methods import LossOutput


@dataclass(frozen=True)
class PairScores:
    """A clean-ness score per train row (higher = cleaner; NaN = not scored), the method's own
    flags (None: it gives none) and further named scores (same convention)."""

    clean_score: np.ndarray
    flagged_noisy: np.ndarray | None = None
    others: dict[str, np.ndarray] = field(default_factory=dict)


class RowSignals:
    """Named float64 values per train row, recorded as rows are seen (NaN: not seen yet): at least
    ``n_rows`` long (``ensure``; the rows never seen keep NaN), written by row index, saved in
    checkpoints through ``state`` / ``load``."""

    def __init__(self, n_rows: int = 0):
        self.n_rows = n_rows
        self.values: dict[str, torch.Tensor] = {}  # name -> [n_rows], created when first recorded

    def __len__(self) -> int:
        return max([self.n_rows, *(len(v) for v in self.values.values())])

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def ensure(self, n_rows: int) -> None:
        self.n_rows = max(self.n_rows, n_rows)
        for name, values in self.values.items():
            if len(values) < n_rows:
                self.values[name] = torch.cat([values, torch.full((n_rows - len(values),), math.nan, dtype=torch.float64)])

    def record(self, rows: torch.Tensor, **values: torch.Tensor) -> None:
        rows = rows.cpu()
        for name in values:
            self.values.setdefault(name, torch.empty(0, dtype=torch.float64))
        self.ensure(max(len(self), int(rows.max()) + 1))
        for name, value in values.items():
            self.values[name][rows] = value.detach().to("cpu", torch.float64)

    def numpy(self, name: str) -> np.ndarray:
        return self.values[name].numpy().copy()

    def state(self) -> dict[str, torch.Tensor]:
        return {name: values.clone() for name, values in self.values.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.values = {name: values.clone() for name, values in state.items()}
        self.n_rows = len(self)


FLAGGED, CLEAN = "flagged", "clean"


def record_signals(signals: RowSignals, rows: torch.Tensor, out: LossOutput) -> None:
    """Keep a step's clean-ness signals per train row (the harness calls this after each loss)."""
    if out.clean is None:
        if out.flagged is not None or out.others:
            raise ConfigError("a LossOutput gave flags or other scores without clean: give clean too")
        return
    values = {CLEAN: out.clean, **({FLAGGED: out.flagged} if out.flagged is not None else {}),
              **{f"others.{name}": value for name, value in out.others.items()}}
    for name, value in values.items():
        if value.shape != rows.shape:
            raise ConfigError(f"LossOutput.{name} has shape {tuple(value.shape)}; give one value per batch row, {tuple(rows.shape)}")
    signals.record(rows, **values)


def pair_scores(signals: RowSignals) -> PairScores | None:
    """Each row's latest signals as the detection metrics read them (None before any)."""
    if CLEAN not in signals:
        return None
    flagged = np.nan_to_num(signals.numpy(FLAGGED), nan=0.0) > 0.5 if FLAGGED in signals else None
    others = {name.removeprefix("others."): signals.numpy(name) for name in signals.values if name.startswith("others.")}
    return PairScores(signals.numpy(CLEAN), flagged, others)
