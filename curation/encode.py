"""Byte encoders for the shards (stage 6): clips to H.264 mp4 bytes, first frames to JPEG bytes.

Everything happens in memory (no temp files). The mp4 is H.264 yuv420p (plays everywhere), with even
dimensions, and the moov atom at the front so WebDataset readers can stream it from a tar. FFmpeg's own
`+faststart` needs to reopen an output file by name, which an in-memory buffer does not have, so
`faststart` does the same move in Python: put moov after ftyp and shift the chunk offsets (stco/co64) by
its size. The result is byte-identical to FFmpeg's (tested).
Frame rate is capped at `max_fps` by dropping frames evenly: output frame j shows the source frame at time
j / out_fps, so the clip keeps its duration (T / fps, within one frame).
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import av
import cv2
import numpy as np

from curation.frames import YuvFrames


X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                     "placebo"]
"""libx264's presets, fastest first."""


@dataclass
class EncodeConfig:
    """Shard media encoding (`encode`)."""

    max_side: int = 512
    """Longest side of the stored clip and first frame in pixels (downscale only; sizes made even)."""
    max_fps: float = 24.0
    """Frame-rate cap; faster clips drop frames evenly (duration preserved)."""
    crf: int = 23
    """libx264 constant rate factor (0 lossless ... 51 worst; 18-28 is the usual range)."""
    preset: X264Preset = "superfast"
    """libx264 preset (ultrafast ... veryslow): speed against size. superfast: ~1.6x faster than veryfast
    for ~25% larger files at the same crf (measured on the shared clips); curation is encode-bound."""
    keyframe_interval_s: float | None = 2.0
    """Longest time between keyframes (x264 keyint = this x the output fps, at least 1 frame); None keeps
    x264's default of 250 frames. Training reads a few frames from a random start of each clip, and decoding
    starts at the keyframe before the first of them: with one keyframe per clip that means decoding about
    half the clip for every sample. 2 s bounds that work for ~9% larger files at the same crf."""
    jpeg_quality: int = 90
    """Quality of the first-frame JPEG (1-100)."""
    threads: int = 0
    """libx264 threads per encoder; 0 lets x264 choose (about 1.5 per core). The pipeline's stage-1 actors
    turn 0 into their CPU share (job.process_cpus): their pool already fills every core."""


