"""A frozen trunk's outputs, memoised by the content of each input row.

With ``frozen_trunks`` a tower's trunk (the pretrained network before its projection) neither
trains nor changes mode, so its output for an input row is a function of that row alone: it is
computed the first time the row is seen (images: the preprocessed pixels, so only without
augmentation do epochs repeat them; captions: the token ids) and read back after, across
epochs, val and test. Rows are keyed by a 128-bit BLAKE2b digest of their bytes. A cell fills
the memo of a whole split at once from a file that the cells of a grid share (trunk_outputs.py).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Callable

import torch
from torch import nn


def row_keys(x: torch.Tensor) -> list[bytes]:
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.detach().cpu().contiguous()]


class TrunkMemo:
    """``memo(x)`` = ``trunk(x)``, each row computed once per process. ``module`` holds the
    trunk's weights (what a shared file of its outputs is keyed by)."""

    def __init__(self, trunk: Callable[[torch.Tensor], torch.Tensor], module: nn.Module):
        self.trunk, self.module = trunk, module
        self.rows: dict[bytes, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> "TrunkMemo":
        """A copy of the backbone (NPC's siamese, OSA's estimator) holds a copy of the same frozen
        trunk: it shares the held rows instead of computing them again."""
        twin = TrunkMemo(copy.deepcopy(self.trunk, memo), copy.deepcopy(self.module, memo))
        twin.rows = self.rows
        return twin

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        keys = row_keys(x)
        self._compute(x, keys)
        return torch.stack([self.rows[key] for key in keys]).to(x.device)

    def _compute(self, x: torch.Tensor, keys: list[bytes]) -> None:
        new = list({key: i for i, key in enumerate(keys) if key not in self.rows}.items())
        if new:
            with torch.no_grad():
                out = self.trunk(x[[i for _, i in new]]).float().cpu()
            self.rows.update({key: row for (key, _), row in zip(new, out)})

    def fill(self, x: torch.Tensor, batch_size: int) -> None:
        """Compute every row of ``x`` not yet held, ``batch_size`` rows at a time."""
        for start in range(0, len(x), batch_size):
            part = x[start: start + batch_size]
            self._compute(part, row_keys(part))

    def held(self, x: torch.Tensor) -> dict[bytes, torch.Tensor]:
        """The held outputs of the rows of ``x`` (each distinct row once)."""
        return {key: self.rows[key] for key in row_keys(x) if key in self.rows}
