"""PySceneDetect's frame scores and cut proposals, computed over a whole array of frames at once.

PySceneDetect's detectors take one frame per Python call: each call converts the frame to HSV, splits the
channels and compares them with the previous frame, and wraps the frame number in a FrameTimecode. On the
small (~128 px) detection frames that bookkeeping costs more than the arithmetic. This module computes the
same numbers from an array of HSV frames (which shot detection converts anyway for its thumbnails):

- `content_values`: ContentDetector's `content_val` with the default weights (hue, saturation and value
  1.0, edges 0.0): the mean absolute difference of each HSV channel between a frame and the previous one,
  averaged over the three channels. Same float64 arithmetic, in the same order, as
  `scenedetect.detectors.content_detector` (exact integer sums, one division per channel), so the values
  are bit-identical.
- `adaptive_cuts`: AdaptiveDetector's decision (its rolling-average ratio, `min_content_val`), with
  `min_scene_len=0` as shot detection uses it.
- `content_cuts`: ContentDetector's decision (`content_val >= threshold`), with `min_scene_len=0`.

Frame 0 has no previous frame: its score is 0.0, and it is never a cut. Equality with the library is what
tests/unit/test_content_score.py checks, on the shared videos and on constructed worst cases.
"""

from __future__ import annotations

import cv2
import numpy as np

ADAPTIVE_MAX_RATIO = 255.0
"""AdaptiveDetector caps its ratio here (and uses it when the neighbours' mean is zero)."""
ADAPTIVE_ZERO_MEAN = 0.00001
"""AdaptiveDetector treats a neighbours' mean below this as zero."""


def hsv_frames(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W, 3) uint8 HSV (OpenCV's 8-bit HSV: hue 0-179)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"hsv_frames expects (N, H, W, 3) uint8 RGB frames, got {rgb.shape} {rgb.dtype}")
    out = np.empty_like(rgb)
    for i, frame in enumerate(rgb):
        cv2.cvtColor(frame, cv2.COLOR_RGB2HSV, dst=out[i])
    return out


def content_values(hsv: np.ndarray) -> np.ndarray:
    """(N,) float64 `content_val` of each frame against the previous one (0.0 for frame 0).

    `hsv`: (N, H, W, 3) uint8 from `hsv_frames`. Equal to what ContentDetector / AdaptiveDetector with
    default weights compute frame by frame (the BGR frame they get converts to the same HSV).
    """
    hsv = np.asarray(hsv)
    if hsv.ndim != 4 or hsv.shape[-1] != 3 or hsv.dtype != np.uint8:
        raise ValueError(f"content_values expects (N, H, W, 3) uint8 HSV frames, got {hsv.shape} {hsv.dtype}")
    n = len(hsv)
    sums = np.zeros((n, 3), np.float64)
    diff = np.empty(hsv.shape[1:], np.uint8)
    for i in range(1, n):
        # |a - b| of uint8 is exact in uint8; the per-channel sums are exact integers in float64
        cv2.absdiff(hsv[i], hsv[i - 1], dst=diff)
        sums[i] = cv2.sumElems(diff)[:3]
    num_pixels = float(hsv.shape[1] * hsv.shape[2])
    delta = sums / num_pixels  # per channel, as _mean_pixel_distance: exact sum / pixel count
    # sum(component * weight) / sum(|weight|) with weights (1, 1, 1, 0), summed left to right
    scores = ((delta[:, 0] + delta[:, 1]) + delta[:, 2] + 0.0) / 3.0
    scores[0] = 0.0
    return scores


def adaptive_cuts(scores: np.ndarray, adaptive_threshold: float, window_width: int,
                  min_content_val: float) -> list[int]:
    """AdaptiveDetector's cuts (min_scene_len=0) from `content_values`.

    Frame t is a cut when its score over the mean of the `window_width` scores on each side reaches
    `adaptive_threshold` (the ratio capped at 255; 255 when that mean is ~0 and the score reaches
    `min_content_val`) and its score reaches `min_content_val`. Frames without a full window on both sides
    are never cuts (the detector never looks at them either).
    """
    if window_width < 1:
        raise ValueError("window_width must be at least 1")
    s = np.asarray(scores, np.float64)
    w = int(window_width)
    n = len(s)
    if n < 2 * w + 1:
        return []
    target = s[w : n - w]
    # the neighbours' sum in the detector's order: left to right, skipping the target
    total = np.zeros(len(target))
    for k in range(2 * w + 1):
        if k != w:
            total = total + s[k : n - 2 * w + k]
    mean = total / (2.0 * w)
    zero = np.abs(mean) < ADAPTIVE_ZERO_MEAN
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(zero, 0.0, np.minimum(target / np.where(zero, 1.0, mean), ADAPTIVE_MAX_RATIO))
    ratio = np.where(zero & (target >= min_content_val), ADAPTIVE_MAX_RATIO, ratio)
    hits = (ratio >= adaptive_threshold) & (target >= min_content_val)
    return [int(i) + w for i in np.flatnonzero(hits) if 0 < int(i) + w]


def content_cuts(scores: np.ndarray, threshold: float) -> list[int]:
    """ContentDetector's cuts (min_scene_len=0): frames whose score reaches `threshold` (never frame 0)."""
    s = np.asarray(scores, np.float64)
    return [int(i) for i in np.flatnonzero(s >= threshold) if i > 0]
