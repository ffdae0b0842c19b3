"""Motion score (stage 4): how much the picture moves, in units that do not depend on size or frame rate.

`motion` = mean dense optical-flow magnitude (OpenCV Farneback on grayscale small frames) between
consecutive frames, in percent of the frame width per second. A tripod shot of a still scene is ~0, a slow
pan ~5-20, a whip pan well above 100. Only `max_pairs` evenly spread frame pairs are measured, on the small
(~128 px wide) frames the decoder already made, so a clip costs a few milliseconds.

`flicker` = mean jump of the global mean brightness between consecutive frames, in percent of the 8-bit
range. Camera or object motion hardly moves the global mean; strobes, flashes and uniform frames that
alternate with content do (and Farneback sees no flow between two flat frames, so `motion` alone misses
them).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class MotionConfig:
    """Motion and flicker scores (`scores.motion`)."""

    max_pairs: int = 16
    """Consecutive-frame pairs measured per clip, spread evenly over it (cost is linear in this)."""
    width: int = 128
    """Frames are resized to this width (keeping aspect) before the flow; fixes the cost per pair."""
    pyr_levels: int = 3
    """Farneback pyramid levels: 3 at 128 px follows displacements up to ~30 px per frame."""
    win_size: int = 15
    """Farneback averaging window (pixels)."""
    global_seed: bool = True
    """Seed the flow with the global shift found by phase correlation (measures fast pans correctly)."""
    seed_min_response: float = 0.05
    """Phase-correlation peak strength below which the global shift is not trusted (no seed)."""


def _gray(frames: np.ndarray, width: int) -> np.ndarray:
    """(K, h, w, 3) uint8 RGB -> (K, h', width) uint8 gray."""
    h, w = frames.shape[1:3]
    out_w = min(width, w)
    out_h = max(8, round(h * out_w / w))
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    if (out_h, out_w) != (h, w):
        gray = [cv2.resize(g, (out_w, out_h), interpolation=cv2.INTER_AREA) for g in gray]
    return np.stack(gray)


def _flow(a: np.ndarray, b: np.ndarray, cfg: MotionConfig, window: np.ndarray) -> np.ndarray:
    """Dense flow a -> b (h, w, 2) in pixels. Farneback alone loses displacements beyond ~10 px on small
    frames (too few pyramid levels fit), so a global shift from phase correlation seeds it: whip pans are
    then measured, not clipped."""
    init = None
    flags = 0
    if cfg.global_seed:
        (dx, dy), response = cv2.phaseCorrelate(a.astype(np.float32), b.astype(np.float32), window)
        if response >= cfg.seed_min_response and (abs(dx) >= 1.0 or abs(dy) >= 1.0):
            init = np.empty((*a.shape, 2), np.float32)
            init[..., 0], init[..., 1] = dx, dy
            flags = cv2.OPTFLOW_USE_INITIAL_FLOW
    return cv2.calcOpticalFlowFarneback(a, b, init, 0.5, cfg.pyr_levels, cfg.win_size, 3, 5, 1.2, flags)


def pair_indices(num_frames: int, max_pairs: int) -> list[int]:
    """First frames i of the measured pairs (i, i+1), spread evenly over the clip."""
    n = num_frames - 1
    if n <= 0:
        return []
    if n <= max_pairs:
        return list(range(n))
    return sorted({int((k + 0.5) * n / max_pairs) for k in range(max_pairs)})


def motion_scores(small_frames: np.ndarray, fps: float, cfg: MotionConfig) -> dict[str, float]:
    """{"motion": % of width per second, "flicker": % of range per frame} for (T, h, w, 3) uint8 RGB frames.

    NaN for both when the clip has fewer than 2 frames or fps is not positive.
    """
    frames = np.asarray(small_frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"motion_scores expects (T, h, w, 3) uint8 frames, got shape {frames.shape}")
    starts = pair_indices(len(frames), cfg.max_pairs)
    if not starts or not fps or fps <= 0 or not np.isfinite(fps):
        return {"motion": float("nan"), "flicker": float("nan")}
    needed = sorted(set(starts) | {i + 1 for i in starts})
    gray = dict(zip(needed, _gray(frames[needed], cfg.width)))
    first = next(iter(gray.values()))
    width = first.shape[1]
    window = cv2.createHanningWindow((first.shape[1], first.shape[0]), cv2.CV_32F)
    flows, jumps = [], []
    for i in starts:
        a, b = gray[i], gray[i + 1]
        flow = _flow(a, b, cfg, window)
        flows.append(float(np.sqrt((flow * flow).sum(axis=-1)).mean()))
        jumps.append(abs(float(a.mean()) - float(b.mean())))
    motion = float(np.mean(flows)) / width * 100.0 * float(fps)
    flicker = float(np.mean(jumps)) / 255.0 * 100.0
    return {"motion": motion, "flicker": flicker}


def motion_score(small_frames: np.ndarray, fps: float, cfg: MotionConfig) -> float:
    """Mean optical-flow magnitude in % of frame width per second (see module docstring)."""
    return motion_scores(small_frames, fps, cfg)["motion"]
