"""Result store: one JSON document per grid cell, written atomically.

A cell is keyed by (method, dataset, backbone, noise_protocol, noise_rate, noise_seed,
train_seed) and lives at ``<root>/<dataset>/<backbone>/<method>/<protocol>-r<rate>-n<ns>-s<ts>.json``
(names sanitised for paths). Its checkpoints go in the sibling folder ``<same path>.ckpt/``.

The document is a :class:`rsnc_bench.record.ResultRecord` as a dict; the store checks only its
``schema``, ``key`` and ``status`` (``record.validate``), readers load it with ``ResultRecord.load``.

Only "complete" cells are done: a failed or diverged cell is retried by a rerun. A file that
cannot be read is never deleted; it counts as not complete and the next write replaces it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rsnc_bench.cell_key import CellKey
from rsnc_bench.errors import ConfigError
from rsnc_bench.paths import atomic_write, atomic_write_text
from rsnc_bench.record import ResultFormatError, validate

CKPT_SUFFIX = ".ckpt"
SCORES_SUFFIX = ".scores.npz"
LOCK_SUFFIX = ".lock"
GRID_NAME = "grid.json"  # the last grid run into the folder: its config and cell keys
LEADERBOARD_NAMES = frozenset({"leaderboard.md", "leaderboard.csv", "leaderboard.json", GRID_NAME})


def to_json_safe(value: Any) -> Any:
    """Recursively: NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, Paths -> str."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k) if isinstance(k, Path) else k: to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _looks_like_result(doc: Any) -> bool:
    return isinstance(doc, dict) and "schema" in doc and "key" in doc and "status" in doc


def _read_json(path: Path, what: str, fix: str) -> Any:
    """The parsed file, None when it does not exist; ResultFormatError naming ``fix`` when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultFormatError(f"{path}: unreadable {what} ({exc}); {fix}") from None


class ResultStore:
    """Result documents under ``root``.

    ``iter_results`` yields valid documents and skips JSON that is not a result document
    (no ``schema``/``key``/``status``), leaderboard files, temporary files and anything inside
    checkpoint folders. Files it cannot use (unreadable JSON, unsupported schema, bad key) are
    skipped too and listed as one-line messages in ``self.problems`` (reset by each call),
    so the caller decides whether to print them.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.problems: list[str] = []

    def path(self, key: CellKey) -> Path:
        return self.root / key.relpath()

    def scores_path(self, key: CellKey) -> Path:
        """The cell's per-row detection scores (``<cell>.scores.npz``), beside its JSON."""
        return self.path(key).with_suffix(SCORES_SUFFIX)

    def write_scores(self, key: CellKey, clean_score: np.ndarray, clean: np.ndarray,
                     flagged_noisy: np.ndarray | None = None) -> str:
        """Save a method's clean-ness score per train row (higher = cleaner, NaN = unscored), its
        native noisy flag if any, and the manifest's clean flags, atomically; returns the path
        relative to the root, for the result document's ``detection_scores``."""
        arrays = {"clean_score": np.asarray(clean_score, dtype=np.float32), "clean": np.asarray(clean, dtype=bool)}
        if flagged_noisy is not None:
            arrays["flagged_noisy"] = np.asarray(flagged_noisy, dtype=bool)
        path = atomic_write(self.scores_path(key), lambda fh: np.savez_compressed(fh, **arrays))
        return path.relative_to(self.root).as_posix()

    def read_scores(self, relpath: str) -> dict[str, np.ndarray] | None:
        """Arrays saved by ``write_scores`` (``relpath`` as recorded in the document); None when
        the file is missing or unreadable."""
        path = self.root / relpath
        if ".." in Path(relpath).parts or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError):
            return None

    def write_grid(self, config: dict[str, Any], cells: list[CellKey]) -> Path:
        """Save the grid being run (``{"config": ..., "cells": [key, ...]}``) as ``<root>/grid.json``,
        replacing the previous one, so that a report can list the cells without a result."""
        data = {"config": config, "cells": [key.as_dict() for key in cells]}
        return atomic_write_text(self.root / GRID_NAME, json.dumps(to_json_safe(data), indent=1) + "\n")

    def read_grid(self) -> tuple[dict[str, Any], list[CellKey]] | None:
        """The saved grid's config and cell keys; None without one; ResultFormatError when malformed."""
        path = self.root / GRID_NAME
        data = _read_json(path, "grid file", "delete it or rerun `rsnc-bench run`")
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(data.get("cells"), list):
            raise ResultFormatError(f"{path}: not a saved grid (config and cells); delete it or rerun `rsnc-bench run`")
        try:
            return data["config"], [CellKey.from_dict(cell) for cell in data["cells"]]
        except ConfigError as exc:
            raise ResultFormatError(f"{path}: {exc}; delete it or rerun `rsnc-bench run`") from None

    def checkpoint_dir(self, key: CellKey) -> Path:
        """Folder for the cell's checkpoints, beside its JSON (not created here)."""
        return self.path(key).with_suffix(CKPT_SUFFIX)

    def lock_path(self, key: CellKey) -> Path:
        """The cell's lock file (``cell_lock.py``), beside its JSON."""
        return self.path(key).with_suffix(LOCK_SUFFIX)

    def state(self, key: CellKey) -> tuple[int, int, int] | None:
        """What identifies the cell's result file as it is now (None: no file): a runner compares
        it before and after taking the cell's lock to see whether another runner wrote the cell."""
        try:
            stat = self.path(key).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def write(self, doc: dict[str, Any]) -> Path:
        """Validate and write atomically (NaN/inf become null); replaces any previous file of the cell."""
        if isinstance(doc, dict) and isinstance(doc.get("key"), CellKey):
            doc = {**doc, "key": doc["key"].as_dict()}
        key = validate(doc)
        text = json.dumps(to_json_safe(doc), indent=2, sort_keys=False, allow_nan=False) + "\n"
        return atomic_write_text(self.path(key), text)

    def read(self, key: CellKey) -> dict[str, Any] | None:
        """The cell's document, None when there is none; ResultFormatError when the file is unusable."""
        path = self.path(key)
        doc = _read_json(path, "result file", "rerun the cell to replace it")
        if doc is None:
            return None
        try:
            found = validate(doc)
        except ResultFormatError as exc:
            raise ResultFormatError(f"{path}: {exc}; rerun the cell to replace it") from None
        if found != key:
            raise ResultFormatError(f"{path}: holds the result of {found.label()}, not {key.label()}")
        return doc

    def is_complete(self, key: CellKey) -> bool:
        """True only for a readable document with status "complete"."""
        try:
            doc = self.read(key)
        except ResultFormatError:
            return False
        return doc is not None and doc["status"] == "complete"

    def iter_results(self) -> Iterator[dict[str, Any]]:
        """Every valid result document under root, in path order (see the class docstring)."""
        self.problems = []
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*.json")):
            rel = path.relative_to(self.root)
            if (path.name in LEADERBOARD_NAMES or path.name.startswith(".")
                    or any(part.endswith(CKPT_SUFFIX) for part in rel.parts[:-1]) or not path.is_file()):
                continue
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                self.problems.append(f"{path}: unreadable JSON ({exc}); skipped")
                continue
            if not _looks_like_result(doc):
                continue
            try:
                validate(doc)
            except ResultFormatError as exc:
                self.problems.append(f"{path}: {exc}; skipped")
                continue
            yield doc
