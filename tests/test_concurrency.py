"""Runners sharing a results folder: every cell runs once, under its lock, and no result is wrong."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsnc_bench.cell_lock import cell_lock
from rsnc_bench.engine.cell import run_cell
from rsnc_bench.store import ResultStore

from .test_training import spec

TINY_ARGS = ["-o", "n_train=48", "-o", "n_val=12", "-o", "n_test=24", "-o", "image_size=48"]


def test_a_held_lock_is_refused_and_released_after_the_block(tmp_path):
    path = tmp_path / "cell.lock"
    with cell_lock(path) as first:
        with cell_lock(path) as second:
            assert first and not second
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    with cell_lock(path) as again:
        assert again


def test_a_stale_lock_of_a_dead_holder_is_taken_over_with_a_notice(tmp_path):
    path = tmp_path / "cell.lock"
    path.write_text(json.dumps({"pid": 999999, "host": "node7", "since": "2026-12-01T10:00:00"}))  # killed, file left
    notices = []
    with cell_lock(path, notice=notices.append) as held:
        assert held
    assert len(notices) == 1 and "pid 999999 on node7" in notices[0] and "no longer running" in notices[0]


def test_a_cell_held_or_written_by_another_runner_is_not_run(tmp_path, synthetic_root):
    cell, store = spec(synthetic_root, epochs=1), ResultStore(tmp_path)
    with cell_lock(store.lock_path(cell.key)):
        assert run_cell(cell, store) is None
    assert not store.path(cell.key).exists()
    planned = store.state(cell.key)  # what this runner saw when it planned the grid: no result
    first = run_cell(cell, store)  # meanwhile another runner completes the cell
    assert first["status"] == "complete"
    assert run_cell(cell, store, planned=planned) is None
    assert run_cell(cell, store, planned=store.state(cell.key), force=True)["status"] == "complete"


def _runner(out: Path, root: Path, noise: str, *train: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "rsnc_bench", "run", "--backbone", "tiny-vit", "--methods", "clip-ft", "--noise", noise,
            "--seeds", "3", "--data-root", str(root), *TINY_ARGS, "-t", "epochs=3", "-t", "batch_size=16",
            *(a for option in train for a in ("-t", option)), "--device", "cpu", "--workers", "1", "--out", str(out)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cells_run(output: str) -> int:
    return int(re.search(r"(\d+) cells run", output).group(1))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, synthetic_root) -> tuple[Path, float]:
    """The tiny grid run once, alone and uninterrupted: the results the other runs must reproduce,
    and how long it took."""
    out, started = tmp_path_factory.mktemp("clean"), time.perf_counter()
    clean = _runner(out, synthetic_root, "0,0.4,0.8")
    assert clean.wait(timeout=600) == 0
    return out, time.perf_counter() - started


@pytest.mark.slow
def test_two_runners_on_overlapping_grids_run_each_cell_once_and_correctly(tmp_path, synthetic_root, clean_run):
    shared = tmp_path / "shared"
    first, second = _runner(shared, synthetic_root, "0,0.4"), _runner(shared, synthetic_root, "0.4,0.8")
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert _cells_run(outputs[0]) + _cells_run(outputs[1]) == 3, outputs  # the union, each cell once
    expected = _results(clean_run[0])
    for path, doc in _results(shared).items():
        assert doc["status"] == "complete" and doc["selected_epoch"] == expected[path]["selected_epoch"]
        assert doc["test"] == expected[path]["test"], path
    assert not list(shared.rglob("*.lock")) and not list(shared.rglob("*.ckpt"))


def _results(folder: Path) -> dict[str, dict]:
    """Every result document under ``folder`` by relative path; each must parse (none half-written)."""
    return {p.relative_to(folder).as_posix(): json.loads(p.read_text())
            for p in sorted((folder / "synthetic").rglob("*.json")) if ".ckpt" not in p.as_posix()}


@pytest.mark.slow
def test_a_grid_killed_at_random_points_loses_nothing_and_matches_a_clean_run(tmp_path, synthetic_root, clean_run):
    """kill -9 at seeded random moments (while loading, training, checkpointing, writing), then a
    rerun: no finished cell is lost or corrupted, and every result is the clean run's."""
    expected, duration = _results(clean_run[0]), clean_run[1]
    killed, rng, finished = tmp_path / "killed", random.Random(15), set()
    for _ in range(4):
        runner = _runner(killed, synthetic_root, "0,0.4,0.8", "checkpoint_seconds=0")
        time.sleep(rng.uniform(0.2, 0.8) * duration)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        now = {path for path, doc in _results(killed).items() if doc["status"] == "complete"}
        assert finished <= now  # nothing finished is lost
        finished = now
    final = _runner(killed, synthetic_root, "0,0.4,0.8", "checkpoint_seconds=0")
    output = final.communicate(timeout=600)[0]
    assert final.returncode == 0, output
    got = _results(killed)
    assert set(got) == set(expected)
    for path, doc in got.items():
        assert doc["status"] == "complete" and doc["test"] == expected[path]["test"], path
        assert [e["loss"] for e in doc["history"]] == [e["loss"] for e in expected[path]["history"]], path
    assert not list(killed.rglob("*.lock")) and not list(killed.rglob("*.ckpt"))


def test_a_file_system_without_flock_is_guarded_by_the_lease_alone(tmp_path, monkeypatch):
    """An NFS v3 mount without lockd, or a cluster file system with flock off: the lock still
    holds (the lease), and a dead holder's file is still recognised (its process is gone)."""
    import errno
    import fcntl

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    path = tmp_path / "cell.lock"
    with cell_lock(path) as first:
        with cell_lock(path) as second:
            assert first and not second
    assert not path.exists()
    path.write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "token": "dead", "heartbeat": time.time(),
                                "since": "2026-12-01T10:00:00"}))
    notices = []
    with cell_lock(path, notice=notices.append) as held:
        assert held
    assert len(notices) == 1 and "its process is gone" in notices[0]


def test_a_runner_whose_lock_was_taken_over_does_not_write_the_result(tmp_path, synthetic_root):
    """Paused past its lease (a suspended job), the runner finds another owns the cell now: the
    successor's result is the one kept, so this one writes nothing."""
    from types import SimpleNamespace

    from rsnc_bench.engine.cell import _run_locked

    store, cell = ResultStore(tmp_path), spec(synthetic_root, epochs=1)
    assert _run_locked(cell, store, None, SimpleNamespace(lost=True)) is None
    assert not store.path(cell.key).exists()
    assert _run_locked(cell, store, None, SimpleNamespace(lost=False))["status"] == "complete" and store.is_complete(cell.key)
