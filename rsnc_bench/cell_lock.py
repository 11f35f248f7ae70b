"""An exclusive lock per grid cell, so that every cell runs once whatever runs beside it.

The lock is an ``flock`` on ``<cell>.lock`` beside the cell's result, held from the start of the
cell to its result write. The kernel drops it when the holder dies, so a lock file left by a
killed runner is stale: the next runner takes it over and says so. ``flock`` works between
processes of one machine and, on Linux, over NFS v4 (a cluster's shared folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from rsnc_bench.errors import RsncError


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def _open_locked(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock; None when a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks (an NFS v3 mount without lockd)
            os.close(fd)
            raise RsncError(f"{path}: the file system refuses locks ({exc.strerror}); put --out on a local or "
                            "lock-capable file system") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed the file between our open and flock: try again


@contextlib.contextmanager
def cell_lock(path: Path, notice: Callable[[str], None] = print) -> Iterator[bool]:
    """Hold the lock at ``path`` for the block; yields False (holding nothing) when another live
    process holds it. A stale lock file (its holder died) is taken over with a ``notice``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path)
    if fd is None:
        yield False
        return
    try:
        stale = os.read(fd, 4096).decode("utf-8", "replace")
        if stale.strip():
            notice(f"{path}: took over the lock of {_describe(stale)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unlinked while still held: a waiting opener sees a new inode and retries
        os.close(fd)
