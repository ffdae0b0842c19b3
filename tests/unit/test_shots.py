"""Shot detection and clip spans on synthetic frames with known answers (no Ray, no shared data)."""

from __future__ import annotations

import random

import pytest

from curation.decode import DecodeConfig, decode_video
from curation.shots import (ClipSpan, SecondOpinion, ShotConfig, classify_candidates, detect_cuts, make_detector,
                            run_scenedetect, shots_to_clips)
from tests import synth

PLAIN = ShotConfig(second_opinion="none")


@pytest.fixture(scope="module")
def second_opinion():
    """One TransNetV2 for the module (the pipeline loads one per actor the same way)."""
    return SecondOpinion(ShotConfig())


def test_cuts_of_an_encoded_video_are_frame_exact(tmp_path, second_opinion):
    path, cuts = synth.write_shots_video(tmp_path / "shots.mp4", (30, 24, 36))
    video = decode_video(path, DecodeConfig())
    assert detect_cuts(video.small, video.fps, PLAIN) == cuts
    assert detect_cuts(video.small, video.fps, ShotConfig(), second_opinion) == cuts
    assert detect_cuts(video.small, video.fps, ShotConfig(detector="content", second_opinion="none")) == cuts


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_content_val_equals_pyscenedetects_own_statistics(detector):
    """run_scenedetect reads content_val without a StatsManager (which would cost Canny edges per frame):
    the same values and cuts as PySceneDetect's statistics give."""
    import cv2
    import numpy as np
    from scenedetect import FrameTimecode
    from scenedetect.detectors import ContentDetector
    from scenedetect.stats_manager import StatsManager

    frames, _ = synth.shots_frames([30, 24, 36])
    frames = np.concatenate([frames, synth.flash_frames(n=24, flash_at=12)])
    cfg = ShotConfig(detector=detector)
    scores, cuts = run_scenedetect(frames, 24.0, make_detector(cfg))
    ref, stats, ref_cuts = make_detector(cfg), StatsManager(), []
    ref.stats_manager = stats
    for i, f in enumerate(frames):
        bgr = cv2.cvtColor(f, cv2.COLOR_RGB2BGR)
        ref_cuts += [c.frame_num for c in ref.process_frame(FrameTimecode(i, 24.0), bgr)]
    ref_cuts += [c.frame_num for c in ref.post_process(FrameTimecode(len(frames) - 1, 24.0))]
    key = ContentDetector.FRAME_SCORE_KEY
    want = [stats.get_metrics(FrameTimecode(i, 24.0), [key])[0] for i in range(1, len(frames))]
    assert np.allclose(scores[1:], want, rtol=1e-6) and scores[0] == 0.0
    assert scores.max() > 20  # the cuts are there to be seen
    assert cuts == sorted(set(c for c in ref_cuts if 0 < c < len(frames)))


def test_single_frame_flash_is_not_a_cut(second_opinion):
    frames = synth.flash_frames(n=48, flash_at=24)
    cands = classify_candidates(frames, 24.0, PLAIN)
    # PySceneDetect proposes both edges of the flash; the revert test rejects them
    assert {c.frame for c in cands} >= {24, 25} and all(c.verdict == "flash" for c in cands)
    assert detect_cuts(frames, 24.0, ShotConfig(), second_opinion) == []


@pytest.mark.parametrize("make", [synth.fade_frames, synth.static_frames], ids=["fade", "static"])
def test_fades_and_static_shots_have_no_cut(make, second_opinion):
    frames = make()
    assert detect_cuts(frames, 24.0, PLAIN) == []
    assert detect_cuts(frames, 24.0, ShotConfig(), second_opinion) == []


def test_short_shots_are_found():
    frames, cuts = synth.shots_frames([10, 10, 10], seed=2)  # 1 s shots at 10 fps, like counter.mp4
    assert detect_cuts(frames, 10.0, PLAIN) == cuts == [10, 20]


def test_second_opinion_scores_cut_high_and_flash_low(second_opinion):
    frames, _ = synth.shots_frames([60, 60])
    flash = synth.flash_frames(n=100, flash_at=50)
    at_cut = second_opinion.cut_probabilities(frames, [60, 30])
    at_flash = second_opinion.cut_probabilities(flash, [50])
    assert at_cut[60] > 0.5 > at_cut[30]
    assert at_flash[50] < 0.5


def test_loading_transnet_leaves_torch_global_state_alone():
    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
    opinion = SecondOpinion(ShotConfig(transnet_weights=None))
    assert opinion._scorer is None  # the model loads on first use, not at construction
    assert opinion.scorer.model is not None
    assert torch.are_deterministic_algorithms_enabled() == before[0]
    assert torch.equal(torch.get_rng_state(), before[1])


def test_missing_transnet_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=str(missing)):
        SecondOpinion(ShotConfig(transnet_weights=str(missing)))


@pytest.mark.parametrize("field, value", [("detector", "histogram"), ("second_opinion", "gpt")])
def test_unknown_registry_keys_list_the_valid_ones(field, value):
    with pytest.raises(ValueError, match=r"valid keys are \["):
        ShotConfig(**{field: value})


# --------------------------------------------------------------------------- shots_to_clips


def test_clips_trim_drop_and_split():
    cfg = ShotConfig(min_shot_s=1.0, max_clip_s=2.0, trim_start_frames=1, trim_end_frames=1)
    # shots at 10 fps: [0,5) too short, [5,30) 25 frames -> 23 after trim -> split into 2 windows <= 20
    spans = shots_to_clips([5, 30], num_frames=42, fps=10.0, cfg=cfg)
    assert spans == [
        ClipSpan(shot_index=1, start_frame=6, end_frame=18, window_index=0),
        ClipSpan(shot_index=1, start_frame=18, end_frame=29, window_index=1),
        ClipSpan(shot_index=2, start_frame=31, end_frame=41, window_index=0),
    ]


def test_no_clip_contains_a_frame_of_a_neighbouring_shot():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 600)
        fps = rng.choice([10.0, 24.0, 29.97, 60.0])
        cuts = sorted(rng.sample(range(1, n), k=min(n - 1, rng.randint(0, 8)))) if n > 1 else []
        cfg = ShotConfig(min_shot_s=rng.choice([0.0, 0.5, 1.0]), max_clip_s=rng.choice([1.0, 2.5, 10.0]),
                         trim_start_frames=rng.randint(0, 2), trim_end_frames=rng.randint(0, 2))
        bounds = [0] + cuts + [n]
        for span in shots_to_clips(cuts, n, fps, cfg):
            lo, hi = bounds[span.shot_index], bounds[span.shot_index + 1]
            assert lo + cfg.trim_start_frames <= span.start_frame < span.end_frame <= hi - cfg.trim_end_frames
            assert span.end_frame - span.start_frame <= int(cfg.max_clip_s * fps + 1e-6)
            assert (span.end_frame - span.start_frame) >= min(cfg.min_shot_s * fps, cfg.max_clip_s * fps / 2) - 1


def test_clip_config_errors():
    with pytest.raises(ValueError, match="min_shot_s"):
        ShotConfig(min_shot_s=5.0, max_clip_s=2.0)
    with pytest.raises(ValueError, match="fps"):
        shots_to_clips([], 10, 0.0, ShotConfig())
