"""The per-cell lock as a lease that holds across hosts: runners on "other hosts" are processes
that call themselves by another host name, on a file system whose flock does not reach them
(flock refused), so only the lease guards the cell, as on a cluster file system without
cross-host flock."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from rsnc_bench import cell_lock as lock_module
from rsnc_bench.cell_lock import OWNER_ENV, cell_lock, lease_times
from rsnc_bench.errors import ConfigError
from rsnc_bench.paths import atomic_write_text

FORK = multiprocessing.get_context("fork")
FAST = dict(lease=0.6, heartbeat=0.1, settle=0.05)  # seconds


def _refuse(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")


def _without_flock() -> None:
    """This (forked) process's file system has no flock: the lease alone guards cells."""
    fcntl.flock = _refuse


@pytest.fixture
def no_flock(monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _refuse)


def _stale(path: Path, host="node-b", pid=4242, age=10.0, **extra) -> dict:
    record = {"host": host, "pid": pid, "token": "0ldt0ken", "owner": None, "since": "2026-12-01T10:00:00",
              "heartbeat": time.time() - age, **extra}
    path.write_text(json.dumps(record))
    return record


def test_the_holder_writes_its_lease_and_keeps_its_heartbeat_fresh(tmp_path):
    path = tmp_path / "cell.lock"
    with cell_lock(path, lease=1.0, heartbeat=0.1) as held:
        assert held
        first = json.loads(path.read_text())
        assert first["host"] == lock_module.HOST and first["pid"] == os.getpid() and first["token"]
        time.sleep(0.45)
        later = json.loads(path.read_text())
        assert later["token"] == first["token"] and later["heartbeat"] > first["heartbeat"] + 0.2
    assert not path.exists()


def _hold_as(host: str, path: Path, ready, stop, flock: bool) -> None:
    if not flock:
        _without_flock()
    lock_module.HOST = host
    with cell_lock(path, notice=lambda m: None, **FAST) as held:
        assert held
        ready.set()
        stop.wait(20)


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "lease-only"])
def test_a_live_heartbeating_lock_of_another_host_is_not_taken_over(tmp_path, monkeypatch, flock):
    if not flock:
        monkeypatch.setattr(fcntl, "flock", _refuse)
    path, ready, stop = tmp_path / "cell.lock", FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_as, args=("node-a", path, ready, stop, flock))
    holder.start()
    try:
        assert ready.wait(20)
        deadline = time.monotonic() + 3 * FAST["lease"]  # well past the lease: the heartbeat keeps it
        while time.monotonic() < deadline:
            with cell_lock(path, **FAST) as got:
                assert not got
            time.sleep(0.05)
    finally:
        stop.set()
        holder.join(20)
    assert holder.exitcode == 0 and not path.exists()
    with cell_lock(path, **FAST) as got:
        assert got


def test_a_killed_holder_on_another_host_is_taken_over_once_its_lease_runs_out(tmp_path, no_flock):
    path, ready, stop = tmp_path / "cell.lock", FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_as, args=("node-a", path, ready, stop, False))
    holder.start()
    assert ready.wait(20)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    notices = []
    with cell_lock(path, notice=notices.append, **FAST) as got:
        assert not got and path.exists()  # a fresh heartbeat from a host whose processes this runner cannot see
    time.sleep(FAST["lease"] + 0.2)
    with cell_lock(path, notice=notices.append, **FAST) as got:
        assert got
    assert len(notices) == 1 and f"pid {holder.pid} on node-a" in notices[0] and "no heartbeat for" in notices[0], notices


def test_a_stale_lease_is_taken_over_with_a_notice_naming_the_old_holder(tmp_path):
    path = tmp_path / "cell.lock"
    _stale(path, age=10)
    notices = []
    with cell_lock(path, notice=notices.append, **FAST) as held:
        assert held and json.loads(path.read_text())["token"] != "0ldt0ken"
    assert len(notices) == 1, notices
    assert "took over the lock of pid 4242 on node-b (since 2026-12-01T10:00:00)" in notices[0]
    assert "no heartbeat for 10 s, lease 0.6 s" in notices[0]
    assert not path.exists() and not list(tmp_path.iterdir())  # no marker or temporary file left


def test_a_fresh_lease_of_another_host_is_left_alone(tmp_path):
    path = tmp_path / "cell.lock"
    before = _stale(path, age=0.1)
    with cell_lock(path, **FAST) as held:
        assert not held
    assert json.loads(path.read_text()) == before


def test_a_requeued_job_takes_over_its_own_lock_at_once(tmp_path, monkeypatch):
    """Slurm requeues a killed array task, maybe on another node: its earlier run is dead, and
    its lock (fresh heartbeat, other host) names the same job."""
    path = tmp_path / "cell.lock"
    _stale(path, age=0.1, owner="slurm:77_3")
    monkeypatch.setenv(OWNER_ENV, "slurm:77_4")
    with cell_lock(path, **FAST) as held:
        assert not held  # another job's live lock
    monkeypatch.setenv(OWNER_ENV, "slurm:77_3")
    notices = []
    with cell_lock(path, notice=notices.append, **FAST) as held:
        assert held and json.loads(path.read_text())["owner"] == "slurm:77_3"
    assert "job slurm:77_3" in notices[0] and "an earlier run of this job (slurm:77_3), requeued" in notices[0]


