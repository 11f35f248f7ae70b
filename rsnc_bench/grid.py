"""Grids of cells: a typed config (YAML file + command-line overrides), its expansion into
cells, and the runner that skips complete cells and keeps going past failed ones."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import multiprocessing
import os
import shutil
import typing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import yaml
from tqdm.auto import tqdm

from rsnc_bench.backbones import BackboneConfig, WeightsNotFoundError, describe_backbones
from rsnc_bench.config import parse_assignments
from rsnc_bench.data.datasets import DATASETS, get_dataset
from rsnc_bench.engine.cell import CellSpec, method_config, run_cell, train_config
from rsnc_bench.errors import ConfigError, UnknownNameError
from rsnc_bench.methods import METHODS
from rsnc_bench.noise import PROTOCOLS, check_rate
from rsnc_bench.store import CellKey, ResultStore


@dataclass(frozen=True)
class GridConfig:
    """A grid. The defaults are the built-in main job: the synthetic dataset, the tiny CPU
    backbone, every registered method, noise 0.0 / 0.4 / 0.8."""

    methods: tuple[str, ...] = ("*",)  # names or wildcards
    datasets: tuple[str, ...] = ("synthetic",)
    backbones: tuple[str, ...] = ("tiny-vit",)
    pretrained: str | None = None  # local weights file for the backbone(s)
    quick_gelu: bool = False
    freeze_image: bool = False
    freeze_text: bool = False
    backbone_options: tuple[str, ...] = ()  # family options, name=value
    noise: tuple[float, ...] = (0.0, 0.4, 0.8)
    noise_protocol: str = "shuffle"
    noise_seeds: tuple[int, ...] = (42,)
    seeds: tuple[int, ...] = (3,)  # training seeds (RRSITR's first; methods.md 8.14)
    data_root: str | None = None
    layout: str | None = None
    dataset_options: tuple[str, ...] = ()  # name=value, for every dataset of the grid
    train: tuple[str, ...] = ()  # TrainConfig overrides, name=value
    method_options: tuple[str, ...] = ()  # method:name=value
    out: str = "runs"
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    force: bool = False

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
    if typing.get_origin(kind) is not tuple:
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false")
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


def load_grid(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> GridConfig:
    """The defaults, then the YAML file's values, then the command line's (those not None)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"grid file {path} not found; give --config a YAML file such as benchmarks/grids/rsicd-subset.yaml")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
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


def resolve_methods(patterns: Iterable[str]) -> list[str]:
    names: list[str] = []
    for pattern in patterns:
        matched = METHODS.names(pattern)
        if not matched:
            METHODS.get(pattern)  # raises with a suggestion
        names += [n for n in matched if n not in names]
    return names


def _check_backbone(name: str) -> None:
    if name.startswith(("local-dir:", "hf-hub:")) or describe_backbones(name):
        return
    known = [n for n, _ in describe_backbones()]
    close = difflib.get_close_matches(name, known, n=1)
    raise UnknownNameError(f"unknown backbone {name!r}; " + (f"did you mean {close[0]!r}?" if close else "see `rsnc-bench list backbones`"))


def _method_options(grid: GridConfig, method: str) -> tuple[str, ...]:
    out = []
    for item in grid.method_options:
        owner, sep, assignment = item.partition(":")
        if not sep or "=" not in assignment:
            raise ConfigError(f"method option {item!r} is not of the form method:name=value (e.g. clip-ft:logit_scale=10)")
        if owner not in METHODS:
            METHODS.get(owner)
        if owner == method:
            out.append(assignment)
    return tuple(out)


def _looks_like_path(text: str) -> bool:
    """A weights file rather than a pretrained tag such as ``openai``."""
    return "/" in text or os.sep in text or Path(text).suffix in (".pt", ".pth", ".bin", ".safetensors")


def expand(grid: GridConfig) -> list[CellSpec]:
    """Every cell of the grid, validated up front so that a typo fails before any training."""
    methods = resolve_methods(grid.methods)
    for name in grid.datasets:
        get_dataset(name, **parse_assignments(DATASETS.get(name).Options, list(grid.dataset_options)))
    for name in grid.backbones:
        _check_backbone(name)
    PROTOCOLS.get(grid.noise_protocol)
    for rate in grid.noise:
        check_rate(rate)
    if grid.pretrained and _looks_like_path(grid.pretrained) and not Path(grid.pretrained).is_file():
        raise WeightsNotFoundError(f"weights file {grid.pretrained} not found; give --pretrained an existing local weights file")
    cells = []
    for dataset, backbone, method, rate, noise_seed, seed in itertools.product(
            grid.datasets, grid.backbones, methods, grid.noise, grid.noise_seeds, grid.seeds):
        key = CellKey(method, dataset, backbone, grid.noise_protocol, rate, noise_seed, seed)
        cells.append(CellSpec(key, grid.backbone_config(backbone), _method_options(grid, method), grid.train,
                              grid.data_root, grid.layout, grid.dataset_options))
    for spec in cells:  # option typos fail here, not in every cell
        method_config(spec)
        train_config(spec)
    return cells


def devices_for(name: str) -> list[str]:
    """One entry per worker: every visible GPU for ``auto``/``cuda`` with several, else one device."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if name == "auto":
        return ["cpu"]
    return [name]


_WORKER_DEVICE: str | None = None


def _claim_device(queue) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()


def _run_in_worker(spec: CellSpec, root: str) -> dict:
    return run_cell(spec, ResultStore(root), _WORKER_DEVICE)


def run_grid(grid: GridConfig, on_done: Callable[[dict], None] = lambda doc: None) -> tuple[list[dict], int]:
    """Run every cell that is not complete. Returns (documents of the cells run, cells skipped)."""
    store = ResultStore(grid.out)
    cells = expand(grid)
    store.write_grid(dataclasses.asdict(grid), [spec.key for spec in cells])  # lets a report list missing cells
    todo = []
    for spec in cells:
        if grid.force:
            shutil.rmtree(store.checkpoint_dir(spec.key), ignore_errors=True)
        elif store.is_complete(spec.key):
            continue
        todo.append(spec)
    devices = devices_for(grid.device)
    docs = []
    if len(devices) == 1 or len(todo) <= 1:
        device = None if grid.device == "auto" else devices[0]
        for spec in _progress(todo):
            docs.append(run_cell(spec, store, device))
            on_done(docs[-1])
        return docs, len(cells) - len(todo)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    queue = context.Manager().Queue()
    for device in devices:
        queue.put(device)
    with ProcessPoolExecutor(len(devices), mp_context=context, initializer=_claim_device, initargs=(queue,)) as pool:
        futures = [pool.submit(_run_in_worker, spec, str(store.root)) for spec in todo]
        for future in _progress(as_completed(futures), total=len(futures)):
            docs.append(future.result())
            on_done(docs[-1])
    return docs, len(cells) - len(todo)


def _progress(items, total: int | None = None):
    return tqdm(items, total=total, desc="cells", unit="cell", disable=None)
