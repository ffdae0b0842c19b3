"""common.atomic: a published file is whole and durable; a failed or killed write publishes nothing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import atomic

REPO = Path(__file__).resolve().parents[2]


def test_write_publishes_whole_file_and_fsyncs_file_then_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:  # the real fsync runs; we only note what it was given
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "config.yaml"
    path.write_text("old")
    assert atomic.write_text(path, "new: 1\n") == path
    assert path.read_text() == "new: 1\n"
    assert synced == ["file", "dir"]  # the bytes are durable before the rename, the rename after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_write(path) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_parquet_writes_through_the_file_object(tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    with atomic.atomic_write(tmp_path / "t.parquet") as fh:
        pq.write_table(table, fh)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)


def test_a_killed_write_leaves_only_a_temp_file_that_cleanup_removes(tmp_path):
    """A writer SIGKILLed mid-write (a real child process): the final name never appears half-written."""
    path = tmp_path / "shard.tar"
    code = ("import os, sys; from common.atomic import atomic_write\n"
            f"with atomic_write({str(path)!r}) as fh:\n"
            "    fh.write(b'x' * 4096); fh.flush(); print('writing', flush=True); os.kill(os.getpid(), 9)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == -9 and "writing" in res.stdout
    left = [p.name for p in tmp_path.iterdir()]
    assert not path.exists() and len(left) == 1 and atomic.is_temp(left[0]) and left[0].startswith("shard.tar")
    (tmp_path / "image-000000.tar.tmp").write_bytes(b"")  # an older writer's leftover
    (tmp_path / "video-000000.tar").write_bytes(b"")  # published: never a temp
    assert atomic.remove_temp_files(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["video-000000.tar"]
    assert atomic.remove_temp_files(tmp_path / "missing") == 0


def test_temp_names_are_unique_and_recognised():
    names = {atomic.temp_name("a.parquet") for _ in range(50)}
    assert len(names) == 50 and all(atomic.is_temp(n) and n.startswith("a.parquet") for n in names)
    assert not atomic.is_temp("a.parquet") and not atomic.is_temp("video-000001.tar")
