"""Synthetic test videos and poison files, written with PyAV (libx264 ships in its wheel).

Tests import these generators and write into `tmp_path`; nothing here touches the network or ../shared.

Clean videos (known ground truth):
  - `shots_frames` / `write_shots_video`: shots of distinct content with known cut frames; each shot has
    moving content (a drifting textured pattern plus a moving block) so that "static" is opt-in.
  - `flash_frames`: one shot with a single-frame white flash in the middle (must not be a cut).
  - `fade_frames`: a slow fade from black into a scene and back out (no hard cut).
  - `static_frames`: a perfectly static shot with sensor-like noise.

Poison files (each must become a SourceError, never a crash):
  - `write_zero_byte`: an empty file.
  - `write_text_as_mp4`: plain text with a .mp4 name.
  - `write_truncated_mp4`: a normal mp4 (moov box written at the END, as libavformat does by default)
    cut in half, so the moov box is missing: no demuxer can open it.
  - `write_lying_header_mp4`: a "faststart" mp4 (moov box moved to the FRONT) whose tail of the mdat box is
    cut off. The header (moov/stts) still claims all N frames, but only the frames whose bytes survive can
    be decoded: the real-world "claims 444 frames, decodes 68" case.
  - `write_unsupported_codec_mp4`: a valid H.264 mp4 whose sample-entry fourcc `avc1` is patched to
    `zzzz` in place (same length, container stays valid): the stream exists but no decoder knows it.
  - `write_audio_only`: an mp4 holding one AAC audio stream and no video stream.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# --------------------------------------------------------------------------- frame generators


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random colour texture (float32, HxWx3 in [0,255]) that differs strongly per seed."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(30, 225, size=3)
    coarse = rng.uniform(-90, 90, size=(6, 8, 3))
    ys = np.linspace(0, 5, h)
    xs = np.linspace(0, 7, w)
    yi = np.clip(ys.astype(int), 0, 4)
    xi = np.clip(xs.astype(int), 0, 6)
    fy = (ys - yi)[:, None, None]
    fx = (xs - xi)[None, :, None]
    c00 = coarse[yi][:, xi]
    c01 = coarse[yi][:, xi + 1]
    c10 = coarse[yi + 1][:, xi]
    c11 = coarse[yi + 1][:, xi + 1]
    tex = (c00 * (1 - fx) + c01 * fx) * (1 - fy) + (c10 * (1 - fx) + c11 * fx) * fy
    return np.clip(base + tex, 0, 255).astype(np.float32)


def moving_shot(n: int, h: int, w: int, seed: int, speed: float = 1.0) -> np.ndarray:
    """`n` frames of one shot: a texture panning slowly plus a block moving across (uint8 RGB)."""
    tex = _pattern(h, 2 * w, seed)
    rng = np.random.default_rng(seed + 1000)
    block_color = rng.uniform(0, 255, size=3)
    out = np.empty((n, h, w, 3), np.uint8)
    bh, bw = max(2, h // 4), max(2, w // 6)
    for i in range(n):
        x0 = int(i * speed) % w
        frame = tex[:, x0 : x0 + w].copy()
        by = int((h - bh) * (0.5 + 0.4 * np.sin(i * 0.15 * speed + seed)))
        bx = int((w - bw) * ((i * speed * 0.02 + seed * 0.1) % 1.0))
        frame[by : by + bh, bx : bx + bw] = block_color
        out[i] = frame.astype(np.uint8)
    return out


def shots_frames(shot_lengths: list[int], h: int = 96, w: int = 160, seed: int = 0):
    """Concatenate moving shots of the given lengths; returns (frames, cuts) with cuts as first frame indices."""
    parts, cuts, pos = [], [], 0
    for k, n in enumerate(shot_lengths):
        parts.append(moving_shot(n, h, w, seed=seed * 100 + k * 7 + 1))
        pos += n
        cuts.append(pos)
    return np.concatenate(parts), cuts[:-1]


def flash_frames(n: int = 48, flash_at: int = 24, h: int = 96, w: int = 160, seed: int = 3) -> np.ndarray:
    """One moving shot with frame `flash_at` replaced by pure white (a camera flash / glitch)."""
    frames = moving_shot(n, h, w, seed)
    frames[flash_at] = 255
    return frames


def fade_frames(n_in: int = 24, n_hold: int = 12, n_out: int = 24, h: int = 96, w: int = 160, seed: int = 5):
    """Black -> scene fade-in over `n_in` frames, hold, then fade-out to black: gradual only, no cut."""
    scene = moving_shot(n_in + n_hold + n_out, h, w, seed).astype(np.float32)
    gain = np.concatenate(
        [np.linspace(0.0, 1.0, n_in), np.ones(n_hold), np.linspace(1.0, 0.0, n_out)]
    )[:, None, None, None]
    return np.clip(scene * gain, 0, 255).astype(np.uint8)


def static_frames(n: int = 48, h: int = 96, w: int = 160, seed: int = 7, noise: float = 2.0) -> np.ndarray:
    """A static shot: one still image plus small per-frame noise (like a locked-off camera)."""
    rng = np.random.default_rng(seed)
    still = _pattern(h, w, seed)
    noisy = still[None] + rng.normal(0, noise, size=(n, h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writers


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float = 24.0,
    codec: str = "libx264",
    faststart: bool = False,
    crf: int = 18,
) -> Path:
    """Encode uint8 RGB frames (N,H,W,3; even H and W) to `path` with PyAV; returns the path."""
    path = Path(path)
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p")
    opts = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            # keyint small so a truncated file still has decodable GOPs
            stream.options = {"crf": str(crf), "preset": "veryfast", "g": "12", "bf": "0"}
        for f in frames:
            for pkt in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    return path


def write_shots_video(path, shot_lengths=(30, 24, 36), fps: float = 24.0, h: int = 96, w: int = 160, seed: int = 0):
    """Write a multi-shot video; returns (path, cuts)."""
    frames, cuts = shots_frames(list(shot_lengths), h=h, w=w, seed=seed)
    return write_video(path, frames, fps=fps), cuts


# --------------------------------------------------------------------------- poison files


def write_zero_byte(path) -> Path:
    """An empty file."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_text_as_mp4(path) -> Path:
    """A text file renamed .mp4."""
    path = Path(path)
    path.write_text("this is not a video, just some text that somebody saved as .mp4\n" * 20)
    return path


