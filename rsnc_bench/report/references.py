"""Reported (paper) numbers from a small YAML file, matched to leaderboard rows.

The shipped ``references.yaml`` holds RRSITR's numbers (methods.md §7.1, §7.2), iEBAKER / EBAKER's
(§7.3) and the sanity bands of protocol.md §8 / methods.md §7.4; its header explains the format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePath
from typing import Any, Iterable

import yaml

from rsnc_bench.errors import ConfigError

DEFAULT_PATH = Path(__file__).with_name("references.yaml")
METRIC_KEYS = ("mr", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
_NUM = r"[-+]?\d+(?:\.\d+)?"
_MEAN_STD = re.compile(rf"^\s*({_NUM})\s*(?:±|\+/?-)\s*({_NUM})\s*$")
_BAND = re.compile(rf"^\s*({_NUM})\s*(?:–|-|to)\s*({_NUM})\s*$")
_FIELDS = {"method", "label", "dataset", "noise_rate", "noise_protocol", "backbone", "pretrained", "metrics",
           "source", "note"}


@dataclass(frozen=True)
class Reported:
    """One reported value: a mean (with its std if given) or a band [low, high]."""

    mean: float = math.nan
    std: float = math.nan
    low: float = math.nan
    high: float = math.nan

    @property
    def is_band(self) -> bool:
        return not math.isnan(self.low)

    @property
    def centre(self) -> float:
        """A single number for plots and the CSV: the mean, or the middle of a band."""
        return (self.low + self.high) / 2 if self.is_band else self.mean

    def scaled(self, factor: float) -> Reported:
        return Reported(*(v * factor for v in (self.mean, self.std, self.low, self.high)))

    def text(self, digits: int = 2) -> str:
        if self.is_band:
            return f"{self.low:g}–{self.high:g}"
        return f"{self.mean:.{digits}f}" + ("" if math.isnan(self.std) else f" ± {self.std:.{digits}f}")


@dataclass(frozen=True, eq=False)  # hashed by identity: one entry of the file
class Reference:
    method: str
    label: str
    dataset: str
    noise_rate: float
    metrics: dict[str, Reported] = field(default_factory=dict)
    source: str = ""
    note: str = ""
    noise_protocol: str | None = None
    backbone: str | None = None
    pretrained: str | None = None

    def value(self, metric: str) -> Reported | None:
        """The reported value of ``metric``; rSum is 6 · mR (protocol.md 5.1)."""
        if metric == "rsum":
            return self.metrics["mr"].scaled(6) if "mr" in self.metrics else None
        return self.metrics.get(metric)

    def specificity(self) -> int:
        return sum(v is not None for v in (self.noise_protocol, self.backbone, self.pretrained))

    def matches(self, dataset: str, backbone: str, protocol: str, rate: float, method: str,
                pretrained: Iterable[str | None] = ()) -> bool:
        if (self.method, self.dataset) != (method, dataset) or not math.isclose(self.noise_rate, rate, abs_tol=1e-9):
            return False
        if self.noise_protocol is not None and self.noise_protocol != protocol:
            return False
        if self.backbone is not None and not fnmatchcase(backbone.lower(), self.backbone.lower()):
            return False
        if self.pretrained is not None:
            names = [PurePath(p).name.lower() for p in pretrained if p]
            return bool(names) and all(fnmatchcase(n, self.pretrained.lower()) for n in names)
        return True


def _reported(value: Any, where: str) -> Reported:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Reported(mean=float(value))
    if isinstance(value, str):
        if m := _MEAN_STD.match(value):
            return Reported(mean=float(m[1]), std=float(m[2]))
        if m := _BAND.match(value):
            return Reported(low=float(m[1]), high=float(m[2]))
    raise ConfigError(f"{where}: {value!r} is not a number, a \"mean±std\" string or a \"low–high\" band")


def _reference(item: Any, where: str) -> Reference:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: each reference is a mapping with method, dataset, noise_rate and metrics")
    unknown = set(item) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(sorted(_FIELDS))}")
    for name in ("method", "dataset", "noise_rate", "metrics"):
        if name not in item:
            raise ConfigError(f"{where}: missing {name!r}; every reference needs method, dataset, noise_rate and metrics")
    rate = item["noise_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ConfigError(f"{where}: noise_rate must be a number in [0, 1], got {rate!r}")
    metrics = item["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise ConfigError(f"{where}: metrics must be a mapping such as {{mr: 46.10}}")
    bad = [k for k in metrics if k not in METRIC_KEYS]
    if bad:
        raise ConfigError(f"{where}: unknown metric {bad[0]!r}; use {', '.join(METRIC_KEYS)}")
    text = {name: (None if item.get(name) is None else str(item[name]))
            for name in ("label", "source", "note", "noise_protocol", "backbone", "pretrained")}
    return Reference(method=str(item["method"]), label=text["label"] or str(item["method"]), dataset=str(item["dataset"]),
                     noise_rate=float(rate), metrics={k: _reported(v, f"{where}, {k}") for k, v in metrics.items()},
                     source=text["source"] or "", note=text["note"] or "", noise_protocol=text["noise_protocol"],
                     backbone=text["backbone"], pretrained=text["pretrained"])


def load_references(path: str | Path | None = None) -> list[Reference]:
    """The references of ``path`` (default: the shipped file); ConfigError naming the file and entry."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise ConfigError(f"references file {path} not found; give --references a YAML file like {DEFAULT_PATH.name}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise ConfigError(f"{path}{'' if line is None else f', line {line + 1}'}: not valid YAML; check indentation and quotes") from None
    items = data.get("references") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a top-level `references:` list")
    return [_reference(item, f"{path}, reference {i + 1}") for i, item in enumerate(items)]


def find(references: Iterable[Reference], dataset: str, backbone: str, protocol: str, rate: float, method: str,
         pretrained: Iterable[str | None] = ()) -> Reference | None:
    """The most specific reference for a leaderboard row (first in file order among equals)."""
    pretrained = list(pretrained)
    found = [r for r in references if r.matches(dataset, backbone, protocol, rate, method, pretrained)]
    return max(found, key=Reference.specificity, default=None)
