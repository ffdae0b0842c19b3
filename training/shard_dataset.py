"""Shards and the samples in them: finding the shard files, and one kind of training sample (video or
image) over its shards: the index, and loading sample i.

Dataset index i is the i-th sample of the kind's shards taken in the given shard order, each shard in tar
order. Loading a sample is a pure function of (seed, kind, epoch, i): its random choices (fps, start
frame, crop) come from a generator seeded by exactly that, never from the process, worker or position
that loads it. A sample that cannot be used raises `SampleError(reason, ...)` (the loader skips and
counts it); anything else that goes wrong is a programming error and propagates.

Sample layout (what `pipeline.curate` writes): video KEY.mp4 + KEY.txt (caption) [+ KEY.jpg, KEY.json,
not needed: the conditioning frame is decoded from the clip so that it is exactly the first sampled
frame]; image KEY.jpg (or .jpeg/.png/.webp) + KEY.txt [+ KEY.json].
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from training.data_order import KIND_IDS, KINDS, sample_id, sample_uniforms
from training.frames import Reader, SampleError, read_clip, read_image, resize_cover_crop
from training.shardindex import MemberReader, MemberRef, index_tar

MEDIA_EXTS: dict[str, tuple[str, ...]] = {"video": ("mp4",), "image": ("jpg", "jpeg", "png", "webp")}
CAPTION_EXT = "txt"
DECODER_CRASH = "decoder_crash"
"""Skip reason of a sample whose decoding crashed a loader worker process (see training.loader_workers)."""

# Index-time status of a sample: 0 = usable as far as the tar goes.
_STATUS = {
    1: ("missing_member", "no {media} member"),
    2: ("missing_member", "no .txt caption member"),
    3: ("corrupt_member", "the {media} member is cut short (truncated shard)"),
    4: ("corrupt_member", "the .txt member is cut short (truncated shard)"),
}


class DataError(RuntimeError):
    """The data cannot be trained on as configured (no shards, no usable sample, wrong resume state)."""


def _shards_of_entry(entry: str) -> list[Path]:
    path = Path(entry).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        for folder in (path / "shards", path):
            found = sorted(folder.glob("video-*.tar")) + sorted(folder.glob("image-*.tar"))
            if found:
                return found
        return []
    found = []
    for match in sorted(glob.glob(str(path))):
        found += _shards_of_entry(match) if Path(match).is_dir() else [Path(match)] if match.endswith(".tar") else []
    return found


def find_shards(entries: list[str]) -> dict[str, list[str]]:
    """{"video": [...], "image": [...]} shard paths of `entries` (the data.shards list; in order, each once).

    Raises DataError naming every entry that holds no shard, or a .tar whose kind its name does not tell."""
    out: dict[str, list[str]] = {k: [] for k in KINDS}
    seen, empty = set(), []
    for entry in entries:
        files = _shards_of_entry(entry)
        if not files:
            empty.append(entry)
        for f in files:
            kind = next((k for k in KINDS if f.name.startswith(f"{k}-")), None)
            if kind is None:
                raise DataError(
                    f"data.shards: cannot tell the kind of {f} (shard names are video-*.tar or image-*.tar)")
            real = os.path.realpath(f)
            if real not in seen:
                seen.add(real)
                out[kind].append(str(f))
    if empty:
        raise DataError(
            f"data.shards: no shards at {empty} (working directory {os.getcwd()}); expected curation output "
            "folders (OUT/shards/video-*.tar, image-*.tar), folders of such shards, .tar files or globs. "
            "Run `python -m pipeline.curate --input ... --output OUT` first, or fix the paths"
        )
    return out


@dataclass(frozen=True)
class SampleSpec:
    """What a sample is turned into (the DataConfig fields the workers need)."""

    num_frames: int
    fps_choices: tuple[int, ...]
    height: int
    width: int
    reader: Reader
    seed: int


@dataclass
class ChunkResult:
    """The usable samples of a list of (epoch, index) in that order, and what happened to the others."""

    keys: list[str] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)
    fps: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    pixels: np.ndarray | None = None
    """(G, 3, F, H, W) uint8 for the G usable samples; None when G = 0. A numpy array travels inside the
    result's pickle (no shared-memory segment and file descriptor per result, as a torch tensor would);
    the loader turns it into float32 in [-1, 1] (frames.unit_range) when it assembles a batch."""
    events: list[tuple[str, str, str, str, bool]] = field(default_factory=list)
    """(key, shard, reason, detail, skipped) of each skipped sample, and of each sample read on a slower
    path (decord fell back to PyAV, PyAV decoded it sequentially: frames.read_clip's note)."""

    def __len__(self) -> int:
        return len(self.keys)


class ShardDataset:
    """Map-style view of one kind's samples over a list of shards (index built at construction)."""

    def __init__(self, kind: str, shard_paths: list[str]):
        if kind not in KIND_IDS:
            raise ValueError(f"unknown sample kind {kind!r}; valid: {sorted(KIND_IDS)}")
        self.kind = kind
        self.shard_paths = list(shard_paths)
        self.unreadable: list[tuple[str, str]] = []
        """(shard path, problem) of shards that could not be read at all."""
        shard, keys, refs, status = [], [], [], []
        empty = MemberRef(0, 0, False)
        for s, path in enumerate(self.shard_paths):
            tar = index_tar(path)
            if tar.problem is not None:
                self.unreadable.append((path, tar.problem))
            for key, members in tar.samples.items():
                media = next((members[e] for e in MEDIA_EXTS[kind] if e in members), None)
                caption = members.get(CAPTION_EXT)
                code = 0
                if media is None:
                    code = 1
                elif media.truncated:  # before "caption missing": a cut shard loses the later members too
                    code = 3
                elif caption is None:
                    code = 2
                elif caption.truncated:
                    code = 4
                shard.append(s)
                keys.append(key)
                media, caption = media or empty, caption or empty
                refs.append((media.offset, media.size, caption.offset, caption.size))
                status.append(code)
        self._shard = np.asarray(shard, dtype=np.int32)
        self._keys = keys
        self._refs = np.asarray(refs, dtype=np.int64).reshape(-1, 4)
        self._status = np.asarray(status, dtype=np.int8)
        self._reader = MemberReader()

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> str:
        """WebDataset key of sample `index`."""
        return self._keys[index]

    def shard(self, index: int) -> str:
        """Path of the shard holding sample `index`."""
        return self.shard_paths[self._shard[index]]

    def load(
        self, index: int, epoch: int, spec: SampleSpec, uniforms: np.ndarray | None = None
    ) -> tuple[torch.Tensor, int, str, str | None]:
        """(pixels (3, F, H, W) uint8, fps condition, caption, note) of sample `index` in `epoch`.

        `uniforms` overrides the seeded draws (validation items use fixed ones). Raises SampleError."""
        code = int(self._status[index])
        if code:
            reason, detail = _STATUS[code]
            raise SampleError(reason, detail.format(media="/".join("." + e for e in MEDIA_EXTS[self.kind])))
        u = sample_uniforms(spec.seed, self.kind, epoch, index) if uniforms is None else uniforms
        path = self.shard(index)
        media_off, media_size, text_off, text_size = (int(v) for v in self._refs[index])
        try:
            caption = self._reader.read(path, MemberRef(text_off, text_size, False)).decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SampleError("corrupt_member", f"the .txt caption is not UTF-8 ({exc})") from None
        data = self._reader.read(path, MemberRef(media_off, media_size, False))
        if self.kind == "video":
            frames, plan, note = read_clip(
                data, num_frames=spec.num_frames, fps_choices=list(spec.fps_choices),
                u_fps=float(u[0]), u_start=float(u[1]), reader=spec.reader,
            )
            fps = plan.fps
        else:
            frames, note = read_image(data, spec.height, spec.width), None
            # a still image fits any frame rate: a seeded pick keeps the fps embedding unbiased
            fps = spec.fps_choices[min(len(spec.fps_choices) - 1, int(u[0] * len(spec.fps_choices)))]
        pixels = resize_cover_crop(frames, spec.height, spec.width, float(u[2]), float(u[3]))
        return pixels, fps, caption, note

    def load_chunk(
        self, items: list[tuple[int, int]], spec: SampleSpec, crashed: Mapping[int, str] | None = None,
        progress: Callable[[int], None] | None = None, uniforms: np.ndarray | None = None,
    ) -> ChunkResult:
        """Load each (epoch, index) of `items`; usable samples in order, the others as skip events.

        `crashed`: positions in `items` whose loading killed a worker process before (what happened); they
        are skipped as `decoder_crash` without being touched again. `progress(j)` is called before loading
        items[j] and `progress(-1)` after the last one (the worker pool's record of whom to blame for a
        crash). `uniforms` overrides every sample's seeded draws (see `load`)."""
        out = ChunkResult()
        tensors = []
        for j, (epoch, index) in enumerate(items):
            key, shard = self.key(index), self.shard(index)
            if crashed and j in crashed:
                out.events.append((key, shard, DECODER_CRASH, crashed[j], True))
                continue
            if progress is not None:
                progress(j)
            try:
                pixels, fps, caption, note = self.load(index, epoch, spec, uniforms)
            except SampleError as exc:
                out.events.append((key, shard, exc.reason, exc.detail, True))
                continue
            if note is not None:
                out.events.append((key, shard, "reader_note", note, False))
            out.keys.append(key)
            out.sample_ids.append(sample_id(self.kind, epoch, index))
            out.fps.append(fps)
            out.captions.append(caption)
            tensors.append(pixels)
        if progress is not None:
            progress(-1)
        if tensors:
            out.pixels = torch.stack(tensors).numpy()
        return out

    def close(self) -> None:
        """Close the shard files this process opened."""
        self._reader.close()


def describe_items(ds: ShardDataset, items: list[tuple[int, int]]) -> str:
    """"(keys [...] in [shards])" of (epoch, index) items, for errors and logs (at most 4 keys)."""
    shards = sorted({ds.shard(i) for _, i in items})
    return f"(keys {[ds.key(i) for _, i in items][:4]} in {shards})"
