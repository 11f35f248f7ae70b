"""A grid's typed config: the built-in defaults, a YAML file's values, then the command line's.

The CLI reads its help text's defaults from here, so ``run --help`` shows what a run does.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rsnc_bench.backbones.base import BackboneConfig
from rsnc_bench.config import check_seed
from rsnc_bench.errors import ConfigError

LAUNCHERS = ("inline", "debug", "local", "slurm")  # inline: this process and its workers; the others through submitit (launch.py)
SLURM_PREFIX = "slurm_"  # GridConfig's fields of the submitit jobs' resources: a `slurm:` block in a grid file
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


# sbatch options that rsnc-bench sets itself (the array, its logs, the requeue signal) or that
# have an option of their own, with what to use instead
_SBATCH_RESERVED = {"array": "", "output": "", "error": "", "open-mode": "", "signal": "", "wrap": "",
                    "time": " (use slurm.time)", "partition": " (use slurm.partition)", "mem": " (use slurm.mem_gb)",
                    "gpus-per-node": " (use slurm.gpus_per_cell)", "cpus-per-task": " (use slurm.cpus_per_cell)"}


@dataclass(frozen=True)
class SlurmConfig:
    """The resources of the submitit launchers' jobs (``GridConfig.slurm``, from its ``slurm_*``
    fields). All but ``time`` are Slurm's only; ``time`` also limits a local job."""

    partition: str | None = None
    time: int | None = None  # minutes; None: 240 on Slurm, no limit for a local job
    gpus_per_cell: int = 0
    cpus_per_cell: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    cells_per_task: int = 1
    setup: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # other sbatch options, name=value

    def __post_init__(self):
        for name, least in (("time", 1), ("gpus_per_cell", 0), ("cpus_per_cell", 1), ("array_parallelism", 1), ("cells_per_task", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"slurm.{name}={value}; use a whole number of at least {least}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ConfigError(f"slurm.mem_gb={self.mem_gb}; use a positive number of GB, e.g. mem_gb: 32")
        self.sbatch_options()  # a malformed option fails here, before anything runs

    def sbatch_options(self) -> dict[str, str | bool]:
        """``options`` as sbatch flags without their dashes: {"account": "proj42", "exclusive": True}."""
        out: dict[str, str | bool] = {}
        for item in self.options:
            name, sep, value = item.partition("=")
            flag = name.strip().lstrip("-").replace("_", "-")
            if not sep or not flag or not all(c.isalnum() or c == "-" for c in flag):
                raise ConfigError(f"slurm option {item!r} is not of the form name=value (e.g. account=proj42)")
            if flag in _SBATCH_RESERVED:
                raise ConfigError(f"slurm option {flag!r} is set by rsnc-bench{_SBATCH_RESERVED[flag]}; leave it out of slurm.options")
            out[flag] = True if value.strip().lower() == "true" else value.strip()
        return out


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
    # where the cells run; the slurm_* fields are a `slurm:` block in a grid file (slurm: {partition: gpu, time: 240})
    launcher: str = _field("inline", "--launcher", help="Where the cells run: inline (this process and its workers), or through submitit: "
                                                        "debug (in this process), local (jobs on this machine) or slurm (a Slurm job array; "
                                                        "pip install \"rsnc-bench[slurm]\").")
    slurm_partition: str | None = _field(None, "--slurm-partition", help="Slurm partition of the array's tasks.")
    slurm_time: int | None = _field(None, "--slurm-time", help="Time limit of one job in minutes: a task that reaches it is requeued and "
                                    "resumes its cell (default 240 on Slurm; none for a local job).")
    slurm_gpus_per_cell: int = _field(0, "--slurm-gpus", help="GPUs of each Slurm array task (slurm.gpus_per_cell in a grid file).")
    slurm_cpus_per_cell: int | None = _field(None, "--slurm-cpus", help="CPU cores of each Slurm array task; a CPU cell trains on all "
                                             "of them (slurm.cpus_per_cell).")
    slurm_mem_gb: float | None = _field(None, "--slurm-mem-gb", help="Memory of each Slurm array task, in GB.")
    slurm_array_parallelism: int | None = _field(None, "--slurm-parallel", help="Array tasks running at once (slurm.array_parallelism; "
                                                 "default: submitit's 256).")
    slurm_cells_per_task: int = _field(1, "--slurm-cells", help="Cells each Slurm array task runs, one after another (slurm.cells_per_task).")
    slurm_setup: tuple[str, ...] = _field((), "--slurm-setup", repeat=True, help="Shell line run before each Slurm task, e.g. "
                                          "'source /shared/venv/bin/activate'; repeatable.")
    slurm_options: tuple[str, ...] = _field((), "--slurm-opt", repeat=True, help="Other sbatch option name=value, e.g. account=proj42, "
                                            "qos=low, constraint=a100; repeatable.")

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
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.launcher == "slurm" and self.device.startswith("cuda") and not self.slurm.gpus_per_cell:
            raise ConfigError(f"--device {self.device} on Slurm needs a GPU per task; give slurm.gpus_per_cell (--slurm-gpus 1)")
        self.slurm  # parsed and checked now, not at submission

    @functools.cached_property
    def slurm(self) -> SlurmConfig:
        """The ``slurm_*`` fields as one typed config."""
        return SlurmConfig(**{f.name: getattr(self, SLURM_PREFIX + f.name) for f in dataclasses.fields(SlurmConfig)})

    def backbone_config(self, name: str) -> BackboneConfig:
        return BackboneConfig(name, self.pretrained, self.quick_gelu, self.freeze_image, self.freeze_text, self.backbone_options)


_FIELDS = {f.name: f for f in dataclasses.fields(GridConfig)}
_SLURM_KEYS = [name[len(SLURM_PREFIX):] for name in _FIELDS if name.startswith(SLURM_PREFIX)]


def _shown(name: str) -> str:
    """A field as a grid file writes it: slurm_time is ``slurm.time``."""
    return "slurm." + name[len(SLURM_PREFIX):] if name.startswith(SLURM_PREFIX) else name


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
    kind, shown, key = typing.get_type_hints(GridConfig)[name], _shown(name), _shown(name).split(".")[-1]
    if value is None:  # a YAML key left empty
        if type(None) in typing.get_args(kind):
            return None
        raise ConfigError(f"{where}: {shown} is empty; give it a value or leave the key out")
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None, and the value is not None: an X
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is not tuple:
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: {shown} must be true or false")
        if kind is int:
            try:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                return int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {shown} must be a whole number, e.g. {key}: 2") from None
        if kind is float:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {shown} must be a number, e.g. {key}: 16") from None
        return value if kind is bool else str(value)
    item = typing.get_args(kind)[0]
    if name == SLURM_PREFIX + "setup" and isinstance(value, str):
        value = [value]  # one shell line, commas and all
    if isinstance(value, dict):
        value = _as_assignments(name, value)
    elif isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return tuple(item(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {shown} must be a list of {item.__name__} values, e.g. {key}: [0.2, 0.6]") from None


def _slurm_block(value: Any, where: str) -> dict[str, Any]:
    """A grid file's ``slurm:`` mapping as the ``slurm_*`` fields' values."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: slurm must be a mapping such as {{partition: gpu, time: 240, gpus_per_cell: 1}}")
    out = {}
    for key, item in value.items():
        name = SLURM_PREFIX + str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{where}: unknown key slurm.{key}; known keys: {', '.join(_SLURM_KEYS)}")
        out[name] = _coerce(name, item, where)
    return out


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
            if name == "slurm":
                values.update(_slurm_block(value, str(path)))
                continue
            if name not in _FIELDS:
                known = [n for n in _FIELDS if not n.startswith(SLURM_PREFIX)] + ["slurm"]
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(known)}")
            values[name] = _coerce(name, value, str(path))
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "command line")
    return GridConfig(**values)
