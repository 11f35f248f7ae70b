"""Run one grid cell as a short pipeline of named stages: data (dataset, noise manifest), method
(seeded backbone and heads), train, evaluate (every scorer of the method), assemble (one
``ResultRecord``, written as one JSON)."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rsnc_bench.backbones import BackboneConfig, build_backbone, train_hints
from rsnc_bench.cell_lock import cell_lock
from rsnc_bench.config import parse_assignments
from rsnc_bench.data.datasets import DATASETS, DatasetSpec, get_dataset
from rsnc_bench.data.images import SplitImages
from rsnc_bench.data.rs5m import StreamedDataset
from rsnc_bench.data.split import Split
from rsnc_bench.engine import distributed
from rsnc_bench.engine.batches import SplitTensors, split_tensors
from rsnc_bench.engine.detection import detection_metrics
from rsnc_bench.engine.embedding_cache import EmbeddingCache
from rsnc_bench.engine.evaluate import EVAL_PRECISION, evaluate, own_metrics
from rsnc_bench.engine.signals import PairScores
from rsnc_bench.engine.stream_data import StreamTrainData
from rsnc_bench.engine.trainer import Diverged, TrainConfig, Trainer, TrainOutcome, resolve_device
from rsnc_bench.engine.trunk_outputs import fill_text, trunk_split
from rsnc_bench.environment import environment
from rsnc_bench.errors import ConfigError, RsncError
from rsnc_bench.methods import METHODS, TRAIN_ROWS, Method, MethodConfig, Registered
from rsnc_bench.noise import NoiseManifest, make_manifest, manifest_path
from rsnc_bench.paths import removed_on_error
from rsnc_bench.record import ResultRecord
from rsnc_bench.store import CellKey, ResultStore


def _parsed():
    return field(init=False, repr=False, compare=False)


@dataclass(frozen=True)
class CellSpec:
    """Everything one cell needs; ``key.backbone`` is ``backbone.name``.

    The options are kept as given (``name=value``, as results record them) and parsed once, when
    the spec is made (the grid expands into specs before anything trains), into typed objects:
    ``method`` (the registered entry), ``method_config``, ``train_config`` (with its layers in
    ``train_layers``) and ``dataset`` (the dataset with its options). A typo fails there."""

    key: CellKey
    backbone: BackboneConfig = BackboneConfig()
    method_options: tuple[str, ...] = ()
    train_options: tuple[str, ...] = ()
    data_root: str | None = None
    layout: str | None = None
    dataset_options: tuple[str, ...] = ()
    # typed, from the options above (__post_init__)
    method: Registered = _parsed()
    method_config: MethodConfig = _parsed()
    train_layers: dict[str, dict] = _parsed()
    train_config: TrainConfig = _parsed()
    dataset: DatasetSpec = _parsed()

    def __post_init__(self):
        entry = METHODS.entry(self.key.method)
        config_type = entry.cls.config_type
        # the training budget, lowest priority first (the harness defaults sit under all three)
        layers = {"method_defaults": dict(entry.cls.train_defaults), "preset_hints": train_hints(self.backbone.name),
                  "user": parse_assignments(TrainConfig, list(self.train_options))}
        typed = {"method": entry, "method_config": config_type(**parse_assignments(config_type, list(self.method_options))),
                 "train_layers": layers, "train_config": TrainConfig(**{k: v for layer in layers.values() for k, v in layer.items()}),
                 "dataset": get_dataset(self.key.dataset, **parse_assignments(DATASETS.get(self.key.dataset).Options, list(self.dataset_options)))}
        for name, value in typed.items():
            object.__setattr__(self, name, value)

    def dataset_label(self) -> str:
        return self.dataset.label(self.layout)


_LOADED: dict[tuple, Any] = {}  # the last few datasets loaded in this process
_KEEP_LOADED = 4


def load_data(spec: CellSpec):
    """The cell's loaded dataset, once per process (a synthetic dataset is drawn on first use)."""
    key = (spec.key.dataset, spec.data_root, spec.layout, spec.dataset_options)
    if key not in _LOADED:
        while len(_LOADED) >= _KEEP_LOADED:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = spec.dataset.load(spec.data_root, layout=spec.layout)
    return _LOADED[key]


