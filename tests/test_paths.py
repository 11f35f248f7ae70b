"""Output folders checked before writing, and what killed writers leave behind cleaned up."""

from __future__ import annotations

import os
import time

import pytest

from rsnc_bench.errors import ConfigError
from rsnc_bench.paths import STALE_SECONDS, remove_stale_temporaries, temporary_path, writable_folder

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: no such process


def _aged(path, seconds=STALE_SECONDS + 60):
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def test_stale_temporaries_of_dead_writers_are_removed_and_live_or_recent_ones_kept(tmp_path):
    cache = tmp_path / "cache" / "rsicd"
    cache.mkdir(parents=True)
    dead = cache / f".train-224px-abc.npy.tmp-{DEAD_PID}"
    dead.write_bytes(b"\0" * 4096)
    _aged(dead)
    dead_folder = tmp_path / f".synthetic.tmp-{DEAD_PID}"
    (dead_folder / "images").mkdir(parents=True)
    (dead_folder / "images" / "a.png").write_bytes(b"x" * 10)
    _aged(dead_folder)
    ours = temporary_path(tmp_path / "result.json")
    ours.write_text("{}")
    _aged(ours)  # a live process (this one) is still writing it
    recent = tmp_path / f".other.json.tmp-{DEAD_PID}"
    recent.write_text("{}")  # just touched: perhaps a writer on another machine of a shared folder
    not_ours = tmp_path / ".notes.tmp-12b"  # not a name our writers use
    not_ours.write_text("mine")
    _aged(not_ours)
    notices = []
    assert remove_stale_temporaries(tmp_path, notices.append) == 4096 + 10
    assert not dead.exists() and not dead_folder.exists()
    assert ours.exists() and recent.exists() and not_ours.exists()
    assert len(notices) == 1 and "removed 2 temporary file(s)" in notices[0]


def test_writable_folder_refuses_files_in_the_way_and_creates_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out .*file is a file, not a folder"):
        writable_folder(tmp_path / "file", "--out")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        writable_folder(tmp_path / "file" / "below", "--out")
    assert writable_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_writable_folder_refuses_a_read_only_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="is not writable"):
        writable_folder(locked / "runs", "--out")
