"""Thumbnails of the curation report (pipeline.report): which clips are shown, and their small images.

Sampling (`sample_groups`): a fixed, seeded cap per group, never every clip: `kept` (up to KEPT_CAP) and
one group per reject reason (up to PER_REASON_CAP each, for the MAX_REASON_GROUPS largest reasons). The
pick is a function of the clip_ids and the seed only, so a resumed run shows the same clips.

Where the frames come from:
- kept clips: their WebDataset shard (OUT/shards, the jpg and mp4 members, read through
  training.shardindex, which survives a damaged shard);
- rejected clips: only what the staging file (pipeline.staging) holds. Stage 1 encodes only the clips that
  pass every rule it can check (the cheap filters), so a clip rejected there has no stored frames; one
  rejected later (a near-duplicate, a late rule) has its mp4 + jpg in OUT/staging while that folder is
  kept (output.keep_staging). A rejected group shows clips with frames first. A clip without frames
  gets a labelled placeholder: the report never decodes a user's source video (that would be untrusted
  input decoded in the driver, outside stage 1's killable decoder process).

A thumbnail is the first frame (JPEG, THUMB_PX long side) plus, for a video, an animated WebP of
STRIP_FRAMES frames spread over the clip, both as data: URIs. A strip over STRIP_MAX_BYTES is re-encoded
smaller, then dropped (said on the thumbnail), which bounds the size of every thumbnail and so of the report.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import av
from PIL import Image

from curation.inputs import source_key
from pipeline import staging

if TYPE_CHECKING:
    from training.shardindex import TarIndex

KEPT_CAP = 12
PER_REASON_CAP = 6
MAX_REASON_GROUPS = 12
THUMB_PX = 128
STRIP_FRAMES = 8
STRIP_MAX_BYTES = 32 * 1024
FIRST_FRAME_QUALITY = 75


@dataclass
class Thumb:
    """One shown clip: its data: URIs (None when there is no such image) and why something is missing."""

    first_frame: str | None
    strip: str | None
    note: str | None
    """Why there are no frames (or no strip), shown under the thumbnail; None when all is there."""


def _pick(ids: list[str], cap: int, seed: int, group: str) -> list[str]:
    ids = sorted(ids)
    if len(ids) <= cap:
        return ids
    return sorted(random.Random(f"{seed}:{group}").sample(ids, cap))


def sample_groups(clip_ids: list[str], reasons: list[str | None], has_media: list[bool], *, seed: int = 0,
                  kept_cap: int = KEPT_CAP, per_reason_cap: int = PER_REASON_CAP,
                  max_reason_groups: int = MAX_REASON_GROUPS) -> dict[str, list[str]]:
    """{group: sampled clip_ids}: "kept" first, then reject reasons by count (largest first, ties by name).

    `reasons[i]` is clip i's reject_reason (None = kept); `has_media[i]`: its frames are stored. In a reject
    group clips with frames are sampled first and the rest fill the cap. Only the `max_reason_groups`
    largest reasons get a group.
    """
    by_group: dict[str, list[int]] = {}
    for i, reason in enumerate(reasons):
        by_group.setdefault(reason or "kept", []).append(i)
    groups: dict[str, list[str]] = {}
    if "kept" in by_group:
        groups["kept"] = _pick([clip_ids[i] for i in by_group["kept"]], kept_cap, seed, "kept")
    rejected = sorted((g for g in by_group if g != "kept"), key=lambda g: (-len(by_group[g]), g))
    for reason in rejected[:max_reason_groups]:
        with_media = [clip_ids[i] for i in by_group[reason] if has_media[i]]
        without = [clip_ids[i] for i in by_group[reason] if not has_media[i]]
        chosen = _pick(with_media, per_reason_cap, seed, reason)
        chosen += _pick(without, per_reason_cap - len(chosen), seed, reason + ":none")
        groups[reason] = chosen
    return groups


def data_uri(mime: str, data: bytes) -> str:
    """`data:<mime>;base64,...`."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _small(img: Image.Image) -> Image.Image:
    img = img.convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX))
    return img


def first_frame_jpeg(jpg: bytes) -> bytes:
    """The stored first frame (JPEG bytes) shrunk to THUMB_PX, as JPEG."""
    with Image.open(io.BytesIO(jpg)) as im:
        small = _small(im)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=FIRST_FRAME_QUALITY)
    return buf.getvalue()


