"""Probe: container and stream metadata of one video, read with PyAV (headers only, no decoding).

Header values are hints. Frame counts and durations in containers lie (a truncated faststart mp4 claims
every frame it was written with); `curation.decode` counts frames by decoding them. What the probe is
trusted for is *rejecting* inputs early with a one-line reason: empty files, files that are not a
container, containers without a video stream, and video streams no decoder here knows.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import av

from curation.errors import SourceError, is_environment_error, reading_input

Source = str | bytes | os.PathLike


@dataclass
class ProbeInfo:
    """Container/stream metadata of one video. Header values are hints only."""

    container: str
    """Demuxer name, e.g. 'mov,mp4,m4a,3gp,3g2,mj2' or 'matroska,webm'."""
    codec: str
    """Video decoder name as PyAV reports it, e.g. 'h264', 'vp8', 'libdav1d'."""
    width: int
    """Native frame width in pixels."""
    height: int
    """Native frame height in pixels."""
    fps: float
    """Average frame rate from the header (0.0 when the header has none)."""
    duration_s: float | None
    """Duration from the stream or container header, None when absent. A hint."""
    header_frames: int | None
    """Frame count the header claims (None when absent). Often wrong: never use it as the count."""
    has_audio: bool
    """Whether the container also holds an audio stream."""
    size_bytes: int | None = None
    """Size of the input in bytes (None when unknown)."""


def open_container(src: Source):
    """av.open() on a path or bytes; every failure that is about the input becomes a SourceError with a
    one-line reason (an environment error of curation.errors propagates)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise SourceError("empty file (0 bytes)")
        target = io.BytesIO(bytes(src))
    else:
        path = os.fspath(src)
        with reading_input("cannot read file"):
            size = os.path.getsize(path)
        if size == 0:
            raise SourceError("empty file (0 bytes)")
        target = path
    try:
        return av.open(target, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        if is_environment_error(exc):
            raise  # this machine (too many open files...), not the input: curation.errors
        text = exc.strerror if isinstance(exc, av.error.FFmpegError) and exc.strerror else exc
        raise SourceError(f"not a readable video container: {text}") from None


def _source_size(src: Source) -> int | None:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src)
    try:
        return os.path.getsize(os.fspath(src))
    except OSError:
        return None


def probe(src: Source) -> ProbeInfo:
    """Read container/stream metadata of `src` (path or bytes) without decoding frames.

    Raises SourceError for: 0-byte input, not a container, no video stream (e.g. audio only), a video
    stream with an unknown codec, a video stream without a frame size.
    """
    container = open_container(src)
    try:
        videos = list(container.streams.video)
        has_audio = len(container.streams.audio) > 0
        if not videos:
            raise SourceError("no video stream (audio only)" if has_audio else "no video stream")
        stream = videos[0]
        ctx = stream.codec_context
        if ctx is None:
            raise SourceError("unsupported video codec (no decoder for this stream)")
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise SourceError(f"video stream of codec '{ctx.name}' has no frame size")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        return ProbeInfo(
            container=container.format.name,
            codec=ctx.name,
            width=width,
            height=height,
            fps=fps,
            duration_s=duration,
            header_frames=int(stream.frames) if stream.frames else None,
            has_audio=has_audio,
            size_bytes=_source_size(src),
        )
    finally:
        container.close()
