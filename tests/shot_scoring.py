"""Scoring of shot-boundary detections against ground truth, and the detectors they are compared with.

Scoring (as for ../shared/data/videos/ground_truth.json): a detected cut within +-TOLERANCE frames of a
listed hard cut is a true positive (each listed cut matches at most once, nearest first); a detection inside
a listed gradual transition counts neither way; every other detection is a false positive. A detection
inside an `in_shot_distractors` range is also a "split at a flash" (`cuts_in_distractors`).

Used by tests/unit/test_shot_accuracy.py and bench/shot_accuracy.py, so both score the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from curation.shots import ShotConfig, detect_cuts

TOLERANCE = 3


def score_video(detected: list[int], truth: dict) -> tuple[int, int, int]:
    """(tp, fp, fn) of `detected` against one ground-truth entry."""
    gradual = [(g["start"], g["end"]) for g in truth.get("gradual_transitions", [])]
    unmatched = list(truth["cuts"])
    tp = fp = 0
    for d in sorted(detected):
        near = [c for c in unmatched if abs(c - d) <= TOLERANCE]
        if near:
            unmatched.remove(min(near, key=lambda c: abs(c - d)))
            tp += 1
        elif any(lo <= d <= hi for lo, hi in gradual):
            continue
        else:
            fp += 1
    return tp, fp, len(unmatched)


def f1(tp: int, fp: int, fn: int) -> float:
    """F1 of the counts; 1.0 when there was nothing to find and nothing was claimed."""
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def cuts_in_distractors(detected: list[int], truth: dict) -> list[tuple[int, str]]:
    """Detections inside an in-shot distractor range (inclusive), with the distractor's type."""
    return [(d, x["type"]) for x in truth.get("in_shot_distractors", []) for d in detected
            if x["start"] <= d <= x["end"]]


Detector = Callable[[np.ndarray, float], list[int]]
"""A detector: (small RGB frames, fps) -> cut frames."""


def ours(cfg: ShotConfig | None = None, second_opinion=None) -> Detector:
    """The curation job's detector (curation.shots.detect_cuts)."""
    cfg = cfg or ShotConfig()
    return lambda small, fps: detect_cuts(small, fps, cfg, second_opinion)


def run_scenedetect(small: np.ndarray, fps: float, detector) -> list[int]:
    """Feed RGB frames to a PySceneDetect detector, frame by frame as the library's own video loop does
    (BGR frames, one FrameTimecode each, then post_process); returns the cut frames. The anchor the curation
    detector is compared with. A detector given a StatsManager (`detector.stats_manager`) records every
    frame's metrics there, as in the library."""
    from scenedetect import FrameTimecode

    fps = float(fps)  # FrameTimecode rejects ints
    cuts: list[int] = []
    tc = None
    for i, frame in enumerate(small):
        tc = FrameTimecode(i, fps)
        cuts += [c.frame_num for c in detector.process_frame(tc, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))]
    if tc is not None:
        cuts += [c.frame_num for c in detector.post_process(tc)]
    return sorted(set(c for c in cuts if 0 < c < len(small)))


def scenedetect_default(kind: str) -> Detector:
    """PySceneDetect's AdaptiveDetector() or ContentDetector() with default settings, fed the same frames."""
    from scenedetect.detectors import AdaptiveDetector, ContentDetector

    make = {"adaptive": AdaptiveDetector, "content": ContentDetector}[kind]
    return lambda small, fps: run_scenedetect(small, fps, make())


def transnet_alone(scorer, threshold: float = 0.5) -> Detector:
    """TransNetV2 on every frame, as its reference inference does it (100-frame windows, stride 50, frames at
    48x27) and its `predictions_to_scenes`: a cut at the first frame after each run of frames above
    `threshold`. `scorer`: a curation.transnet.TransNetScorer."""
    import torch

    def detect(small, fps):
        tiny = np.stack([cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in small])
        with torch.inference_mode():
            single, _ = scorer.model.predict_frames(torch.from_numpy(tiny), quiet=True)
        scenes = scorer.model.predictions_to_scenes(single.float().numpy(), threshold)
        return [int(s) for s, _ in scenes[1:]]

    return detect


def evaluate(videos: dict[str, tuple[np.ndarray, float]], truth: dict[str, dict], detector: Detector,
             group: Callable[[str], str]) -> dict[str, dict]:
    """Run `detector` on every video; totals per group (e.g. per set): {group: {tp, fp, fn, f1, splits,
    cuts: {video: detections}}}, plus 'ALL'."""
    out: dict[str, dict] = {}
    for name, (small, fps) in videos.items():
        cuts = detector(small, fps)
        for key in (group(name), "ALL"):
            row = out.setdefault(key, {"tp": 0, "fp": 0, "fn": 0, "splits": [], "cuts": {}})
            for k, v in zip(("tp", "fp", "fn"), score_video(cuts, truth[name])):
                row[k] += v
            row["splits"] += [(name, *s) for s in cuts_in_distractors(cuts, truth[name])]
            row["cuts"][name] = cuts
    for row in out.values():
        row["f1"] = f1(row["tp"], row["fp"], row["fn"])
    return out
