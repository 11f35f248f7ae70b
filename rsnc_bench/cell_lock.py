"""An exclusive lock per grid cell, so that every cell runs once whatever runs beside it, on this
machine or on the other nodes of a cluster sharing the result folder.

The lock is the file ``<cell>.lock`` beside the cell's result, held from the start of the cell to
its result write. It is a **lease**: the file names its holder (host, pid, a random token, the
submitit job when there is one) and a heartbeat time, which a background thread of the holder
rewrites every ``heartbeat`` seconds (default 30). Another runner treats the lock as live while
the heartbeat is younger than the lease (default 300 s), whichever host it is on, and otherwise
takes it over with a notice naming the old holder. On the holder's own host, and wherever the
file system honours ``flock`` between hosts (NFS v4), the holder also keeps an ``flock`` on the
file, so a killed runner is recognised at once (the kernel drops its flock, and its process is
gone) instead of after the lease.

Exclusive steps, for file systems shared between hosts:

- a free cell is claimed by creating the file with ``link()`` from a private temporary file,
  which exactly one runner can do (atomic on local file systems and on NFS);
- a stale lock is taken over by whoever first creates ``.<cell>.lock.takeover-<old token>``
  (``link()`` again); the winner checks that the lock is still the stale one, replaces it
  (``os.replace``), waits a short settle time and re-reads its token before it runs the cell;
- a holder rewrites its heartbeat in place and deletes the file on release only while the path
  is still its own file, so a holder that lost its lease never removes its successor's lock.

Clocks: a heartbeat is compared with the reader's clock, so the hosts' clocks must agree to well
within the lease (NTP). A holder paused for longer than the lease (suspended, swapped out) can
lose its cell to another runner; it says so in its log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from rsnc_bench.errors import ConfigError

LEASE_SECONDS = 300.0  # a lock whose heartbeat is older than this is stale
HEARTBEAT_SECONDS = 30.0  # how often a holder rewrites its heartbeat
SETTLE_SECONDS = 0.5  # a taker's wait before it checks that its takeover held
ENV = {"lease": "RSNC_BENCH_LOCK_LEASE", "heartbeat": "RSNC_BENCH_LOCK_HEARTBEAT", "settle": "RSNC_BENCH_LOCK_SETTLE"}
OWNER_ENV = "RSNC_BENCH_LOCK_OWNER"  # the job a runner belongs to (set by rsnc_bench.launch): stable across requeues
HOST = socket.gethostname()
_RECORD_BYTES = 1024  # every record is padded to this length, so an in-place rewrite never leaves a tail
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


@dataclasses.dataclass(frozen=True)
class LeaseTimes:
    lease: float = LEASE_SECONDS
    heartbeat: float = HEARTBEAT_SECONDS
    settle: float = SETTLE_SECONDS


def lease_times(lease: float | None = None, heartbeat: float | None = None, settle: float | None = None) -> LeaseTimes:
    """The given times, else the environment's (``RSNC_BENCH_LOCK_LEASE`` / ``_HEARTBEAT`` /
    ``_SETTLE``, seconds), else the defaults; the heartbeat must be well inside the lease."""
    values = {}
    for name, given in (("lease", lease), ("heartbeat", heartbeat), ("settle", settle)):
        if given is None and os.environ.get(ENV[name], "").strip():
            text = os.environ[ENV[name]]
            try:
                given = float(text)
            except ValueError:
                raise ConfigError(f"{ENV[name]}={text!r} is not a number of seconds") from None
        if given is not None:
            values[name] = float(given)
    times = LeaseTimes(**values)
    if not (0 < times.heartbeat * 2 <= times.lease) or times.settle < 0:
        raise ConfigError(f"lock heartbeat {times.heartbeat:g} s and lease {times.lease:g} s: the heartbeat must be positive and at most "
                          f"half the lease ({ENV['heartbeat']}, {ENV['lease']})")
    return times


def _describe(record: dict | None) -> str:
    if not record:
        return "an unknown process"
    try:
        text = f"pid {record['pid']} on {record['host']} (since {record['since']}"
    except (KeyError, TypeError):
        return "an unknown process"
    return text + (f", job {record['owner']})" if record.get("owner") else ")")


def _encode(record: dict) -> bytes:
    data = json.dumps(record).encode()
    return data + b" " * max(0, _RECORD_BYTES - 1 - len(data)) + b"\n"


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclasses.dataclass
class _Seen:
    """A lock file as a reader found it."""

    raw: bytes
    record: dict | None  # None: unreadable (a legacy or half-written file)
    mtime: float

    @property
    def token(self) -> str:
        """What names this lock's holding: its token, or for a file without one, its content."""
        token = (self.record or {}).get("token")
        return token if isinstance(token, str) and token.isalnum() else hashlib.sha256(self.raw).hexdigest()[:16]


