"""Parsing of command-line values into typed configs."""

from __future__ import annotations

import dataclasses
import typing

from rsnc_bench.errors import ConfigError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
SEED_MAX = 2**32 - 1  # numpy's seeding takes [0, 2**32)


def check_seed(seed: int, what: str = "seed") -> int:
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{what} {seed} is outside [0, {SEED_MAX}]; give a whole number such as 42")
    return int(seed)


def _convert(text: str, kind: type, key: str):
    try:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"option {key}={text!r} is not a valid {kind.__name__}") from None


def parse_assignments(config_type: type, items: list[str] | None) -> dict:
    """``["n_train=400", "seed=3"]`` -> typed values for the fields of a dataclass."""
    hints = typing.get_type_hints(config_type)
    names = [f.name for f in dataclasses.fields(config_type)]
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"option {item!r} is not of the form name=value")
        if key not in names:
            raise ConfigError(f"unknown option {key!r}; known options: {', '.join(names) or 'none'}")
        out[key] = _convert(value.strip(), hints[key], key)
    return out


def parse_floats(text: str, what: str) -> list[float]:
    """``"0.2,0.6"`` -> [0.2, 0.6]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of numbers such as 0.2,0.6") from None
    if not values:
        raise ConfigError(f"{what} is empty; give e.g. 0.2,0.6")
    return values