def noise_manifest(train: Split, dataset: str, label: str, key: CellKey, noise_dir: Path) -> tuple[NoiseManifest, Path]:
    """The cell's manifest: loaded when saved before (and checked against the train rows), else made and saved."""
    path = _manifest_path(key, noise_dir / label)
    if path.exists():
        manifest = NoiseManifest.load(path)
        manifest.check_split(train, where=str(path))
        return manifest, path
    manifest = make_manifest(train, dataset, key.noise_protocol, key.noise_rate, key.noise_seed)
    if distributed.is_main():  # the other ranks of a data-parallel cell make the same one in memory
        manifest.save(path)
    return manifest, path


def check_inputs(spec: CellSpec, store: ResultStore) -> None:
    """What a cell would otherwise find only once started: its dataset's files and images (loaded
    once per process, so a synthetic one is drawn here, not by several workers at a time) and a
    saved manifest that no longer fits them."""
    data = load_data(spec)
    path = _manifest_path(spec.key, store.root / "noise" / spec.dataset_label())
    if path.exists():
        NoiseManifest.load(path).check_split(data["train"], where=str(path))


def cache_images(spec: CellSpec, store: ResultStore, image_size: int) -> None:
    """Decode the cell's images into the cache its cells read (train at native size, val and test
    at the backbone's): before the grid, so that an unreadable image stops it before any training."""
    data = load_data(spec)
    cache = _image_cache(store, spec.dataset_label())
    with removed_on_error(cache):  # the caches of the splits before a bad image go too
        for split in data.splits.values():
            if not (split.name == "train" and isinstance(data, StreamedDataset)):  # streamed images are decoded as they are read
                SplitImages(split, None if split.name == "train" else image_size, cache)


def _image_cache(store: ResultStore, label: str) -> Path:
    return store.root / "cache" / label


def _manifest_path(key: CellKey, folder: Path) -> Path:
    return manifest_path(folder, key.noise_protocol, key.noise_rate, key.noise_seed)


def check_recorded_manifest(spec: CellSpec, store: ResultStore, doc: dict) -> None:
    """A complete cell's manifest on disk must still be the one it trained with (its recorded hash)."""
    recorded = ResultRecord.load(doc).noise.get("manifest_hash")
    path = _manifest_path(spec.key, store.root / "noise" / spec.dataset_label())
    if recorded and path.exists() and NoiseManifest.load(path).content_hash != recorded:
        raise ConfigError(f"{path}: changed since {spec.key.label()} was trained with it (content hash {recorded}); "
                          "restore it, or delete it and rerun with --force")


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


UNCHECKED = object()


def run_cell(spec: CellSpec, store: ResultStore, device: str | None = None, *, planned=UNCHECKED,
             force: bool = False) -> dict | None:
    """Run a cell under its lock and write its result (complete, failed or diverged). Never raises
    for a cell-level failure: the error is recorded and the grid goes on.

    Returns None, running nothing, when another runner holds the cell, or has written it since the
    grid saw its result file in state ``planned`` (``ResultStore.state``). ``force`` starts from
    scratch (the checkpoints go; the old result stays until a new one is complete).

    In a data-parallel cell (``distributed``), rank 0 takes the lock and decides; every rank follows."""
    key = spec.key
    if not distributed.is_main():
        return _run_locked(spec, store, device) if distributed.broadcast(None) else None
    with cell_lock(store.lock_path(key), notice=tqdm.write) as held:
        go = bool(held) and (planned is UNCHECKED or store.state(key) == planned)
        if go and force:
            shutil.rmtree(store.checkpoint_dir(key), ignore_errors=True)
        if not distributed.broadcast(go):  # after the removal: no rank resumes from what --force removed
            return None
        return _run_locked(spec, store, device, held)