def _read(path: Path) -> _Seen | None:
    """The lock file now (None: there is none). A record caught mid-rewrite is read again."""
    for _ in range(4):
        try:
            with open(path, "rb") as fh:
                raw, mtime = fh.read(1 << 16), os.fstat(fh.fileno()).st_mtime
        except FileNotFoundError:
            return None
        record = _parse(raw)
        if record is not None:
            return _Seen(raw, record, mtime)
        time.sleep(0.02)
    return _Seen(raw, None, mtime)  # its mtime stands for the heartbeat


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    except (TypeError, ValueError):
        return False
    return True


def _flock(fd: int) -> bool | None:
    """Take ``fd``'s exclusive flock without waiting: True, False when another holds it, None
    where the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise
    return True


def _probe(path: Path) -> str:
    """Whether some process holds the file's flock now: "held", "free", "unsupported" or "missing"."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing"
    try:
        got = _flock(fd)
    finally:
        os.close(fd)  # drops the probe's own flock
    return {True: "free", False: "held", None: "unsupported"}[got]


def _write_new(path: Path, data: bytes) -> Path:
    """``data`` in a private temporary file beside ``path`` (``.<name>.<random>.tmp-<pid>``)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return tmp


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; exactly one of several creators, on any
    hosts, gets True. ``link()`` publishes a complete file atomically (NFS too); where a file
    system has no hard links, an ``O_EXCL`` create does the same."""
    tmp = _write_new(path, data)
    try:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return os.stat(tmp).st_nlink == 2  # NFS: a retransmitted link that had succeeded reports EEXIST
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class _Lease:
    """A lock this process holds: its descriptor (with the flock where there is one) and the
    thread that keeps its heartbeat fresh."""

    def __init__(self, path: Path, fd: int, record: dict, times: LeaseTimes, notice: Callable[[str], None]):
        self.path, self.fd, self.record, self.times, self.notice = path, fd, record, times, notice
        self.inode = os.fstat(fd).st_ino
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path.name}", daemon=True)
        self._thread.start()

    def _ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.times.heartbeat):
            if not self._ours():
                self.lost = True
                self.notice(f"{self.path}: this runner's lock was taken over by another runner (no heartbeat written for "
                            f"over {self.times.lease:g} s?); the cell may run twice")
                return
            self.record["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # a passing file-system error: the next beat tries again
                os.pwrite(self.fd, _encode(self.record), 0)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.times.heartbeat + 5)
        try:
            if self._ours():  # never the successor's file
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # unlinked while still flocked: a prober sees the file gone or a new one
        finally:
            os.close(self.fd)