def _even(n: float) -> int:
    return max(2, int(n) // 2 * 2)


def fit_max_side(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) with the longest side <= max_side, both even; never upscales."""
    scale = min(1.0, max_side / max(height, width))
    return _even(math.floor(height * scale + 1e-6)), _even(math.floor(width * scale + 1e-6))


def resize_max_side(frames: np.ndarray, max_side: int) -> np.ndarray:
    """(T, H, W, 3) or (H, W, 3) uint8 -> same with the longest side <= max_side and even sides.

    Never upscales; already even frames that fit are returned as they are (no copy)."""
    frames = np.asarray(frames)
    single = frames.ndim == 3
    batch = frames[None] if single else frames
    h, w = batch.shape[1:3]
    nh, nw = fit_max_side(h, w, max_side)
    if (nh, nw) == (h, w):
        return frames
    # INTER_AREA (box filter) only for strong downscales, where bilinear would alias; it is ~5x slower.
    interp = cv2.INTER_AREA if nh * 2 <= h or nw * 2 <= w else cv2.INTER_LINEAR
    out = np.stack([cv2.resize(f, (nw, nh), interpolation=interp) for f in batch])
    return out[0] if single else out


def output_frame_indices(num_frames: int, fps: float, max_fps: float) -> tuple[list[int], float]:
    """Source indices of the output frames and the output fps (= fps, or max_fps when fps is higher)."""
    if fps <= max_fps:
        return list(range(num_frames)), fps
    n_out = max(1, round(num_frames * max_fps / fps))
    # Output frame j at time j / max_fps shows the source frame displayed at that moment.
    idx = [min(num_frames - 1, math.floor(j * fps / max_fps + 1e-6)) for j in range(n_out)]
    return idx, max_fps


def _rate(fps: float) -> Fraction:
    """Exact rational frame rate: 29.97 -> 30000/1001, 25 -> 25."""
    return Fraction(fps).limit_denominator(1001)


def encode_mp4(frames: YuvFrames | np.ndarray, fps: float, cfg: EncodeConfig) -> tuple[bytes, float]:
    """Frames at `fps` -> (H.264 yuv420p faststart mp4 bytes, output fps).

    `frames`: YuvFrames (what decode_video gives: encoded as they are, no colour conversion) or
    (T, H, W, 3) uint8 RGB.
    """
    if not isinstance(frames, YuvFrames):
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise ValueError(f"encode_mp4 expects YuvFrames or (T, H, W, 3) uint8 frames with T >= 1, got "
                             f"{frames.shape} {frames.dtype}")
    elif len(frames) == 0:
        raise ValueError("encode_mp4 got no frames")
    if not fps or fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"encode_mp4: fps must be positive, got {fps}")
    idx, out_fps = output_frame_indices(len(frames), fps, cfg.max_fps)
    rate = _rate(out_fps)
    if len(idx) != len(frames):
        frames = frames[idx]
    if isinstance(frames, YuvFrames):
        h, w = fit_max_side(frames.height, frames.width, cfg.max_side)
        i420 = frames.resized(w, h).i420
    else:
        rgb = resize_max_side(frames, cfg.max_side)
        h, w = rgb.shape[1:3]
        i420 = YuvFrames.from_rgb(rgb).i420  # OpenCV's I420 conversion: ~7x faster than swscale's here
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        time_base = 1 / rate  # the muxer changes stream.time_base once the header is written; frames keep this
        stream.time_base = time_base
        stream.codec_context.thread_count = cfg.threads
        if cfg.keyframe_interval_s is not None:
            stream.codec_context.gop_size = max(1, round(cfg.keyframe_interval_s * float(rate)))
        stream.options = {"crf": str(cfg.crf), "preset": cfg.preset}
        for i, f in enumerate(i420):
            # a view of the array, no copy (from_ndarray copies every frame): libx264 copies its input
            # picture into its own buffers, and the frame keeps the array alive until then
            frame = av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(f), format="yuv420p")
            frame.pts = i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return faststart(buf.getvalue()), float(rate)


# Boxes on the path moov/trak/mdia/minf/stbl that hold chunk offset tables.
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"udta"}


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int, int]]:
    """Top-level boxes of data[start:end] as (type, offset, header size, total size)."""
    end = len(data) if end is None else end
    out, i = [], start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[i + 8 : i + 16])[0], 16
        elif size == 0:
            size = end - i
        if size < header or i + size > end:
            raise ValueError(f"malformed mp4: box {kind!r} at {i} has size {size}")
        out.append((kind, i, header, size))
        i += size
    return out


def _shift_offsets(moov: bytearray, start: int, end: int, delta: int) -> None:
    """Add `delta` to every chunk offset in the stco/co64 boxes inside moov[start:end], in place."""
    for kind, off, header, size in _boxes(moov, start, end):
        body = off + header
        if kind in _CONTAINERS:
            _shift_offsets(moov, body, off + size, delta)
        elif kind in (b"stco", b"co64"):
            (count,) = struct.unpack(">I", moov[body + 4 : body + 8])  # after version/flags
            fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
            for k in range(count):
                pos = body + 8 + k * width
                (value,) = struct.unpack(fmt, moov[pos : pos + width])
                if kind == b"stco" and value + delta >= 1 << 32:
                    raise ValueError("faststart: chunk offset overflows stco (clip over 4 GiB)")
                moov[pos : pos + width] = struct.pack(fmt, value + delta)


def faststart(mp4: bytes) -> bytes:
    """Move the moov box of an mp4 right after ftyp (like `ffmpeg -movflags +faststart`)."""
    boxes = _boxes(mp4)
    kinds = [b[0] for b in boxes]
    if b"moov" not in kinds or b"mdat" not in kinds or kinds.index(b"moov") < kinds.index(b"mdat"):
        return mp4
    _, moov_off, _, moov_size = boxes[kinds.index(b"moov")]
    moov = bytearray(mp4[moov_off : moov_off + moov_size])
    _shift_offsets(moov, 0, len(moov), moov_size)
    head = [mp4[o : o + n] for k, o, _, n in boxes if k == b"ftyp"]
    rest = [mp4[o : o + n] for k, o, _, n in boxes if k not in (b"ftyp", b"moov")]
    return b"".join([*head, bytes(moov), *rest])


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for a frame of shape {np.shape(frame)}")
    return data.tobytes()
