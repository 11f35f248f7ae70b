"""Result store: cell paths, atomic writes, completeness and scanning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rsnc_bench.cell_key import slug
from rsnc_bench.errors import ConfigError
from rsnc_bench.record import ResultFormatError
from rsnc_bench.store import CellKey, ResultStore


def make_key(**over) -> CellKey:
    base = dict(method="clip-ft", dataset="synthetic", backbone="tiny-vit", noise_protocol="shuffle",
                noise_rate=0.4, noise_seed=0, train_seed=1)
    return CellKey(**{**base, **over})


def make_doc(key: CellKey, status: str = "complete", mr: float = 42.0, **extra) -> dict:
    test = {"i2t_r1": mr, "i2t_r5": mr, "i2t_r10": mr, "t2i_r1": mr, "t2i_r5": mr, "t2i_r10": mr,
            "mr": mr, "rsum": 6 * mr} if status == "complete" else None
    return {"schema": 1, "key": key.as_dict(), "status": status,
            "error": None if status == "complete" else "CUDA out of memory", "test": test, **extra}


def test_relpath_is_readable_and_stable():
    key = make_key()
    assert key.relpath().as_posix() == "synthetic/tiny-vit/clip-ft/shuffle-r0.4-n0-s1.json"
    assert make_key(noise_rate=0).relpath().name == "shuffle-r0-n0-s1.json"
    assert make_key().relpath() == key.relpath()
    assert CellKey.from_dict(key.as_dict()) == key
    assert make_key(backbone="ViT-B-32-quickgelu").relpath().parts[1] == "ViT-B-32-quickgelu"


def test_relpath_distinct_for_distinct_keys():
    keys = [make_key(backbone=b) for b in ("local-dir:/x/y", "local-dir/x/y", "local-dir-x-y", "..", "a" * 200, "a" * 201)]
    keys += [make_key(noise_rate=r) for r in (0.2, 0.20000001, 0.2000000001)]
    keys += [make_key(noise_seed=1, train_seed=0), make_key(noise_seed=0, train_seed=1), make_key(method="x/y")]
    paths = [k.relpath() for k in keys]
    assert len(set(paths)) == len(set(keys)) == len(keys)
    for path in paths:
        assert not path.is_absolute() and ".." not in path.parts and len(path.parts) == 4
        assert all(len(part) <= 80 for part in path.parts)
    assert slug("local-dir:/x/y").startswith("local-dir-x-y-")


def test_key_validation():
    with pytest.raises(ConfigError):
        make_key(noise_rate=1.5)
    with pytest.raises(ConfigError):
        make_key(train_seed=1.0)
    with pytest.raises(ConfigError):
        make_key(backbone="")
    with pytest.raises(ConfigError):
        CellKey.from_dict({**make_key().as_dict(), "extra": 1})
    assert make_key(noise_rate=0).noise_rate == 0.0 and isinstance(make_key(noise_rate=0).noise_rate, float)


def test_write_read_round_trip_nan_becomes_null(tmp_path):
    store, key = ResultStore(tmp_path), make_key()
    doc = make_doc(key, history=[{"epoch": 1, "loss": float("nan"), "val": {"mr": float("inf")}}],
                   detection={"auroc": float("-inf"), "ap": 0.5})
    path = store.write(doc)
    assert path == tmp_path / key.relpath() and path.is_file()
    assert math.isnan(doc["history"][0]["loss"])  # caller's document untouched
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    back = store.read(key)
    assert back["history"][0] == {"epoch": 1, "loss": None, "val": {"mr": None}}
    assert back["detection"] == {"auroc": None, "ap": 0.5}
    assert back["test"] == doc["test"] and back["key"] == key.as_dict()
    assert list(back) == list(doc)  # key order kept
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_write_rejects_invalid_documents(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ResultFormatError):
        store.write({**make_doc(make_key()), "schema": 3})
    with pytest.raises(ResultFormatError):
        store.write({**make_doc(make_key()), "status": "done"})
    with pytest.raises(ResultFormatError):
        store.write({**make_doc(make_key()), "key": {"method": "x"}})
    assert not any(tmp_path.rglob("*"))


def test_is_complete(tmp_path):
    store = ResultStore(tmp_path)
    done, failed, diverged, corrupt, missing = (make_key(train_seed=s) for s in range(5))
    store.write(make_doc(done))
    store.write(make_doc(failed, "failed"))
    store.write(make_doc(diverged, "diverged"))
    store.path(corrupt).write_text('{"schema": 1, "key": ')
    assert store.is_complete(done)
    assert not store.is_complete(failed) and not store.is_complete(diverged)
    assert not store.is_complete(missing) and store.read(missing) is None
    assert not store.is_complete(corrupt)
    with pytest.raises(ResultFormatError, match="unreadable"):
        store.read(corrupt)
    assert store.path(corrupt).exists()  # never deleted
    store.write(make_doc(corrupt))  # a rerun replaces it
    assert store.is_complete(corrupt)
    store.write(make_doc(failed))
    assert store.is_complete(failed)


def test_read_rejects_document_of_another_cell(tmp_path):
    store, key, other = ResultStore(tmp_path), make_key(), make_key(train_seed=9)
    store.path(key).parent.mkdir(parents=True)
    store.path(key).write_text(json.dumps(make_doc(other)))
    assert not store.is_complete(key)


def test_checkpoint_dir_is_sibling_and_not_created(tmp_path):
    store, key = ResultStore(tmp_path), make_key()
    ckpt = store.checkpoint_dir(key)
    assert ckpt.parent == store.path(key).parent and ckpt.name == "shuffle-r0.4-n0-s1.ckpt"
    assert not ckpt.exists()
    assert store.checkpoint_dir(make_key(train_seed=2)) != ckpt


def test_iter_results_skips_non_results_and_reports_corrupt(tmp_path):
    store = ResultStore(tmp_path)
    keys = [make_key(train_seed=s) for s in range(3)]
    for k in keys:
        store.write(make_doc(k))
    (tmp_path / "leaderboard.md").write_text("# x")
    (tmp_path / "leaderboard.csv").write_text("a,b\n")
    (tmp_path / "leaderboard.json").write_text(json.dumps(make_doc(make_key(train_seed=7))))
    (tmp_path / "synthetic" / "manifest.json").write_text('{"format": "rsnc-noise-manifest"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / ".half.json").write_text("{")
    ckpt = store.checkpoint_dir(keys[0])
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(make_doc(make_key(train_seed=8))))
    store.path(keys[0]).with_name("broken.json").write_text("{not json")
    store.path(keys[0]).with_name("future.json").write_text(json.dumps({**make_doc(keys[0]), "schema": 99}))
    found = list(store.iter_results())
    assert sorted(d["key"]["train_seed"] for d in found) == [0, 1, 2]
    assert len(store.problems) == 2
    assert any("broken.json" in p and "unreadable" in p for p in store.problems)
    assert any("future.json" in p and "schema" in p for p in store.problems)
    assert list(ResultStore(tmp_path / "nowhere").iter_results()) == []


def test_scores_and_grid_round_trip(tmp_path):
    store, key = ResultStore(tmp_path), make_key()
    rel = store.write_scores(key, np.array([0.5, np.nan, -1.0]), np.array([True, False, True]))
    assert rel == "synthetic/tiny-vit/clip-ft/shuffle-r0.4-n0-s1.scores.npz" and store.scores_path(key) == tmp_path / rel
    arrays = store.read_scores(rel)
    assert set(arrays) == {"clean_score", "clean"} and np.isnan(arrays["clean_score"][1]) and arrays["clean"].dtype == bool
    assert store.read_scores("nowhere.npz") is None and store.read_scores("../x.npz") is None
    store.write(make_doc(key))
    assert [d["key"] for d in store.iter_results()] == [key.as_dict()]  # the .npz is not a result
    assert store.read_grid() is None
    store.write_grid({"methods": ["clip-ft"], "pretrained": None}, [key, make_key(noise_rate=0.8)])
    config, cells = store.read_grid()
    assert config == {"methods": ["clip-ft"], "pretrained": None} and cells == [key, make_key(noise_rate=0.8)]
    assert len(list(store.iter_results())) == 1 and store.problems == []  # grid.json is not a result
    (tmp_path / "grid.json").write_text('{"config": {}, "cells": [{"method": "x"}]}')
    with pytest.raises(ResultFormatError, match="grid.json"):
        store.read_grid()
