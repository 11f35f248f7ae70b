"""Deterministic, image-level validation carve for layouts that have no val split.

Rule (documented in the README): the train images are ordered by sha256("<seed>:<file name>")
and the first max(1, round(fraction x images)) become val, with all their captions. The choice depends
only on the seed and the file names, not on row order, numpy's RNG or what ran before, so the
same files always give the same val set. Noise is injected afterwards, into the remaining
train rows only, so val stays clean (protocol.md section 6).
"""

from __future__ import annotations

import hashlib

import numpy as np

from rsnc_bench.data.split import Split
from rsnc_bench.errors import ConfigError

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_VAL_SEED = 0


def carve_val(train: Split, fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_VAL_SEED) -> tuple[Split, Split]:
    """Split ``train`` into (remaining train, val) by image; e.g. 1,966 -> 1,769 + 197 images."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val fraction {fraction} is outside (0, 1); use e.g. 0.1")
    n_val = max(1, int(round(fraction * train.n_images)))
    if n_val >= train.n_images:
        raise ConfigError(f"cannot carve a val split of {fraction:.0%} from {train.n_images} train images; add images or change the fraction")
    keys = [hashlib.sha256(f"{seed}:{name}".encode()).hexdigest() for name in train.images]
    order = np.array(sorted(range(train.n_images), key=keys.__getitem__), dtype=np.int64)
    val_images, train_images = order[:n_val], order[n_val:]
    return train.select_images(train_images, "train"), train.select_images(val_images, "val")
