"""Random access to WebDataset tar shards that survives damage: an index of every intact member, by key.

The loader needs map-style access (sample i of the dataset, in any order) so that its position is exact.
webdataset's map-style reader is `wids`; it was tried first and measured on damaged copies of a curated
shard (truncated inside a member, truncated inside a header, a garbage header, an empty file):

- `wids.IndexedTarSamples` (mmap index) returns a member cut by truncation as if it were whole (a 1000-byte
  prefix of a 110 kB mp4), raises `struct.error` on a header cut short and `UnicodeDecodeError` on a garbage
  header, and cannot open an empty file: one bad byte loses the whole shard, or passes bad bytes as good.
- its tarfile-based index raises `ReadError` on a truncated member (whole shard lost) and stops at a
  garbage header (every later sample lost).

So the index is built here with the stdlib tar parser in `ignore_zeros` mode, which steps block by block
over a damaged header and resynchronises on the next valid one (only the damaged member is lost); a walk
that hits the end of a truncated file keeps every member before that point; a member whose data runs
past the end of the file is kept but marked `truncated`, so the loader skips its sample with a reason.
Keys and extensions follow webdataset's own rule (`webdataset.tariterators.base_plus_ext`: the key is
everything before the first dot of the file name), extensions lower-cased, `__meta__` files ignored.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext


@dataclass(frozen=True)
class MemberRef:
    """Where one tar member's bytes lie in its shard file."""

    offset: int
    """Byte offset of the member's data in the file."""
    size: int
    """Size in bytes the header declares."""
    truncated: bool
    """The data runs past the end of the file (the shard was cut short); its bytes are incomplete."""


@dataclass
class TarIndex:
    """The members of one shard grouped by sample key, in the order the keys first appear."""

    path: str
    samples: dict[str, dict[str, MemberRef]] = field(default_factory=dict)
    """key -> {extension: MemberRef}; a repeated extension for a key keeps its first member."""
    problem: str | None = None
    """Why the shard could not be read at all (empty file, not a tar); None when it could."""


def index_tar(path: str) -> TarIndex:
    """Walk the headers of tar `path` (no member data is read) and return its TarIndex.

    Never raises for damaged content: an unreadable file gives an index with no samples and `problem` set.
    """
    index = TarIndex(path=path)
    try:
        file_size = os.path.getsize(path)
        tar = tarfile.open(path, mode="r:", ignore_zeros=True)
    except (OSError, tarfile.TarError) as exc:
        index.problem = f"not a readable tar file: {exc}"
        return index
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, ValueError):
                # end of a truncated file (the parser checks that the previous member's data is all
                # there before reading the next header): every member before this point is indexed
                break
            if info is None:
                break
            if not info.isreg():
                continue
            name = os.path.basename(info.name)
            if name.startswith("__") and name.endswith("__"):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            members = index.samples.setdefault(key, {})
            members.setdefault(
                ext.lower(),
                MemberRef(info.offset_data, info.size, info.offset_data + info.size > file_size),
            )
    return index


class MemberReader:
    """Reads member bytes with `os.pread`, keeping up to `max_open` shard files open (LRU).

    Safe across `fork`: a child process opens its own descriptors instead of sharing the parent's."""

    def __init__(self, max_open: int = 32):
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def read(self, path: str, ref: MemberRef) -> bytes:
        """The bytes of member `ref` of shard `path` (shorter than ref.size when it is truncated)."""
        if os.getpid() != self._pid:  # forked: the inherited descriptors stay with the parent
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
            while len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(path)
        return os.pread(fd, ref.size, ref.offset)

    def close(self) -> None:
        """Close every descriptor this process opened."""
        if os.getpid() == self._pid:
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()
