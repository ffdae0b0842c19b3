"""Work-size frames kept as planar YUV 4:2:0 (I420): what decoders produce and the H.264 encoder takes.

Shape legend: N frames of H x W pixels (both even). One I420 frame is a (H * 3 // 2, W) uint8 array: H rows
of Y, then U (H/2 x W/2) and V (H/2 x W/2) packed one after the other into the last H/2 rows. That is the
layout OpenCV's COLOR_YUV2RGB_I420 reads and PyAV's VideoFrame.from_ndarray(format="yuv420p") takes.

Why not RGB: converting every decoded frame to RGB costs more CPU than decoding it (1280x720 H.264:
~1.2 ms to decode, ~2 ms for swscale's RGB conversion, measured), and the encoder converts it straight back
to YUV. So frames stay YUV at half the bytes of RGB; RGB is made only for the few frames a score looks at
(`YuvFrames.rgb`). Colour conversions are BT.601 limited range, FFmpeg's default for RGB output (the same
numbers decord gives).
"""

from __future__ import annotations

import cv2
import numpy as np


def plane_views(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y, U, V) views of one (H * 3 // 2, W) I420 frame: (H, W), (H/2, W/2), (H/2, W/2)."""
    h, w = frame.shape[0] * 2 // 3, frame.shape[1]
    flat = frame.reshape(-1)
    n_y, n_c = h * w, (h // 2) * (w // 2)
    return (flat[:n_y].reshape(h, w), flat[n_y:n_y + n_c].reshape(h // 2, w // 2),
            flat[n_y + n_c:].reshape(h // 2, w // 2))


def resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Downscale one 8-bit plane to (height, width) without aliasing, cheaply.

    OpenCV's INTER_AREA is ~5x slower for fractional factors than for integer ones, so a strong downscale
    first box-filters by the largest integer factor (exact when the size divides), then finishes with a
    bilinear step of less than 2x, which does not alias.
    """
    h, w = plane.shape
    if (w, h) == (width, height):
        return plane
    factor = min(w // width, h // height)
    if factor >= 2:
        plane = cv2.resize(plane, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        if plane.shape == (height, width):
            return plane
    return cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)


def pack_i420(y: np.ndarray, u: np.ndarray, v: np.ndarray, width: int, height: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Resize the three planes (any sizes) to a (height, width) frame and pack them as I420 into `out`."""
    if out is None:
        out = np.empty((height * 3 // 2, width), np.uint8)
    oy, ou, ov = plane_views(out)
    oy[...] = resize_plane(y, width, height)
    ou[...] = resize_plane(u, width // 2, height // 2)
    ov[...] = resize_plane(v, width // 2, height // 2)
    return out


def i420_to_rgb(frame: np.ndarray, width: int | None = None, height: int | None = None) -> np.ndarray:
    """One I420 frame -> (h, w, 3) uint8 RGB, optionally downscaled first (in YUV: cheaper)."""
    h, w = frame.shape[0] * 2 // 3, frame.shape[1]
    if width is not None and (width, height) != (w, h):
        frame = pack_i420(*plane_views(frame), width, height)
    return cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_I420)


def rgb_to_i420(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB with even sides -> (H * 3 // 2, W) I420."""
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2YUV_I420)


class YuvFrames:
    """N frames of one clip or source at work size, stored as I420 (see the module docstring).

    Indexing with a slice or a list of indices gives another YuvFrames (a view for slices); `rgb` converts.
    """

    def __init__(self, i420: np.ndarray):
        i420 = np.asarray(i420)
        if i420.ndim != 3 or i420.dtype != np.uint8 or i420.shape[1] % 3 or i420.shape[2] % 2:
            raise ValueError(f"YuvFrames wants (N, H * 3 // 2, W) uint8 with H, W even, got {i420.shape} {i420.dtype}")
        self.i420 = i420

    @classmethod
    def from_rgb(cls, frames: np.ndarray) -> YuvFrames:
        """(N, H, W, 3) uint8 RGB with even H, W -> YuvFrames."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"YuvFrames.from_rgb wants (N, H, W, 3) with H, W even, got {frames.shape}")
        out = np.empty((len(frames), frames.shape[1] * 3 // 2, frames.shape[2]), np.uint8)
        for i, f in enumerate(frames):
            out[i] = rgb_to_i420(f)
        return cls(out)

    @property
    def width(self) -> int:
        return int(self.i420.shape[2])

    @property
    def height(self) -> int:
        return int(self.i420.shape[1] * 2 // 3)

    def __len__(self) -> int:
        return len(self.i420)

    def __getitem__(self, key) -> YuvFrames:
        if isinstance(key, (int, np.integer)):
            key = [int(key)]
        return YuvFrames(self.i420[key])

    def rgb(self, indices=None, width: int | None = None, height: int | None = None) -> np.ndarray:
        """(k, h, w, 3) uint8 RGB of the frames at `indices` (all when None), optionally downscaled."""
        idx = range(len(self)) if indices is None else indices
        w, h = (width, height) if width is not None else (self.width, self.height)
        out = np.empty((len(idx), h, w, 3), np.uint8)
        for j, i in enumerate(idx):
            out[j] = i420_to_rgb(self.i420[i], w, h)
        return out

    def resized(self, width: int, height: int) -> YuvFrames:
        """The same frames downscaled to (height, width) (even sizes); self when the size already matches."""
        if (width, height) == (self.width, self.height):
            return self
        if width % 2 or height % 2:
            raise ValueError(f"YuvFrames.resized: sizes must be even, got {width}x{height}")
        out = np.empty((len(self), height * 3 // 2, width), np.uint8)
        for i, f in enumerate(self.i420):
            pack_i420(*plane_views(f), width, height, out=out[i])
        return YuvFrames(out)
