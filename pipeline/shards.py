"""WebDataset shard planning and writing.

Planning is a pure function of the kept samples: sorted by clip_id, packed greedily into shards of at most
`max_bytes` (a sample larger than the limit gets a shard of its own). So a resumed run produces exactly the
shards of an uninterrupted run, whatever order Ray finished the sources in.

Writing is deterministic too (fixed member order, mtime 0, no user names) and atomic: each shard is written
to `NAME.tar.tmp` and renamed. A killed packing phase leaves at most temp files, which the next run deletes
before rewriting every shard of the plan (packing is cheap next to decoding).

Sample layout (WebDataset: members of one sample share the key before the first dot):
    video: KEY.mp4, KEY.jpg (first frame, the conditioning image), KEY.txt (caption), KEY.json (manifest row)
    image: KEY.jpg, KEY.txt, KEY.json
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterable

SHARD_PREFIX = {"video": "video", "image": "image"}
TMP_SUFFIX = ".tmp"


def shard_name(kind: str, index: int) -> str:
    """`video-000003.tar` / `image-000000.tar`."""
    if kind not in SHARD_PREFIX:
        raise ValueError(f"unknown sample kind {kind!r}; valid: {sorted(SHARD_PREFIX)}")
    return f"{SHARD_PREFIX[kind]}-{index:06d}.tar"


def plan_shards(samples: Iterable[tuple[str, str, int]], max_bytes: int) -> dict[str, str]:
    """{clip_id: shard file name} for samples (clip_id, kind, nbytes), packed by bytes in clip_id order."""
    if max_bytes <= 0:
        raise ValueError(f"output.shard_max_bytes must be > 0, got {max_bytes}")
    by_kind: dict[str, list[tuple[str, int]]] = {}
    for clip_id, kind, nbytes in samples:
        by_kind.setdefault(kind, []).append((clip_id, int(nbytes)))
    plan: dict[str, str] = {}
    for kind, items in by_kind.items():
        index, used, count = 0, 0, 0
        for clip_id, nbytes in sorted(items):
            # ~3 KiB of tar headers and json per sample; counting it keeps shards under the limit
            cost = nbytes + 3072
            if count and used + cost > max_bytes:
                index, used, count = index + 1, 0, 0
            plan[clip_id] = shard_name(kind, index)
            used += cost
            count += 1
    return plan


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples [(key, {ext: bytes})] to tar `path` atomically; returns the number of samples."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    count = 0
    with open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
                for ext in sorted(members):
                    _add(tar, f"{key}.{ext}", members[ext])
                count += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return count


def clean_shard_dir(shard_dir: str | Path, keep: set[str]) -> int:
    """Delete temp files and shards not in `keep` (left by an earlier plan); returns how many."""
    shard_dir = Path(shard_dir)
    removed = 0
    if not shard_dir.is_dir():
        return 0
    for path in shard_dir.iterdir():
        stale_tar = path.name.endswith(".tar") and path.name not in keep
        if path.name.endswith(TMP_SUFFIX) or stale_tar:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
