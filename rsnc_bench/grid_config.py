"""A grid's typed config: the built-in defaults, a YAML file's values, then the command line's.

The CLI reads its help text's defaults from here, so ``run --help`` shows what a run does.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rsnc_bench.backbones.base import BackboneConfig
from rsnc_bench.config import check_seed
from rsnc_bench.errors import ConfigError

NON_EMPTY = {"methods": "--methods clip-ft", "datasets": "--datasets synthetic", "backbones": "--backbone tiny-clip",
             "noise": "--noise 0.4", "noise_seeds": "--noise-seeds 42", "seeds": "--seeds 3"}  # fields a grid needs, with an example


@dataclass(frozen=True)
class CliFlag:
    """How a grid field appears on `rsnc-bench run`: its option names and help. List fields take
    a comma-separated value, or with ``repeat`` one value per use of the option."""

    names: tuple[str, ...]
    help: str
    repeat: bool = False


def _field(default: Any, *names: str, help: str, repeat: bool = False) -> Any:
    return dataclasses.field(default=default, metadata={"cli": CliFlag(names, help, repeat)})


@dataclass(frozen=True)
class GridConfig:
    """A grid. The defaults are the built-in main job: every registered method fine-tuned from the
    built-in pretrained CPU backbone on the synthetic dataset, noise 0.0 / 0.4 / 0.8, three seeds.
    Each field is a `run` option too (``CliFlag``), so none is missing from the command line."""

    methods: tuple[str, ...] = _field(("*",), "--methods", help="Comma-separated methods or wildcards.")
    datasets: tuple[str, ...] = _field(("synthetic",), "--datasets", help="Comma-separated datasets.")
    backbones: tuple[str, ...] = _field(("tiny-clip",), "--backbone", help="Backbone(s), comma-separated (see `list backbones`).")
    pretrained: str | None = _field(None, "--pretrained", help="Local weights file for the backbone (never downloaded).")
    quick_gelu: bool = _field(False, "--quick-gelu", help="Force QuickGELU: needed for OpenAI-initialised weights such as RemoteCLIP "
                                                          "and GeoRSCLIP ViT-B-32.")
    freeze_image: bool = _field(False, "--freeze-image", help="Freeze the image tower (its parameters are not trained).")
    freeze_text: bool = _field(False, "--freeze-text", help="Freeze the text tower.")
    backbone_options: tuple[str, ...] = _field((), "--backbone-opt", "-b", repeat=True,
                                               help="Backbone family option name=value (e.g. text=/models/bert); repeatable.")
    noise: tuple[float, ...] = _field((0.0, 0.4, 0.8), "--noise", help="Comma-separated noise rates.")
    # the field's generator (protocol.md 4.1), byte-compatible with RRSITR's files
    noise_protocol: str = _field("rrsitr", "--noise-protocol", help="Noise protocol (see `list noise`).")
    noise_seeds: tuple[int, ...] = _field((42,), "--noise-seeds", help="Comma-separated noise seeds.")
    # training seeds: RRSITR's first three (methods.md 8.14)
    seeds: tuple[int, ...] = _field((3, 13, 25), "--seeds", help="Comma-separated training seeds.")
    data_root: str | None = _field(None, "--data-root", help="Folder holding the dataset; default $RSNC_BENCH_DATA/<name> or ./data/<name>.")
    layout: str | None = _field(None, "--layout", help="File layout (karpathy, amfmn, csv, nwpu); default: the dataset's own.")
    dataset_options: tuple[str, ...] = _field((), "--dataset-opt", "-o", repeat=True,
                                              help="Dataset option name=value, for every dataset of the grid (e.g. synthetic's n_train=400); repeatable.")
    train: tuple[str, ...] = _field((), "--train-opt", "-t", repeat=True,
                                    help="Training option name=value (epochs, batch_size, lr, precision, ...); repeatable.")
    method_options: tuple[str, ...] = _field((), "--method-opt", "-m", repeat=True,
                                             help="Method option method:name=value (e.g. clip-ft:logit_scale=10); repeatable.")
    out: str = _field("runs", "--out", help="Result folder.")
    device: str = _field("auto", "--device", help="auto, cpu, cuda or cuda:N.")
    workers: int = _field(0, "--workers", help="Cells run at once: 0 is one per GPU, or on a CPU one per core, each single-threaded.")
    force: bool = _field(False, "--force", help="Rerun cells that are already complete (the old result stays until the new one is).")

    def __post_init__(self):
        for name in NON_EMPTY:
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty, so there is nothing to run; give at least one value, e.g. {NON_EMPTY[name]}")
        for seed in self.seeds:
            check_seed(seed, "train seed")
        for seed in self.noise_seeds:
            check_seed(seed, "noise seed")
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers}; use 0 (one per GPU or CPU core) or a positive count")

    def backbone_config(self, name: str) -> BackboneConfig:
        return BackboneConfig(name, self.pretrained, self.quick_gelu, self.freeze_image, self.freeze_text, self.backbone_options)


_FIELDS = {f.name: f for f in dataclasses.fields(GridConfig)}


def _as_assignments(name: str, value: dict) -> list[str]:
    """``{epochs: 3}`` -> ["epochs=3"]; method options nest one level: ``{clip-ft: {logit_scale: 10}}``."""
    if name != "method_options":
        return [f"{k}={v}" for k, v in value.items()]
    out = []
    for method, options in value.items():
        if not isinstance(options, dict):
            raise ConfigError(f"method_options.{method} must be a mapping such as {{logit_scale: 10}}")
        out += [f"{method}:{k}={v}" for k, v in options.items()]
    return out


def _coerce(name: str, value: Any, where: str):
    """A YAML or CLI value for field ``name``; lists may also be comma-separated strings."""
    kind = typing.get_type_hints(GridConfig)[name]
    if value is None:  # a YAML key left empty
        if type(None) in typing.get_args(kind):
            return None
        raise ConfigError(f"{where}: {name} is empty; give it a value or leave the key out")
    if typing.get_origin(kind) is not tuple:
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false")
        if kind is int:
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {name} must be a whole number, e.g. {name}: 2") from None
        return value if kind is bool else str(value)
    item = typing.get_args(kind)[0]
    if isinstance(value, dict):
        value = _as_assignments(name, value)
    elif isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return tuple(item(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be a list of {item.__name__} values, e.g. {name}: [0.2, 0.6]") from None


class _AliasError(yaml.YAMLError):
    def __init__(self, line: int):
        self.line = line


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a few nested aliases (a "billion laughs" file) expand to
    gigabytes once the values are read; a grid file has no need for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasError(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def load_grid(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> GridConfig:
    """The defaults, then the YAML file's values, then the command line's (those not None)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"grid file {path} not found; give --config a YAML file such as benchmarks/grids/rsicd-subset.yaml")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader) or {}
        except (UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"grid file {path} cannot be read as UTF-8 text ({exc}); re-save it as UTF-8") from None
        except _AliasError as exc:
            raise ConfigError(f"{path}, line {exc.line}: YAML aliases (*name) are not allowed in a grid file; write the values out") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            raise ConfigError(f"{path}{'' if line is None else f', line {line + 1}'}: not valid YAML; check indentation and colons") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a grid file is a mapping of keys such as methods:, datasets:, noise:")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(_FIELDS)}")
            values[name] = _coerce(name, value, str(path))
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "command line")
    return GridConfig(**values)
