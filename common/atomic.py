"""The one way this repo publishes a file: whole or not at all, and durable once published.

`atomic_write(path)` yields a binary file object on a temp file in `path`'s own folder (a rename across
file systems would not be atomic); when the block ends without an exception it flushes, fsyncs the file,
`os.replace`s it onto `path` and fsyncs the folder, so a crash at any moment leaves either the old file or
the new one, never a torn one, and a published name survives a power cut. On an exception the temp file
is removed and nothing is published. A process killed mid-write can still leave a temp file behind:
`is_temp` recognises those names and `remove_temp_files` deletes them (writers call it before they
rewrite a folder).

    with atomic_write(out / "shard.tar") as fh:
        fh.write(...)                         # or pq.write_table(table, fh), tarfile.open(fileobj=fh)
    write_text(out / "config.yaml", text)     # the same, for a string
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator

TMP_MARK = ".tmp-"
"""Marks a temp file of `atomic_write`: NAME.tmp-PID-RANDOM beside NAME."""
LEGACY_SUFFIX = ".tmp"
"""Temp files of the writers before this module (NAME.tmp), still left in older output folders."""


def temp_name(name: str) -> str:
    """The temp file name for the final file name `name` (unique per process and call)."""
    return f"{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def is_temp(name: str) -> bool:
    """True for a temp file name made by `temp_name`, or an older writer's NAME.tmp (never published)."""
    return TMP_MARK in name or name.endswith(LEGACY_SUFFIX)


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder so a rename in it is durable. File systems that cannot fsync a folder (EINVAL) are
    skipped: there the rename is as durable as the file system makes it."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Binary file object whose content replaces `path` atomically and durably when the block succeeds.

    The folder of `path` must exist. Temp file in the same folder + fsync(file) + os.replace + fsync(folder).
    """
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    fh = open(tmp, "xb")
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Publish `data` as `path` atomically (see atomic_write); returns the path."""
    with atomic_write(path) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Publish `text` (UTF-8) as `path` atomically (see atomic_write); returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def remove_temp_files(folder: str | Path) -> int:
    """Delete the temp files that killed writes left in `folder`; returns how many (0 without the folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        if is_temp(entry.name):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
