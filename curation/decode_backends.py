"""Decoding backends behind curation.decode: frame sizes, frame sinks, decord and PyAV passes.

Everything here runs inside the decoder child (see curation/decode.py for the isolation around it): it
must not use OpenCV, whose thread pool inherited through fork deadlocks in the child.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from curation.errors import SourceError
from curation.probe import ProbeInfo, open_container

if TYPE_CHECKING:
    from curation.decode import DecodeConfig

# --------------------------------------------------------------------------- sizes


def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def small_size(width: int, height: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(w, h) of the detection frames: detect_width wide, even height keeping the aspect."""
    return cfg.detect_width, _even(height * cfg.detect_width / width)


def work_size(width: int, height: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(w, h) of the work frames: long side <= work_max_side, even, never upscaled."""
    scale = min(1.0, cfg.work_max_side / max(width, height))
    w, h = _even(width * scale), _even(height * scale)
    # never upscale through rounding
    return min(w, width - width % 2 or 2), min(h, height - height % 2 or 2)


# --------------------------------------------------------------------------- frame sinks


class _MemorySink:
    """Collects batches in lists (in-process decoding)."""

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
            work = np.concatenate(self.work) if self.work else np.zeros((0, wh, ww, 3), np.uint8)
        return small, work


class _FileSink:
    """Streams batches into raw files in a scratch folder (child process); the parent maps them."""

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
    """Area (box) downscale of a batch. Pillow, not OpenCV: this runs in a forked child, and OpenCV's
    thread pool inherited from a parent that already used cv2 deadlocks there (seen in tests)."""
    from PIL import Image

    if work.shape[1:3] == (hs, ws):
        return work  # decoded straight at detect size
    h, w = work.shape[1:3]
    factor = min(w // ws, h // hs)  # integer box reduce first: 2.5x faster than a fractional resize
    out = np.empty((len(work), hs, ws, 3), np.uint8)
    for i, f in enumerate(work):
        img = Image.fromarray(f)
        if factor >= 2:
            img = img.reduce(factor)
        if img.size != (ws, hs):
            img = img.resize((ws, hs), Image.BOX)
        out[i] = np.asarray(img)
    return out


class _DecordFailed(Exception):
    """decord could not open or finish this source; the caller retries with PyAV."""


def _decode_decord(src, cfg, info: ProbeInfo, sink, sizes, budget_frames, start=0, end=None):
    import decord

    ww, wh, ws, hs = sizes
    resize = (ww, wh) != (info.width, info.height)
    try:
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
            work = vr.get_batch(idx).asnumpy()
            if work.shape[1:3] != (wh, ww):
                raise _DecordFailed(f"decord returned frames of {work.shape[2]}x{work.shape[1]}, wanted {ww}x{wh}")
            stamps.append(vr.get_frame_timestamp(idx)[:, 0].astype(np.float64))
            _add(sink, work, ws, hs, cfg, budget_frames)
    except (_DecordFailed, SourceError):
        raise
    except Exception as exc:  # decord raises RuntimeError / DECORDError with multi-line C++ messages
        raise _DecordFailed(" ".join(str(exc).split())[:200]) from None
    return (np.concatenate(stamps) if stamps else np.zeros(0)), 0


def _decode_pyav(src, cfg, info: ProbeInfo, sink, sizes, budget_frames, start=0, end=None):
    import av

    ww, wh, ws, hs = sizes
    container = open_container(src)
    stamps: list[float] = []
    bad = 0
    index = 0
    batch: list[np.ndarray] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if cfg.decoder_threads:
            stream.codec_context.thread_count = cfg.decoder_threads
        fps = info.fps or 25.0

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
                if index >= start and (end is None or index < end):
                    batch.append(frame.to_ndarray(format="rgb24", width=ww, height=wh))
                    stamps.append(float(frame.time) if frame.time is not None else index / fps)
                    if len(batch) >= cfg.batch_frames:
                        _add(sink, np.stack(batch), ws, hs, cfg, budget_frames)
                        batch = []
                index += 1
            if end is not None and index >= end:
                break
        if batch:
            _add(sink, np.stack(batch), ws, hs, cfg, budget_frames)
    finally:
        container.close()
    return np.asarray(stamps, np.float64), bad


def _add(sink, work, ws, hs, cfg, budget_frames):
    if sink.count + len(work) > cfg.max_frames:
        raise SourceError(f"video has more than max_frames={cfg.max_frames} frames")
    if sink.keep_work and sink.count + len(work) > budget_frames:
        sink.drop_work()  # over max_memory_mb: keep detection frames only, re-decode ranges later
    sink.add(work, _to_small(work, ws, hs) if ws else None)


def _decode_into(src, cfg, info, sink, start=0, end=None, small=True):
    """Decode with the configured backend(s) into `sink`; returns (timestamps, bad_frames, backend)."""
    ww, wh = work_size(info.width, info.height, cfg)
    ws, hs = small_size(info.width, info.height, cfg) if small else (0, 0)
    # decode_range (small=False) returns a caller-bounded range: no memory fallback there
    budget = max(0, cfg.max_memory_mb) * 2**20 // (ww * wh * 3) if small else cfg.max_frames
    keep = sink.keep_work
    if small and not keep:
        ww, wh = ws, hs  # nothing kept at work size: let the decoder scale straight to detect size
    sizes = (ww, wh, ws, hs)
    if cfg.backend in ("auto", "decord"):
        try:
            ts, bad = _decode_decord(src, cfg, info, sink, sizes, budget, start, end)
            if sink.count > 0 or cfg.backend == "decord":
                return ts, bad, "decord"
        except _DecordFailed as exc:
            if cfg.backend == "decord":
                raise SourceError(f"decord failed: {exc}") from None
        sink.reset(keep)
    ts, bad = _decode_pyav(src, cfg, info, sink, sizes, budget, start, end)
    return ts, bad, "pyav"