def _run_locked(spec: CellSpec, store: ResultStore, device: str | None, lease=None) -> dict | None:
    """Run the cell and write its result, unless ``lease`` (the cell's lock) was taken over by
    another runner meanwhile: that runner owns the cell now, and its result is the one kept."""
    key = spec.key
    started = time.perf_counter()
    record = ResultRecord(key)
    trainer = None
    try:
        trainer = _train_and_evaluate(spec, store, device, record)
        record.status = "complete"
    except Diverged as exc:
        record.status, record.error = "diverged", str(exc)
    except RsncError as exc:
        record.error = str(exc)
    except Exception as exc:  # a bug in a method must not stop the grid; keep the trace for its author
        if distributed.active():  # unless the ranks may have parted ways: stop them all (the cell resumes on rerun)
            raise
        record.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        record.traceback = traceback.format_exc()
    record.timings["total_seconds"] = time.perf_counter() - started
    record.finished_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = record.as_dict()
    if not distributed.is_main():
        return doc
    if lease is not None and lease.lost:
        tqdm.write(f"{key.label()}: another runner took this cell's lock over while it ran; its result is not written here")
        return None
    if not record.complete and store.is_complete(key):  # a forced rerun that failed
        tqdm.write(f"{key.label()}: the rerun {record.status} ({record.error}); the previous complete result stays in {store.path(key)}")
    else:
        store.write(doc)
    if trainer is not None:
        trainer.clear_resume_state()  # only now: a run killed before the write resumes instead of retraining
    return doc


@dataclass(frozen=True)
class CellData:
    """The data stage's output: the dataset, its noise manifest and the noisy train split."""

    label: str
    data: Any  # the loaded dataset
    manifest: NoiseManifest
    manifest_path: Path
    train_split: Split


def _data_stage(spec: CellSpec, store: ResultStore) -> CellData:
    data, label = load_data(spec), spec.dataset_label()
    manifest, path = noise_manifest(data["train"], spec.dataset.name, label, spec.key, store.root / "noise")
    return CellData(label, data, manifest, path, manifest.apply(data["train"]))


def _method_stage(spec: CellSpec) -> Method:
    """The method on a freshly built backbone: random-init towers and heads depend on the training seed only."""
    torch.manual_seed(spec.key.train_seed)
    np.random.seed(spec.key.train_seed)
    return spec.method.cls(build_backbone(spec.backbone), spec.method_config)


def _configure(spec: CellSpec, tconfig: TrainConfig, cell: CellData, record: ResultRecord) -> None:
    """What the record says the cell ran with: configs, their sources, data, noise, environment."""
    data, manifest = cell.data, cell.manifest
    record.config = {
        "method": {"name": spec.key.method, **asdict(spec.method_config)}, "capabilities": spec.method.record(),
        "train": asdict(tconfig), "train_sources": spec.train_layers,
        "backbone": asdict(spec.backbone),
        "dataset": {"name": spec.key.dataset, "root": str(data.root), "layout": data.layout, "options": list(spec.dataset_options),
                    "splits": {name: [s.n_images, s.n_rows] for name, s in data.splits.items()}, "val": data.val_provenance},
    }
    record.noise = {"manifest": str(cell.manifest_path), "manifest_hash": manifest.content_hash, "realized_rate": manifest.realized_rate,
                    "n_noisy": manifest.n_noisy, "n_rows": manifest.n_rows}
    record.environment = environment(resolve_device(tconfig.device))
    if distributed.active():  # one cell over several processes (torchrun): its batches are global, its encoders sharded
        record.environment["data_parallel_ranks"] = distributed.world_size()


def _evaluate_stage(method: Method, trainer: Trainer, outcome: TrainOutcome, test, chunk: int):
    """Test metrics of the last epoch's weights (the method's own scorer: ``test_last``) and, per
    scorer, of the selected epoch's."""
    if outcome.selected_epoch == outcome.history[-1]["epoch"]:
        selected = evaluate(method, test, trainer.device, chunk, cache=trainer.embeddings)
        return selected, selected
    last = evaluate(method, test, trainer.device, chunk, method.scorers()[:1])
    trainer.load_selected()
    return last, evaluate(method, test, trainer.device, chunk)


