"""Shot boundary accuracy on the real clips of ../shared/data/videos against ground_truth.json.

Scoring: a detected cut within +-3 frames of a listed hard cut is a true positive (each listed cut
matches at most once); a detection inside a listed gradual transition counts neither way; every other
detection is a false positive. Targets: overall F1 >= 0.95, no cut inside any `in_shot_distractors`
range, and strictly better than PySceneDetect's default AdaptiveDetector and ContentDetector fed the
same frames.
"""

from __future__ import annotations

import numpy as np
import pytest

from curation.decode import DecodeConfig, decode_video
from curation.shots import ShotConfig, detect_cuts, run_scenedetect

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
    if tp + fp + fn == 0:
        return 1.0  # nothing to find and nothing claimed
    return 2 * tp / (2 * tp + fp + fn)


def cuts_in_distractors(detected: list[int], truth: dict) -> list[tuple[int, str]]:
    return [(d, x["type"]) for x in truth.get("in_shot_distractors", []) for d in detected
            if x["start"] <= d <= x["end"]]


@pytest.fixture(scope="module")
def decoded(shared_videos, ground_truth):
    """Every shared video decoded once (detection frames only) for the whole module."""
    cfg = DecodeConfig(keep_frames=False)
    return {name: decode_video(shared_videos / name, cfg) for name in ground_truth}


def _evaluate(decoded, ground_truth, detector):
    per_video, totals = {}, np.zeros(3, int)
    detections = {}
    for name, video in decoded.items():
        cuts = detector(video)
        detections[name] = cuts
        counts = score_video(cuts, ground_truth[name])
        totals += counts
        per_video[name] = f1(*counts)
    return f1(*totals), per_video, detections


def _scenedetect_default(kind):
    from scenedetect.detectors import AdaptiveDetector, ContentDetector

    make = {"adaptive": AdaptiveDetector, "content": ContentDetector}[kind]
    return lambda video: run_scenedetect(video.small, video.fps, make())[1]


def test_frame_counts_match_ground_truth(decoded, ground_truth):
    for name, video in decoded.items():
        assert video.num_frames == ground_truth[name]["frames"], name
        assert abs(video.fps - ground_truth[name]["fps"]) < 0.01, name


def test_shot_accuracy_beats_scenedetect_defaults(decoded, ground_truth):
    ours_cfg = ShotConfig()  # adaptive + flash suppression + TransNetV2 second opinion
    ours, ours_per, ours_cuts = _evaluate(decoded, ground_truth, lambda v: detect_cuts(v.small, v.fps, ours_cfg))
    plain_cfg = ShotConfig(second_opinion="none")
    plain, plain_per, _ = _evaluate(decoded, ground_truth, lambda v: detect_cuts(v.small, v.fps, plain_cfg))
    ref = {k: _evaluate(decoded, ground_truth, _scenedetect_default(k)) for k in ("adaptive", "content")}

    print(f"\n{'video':34s} {'ours':>6s} {'no-2nd':>6s} {'sd-adapt':>8s} {'sd-cont':>8s}  our cuts")
    for name in decoded:
        print(f"{name:34s} {ours_per[name]:6.3f} {plain_per[name]:6.3f} {ref['adaptive'][1][name]:8.3f} "
              f"{ref['content'][1][name]:8.3f}  {ours_cuts[name]}")
    print(f"{'OVERALL F1':34s} {ours:6.3f} {plain:6.3f} {ref['adaptive'][0]:8.3f} {ref['content'][0]:8.3f}")

    assert ours >= 0.95
    for name, cuts in ours_cuts.items():
        assert not cuts_in_distractors(cuts, ground_truth[name]), (name, cuts_in_distractors(cuts, ground_truth[name]))
    assert ours > ref["adaptive"][0] and ours > ref["content"][0]


def test_full_decode_path_gives_same_cuts(shared_videos, ground_truth, decoded):
    """The pipeline's path (work frames kept, small frames downscaled from them) detects the same cuts."""
    cfg = ShotConfig(second_opinion="none")
    for name in ("clip_01_tears_of_steel.mp4", "pyscenedetect/counter.mp4"):
        full = decode_video(shared_videos / name, DecodeConfig(work_max_side=320))
        assert full.frames is not None and full.num_frames == decoded[name].num_frames
        assert detect_cuts(full.small, full.fps, cfg) == detect_cuts(decoded[name].small, decoded[name].fps, cfg)
        assert score_video(detect_cuts(full.small, full.fps, cfg), ground_truth[name])[1:] == (0, 0)


def test_second_opinion_is_right_on_every_doubtful_candidate(decoded, ground_truth):
    """TransNetV2 (64-frame windows) decides the doubtful candidates the way the hand-checked truth does."""
    from curation.shots import classify_candidates

    asked = 0
    for name, video in decoded.items():
        for c in classify_candidates(video.small, video.fps, ShotConfig()):
            if c.second_opinion is None:
                continue
            asked += 1
            true_cut = any(abs(c.frame - t) <= TOLERANCE for t in ground_truth[name]["cuts"])
            assert (c.verdict == "cut") == true_cut, (name, c.frame, c.second_opinion)
    assert asked >= 2  # the shared clips do have doubtful candidates (a weak cut and a flash-like change)
