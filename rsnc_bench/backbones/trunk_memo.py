"""A frozen trunk's outputs, memoised by the content of each input row.

With ``frozen_trunks`` a tower's trunk (the pretrained network before its projection) neither
trains nor changes mode, so its output for an input row is a function of that row alone: it is
computed the first time the row is seen (images: the preprocessed pixels, so only without
augmentation do epochs repeat them; captions: the token ids) and read back after, across
epochs, val and test. Rows are keyed by a 128-bit BLAKE2b digest of their bytes.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch


class TrunkMemo:
    """``memo(x)`` = ``trunk(x)``, each row computed once per process."""

    def __init__(self, trunk: Callable[[torch.Tensor], torch.Tensor]):
        self.trunk = trunk
        self.rows: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.detach().cpu().contiguous()]
        new = list({key: i for i, key in enumerate(keys) if key not in self.rows}.items())
        if new:
            with torch.no_grad():
                out = self.trunk(x[[i for _, i in new]]).float().cpu()
            self.rows.update({key: row for (key, _), row in zip(new, out)})
        return torch.stack([self.rows[key] for key in keys]).to(x.device)