def _assemble_stage(record: ResultRecord, outcome: TrainOutcome, last: dict, selected: dict) -> None:
    chosen = next(e for e in outcome.history if e["epoch"] == outcome.selected_epoch)
    (own_tag, own), *variants = selected.items()
    record.history, record.selected_epoch, record.val = outcome.history, outcome.selected_epoch, chosen["val"]
    record.test, record.test_last, record.detection = own.as_dict(), own_metrics(last).as_dict(), chosen.get("detection")
    record.score_tag = own_tag
    record.test_variants = {tag: metrics.as_dict() for tag, metrics in variants}  # a re-ranker: a row each, <method>+<tag>
    record.timings.update(train_seconds=outcome.train_seconds,
                          samples_per_second=outcome.samples / outcome.train_seconds if outcome.train_seconds else None,
                          precision=outcome.precision, eval_precision=EVAL_PRECISION)


def _train_and_evaluate(spec: CellSpec, store: ResultStore, device_name: str | None, record: ResultRecord) -> Trainer:
    """The cell's stages (data, method, train, evaluate, assemble), filling ``record``; returns the
    trainer, whose resume state the caller clears once the record is written."""
    key, tconfig = spec.key, spec.train_config
    if device_name:
        tconfig = dataclasses.replace(tconfig, device=device_name)
    cell = _data_stage(spec, store)
    _configure(spec, tconfig, cell, record)

    method = _method_stage(spec)
    if method.backbone.provenance:
        record.config["backbone_weights"] = method.backbone.provenance
    cache = _image_cache(store, cell.label)
    train_images = tconfig.images if method.capabilities.trains else "disk"  # never read: left in the cache file
    if isinstance(cell.data, StreamedDataset):  # RS5M: train images streamed from the shards, noise applied by row
        train = StreamTrainData(cell.data.stream(key.train_seed, cell.manifest), method.backbone.tokenize)
    else:
        train = split_tensors(cell.train_split, method.backbone, cache, native=True, images=train_images)  # crops come from the original images
    val, test = (split_tensors(s, method.backbone, cache, images=tconfig.images) for s in (cell.data["val"], cell.data["test"]))
    if method.backbone.frozen_trunks() is not None:  # the trunks' outputs in place of pixels, once per grid
        device = resolve_device(tconfig.device)
        outputs = functools.partial(trunk_split, backbone=method.to(device).backbone, folder=cache / "trunks", device=device)
        val, test = outputs(val), outputs(test)
        if not tconfig.augment and isinstance(train, SplitTensors):  # augmented crops differ every epoch: pixels, memoised
            train = outputs(train)
        derived = method.derived_texts(cell.train_split.captions, getattr(method.backbone, "tokenizer", None))
        if derived is not None:  # e.g. KER's masked captions
            fill_text(method.backbone.frozen_trunks().text, derived.cpu(), cache / "trunks")
    clean = cell.manifest.clean
    rows = TRAIN_ROWS[spec.method.rows](clean)  # a data variant (the oracle) trains on the clean rows only
    record.noise["train_rows_used"] = int(len(rows))

    def record_detection(scores: PairScores | None, epoch: dict) -> None:
        if scores is not None:
            epoch["detection"] = detection_metrics(scores.clean_score, clean, scores.flagged_noisy).as_dict()
            if scores.others:
                epoch["detection_others"] = {name: detection_metrics(score, clean).as_dict() for name, score in scores.others.items()}

    fingerprint = _fingerprint(record.config, record.noise["manifest_hash"], key.as_dict())
    # a data-parallel cell encodes (collectively) whatever rank 0 would, so no rank may find a cache hit alone
    embeddings = None if distributed.active() else EmbeddingCache(cache / "embeddings")
    trainer = Trainer(method, tconfig, train, rows, val, key.train_seed, store.checkpoint_dir(key), fingerprint, record_detection,
                      captions=cell.train_split.captions, embeddings=embeddings)
    with distributed.sharded_encoders(method):
        outcome = trainer.fit()
        eval_started = time.perf_counter()
        last, selected = _evaluate_stage(method, trainer, outcome, test, tconfig.eval_chunk)
    scores = trainer.selected_scores()
    if scores is not None and distributed.is_main():  # per-row scores, for ROC curves in the report
        record.detection_scores = store.write_scores(key, scores.clean_score, clean, scores.flagged_noisy)
    _assemble_stage(record, outcome, last, selected)
    record.timings["eval_seconds"] = time.perf_counter() - eval_started
    return trainer
