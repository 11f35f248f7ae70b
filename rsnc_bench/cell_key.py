"""A grid cell's key: (method, dataset, backbone, noise protocol, noise rate, noise seed, train
seed), and the readable, stable path it gives its files."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from rsnc_bench.errors import ConfigError


def slug(name: str, max_len: int = 60) -> str:
    """A path-safe form of ``name``; when sanitising changed it, a hash of the raw name is appended.

    Names made only of ``[A-Za-z0-9._-]`` (and not starting with ``.`` or ``-``) are kept as they
    are, so distinct names always give distinct slugs.
    """
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:max_len].rstrip(".-")
    if clean == name:
        return clean
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{clean}-{digest}" if clean else digest


def format_rate(rate: float) -> str:
    """Shortest ``g`` form that reads back as the same float (0.4 -> "0.4", 0.0 -> "0")."""
    text = f"{rate:g}"
    return text if float(text) == rate else repr(float(rate))


@dataclass(frozen=True)
class CellKey:
    """One grid cell."""

    method: str
    dataset: str
    backbone: str
    noise_protocol: str
    noise_rate: float
    noise_seed: int
    train_seed: int

    def __post_init__(self) -> None:
        for name in ("method", "dataset", "backbone", "noise_protocol"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"cell key: {name} must be a non-empty string, got {value!r}")
        rate = self.noise_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise ConfigError(f"cell key: noise_rate must be a number in [0, 1], got {rate!r}")
        object.__setattr__(self, "noise_rate", float(rate))
        for name in ("noise_seed", "train_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"cell key: {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    def relpath(self) -> Path:
        """Readable, stable path relative to the store root; distinct keys give distinct paths."""
        stem = f"{slug(self.noise_protocol)}-r{format_rate(self.noise_rate)}-n{self.noise_seed}-s{self.train_seed}"
        return Path(slug(self.dataset), slug(self.backbone), slug(self.method), stem + ".json")

    def label(self) -> str:
        """One-line name, e.g. ``clip-ft synthetic tiny-vit shuffle r0.4 n0 s1``."""
        return (f"{self.method} {self.dataset} {self.backbone} {self.noise_protocol} "
                f"r{format_rate(self.noise_rate)} n{self.noise_seed} s{self.train_seed}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> CellKey:
        """Inverse of ``as_dict``; ConfigError on missing or extra fields or bad values."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"cell key must have exactly the fields {sorted(names)}, got {got}")
        return cls(**data)
