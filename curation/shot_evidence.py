"""Evidence about a proposed cut, measured on the small detection frames (used by curation.shots).

- `thumbnails`: 16x9 HSV thumbnails and mean brightness of every frame (what the revert test compares).
- `revert_test`: does the picture from before a change come back soon after it (a flash, a glitch, a
  passing car), and which frames were the flash.
- `spike_ratio`: a frame's change score over its neighbours' (AdaptiveDetector's ratio), optionally with
  the frames of flashes left out of the neighbours.
- `edge_spikes`: frames where a burst of change starts or ends (one-sided spikes), which a two-sided mean
  hides when a cut is followed by a flash.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from curation.content_score import ADAPTIVE_MAX_RATIO, ADAPTIVE_ZERO_MEAN


def thumbnails(hsv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,9,16,3) float32 HSV thumbnails and (N,) mean brightness (HSV value) of the small frames, given as
    HSV (`curation.content_score.hsv_frames`, which shot detection converts once for its scores too)."""
    thumbs = np.empty((len(hsv), 9, 16, 3), np.float32)
    luma = np.empty(len(hsv), np.float32)
    for i, frame in enumerate(hsv):
        luma[i] = frame[..., 2].mean()
        thumbs[i] = cv2.resize(frame, (16, 9), interpolation=cv2.INTER_AREA)
    return thumbs, luma


def _distance(thumbs: np.ndarray, x: int, y: int) -> float:
    return float(np.abs(thumbs[x] - thumbs[y]).mean())


def revert_test(thumbs: np.ndarray, i: int, k: int) -> tuple[float, int, int]:
    """(revert_ratio, b, a) of a change at frame i; frames b+1 .. a-1 are the flash when the ratio is small.

    A flash is a change that reverts: the picture before it comes back after it (the flash, the glitch, the
    passing car are the frames between). A pair of a frame b < i and a frame a >= i, with a - b <= k + 1,
    qualifies when every frame between them is unlike both (farther from each than b is from a): a swinging
    camera can pass a framing that resembles the next shot, but the frames around that framing resemble it.
    Then revert_ratio = (distance(b, a) - drift) / distance across i. drift is what the shot's own motion
    changes over a - b frames (the smaller of the distances from b back and from a on over as many frames:
    one side may lie across another cut), so that a flash in a fast pan reverts as clearly as one in a still
    shot. It counts only when the shot goes on after a (`_persists`): a noise frame shortly after a cut can
    resemble the picture before the cut by chance, and motion explains nothing there.
    ~1 for a cut (no pair qualifies: (1.0, i-1, i)), ~0-0.3 for a flash.
    """
    n = len(thumbs)
    lo, hi = max(0, i - k), min(n, i + k + 1)
    flat = thumbs[lo:hi].reshape(hi - lo, -1)
    dist = np.abs(flat[:, None, :] - flat[None, :, :]).mean(-1)
    across = float(dist[i - 1 - lo, i - lo])
    best = (1.0, i - 1, i)
    if across <= 1e-6:
        return best
    for b in range(0, i - lo):
        for a in range(max(i - lo, b + 2), min(hi - lo, b + k + 2)):
            if np.minimum(dist[b, b + 1 : a], dist[b + 1 : a, a]).min() <= dist[b, a]:
                continue
            fb, fa, gap = b + lo, a + lo, a - b
            drift = 0.0
            if _persists(thumbs, fb, fa):
                drift = min((_distance(thumbs, x, x + gap) for x in (fb - gap, fa) if 0 <= x and x + gap < n),
                            default=0.0)
            ratio = max(0.0, float(dist[b, a]) - drift) / across
            if ratio < best[0]:
                best = (ratio, fb, fa)
    return best


def _persists(thumbs: np.ndarray, b: int, a: int) -> bool:
    """The picture at a stays for as long as the frames b+1 .. a-1 lasted: each of the next a - b - 1 frames
    is closer to frame a than to every one of those (a shot going on, not another flash frame)."""
    between = thumbs[b + 1 : a].reshape(a - b - 1, -1)
    for f in range(a + 1, min(len(thumbs), a + (a - b))):
        here = thumbs[f].reshape(-1)
        if _distance(thumbs, f, a) >= np.abs(between - here).mean(1).min():
            return False
    return True


def spike_ratio(scores: np.ndarray, i: int, window: int, masked: np.ndarray | None = None) -> float:
    """scores[i] over the mean score of the `window` frames on each side (frame 0, which has no score, and
    frames where `masked` is True left out), capped at ADAPTIVE_MAX_RATIO, which it also is when that mean
    is ~0 (ADAPTIVE_ZERO_MEAN), as in AdaptiveDetector."""
    lo, hi = max(1, i - window), min(len(scores), i + window + 1)
    nb = [j for j in range(lo, hi) if j != i and (masked is None or not masked[j])]
    mean = float(scores[nb].mean()) if nb else 0.0
    return min(float(scores[i]) / mean, ADAPTIVE_MAX_RATIO) if mean > ADAPTIVE_ZERO_MEAN else ADAPTIVE_MAX_RATIO


def edge_spikes(scores: np.ndarray, threshold: float, window: int, min_score: float) -> list[int]:
    """Frames whose score reaches `min_score` and `threshold` times the mean of the `window` frames on ONE
    side: where a burst of change starts or ends. A cut followed within a few frames by a flash is a burst
    of three or more large changes; AdaptiveDetector's two-sided mean hides every frame of it, but the cut is
    where the burst starts.

    Frame 0 has no score and is left out of every mean; near the ends a side holds fewer frames, and an
    empty side (frame 1's left, the last frame's right) never makes a spike.
    """
    s = np.asarray(scores)
    left, right = _side_means(s, window)

    def spikes_over(means: np.ndarray) -> np.ndarray:
        # threshold x mean in float64, compared in the scores' dtype; NaN (an empty side) compares False
        return s >= (threshold * means.astype(np.float64)).astype(s.dtype)

    hits = (s >= min_score) & (spikes_over(left) | spikes_over(right))
    hits[:1] = False
    return [int(i) for i in np.flatnonzero(hits)]


def _side_means(scores: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) of a 1-d float array: per frame i, the mean of scores[max(1, i - window) : i] and of
    scores[i + 1 : i + 1 + window] (frame 0, which has no score, left out), NaN for an empty side. Each
    value is the very number that slice's own `.mean()` gives (numpy's reduction over a sliding window,
    the shorter windows at both ends one by one), in the scores' dtype. A window under 1 has no sides."""
    s = np.asarray(scores)
    n = len(s)
    left = np.full(n, np.nan, s.dtype)
    right = np.full(n, np.nan, s.dtype)
    if window < 1:
        return left, right
    if n - 1 >= window:
        full = sliding_window_view(s[1:], window).mean(axis=-1)  # full[j] = mean of s[1 + j : 1 + j + window]
        left[window + 1 :] = full[: n - window - 1]
        right[1 : n - window] = full[1 : n - window]
    for i in range(2, min(window + 1, n)):  # shorter left sides (frame 1's is empty)
        left[i] = s[1:i].mean()
    for i in range(max(1, n - window), n - 1):  # shorter right sides (the last frame's is empty)
        right[i] = s[i + 1 :].mean()
    return left, right
