"""WebDataset shard planning and writing.

Planning is a pure function of the kept samples: sorted by clip_id, packed greedily into shards of at most
`max_bytes` (a sample larger than the limit gets a shard of its own). So a resumed run produces exactly the
shards of an uninterrupted run, whatever order Ray finished the sources in.

Writing goes through `webdataset.TarWriter` and is deterministic (members of a sample in sorted extension
order, samples in the order given, mtime 0, no user or group names, mode 0644: two runs give the same
bytes) and atomic (common.atomic): a killed packing phase leaves at most temp files, which the next run
deletes before rewriting every shard of the plan (packing is cheap next to decoding).

Sample layout (WebDataset: members of one sample share the key before the first dot; the training loader
reads exactly these names):
    video-NNNNNN.tar: KEY.jpg (first frame, the conditioning image), KEY.json (manifest row), KEY.mp4, KEY.txt
    image-NNNNNN.tar: KEY.jpg, KEY.json, KEY.txt
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Iterable

from common.atomic import atomic_write, is_temp

SHARD_PREFIX = {"video": "video", "image": "image"}


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


def preload_writer() -> None:
    """Start importing webdataset on a daemon thread.

    webdataset imports torch, which the driver has no other use for and which takes a while to import; the
    job starts this while the stream runs, so write_shard does not wait for it at the end.
    """
    threading.Thread(target=importlib.import_module, args=("webdataset",), name="import-webdataset",
                     daemon=True).start()


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples [(key, {ext: bytes})] to tar `path` atomically; returns the number of samples."""
    import webdataset as wds  # here, not at the top: see preload_writer

    count = 0
    with atomic_write(path) as fh:
        # encoder=False: the members are bytes already; the fixed mtime/user/group/mode make the bytes
        # depend on the samples only
        with wds.TarWriter(fh, user="", group="", mode=0o644, mtime=0, encoder=False) as tar:
            for key, members in samples:
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
                if "__key__" in members or any(ext.startswith("_") for ext in members):
                    raise ValueError(f"sample {key!r}: member names must not start with '_' (WebDataset metadata)")
                tar.write({"__key__": key, **members})
                count += 1
    return count


def clean_shard_dir(shard_dir: str | Path, keep: set[str]) -> int:
    """Delete temp files and shards not in `keep` (left by an earlier plan); returns how many."""
    shard_dir = Path(shard_dir)
    removed = 0
    if not shard_dir.is_dir():
        return 0
    for path in shard_dir.iterdir():
        stale_tar = path.name.endswith(".tar") and path.name not in keep
        if is_temp(path.name) or stale_tar:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