def test_a_holder_whose_lease_was_taken_never_deletes_its_successors_lock(tmp_path):
    path, notices = tmp_path / "cell.lock", []
    with cell_lock(path, notice=notices.append, **FAST) as held:
        assert held
        successor = tmp_path / "successor"
        successor.write_text(json.dumps({"host": "node-c", "pid": 1, "token": "succ", "heartbeat": time.time()}))
        os.replace(successor, path)  # what a runner that judged this lease stale does
        time.sleep(0.3)
    assert json.loads(path.read_text())["token"] == "succ"
    assert any("taken over by another runner" in n for n in notices), notices


def _race(i: int, path: Path, flock: bool, start, outcomes, stop) -> None:
    if not flock:
        _without_flock()
    lock_module.HOST = f"node-{i}"
    start.wait(20)
    with cell_lock(path, notice=lambda m: None, **FAST) as held:
        outcomes.put((i, bool(held)))
        if held:
            stop.wait(20)  # holds it until every other runner has tried


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "lease-only"])
def test_of_runners_taking_over_one_stale_lock_at_once_exactly_one_wins(tmp_path, flock):
    runners = 5
    for round_ in range(4):
        path = tmp_path / f"cell{round_}.lock"
        _stale(path, age=10)
        start, stop, outcomes = FORK.Barrier(runners), FORK.Event(), FORK.Queue()
        procs = [FORK.Process(target=_race, args=(i, path, flock, start, outcomes, stop)) for i in range(runners)]
        for p in procs:
            p.start()
        got = [outcomes.get(timeout=30) for _ in range(runners)]
        stop.set()
        for p in procs:
            p.join(20)
        assert sum(held for _, held in got) == 1, (round_, got)
        assert all(p.exitcode == 0 for p in procs)
        assert not path.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _state(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _runner(name: str, folder: Path, cells: list[str], flock: bool, seed: int) -> None:
    """A grid runner as run_grid / CellTask drive run_cell: plan the cells' result states, then run
    each under its lock unless another runner holds it or wrote it meanwhile."""
    if not flock:
        _without_flock()
    lock_module.HOST = name
    rng = random.Random(seed)
    planned = {cell: _state(folder / f"{cell}.json") for cell in cells}
    for cell in cells:
        if planned[cell] is not None:  # complete before this runner started
            continue
        with cell_lock(folder / f"{cell}.lock", notice=lambda m: None, **FAST) as held:
            if not held or _state(folder / f"{cell}.json") != planned[cell]:
                continue
            with open(folder / "ran.log", "a") as log:  # O_APPEND: whole lines
                log.write(f"{cell} {name}\n")
            time.sleep(rng.uniform(0, 0.03))
            atomic_write_text(folder / f"{cell}.json", json.dumps({"cell": cell, "by": name}))


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "lease-only"])
def test_concurrent_runners_over_overlapping_grids_run_each_cell_exactly_once(tmp_path, flock):
    cells = [f"c{i:02d}" for i in range(16)]
    rng = random.Random(7)
    grids = []
    for i in range(4):  # four overlapping windows of ten cells, each in its own order
        window = cells[i * 2:i * 2 + 10]
        rng.shuffle(window)
        grids.append(window)
    procs = [FORK.Process(target=_runner, args=(f"node-{i}", tmp_path, grid, flock, i)) for i, grid in enumerate(grids)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    union = sorted({cell for grid in grids for cell in grid})
    ran = [line.split()[0] for line in (tmp_path / "ran.log").read_text().splitlines()]
    assert sorted(ran) == union  # every cell once, none twice
    for cell in union:  # every result there and whole, written by the runner that ran it
        assert json.loads((tmp_path / f"{cell}.json").read_text())["cell"] == cell
    assert not list(tmp_path.glob("*.lock")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("env, value, message", [
    ("RSNC_BENCH_LOCK_LEASE", "five", "RSNC_BENCH_LOCK_LEASE='five' is not a number of seconds"),
    ("RSNC_BENCH_LOCK_HEARTBEAT", "200", "heartbeat must be positive and at most half the lease"),
])
def test_bad_lease_settings_are_one_clear_error(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=message):
        lease_times()


def test_lease_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RSNC_BENCH_LOCK_LEASE", "60")
    monkeypatch.setenv("RSNC_BENCH_LOCK_HEARTBEAT", "5")
    assert lease_times() == lock_module.LeaseTimes(lease=60.0, heartbeat=5.0)
    assert lease_times(lease=10, heartbeat=2, settle=0) == lock_module.LeaseTimes(10.0, 2.0, 0.0)