def write_truncated_mp4(path, n: int = 48) -> Path:
    """An mp4 with its moov box at the end, cut in half: the moov box is gone, nothing can open it."""
    path = Path(path)
    write_video(path, moving_shot(n, 96, 160, seed=11), faststart=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_lying_header_mp4(path, n: int = 96, keep_fraction: float = 0.3) -> tuple[Path, int]:
    """A faststart mp4 whose mdat tail is cut: the header claims `n` frames, fewer decode.

    Returns (path, n) where n is the frame count the header claims. The exact decodable count depends on
    the encoder's packet sizes, so tests assert "fewer than claimed and more than zero", not a number.
    """
    path = Path(path)
    write_video(path, moving_shot(n, 96, 160, seed=13), faststart=True)
    data = path.read_bytes()
    mdat = data.find(b"mdat")
    if mdat < 0:
        raise RuntimeError("no mdat box in the written mp4")
    body = len(data) - (mdat + 4)
    path.write_bytes(data[: mdat + 4 + int(body * keep_fraction)])
    return path, n


def write_unsupported_codec_mp4(path, n: int = 12) -> Path:
    """A valid mp4 whose video sample entry `avc1` is renamed `zzzz`: a video stream with an unknown codec."""
    path = Path(path)
    write_video(path, moving_shot(n, 96, 160, seed=17))
    data = bytearray(path.read_bytes())
    at = data.find(b"avc1", data.find(b"stsd"))  # the sample entry, not the `ftyp` brand list
    if at < 0:
        raise RuntimeError("no avc1 sample entry found")
    data[at : at + 4] = b"zzzz"
    path.write_bytes(bytes(data))
    return path


def write_audio_only(path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """An mp4 with one AAC audio stream (a sine tone) and no video stream."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        total = int(seconds * rate)
        t = np.arange(total, dtype=np.float32) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        chunk = 1024
        for i in range(0, total, chunk):
            part = tone[i : i + chunk][None]
            frame = av.AudioFrame.from_ndarray(part, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    return path
