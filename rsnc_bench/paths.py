"""The file system around a command's outputs: the folders it will write into, checked before it
writes anything; the temporary names of atomic writes, and what killed writers left under them;
undoing the partial writes of a refused command."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from rsnc_bench.errors import ConfigError


def writable_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder that exists or can be created and can be written; nothing is created.
    A ConfigError names ``what`` (an option such as ``--out``) when a file stands in the way or
    the nearest existing folder is read-only."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; give a folder path")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a folder; give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable; give a folder you can write to")
    return path


def readable_file(path: str | Path, what: str) -> Path:
    """``path`` as an existing, readable file; a ConfigError naming ``what`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found; give an existing file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable; check its permissions")
    return path


def temporary_path(path: Path) -> Path:
    """Where an atomic writer builds ``path`` before renaming it (``.<name>.tmp-<pid>``, beside it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` into its temporary name, flushed to disk, then renamed
    over it: a reader (or a kill) never sees half a file. The one atomic write of the harness."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write`` of UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


_TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")  # how atomic writers here name their work in progress
STALE_SECONDS = 600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, notice: Callable[[str], None] = print) -> int:
    """Delete what killed writers left under ``folder`` (``.<name>.tmp-<pid>`` files and folders, a
    half-written image cache can take gigabytes): those whose process is not running here and that
    nothing has touched for ten minutes (a writer on another machine of a shared folder keeps
    touching its own). Returns the bytes freed, after one notice."""
    folder, freed, count = Path(folder), 0, 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for path in list(folder.rglob(".*.tmp-*")):
        match = _TEMPORARY.fullmatch(path.name)
        try:
            if not match or _alive(int(match.group(1))) or now - path.stat().st_mtime < STALE_SECONDS:
                continue
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:  # gone meanwhile, or not ours to delete
            continue
        freed, count = freed + size, count + 1
    if count:
        notice(f"{folder}: removed {count} temporary file(s) of killed runs ({freed / 2**20:.1f} MiB)")
    return freed


@contextlib.contextmanager
def removed_on_error(folder: Path) -> Iterator[None]:
    """On an exception in the block, delete the files and folders it created under ``folder`` (and
    ``folder`` and its parents, where the block created them), so a refused input leaves nothing."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    before = set(folder.rglob("*")) if folder.exists() else set()
    try:
        yield
    except BaseException:
        created = set(folder.rglob("*")) - before if folder.exists() else set()
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        for path in missing:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
