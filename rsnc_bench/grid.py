"""Grids of cells: the expansion of a grid config (``grid_config.py``) into cells, and the
runner that skips complete cells and keeps going past failed ones."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
from tqdm.auto import tqdm

from rsnc_bench.backbones import WeightsNotFoundError, build_backbone, describe_backbones
from rsnc_bench.engine import distributed
from rsnc_bench.engine.cell import CellSpec, cache_images, check_inputs, check_recorded_manifest, run_cell
from rsnc_bench.errors import ConfigError, RsncError, UnknownNameError
from rsnc_bench.grid_config import GridConfig
from rsnc_bench.methods import METHODS
from rsnc_bench.noise import PROTOCOLS, check_rate
from rsnc_bench.paths import remove_stale_temporaries, writable_folder
from rsnc_bench.pretrain import RECIPES, ensure_checkpoint
from rsnc_bench.progress import bar, silence
from rsnc_bench.store import CellKey, ResultStore


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
    for name in grid.backbones:
        _check_backbone(name)
    PROTOCOLS.get(grid.noise_protocol)
    for rate in grid.noise:
        check_rate(rate)
    builtin = [name for name in grid.backbones if name in RECIPES]
    if grid.pretrained and builtin:
        raise ConfigError(f"{builtin[0]} brings its own weights; to load a file, use --backbone {RECIPES[builtin[0]].arch} --pretrained FILE")
    if grid.pretrained and _looks_like_path(grid.pretrained) and not Path(grid.pretrained).is_file():
        raise WeightsNotFoundError(f"weights file {grid.pretrained} not found; give --pretrained an existing local weights file")
    cells = []  # each spec parses its options into typed configs: a typo fails here, not in every cell
    for dataset, backbone, method, rate, noise_seed, seed in itertools.product(
            grid.datasets, grid.backbones, methods, grid.noise, grid.noise_seeds, grid.seeds):
        key = CellKey(method, dataset, backbone, grid.noise_protocol, rate, noise_seed, seed)
        cells.append(CellSpec(key, grid.backbone_config(backbone), _method_options(grid, method), grid.train,
                              grid.data_root, grid.layout, grid.dataset_options))
    return cells


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_plan(device: str, workers: int = 0) -> tuple[list[str], int | None]:
    """(the device of each worker, torch threads per worker; None: torch's default).

    ``workers`` 0 means one worker per visible GPU for ``auto``/``cuda``, and on a CPU one per
    core, each single-threaded: tiny cells use two threads at about 65 % efficiency, so two
    one-thread cells at once finish about 1.3x sooner than one after another, and a cell's numbers
    are then the same on any core count (results record the thread count)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return [gpus[i % len(gpus)] for i in range(workers or len(gpus))], None
    name = "cpu" if device == "auto" else device
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if kind != "cpu":
        return [name] * max(1, workers), None
    cores = usable_cores()
    count = workers or cores
    return ["cpu"] * count, max(1, cores // count)


_WORKER_DEVICE: str | None = None


def _start_worker(queue, threads: int | None) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()
    if threads:
        torch.set_num_threads(threads)
    silence()  # the parent shows the cells' bar


def _run_in_worker(spec: CellSpec, root: str, planned, force: bool) -> dict | None:
    return run_cell(spec, ResultStore(root), _WORKER_DEVICE, planned=planned, force=force)


def check_before_training(specs: list[CellSpec], store: ResultStore) -> None:
    """What cells would otherwise find only once started, found once before any trains: each
    dataset's files, images and saved manifests, the built-in checkpoints (built if missing), and
    each distinct backbone, built once (its options and weights files)."""
    for spec in specs:
        check_inputs(spec, store)
    for name in {spec.key.backbone for spec in specs} & set(RECIPES):
        ensure_checkpoint(name)  # once, here, before any cell (or worker) needs it
    image_sizes = {config: build_backbone(config).image_size for config in dict.fromkeys(spec.backbone for spec in specs)}
    cached = set()
    for spec in specs:  # an unreadable image stops the grid here, not in every cell
        images = (spec.key.dataset, spec.data_root, spec.layout, spec.dataset_options, image_sizes[spec.backbone])
        if images not in cached:
            cached.add(images)
            cache_images(spec, store, image_sizes[spec.backbone])


class GridOutcome(NamedTuple):
    docs: list[dict]  # the documents of the cells run here
    skipped: int  # cells complete before the grid started
    elsewhere: int  # cells another runner held or wrote meanwhile


class GridPlan(NamedTuple):
    """What a grid will run, found and checked before anything trains (``plan_grid``)."""

    store: ResultStore
    cells: list[CellSpec]  # every cell of the grid
    todo: list[tuple[CellSpec, object]]  # (cell, its result file's state now: the cell is skipped if another runner changes it)
    devices: list[str]  # the device of each worker (``worker_plan``)
    threads: int | None  # torch threads per worker

    def worker_devices(self, device: str) -> list[str | None]:
        """The device each worker passes to its cells: None (the cell's own choice) for a lone
        worker of ``--device auto``, as a single-process run does."""
        if len(self.devices) == 1 or len(self.todo) <= 1:
            return [None if device == "auto" else self.devices[0]]
        return list(self.devices)


def plan_grid(grid: GridConfig) -> GridPlan:
    """Expand the grid, find the cells that are not complete, check their inputs (``check_before_training``)
    and record the grid in the store; nothing trains."""
    store = ResultStore(writable_folder(grid.out, "--out"))
    cells = expand(grid)
    devices, threads = worker_plan(grid.device, grid.workers)
    todo = []
    for spec in cells:
        if not grid.force and store.is_complete(spec.key):
            check_recorded_manifest(spec, store, store.read(spec.key))
            continue
        todo.append((spec, store.state(spec.key)))
    check_before_training([spec for spec, _ in todo], store)
    remove_stale_temporaries(store.root, notice=tqdm.write)
    store.write_grid(dataclasses.asdict(grid), [spec.key for spec in cells])  # lets a report list missing cells
    return GridPlan(store, cells, todo, devices, threads)


def run_grid(grid: GridConfig, on_done: Callable[[dict], None] = lambda doc: None) -> GridOutcome:
    """Run every cell that is not complete (each under its lock, so runners can share a folder)."""
    if distributed.launched_by_torchrun():
        return _run_data_parallel(grid, on_done)
    plan = plan_grid(grid)
    store, cells, todo = plan.store, plan.cells, plan.todo
    docs, elsewhere = [], 0

    def done(doc: dict | None) -> None:
        nonlocal elsewhere
        if doc is None:  # another runner has it
            elsewhere += 1
        else:
            docs.append(doc)
            on_done(doc)

    workers = plan.worker_devices(grid.device)
    if len(workers) == 1:
        with torch_threads(plan.threads):  # a cell left alone trains as it would in a worker: same thread count, same numbers
            for spec, state in _progress(todo):
                done(run_cell(spec, store, workers[0], planned=state, force=grid.force))
        return GridOutcome(docs, len(cells) - len(todo), elsewhere)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    queue = context.Manager().Queue()
    for device in workers:
        queue.put(device)
    with ProcessPoolExecutor(len(workers), mp_context=context, initializer=_start_worker, initargs=(queue, plan.threads)) as pool:
        futures = [pool.submit(_run_in_worker, spec, str(store.root), state, grid.force) for spec, state in todo]
        for future in _progress(as_completed(futures), total=len(futures)):
            done(future.result())
    return GridOutcome(docs, len(cells) - len(todo), elsewhere)


def _run_data_parallel(grid: GridConfig, on_done: Callable[[dict], None]) -> GridOutcome:
    """The grid under torchrun: every cell one after another, each data-parallel over all the ranks
    (``engine/distributed.py``). Rank 0 plans the grid (and writes what planning writes); the other
    ranks take its plan and check their own inputs once it is done (a node-local cache is built there)."""
    if grid.workers > 1:
        raise ConfigError("under torchrun every cell spans all the ranks: leave --workers at 0 or 1 (torchrun's --nproc-per-node sets the ranks)")
    device = distributed.start_from_env(grid.device)
    planned: tuple | RsncError | None = None
    if distributed.is_main():
        try:
            plan = plan_grid(grid)
            planned = (str(plan.store.root), plan.cells, plan.todo)
        except RsncError as error:  # bad input: every rank stops, rank 0 says why
            distributed.broadcast(error)
            raise
    planned = distributed.broadcast(planned)
    if isinstance(planned, RsncError):
        raise SystemExit(2)
    store, cells, todo = ResultStore(planned[0]), planned[1], planned[2]
    if not distributed.is_main():
        silence()
        check_before_training([spec for spec, _ in todo], store)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
    docs, elsewhere = [], 0
    with torch_threads(None if device.startswith("cuda") else max(1, usable_cores() // local_ranks)):
        for spec, state in _progress(todo):
            doc = run_cell(spec, store, device, planned=state, force=grid.force)
            if doc is None:
                elsewhere += 1
            elif distributed.is_main():
                docs.append(doc)
                on_done(doc)
    distributed.barrier()
    return GridOutcome(docs, len(cells) - len(todo), elsewhere)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's thread count set to ``threads`` (None: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(items, total: int | None = None):
    return bar(items, total=total, desc="cells", unit="cell")