def strip_frames(mp4: bytes, count: int = STRIP_FRAMES) -> list[Image.Image]:
    """`count` frames spread evenly over a stored clip (our own short H.264 mp4), shrunk to THUMB_PX."""
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        # every frame up to the last wanted one is decoded; the deblocking filter is skipped (~20% of the
        # decode, invisible at THUMB_PX) and frames are scaled by swscale straight to thumbnail size
        stream.codec_context.options = {"skip_loop_filter": "all"}
        total = stream.frames or 0
        want = {int(i * total / count) for i in range(count)} if total else set(range(count))
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                scale = min(1.0, THUMB_PX / max(frame.width, frame.height))
                size = {"width": max(2, round(frame.width * scale)), "height": max(2, round(frame.height * scale))}
                frames.append(frame.to_image(**size, interpolation="AREA"))
            if total and i >= max(want):
                break
    return frames


def animated_webp(frames: list[Image.Image], max_bytes: int = STRIP_MAX_BYTES) -> bytes | None:
    """The frames as a looping animated WebP under `max_bytes` (quality, then frames reduced); None if not."""
    for quality, step in ((50, 1), (30, 1), (30, 2)):
        chosen = frames[::step]
        buf = io.BytesIO()
        chosen[0].save(buf, format="WEBP", save_all=True, append_images=chosen[1:], duration=250, loop=0,
                       quality=quality, method=4)
        if buf.tell() <= max_bytes:
            return buf.getvalue()
    return None


def make_thumb(kind: str, mp4: bytes | None, jpg: bytes | None) -> Thumb:
    """The Thumb of a clip from its stored media; media that cannot be read becomes a note."""
    if jpg is None:
        return Thumb(None, None, "no stored frames")
    try:
        first = data_uri("image/jpeg", first_frame_jpeg(jpg))
    except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
        return Thumb(None, None, f"stored jpg unreadable: {exc}")
    if kind != "video":
        return Thumb(first, None, None)
    if mp4 is None:
        return Thumb(first, None, "no stored mp4")
    try:
        frames = strip_frames(mp4)
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: no video stream
        return Thumb(first, None, f"stored mp4 unreadable: {type(exc).__name__}")
    strip = animated_webp(frames) if frames else None
    return Thumb(first, data_uri("image/webp", strip) if strip else None,
                 None if strip else "strip over its size cap: first frame only")


class MediaStore:
    """Fetches a clip's stored (mp4, jpg): kept clips from OUT/shards, rejected ones from OUT/staging."""

    def __init__(self, out: Path):
        # imported here, not at the top: training.shardindex imports webdataset and so torch, which the
        # job's driver does not import at start (pipeline.shards.preload_writer loads it during the stream).
        # The package first: preload_writer's thread may still be importing it, and importing one of its
        # submodules first from here would take the two import locks in the opposite order, a deadlock
        # Python breaks by failing one of the imports (seen in bench.curation: the job crashed in its
        # report with KeyError: 'webdataset').
        import webdataset  # noqa: F401

        from training.shardindex import MemberReader, index_tar

        self._index_tar = index_tar
        self.out = Path(out)
        self._indexes: dict[str, TarIndex] = {}
        self._reader = MemberReader(max_open=8)
        self._staged_key: str | None = None
        self._staged: dict = {}

    def from_shard(self, shard: str, clip_id: str) -> tuple[bytes | None, bytes | None, str | None]:
        """(mp4, jpg, problem) of a kept clip from its shard; problem says why a member is missing."""
        path = str(self.out / "shards" / shard)
        if shard not in self._indexes:
            self._indexes[shard] = self._index_tar(path)
        index = self._indexes[shard]
        members = index.samples.get(clip_id)
        if members is None:
            return None, None, index.problem or f"not in shard {shard}"
        got = {ext: self._reader.read(path, ref) for ext, ref in members.items()
               if ext in ("mp4", "jpg") and not ref.truncated}
        return got.get("mp4"), got.get("jpg"), None

    def from_staging(self, source: str, clip_id: str) -> tuple[bytes | None, bytes | None]:
        """(mp4, jpg) of a clip from its source's staging file; (None, None) when not stored or no staging."""
        key = source_key(source)
        if key != self._staged_key:  # callers go source by source: one staging file in memory
            path = staging.staging_path(staging.folder_of(self.out), key)
            self._staged = staging.read_media(path) if path.is_file() else {}
            self._staged_key = key
        return self._staged.get(clip_id, (None, None))

    def close(self) -> None:
        """Close the shard files."""
        self._reader.close()