def _hold(path: Path, token: str) -> int | None:
    """A descriptor of ``path`` while it holds our ``token``, flocked where flock works; None if
    the file is no longer ours."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_ino != os.stat(path).st_ino or (_parse(os.pread(fd, 1 << 16, 0)) or {}).get("token") != token:
            os.close(fd)
            return None
    except FileNotFoundError:
        os.close(fd)
        return None
    deadline = time.monotonic() + 2.0
    while _flock(fd) is False and time.monotonic() < deadline:  # a prober holds it for a moment
        time.sleep(0.02)
    return fd  # without the flock after two seconds, the lease alone still guards the cell


def _stale_reason(path: Path, seen: _Seen, times: LeaseTimes) -> str | None:
    """Why the lock ``seen`` is no longer held (None: it is live)."""
    probe = _probe(path)
    if probe == "held":  # a live flock, here or (NFS v4) on another host
        return None
    if probe == "missing":
        return "released"
    record = seen.record or {}
    here = record.get("host") == HOST
    owner = os.environ.get(OWNER_ENV)
    if owner and record.get("owner") == owner and not (here and _alive(record.get("pid"))):
        return f"an earlier run of this job ({owner}), requeued"
    if here and "pid" in record and not _alive(record["pid"]):
        return "its process is gone"
    if seen.record is not None and "token" not in record:  # written by a runner before leases: it held a flock, now free
        return "its flock is free"
    beat = record.get("heartbeat")
    beat = float(beat) if isinstance(beat, (int, float)) else seen.mtime
    age = time.time() - beat
    if age > times.lease:
        return f"no heartbeat for {age:.0f} s, lease {times.lease:g} s"
    return None


def _take_over(path: Path, seen: _Seen, record: dict, times: LeaseTimes) -> int | None | bool:
    """Replace the stale lock ``seen`` by ``record``: a descriptor when this runner won, None when
    another runner has the lock, False when the lock changed meanwhile (look again)."""
    marker = path.with_name(f".{path.name}.takeover-{seen.token}")
    if not _create_exclusive(marker, record["token"].encode()):
        with contextlib.suppress(OSError):
            if time.time() - marker.stat().st_mtime > times.lease:  # its taker died halfway, long ago
                marker.unlink()
                return False
        return None  # another runner is taking it over
    try:
        now = _read(path)
        if now is None or now.raw != seen.raw:  # released, taken, or its holder's heartbeat moved: look again
            return False
        os.replace(_write_new(path, _encode(record)), path)
        fd = _hold(path, record["token"])
        if fd is None:
            return None
        time.sleep(times.settle)  # then check that no other runner's replace landed after ours
        try:
            ours = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            ours = False
        if not ours:
            os.close(fd)
            return None
        return fd
    finally:
        marker.unlink(missing_ok=True)


def _acquire(path: Path, times: LeaseTimes, notice: Callable[[str], None]) -> _Lease | None:
    token = secrets.token_hex(8)
    owner = os.environ.get(OWNER_ENV) or None
    record = {"host": HOST, "pid": os.getpid(), "token": token, "owner": owner and owner[:200],
              "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "heartbeat": time.time()}
    for _ in range(8):
        record["heartbeat"] = time.time()
        if _create_exclusive(path, _encode(record)):
            fd = _hold(path, token)
            if fd is not None:
                return _Lease(path, fd, record, times, notice)
            continue
        seen = _read(path)
        if seen is None:
            continue  # released meanwhile: claim it afresh
        reason = _stale_reason(path, seen, times)
        if reason is None:
            return None
        if reason == "released":
            continue
        record["heartbeat"] = time.time()
        fd = _take_over(path, seen, record, times)
        if fd is False:
            continue
        if fd is None:
            return None
        notice(f"{path}: took over the lock of {_describe(seen.record)}, which is no longer running ({reason})")
        return _Lease(path, fd, record, times, notice)
    return None  # it kept changing under us: other runners are busy with it


@contextlib.contextmanager
def cell_lock(path: Path, notice: Callable[[str], None] = print, *, lease: float | None = None,
              heartbeat: float | None = None, settle: float | None = None) -> Iterator[bool]:
    """Hold the lock at ``path`` for the block; yields the held lease (true; its ``lost`` turns
    True if another runner takes the lock over meanwhile), or False (holding nothing) when another
    live runner holds it, on this host or another. A stale lock (its holder died, or stopped its
    heartbeat for longer than the lease) is taken over with a ``notice``. The times default to
    ``lease_times()``."""
    times = lease_times(lease, heartbeat, settle)
    path.parent.mkdir(parents=True, exist_ok=True)
    held = _acquire(path, times, notice)
    if held is None:
        yield False
        return
    try:
        yield held
    finally:
        held.release()
