"""Training shards for loader tests, built in code from a real clip (no Ray, no curation run).

Clips are the first frames of tests/assets/sample/clip_02_caminandes.mp4 (a real CGI shot) at 96x64 with
a frame-number marker: the top 16 rows of frame i are the flat grey MARKER_BASE + MARKER_STEP * i, which
survives H.264 and the loader's resize/crop, so a test can read back which source frame the loader
sampled. They are encoded by the curation job's own encoder (`curation.encode.encode_mp4`: H.264, moov in
front; or, for clips that must make random access seek, PyAV with a short keyframe interval) and written
with webdataset's TarWriter in the curation layout (KEY.mp4/.jpg/.txt/.json for videos, KEY.jpg/.txt/.json
for images).

Damage helpers cut or overwrite bytes of a written shard at a named member, like a failed copy would, or
damage an mp4's sample table so that decord crashes on it (`far_chunk_offset`).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np
import webdataset as wds

from curation.encode import EncodeConfig, encode_jpeg, encode_mp4, faststart

REPO = Path(__file__).resolve().parents[1]
SOURCE_CLIP = REPO / "tests" / "assets" / "sample" / "clip_02_caminandes.mp4"
CLIP_H, CLIP_W = 64, 96
MARKER_ROWS = 16
MARKER_BASE, MARKER_STEP = 8, 6
MAX_MARKED_FRAMES = 40


@lru_cache(maxsize=1)
def source_frames() -> np.ndarray:
    """(40, 64, 96, 3) uint8: the first 40 frames of the real sample clip, resized."""
    frames = []
    with av.open(str(SOURCE_CLIP)) as container:
        for frame in container.decode(video=0):
            frames.append(cv2.resize(frame.to_ndarray(format="rgb24"), (CLIP_W, CLIP_H), interpolation=cv2.INTER_AREA))
            if len(frames) == MAX_MARKED_FRAMES:
                break
    return np.stack(frames)


def marked_frames(num_frames: int, offset: int = 0) -> np.ndarray:
    """Real frames (starting at source frame `offset`) with frame i's marker in the top rows."""
    if num_frames > MAX_MARKED_FRAMES:
        raise ValueError(f"at most {MAX_MARKED_FRAMES} marked frames")
    src = source_frames()
    frames = np.stack([src[(offset + i) % len(src)] for i in range(num_frames)]).copy()
    for i in range(num_frames):
        frames[i, :MARKER_ROWS] = MARKER_BASE + MARKER_STEP * i
    return frames


def marker_index(frame: np.ndarray) -> int:
    """Frame number of a loader frame (3, H, W) in [-1, 1] whose top rows show the marker."""
    band = (np.asarray(frame)[:, 2 : MARKER_ROWS - 4] + 1.0) * 127.5
    return int(round((float(band.mean()) - MARKER_BASE) / MARKER_STEP))


def clip_mp4(num_frames: int, fps: float = 24.0, offset: int = 0, keyint: int | None = None) -> bytes:
    """A marked H.264 clip of `num_frames` frames at `fps`, encoded like the curation job does; with
    `keyint`, a keyframe every `keyint` frames (and B-frames), so that random access has to seek."""
    frames = marked_frames(num_frames, offset)
    if keyint is None:
        data, _ = encode_mp4(frames, fps, EncodeConfig(max_fps=240.0, max_side=CLIP_W))
        return data
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = CLIP_W, CLIP_H, "yuv420p"
        stream.options = {"x264-params": f"keyint={keyint}:min-keyint={keyint}:bframes=3:scenecut=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return faststart(buf.getvalue())


def video_sample(key: str, num_frames: int = 40, fps: float = 24.0, caption: str | None = None, offset: int = 0,
                 keyint: int | None = None) -> dict:
    """A complete video sample dict for TarWriter (mp4, first-frame jpg, caption, manifest json)."""
    frames = marked_frames(num_frames, offset)
    return {
        "__key__": key,
        "mp4": clip_mp4(num_frames, fps, offset, keyint),
        "jpg": encode_jpeg(frames[0]),
        "txt": (caption or f"caption of {key}").encode(),
        "json": json.dumps({"clip_id": key, "kind": "video", "out_fps": fps, "num_frames": num_frames,
                            "width": CLIP_W, "height": CLIP_H}).encode(),
    }


def image_sample(key: str, frame: int = 0, caption: str | None = None) -> dict:
    """A complete image sample dict for TarWriter (jpg, caption, manifest json)."""
    return {
        "__key__": key,
        "jpg": encode_jpeg(marked_frames(frame + 1)[frame]),
        "txt": (caption or f"caption of {key}").encode(),
        "json": json.dumps({"clip_id": key, "kind": "image", "width": CLIP_W, "height": CLIP_H}).encode(),
    }


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Write samples with webdataset's TarWriter (raw bytes, no encoder), fixed mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def member_span(path: Path, name: str) -> tuple[int, int, int]:
    """(header offset, data offset, size) of member `name` in tar `path`."""
    with tarfile.open(path, ignore_zeros=True) as tar:  # finds members after a garbled header
        info = tar.getmember(name)
        return info.offset, info.offset_data, info.size


def truncate_inside(path: Path, name: str, keep: int = 1000) -> None:
    """Cut the file `keep` bytes into the data of member `name` (a copy that stopped half way)."""
    _, data, _ = member_span(path, name)
    with open(path, "r+b") as fh:
        fh.truncate(data + keep)


def garble_header(path: Path, name: str) -> None:
    """Overwrite the first 100 bytes of member `name`'s tar header (name field) with 0xff."""
    header, _, _ = member_span(path, name)
    with open(path, "r+b") as fh:
        fh.seek(header)
        fh.write(b"\xff" * 100)


def far_chunk_offset(mp4: bytes, offset: int = 0x7FFF0000) -> bytes:
    """The mp4 with its first chunk offset (moov/.../stco) pointing `offset` bytes into the file, far past
    its data (a damaged sample table). decord 0.6 reading it from memory segfaults in VideoReader (a real
    crash, not an exception); PyAV reports it as a stream with no decodable frame."""
    at = mp4.find(b"stco")
    if at < 0 or mp4.find(b"stco", at + 4) >= 0:
        raise ValueError("expected exactly one stco box (a single-track mp4 with 32-bit chunk offsets)")
    entries = struct.unpack(">I", mp4[at + 8 : at + 12])[0]
    if entries < 1:
        raise ValueError("the stco box lists no chunk")
    return mp4[: at + 12] + struct.pack(">I", offset) + mp4[at + 16 :]


def unreferenced_pictures(mp4: bytes) -> tuple[int, int]:
    """(pictures no other one is predicted from, keyframes) of an mp4's H.264 stream: packets whose slice
    NAL units all have nal_ref_idc 0, read from the 4-byte length-prefixed packets x264 writes into mp4.
    A premise check for tests of readers that skip such pictures."""
    unreferenced = keyframes = 0
    with av.open(io.BytesIO(mp4)) as container:
        for packet in container.demux(video=0):
            data, i, refs = bytes(packet), 0, []
            while i + 4 < len(data):
                size, head = struct.unpack(">I", data[i : i + 4])[0], data[i + 4]
                if head & 0x1F in (1, 5):
                    refs.append(head >> 5 & 3)
                i += 4 + size
            unreferenced += bool(refs) and not any(refs)
            keyframes += packet.is_keyframe
    return unreferenced, keyframes
