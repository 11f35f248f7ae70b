"""Runners sharing a results folder: every cell runs once, under its lock, and no result is wrong."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


def _runner(out: Path, root: Path, noise: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "rsnc_bench", "run", "--backbone", "tiny-vit", "--methods", "clip-ft", "--noise", noise,
            "--seeds", "3", "--data-root", str(root), *TINY_ARGS, "-t", "epochs=3", "-t", "batch_size=16",
            "--device", "cpu", "--workers", "1", "--out", str(out)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cells_run(output: str) -> int:
    return int(re.search(r"(\d+) cells run", output).group(1))


def test_two_runners_on_overlapping_grids_run_each_cell_once_and_correctly(tmp_path, synthetic_root):
    clean = _runner(tmp_path / "clean", synthetic_root, "0,0.2,0.4,0.6")
    clean_out = clean.communicate(timeout=600)[0]
    assert clean.returncode == 0, clean_out
    shared = tmp_path / "shared"
    first, second = _runner(shared, synthetic_root, "0,0.2,0.4"), _runner(shared, synthetic_root, "0.2,0.4,0.6")
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert _cells_run(outputs[0]) + _cells_run(outputs[1]) == 4, outputs  # the union, each cell once
    for path in sorted((tmp_path / "clean" / "synthetic").rglob("*.json")):
        expected = json.loads(path.read_text())
        got = json.loads((shared / path.relative_to(tmp_path / "clean")).read_text())
        assert got["status"] == "complete" and got["selected_epoch"] == expected["selected_epoch"]
        assert got["test"] == expected["test"], path.name
    assert not list(shared.rglob("*.lock")) and not list(shared.rglob("*.ckpt"))
