"""Decoding backends behind curation.decode: frame sinks, PyAV and decord passes.

Both passes hand the sink work-size frames as I420 (curation/frames.py) and detect-size frames as RGB.
PyAV (the default) keeps decoded frames in YUV and scales the planes with OpenCV: ~2x less CPU than decord,
which can only return RGB (converted by swscale at full size, then scaled). decord stays as a backend.
This runs inside the decoder process (curation/decode_worker.py), a clean process where OpenCV is safe,
or in the caller's process with DecodeConfig.isolation='none'.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from curation.decode_types import DecodeConfig, over_max_pixels, small_size, work_size
from curation.errors import SourceError, is_input_error
from curation.frames import i420_to_rgb, pack_i420, rgb_to_i420
from curation.probe import ProbeInfo, open_container

# --------------------------------------------------------------------------- frame sinks


class MemorySink:
    """Collects batches in lists (in-process decoding)."""

    retains_batches = True  # keeps the arrays it is given: a reused buffer must be copied first

    def __init__(self, keep_work: bool):
        self.keep_work = keep_work
        self.small: list[np.ndarray] = []
        self.work: list[np.ndarray] = []
        self.count = 0

    def add(self, work: np.ndarray, small: np.ndarray | None) -> None:
        if small is not None:
            self.small.append(small)
        if self.keep_work:
            self.work.append(work)
        self.count += len(work)

    def drop_work(self) -> None:
        self.keep_work = False
        self.work = []

    def reset(self, keep_work: bool) -> None:
        self.__init__(keep_work)

    def arrays(self, ws, hs, ww, wh):
        small = np.concatenate(self.small) if self.small else np.zeros((0, hs, ws, 3), np.uint8)
        work = None
        if self.keep_work:
            work = np.concatenate(self.work) if self.work else np.zeros((0, wh * 3 // 2, ww), np.uint8)
        return small, work


class FileSink:
    """Streams batches into raw files in a scratch folder (child process); the parent maps them."""

    retains_batches = False  # writes each batch at once

    def __init__(self, folder: str, keep_work: bool):
        self.folder = folder
        self.reset(keep_work)

    def reset(self, keep_work: bool) -> None:
        for name in ("small.raw", "work.raw"):
            if os.path.exists(os.path.join(self.folder, name)):
                os.unlink(os.path.join(self.folder, name))
        self.keep_work = keep_work
        self.count = 0
        self._small = open(os.path.join(self.folder, "small.raw"), "wb")
        self._work = open(os.path.join(self.folder, "work.raw"), "wb") if keep_work else None

    def add(self, work: np.ndarray, small: np.ndarray | None) -> None:
        if small is not None:
            self._small.write(np.ascontiguousarray(small).data)
        if self._work is not None:
            self._work.write(np.ascontiguousarray(work).data)
        self.count += len(work)

    def drop_work(self) -> None:
        self.keep_work = False
        if self._work is not None:
            self._work.close()
            os.unlink(os.path.join(self.folder, "work.raw"))
            self._work = None

    def close(self) -> None:
        self._small.close()
        if self._work is not None:
            self._work.close()


# --------------------------------------------------------------------------- backends


def _to_small(work: np.ndarray, ws: int, hs: int) -> np.ndarray:
    """(B, H*3/2, W) I420 batch -> (B, hs, ws, 3) RGB detection frames (scaled in YUV, then converted)."""
    out = np.empty((len(work), hs, ws, 3), np.uint8)
    for i, f in enumerate(work):
        out[i] = i420_to_rgb(f, ws, hs)
    return out


class _DecordFailed(Exception):
    """decord could not open or finish this source; the caller retries with PyAV."""


@contextlib.contextmanager
def _calling_decord(decord) -> Iterator[None]:
    """Around calls into decord only: what it raises on a bad input, RuntimeError (cannot open) or
    DECORDError (C++ errors, multi-line messages), becomes _DecordFailed with a one-line reason."""
    try:
        yield
    except (RuntimeError, decord.DECORDError) as exc:
        raise _DecordFailed(" ".join(str(exc).split())[:200]) from None


def _decode_decord(src, cfg, info: ProbeInfo, sink, sizes, budget_frames, start=0, end=None):
    import decord

    ww, wh, ws, hs = sizes
    resize = (ww, wh) != (info.width, info.height)
    with _calling_decord(decord):
        vr = decord.VideoReader(
            src if isinstance(src, str) else os.fspath(src),
            ctx=decord.cpu(0),
            width=ww if resize else -1,
            height=wh if resize else -1,
            num_threads=cfg.decoder_threads,
        )
        n = len(vr)
    stop = n if end is None else min(n, end)
    stamps = []
    for i in range(start, stop, cfg.batch_frames):
        idx = list(range(i, min(stop, i + cfg.batch_frames)))
        with _calling_decord(decord):
            rgb = vr.get_batch(idx).asnumpy()
            stamps.append(vr.get_frame_timestamp(idx)[:, 0].astype(np.float64))
        if rgb.shape[1:3] != (wh, ww):
            raise _DecordFailed(f"decord returned frames of {rgb.shape[2]}x{rgb.shape[1]}, wanted {ww}x{wh}")
        _add(sink, np.stack([rgb_to_i420(f) for f in rgb]), ws, hs, cfg, budget_frames)
    return (np.concatenate(stamps) if stamps else np.zeros(0)), 0


def _frame_to_i420(frame, ww: int, wh: int, out: np.ndarray) -> None:
    """One PyAV VideoFrame -> `out` (wh * 3/2, ww) I420. 8-bit yuv420p (nearly every H.264/VP9/AV1 file)
    takes the fast path: zero-copy plane views scaled by OpenCV. Other formats (10-bit, 4:2:2, 4:4:4,
    full-range yuvj, RGB) go through swscale, which also converts range and depth correctly."""
    if frame.format.name != "yuv420p":
        frame = frame.reformat(width=ww, height=wh, format="yuv420p")
    planes = []
    for k, plane in enumerate(frame.planes):
        w = frame.width if k == 0 else (frame.width + 1) // 2
        h = frame.height if k == 0 else (frame.height + 1) // 2
        planes.append(np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w])
    pack_i420(*planes, ww, wh, out=out)


def _decode_pyav(src, cfg, info: ProbeInfo, sink, sizes, budget_frames, start=0, end=None, span=None):
    """Decode into `sink`; frames [start, end) by decoded index, or, with `span` = (t0, t1) seconds, the
    frames shown from t0 to t1 after seeking to the keyframe before t0 (decode_range: no decode from 0)."""
    import av

    ww, wh, ws, hs = sizes
    container = open_container(src)
    stamps: list[float] = []
    bad = 0
    index = 0
    batch = np.empty((cfg.batch_frames, wh * 3 // 2, ww), np.uint8)
    filled = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if cfg.decoder_threads:
            stream.codec_context.thread_count = cfg.decoder_threads
        fps = info.fps or 25.0
        half = 0.5 / fps  # timestamps match within half a frame
        if span is not None:
            container.seek(max(0, int(span[0] / stream.time_base)), stream=stream, backward=True)

        def flush(n: int) -> None:
            # `batch` is reused: copied only for a sink that keeps it (not the decoder process's file sink)
            _add(sink, batch[:n].copy() if sink.retains_batches else batch[:n], ws, hs, cfg, budget_frames)

        def frames_of(packet):
            try:
                return packet.decode()
            except av.error.FFmpegError:
                return None

        for packet in container.demux(stream):
            decoded = frames_of(packet)
            if decoded is None:
                bad += 1
                continue
            for frame in decoded:
                if span is not None:
                    t = frame.time
                    if t is None:
                        raise SourceError("decode_range: a frame without a timestamp after seeking")
                    if t > span[1] + half:
                        end = index  # past the span: stop
                        break
                    wanted = t >= span[0] - half
                else:
                    wanted = index >= start and (end is None or index < end)
                if wanted:
                    _frame_to_i420(frame, ww, wh, batch[filled])
                    filled += 1
                    stamps.append(float(frame.time) if frame.time is not None else index / fps)
                    if filled == len(batch):
                        flush(filled)
                        filled = 0
                index += 1
            if end is not None and index >= end:
                break
        if filled:
            flush(filled)
    finally:
        container.close()
    return np.asarray(stamps, np.float64), bad


def _add(sink, work, ws, hs, cfg, budget_frames):
    if sink.count + len(work) > cfg.max_frames:
        raise SourceError(f"video has more than max_frames={cfg.max_frames} frames")
    if sink.keep_work and sink.count + len(work) > budget_frames:
        sink.drop_work()  # over max_memory_mb: keep detection frames only, re-decode ranges later
    sink.add(work, _to_small(work, ws, hs) if ws else None)


def decode_into(src, cfg: DecodeConfig, info: ProbeInfo, sink, start=0, end=None, small=True, span=None):
    """Decode with the configured backend(s) into `sink` (MemorySink or FileSink); returns (timestamps,
    bad_frames, backend). Raises SourceError for an unusable input, frames over cfg.max_pixels included.

    `span` = (t0, t1, count): decode_range's fast path, PyAV seeking to t0 and keeping the frames shown
    up to t1. It must give exactly `count` frames (the range's size in the first decode); anything else
    (a file whose timestamps do not survive a seek) falls back to decoding from the start by index.
    """
    reason = over_max_pixels(info.width, info.height, cfg.max_pixels)
    if reason:
        raise SourceError(f"video frames of {reason}")
    if span is not None and cfg.backend in ("auto", "pyav"):
        try:
            ww, wh = work_size(info.width, info.height, cfg)
            ts, bad = _decode_pyav(src, cfg, info, sink, (ww, wh, 0, 0), cfg.max_frames, span=span[:2])
            if sink.count == span[2]:
                return ts, bad, "pyav"
        except Exception as exc:  # an input or library error after the seek: decode from the start instead
            if not is_input_error(exc):
                raise
        sink.reset(sink.keep_work)
    ww, wh = work_size(info.width, info.height, cfg)
    ws, hs = small_size(info.width, info.height, cfg) if small else (0, 0)
    # decode_range (small=False) returns a caller-bounded range: no memory fallback there
    budget = max(0, cfg.max_memory_mb) * 2**20 // (ww * wh * 3 // 2) if small else cfg.max_frames
    keep = sink.keep_work
    if small and not keep:
        ww, wh = ws, hs  # nothing kept at work size: let the decoder scale straight to detect size
    sizes = (ww, wh, ws, hs)
    pyav_error = None
    if cfg.backend in ("auto", "pyav"):
        try:
            ts, bad = _decode_pyav(src, cfg, info, sink, sizes, budget, start, end)
            if sink.count > 0 or cfg.backend == "pyav":
                return ts, bad, "pyav"
        except SourceError:
            raise
        except Exception as exc:  # a library failure: decord (its own FFmpeg build) gets a try in 'auto'
            if not is_input_error(exc):
                raise
            pyav_error = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            if cfg.backend == "pyav":
                raise SourceError(f"PyAV failed: {pyav_error}") from None
        sink.reset(keep)
    try:
        ts, bad = _decode_decord(src, cfg, info, sink, sizes, budget, start, end)
    except _DecordFailed as exc:
        first = f"PyAV failed: {pyav_error}; " if pyav_error else ""
        raise SourceError(f"{first}decord failed: {exc}") from None
    return ts, bad, "decord"
