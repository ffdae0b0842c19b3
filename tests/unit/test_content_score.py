"""curation.content_score gives exactly PySceneDetect's content_val and cuts, on real and constructed frames.

The reference is PySceneDetect itself, fed frame by frame as its own video loop does (BGR frames, one
FrameTimecode each: tests/shot_scoring.run_scenedetect, the same feeder as the accuracy anchor), with a
StatsManager to read every frame's content_val as the library records it.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from curation import content_score
from curation.decode import decode_video
from curation.decode_types import DecodeConfig
from tests import synth
from tests.shot_scoring import run_scenedetect


def reference(frames: np.ndarray, detector: str, fps: float = 24.0, **kwargs) -> tuple[np.ndarray, list[int]]:
    """(content_val per frame as float64, cuts) from PySceneDetect's AdaptiveDetector / ContentDetector."""
    from scenedetect import FrameTimecode
    from scenedetect.detectors import AdaptiveDetector, ContentDetector
    from scenedetect.stats_manager import StatsManager

    det = (AdaptiveDetector(min_scene_len=0, **kwargs) if detector == "adaptive"
           else ContentDetector(min_scene_len=0, **kwargs))
    stats = StatsManager()
    det.stats_manager = stats
    cuts = run_scenedetect(frames, fps, det)
    key = ContentDetector.FRAME_SCORE_KEY
    scores = np.zeros(len(frames))
    for i in range(1, len(frames)):
        scores[i] = stats.get_metrics(FrameTimecode(i, fps), [key])[0]
    return scores, cuts


def ours(frames: np.ndarray, detector: str, **kwargs) -> tuple[np.ndarray, list[int]]:
    scores = content_score.content_values(content_score.hsv_frames(frames))
    if detector == "adaptive":
        cuts = content_score.adaptive_cuts(scores, kwargs.get("adaptive_threshold", 3.0),
                                           kwargs.get("window_width", 2), kwargs.get("min_content_val", 15.0))
    else:
        cuts = content_score.content_cuts(scores, kwargs.get("threshold", 27.0))
    return scores, cuts


def assert_same(frames: np.ndarray, detector: str, **kwargs) -> tuple[np.ndarray, list[int]]:
    want_scores, want_cuts = reference(frames, detector, **kwargs)
    got_scores, got_cuts = ours(frames, detector, **kwargs)
    assert got_scores.dtype == np.float64
    np.testing.assert_array_equal(got_scores, want_scores)  # bit for bit, not approximately
    assert got_cuts == want_cuts
    return got_scores, got_cuts


@pytest.fixture(scope="module")
def shared_small(shared_videos, ground_truth):
    """The detection frames of every shared video, as the job decodes them."""
    cfg = DecodeConfig(keep_frames=False)
    return {name: decode_video(shared_videos / name, cfg).small for name in ground_truth}


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_equal_to_pyscenedetect_on_the_shared_videos(shared_small, detector):
    total_cuts = 0
    for name, small in shared_small.items():
        scores, cuts = assert_same(small, detector)
        total_cuts += len(cuts)
    assert total_cuts >= 10  # the videos do have cuts: the equality is not one of empty lists


@pytest.mark.parametrize("window_width", [1, 2, 3])
@pytest.mark.parametrize("adaptive_threshold", [1.5, 3.0])
def test_adaptive_settings_on_constructed_frames(window_width, adaptive_threshold):
    shots, _ = synth.shots_frames([9, 3, 14, 2, 20], seed=4)  # short shots: windows overlap several cuts
    frames = np.concatenate([shots, synth.flash_frames(n=16, flash_at=8), synth.fade_frames(6, 3, 6)])
    _, cuts = assert_same(frames, "adaptive", window_width=window_width, adaptive_threshold=adaptive_threshold,
                          min_content_val=10.0)
    assert cuts


def test_flat_frames_take_the_zero_mean_branch():
    """Constant frames around a jump: the neighbours' mean is 0, so the ratio is 255 (or 0 under
    min_content_val): both branches of AdaptiveDetector's division guard."""
    h, w = 40, 64
    levels = [0] * 6 + [200] + [200] * 6 + [210] + [210] * 6
    frames = np.stack([np.full((h, w, 3), v, np.uint8) for v in levels])
    for min_val in (5.0, 15.0, 100.0):
        assert_same(frames, "adaptive", min_content_val=min_val)


def test_ratio_exactly_at_the_threshold_is_a_cut():
    """Gray frames brightening by 3 levels a frame (content_val 1.0), with one jump of 9 (content_val 3.0):
    the ratio is exactly 3.0, which AdaptiveDetector counts as reaching adaptive_threshold=3.0."""
    levels = [10, 13, 16, 19, 28, 31, 34, 37, 40]
    frames = np.stack([np.full((24, 32, 3), v, np.uint8) for v in levels])
    scores, cuts = assert_same(frames, "adaptive", adaptive_threshold=3.0, min_content_val=2.0)
    assert scores[4] == 3.0 and cuts == [4]


def test_noise_odd_sizes_and_short_inputs():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (30, 37, 53, 3), dtype=np.uint8)  # odd sizes, scores far above any threshold
    assert_same(noise, "adaptive")
    assert_same(noise, "content", threshold=60.0)
    for n in (1, 2, 4, 5, 6):  # fewer frames than one adaptive window, and just enough
        assert_same(noise[:n], "adaptive")
        assert_same(noise[:n], "content")


def test_hsv_is_what_pyscenedetect_converts():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)
    for frame, hsv in zip(rgb, content_score.hsv_frames(rgb)):
        np.testing.assert_array_equal(hsv, cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2HSV))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        content_score.hsv_frames(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="HSV"):
        content_score.content_values(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="window_width"):
        content_score.adaptive_cuts(np.zeros(10), 3.0, 0, 15.0)
