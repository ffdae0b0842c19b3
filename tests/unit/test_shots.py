"""Shot detection and clip spans on synthetic frames with known answers (no Ray, no shared data)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from common import configtree
from common.configtree import ConfigError
from curation.decode import decode_video
from curation.decode_types import DecodeConfig
from curation.shots import ClipSpan, SecondOpinion, ShotConfig, classify_candidates, detect_cuts, shots_to_clips
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


@pytest.mark.parametrize("field, value", [("detector", "histogram"), ("second_opinion", "gpt"),
                                          ("transnet_precision", "fp8"), ("transnet_device", "tpu")])
def test_unknown_registry_keys_list_the_valid_ones(field, value):
    with pytest.raises(ValueError, match=r"valid keys are \["):
        ShotConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"shots.{field}"):  # the config loader says so before any work
        configtree.from_dict(ShotConfig, {field: value}, "shots")


@pytest.mark.parametrize("precision, dtype", [("float32", "float32"), ("bf16", "bfloat16")])
def test_transnet_precision_resolves_through_common_dtypes(precision, dtype):
    import torch

    from curation.transnet import TransNetScorer

    scorer = TransNetScorer(precision=precision)
    assert scorer.dtype == getattr(torch, dtype)
    frames, _ = synth.shots_frames([40, 40])
    assert scorer.peak_probabilities(frames, [40])[40] > 0.5  # autocast in that dtype still sees the cut


def test_float16_transnet_is_for_gpus_only():
    """CPUs emulate float16 (many times slower than bfloat16 or float32): refused in the config, before any
    work, naming the key."""
    with pytest.raises(ConfigError, match=r"^shots.transnet_precision='float16': on transnet_device='cpu'"):
        configtree.from_dict(ShotConfig, {"transnet_precision": "float16"}, "shots")
    assert ShotConfig(transnet_precision="float16", transnet_device="cuda").transnet_precision == "float16"


def test_unknown_transnet_precision_names_the_valid_ones():
    from curation.transnet import TransNetScorer

    with pytest.raises(ValueError, match="float32"):
        TransNetScorer(precision="fp8")


# --------------------------------------------------------------------------- decision rules


def _flash(frames, at, n=1, value=255):
    frames = frames.copy()
    frames[at : at + n] = value
    return frames


@pytest.mark.parametrize("gap, n, value", [(1, 1, 255), (2, 1, 0), (1, 2, 255), (3, 3, 0)])
def test_a_cut_followed_by_a_flash_is_kept_and_the_flash_is_not_a_cut(gap, n, value, second_opinion):
    frames, cuts = synth.shots_frames([30, 30], seed=4)
    frames = _flash(frames, 30 + gap, n, value)
    assert detect_cuts(frames, 24.0, PLAIN) == cuts == [30]
    assert detect_cuts(frames, 24.0, ShotConfig(), second_opinion) == [30]


def test_a_short_shot_between_two_similar_ones_is_a_shot():
    """Montage A B A': B (12 frames, 0.5 s) must not be taken for a flash of A."""
    a = synth.moving_shot(60, 96, 160, seed=1)
    b = synth.moving_shot(12, 96, 160, seed=2)
    frames = np.concatenate([a[:24], b, a[36:]])
    assert detect_cuts(frames, 24.0, PLAIN) == [24, 36]


def test_a_noise_flash_in_a_fast_pan_is_not_a_cut(second_opinion):
    frames = synth.moving_shot(60, 96, 160, seed=3, speed=2.6)  # (the pan wraps around after 160 / speed frames)
    frames[30:33] = np.random.default_rng(0).integers(0, 256, (3, 96, 160, 3), dtype=np.uint8)
    cands = classify_candidates(frames, 24.0, PLAIN)
    assert cands and all(c.verdict in ("flash", "weak") for c in cands if 29 <= c.frame <= 34)
    assert detect_cuts(frames, 24.0, PLAIN) == []
    assert detect_cuts(frames, 24.0, ShotConfig(), second_opinion) == []


def test_a_clear_quiet_cut_does_not_ask_the_second_opinion(second_opinion):
    """Two framings of one scene (same palette): a clear spike that does not revert is a cut on its own
    evidence; TransNetV2 is not asked (it is weakest on exactly these)."""
    import cv2

    scene = synth.moving_shot(60, 192, 320, seed=5)
    left = np.stack([cv2.resize(f[:, :200], (160, 96), interpolation=cv2.INTER_AREA) for f in scene[:30]])
    right = np.stack([cv2.resize(f[40:, 120:], (160, 96), interpolation=cv2.INTER_AREA) for f in scene[30:]])
    cands = classify_candidates(np.concatenate([left, right]), 24.0, ShotConfig(), second_opinion)
    (cut,) = [c for c in cands if c.verdict == "cut"]
    assert cut.frame == 30 and cut.second_opinion is None
    assert cut.spike >= 3.0 and cut.revert_ratio >= 0.65


def test_revert_test_finds_the_flash_frames_net_of_motion():
    from curation.content_score import hsv_frames
    from curation.shot_evidence import revert_test, thumbnails

    frames = synth.moving_shot(40, 96, 160, seed=6, speed=4.0)
    frames[20:22] = np.random.default_rng(0).integers(0, 256, (2, 96, 160, 3), dtype=np.uint8)
    thumbs, _ = thumbnails(hsv_frames(frames))
    ratio, b, a = revert_test(thumbs, 20, 6)
    # frames 19 and 22 differ by 4 frames of panning (0.36 of the change into the noise); net of the pan's
    # own change over 3 frames, the picture comes back
    assert (b, a) == (19, 22) and ratio < 0.1
    ratio_cut, *_ = revert_test(thumbnails(hsv_frames(synth.shots_frames([20, 20])[0]))[0], 20, 6)
    assert ratio_cut == 1.0


def _edge_spikes_by_definition(scores, threshold, window, min_score):
    """edge_spikes as its docstring defines it, frame by frame (the oracle of the vectorised one)."""
    out = []
    for i in range(1, len(scores)):
        if scores[i] < min_score:
            continue
        left, right = scores[max(1, i - window) : i], scores[i + 1 : i + 1 + window]
        if any(len(side) and scores[i] >= threshold * float(side.mean()) for side in (left, right)):
            out.append(i)
    return out


def test_edge_spikes_are_bit_identical_to_the_frame_by_frame_definition():
    """Random scores, scores on a coarse grid (ratios land exactly on the threshold, and one float32 step
    either side of it), and real content values; every window size from 0 to past numpy's 8-element
    pairwise-summation block, both ends of short arrays included."""
    from curation.content_score import content_values, hsv_frames
    from curation.shot_evidence import edge_spikes

    rng = np.random.default_rng(0)
    frames, _ = synth.shots_frames([9, 3, 14, 2, 20], seed=4)
    real = content_values(hsv_frames(np.concatenate([frames, synth.flash_frames(n=16, flash_at=8)])))
    cases = [real.astype(np.float32), real]
    for _ in range(100):
        n = int(rng.integers(0, 50))
        cases.append((rng.gamma(0.6, 8, n) * (rng.random(n) < 0.8)).astype(np.float32))
        cases.append((rng.integers(0, 7, n) / 2.0).astype(rng.choice([np.float32, np.float64])))
    hits = 0
    for scores in cases:
        for window in range(0, 11):
            for threshold, min_score in ((3.0, 15.0), (3.0, 0.0), (1.5, 1.0), (np.nextafter(np.float32(2), 3), 0.5)):
                want = _edge_spikes_by_definition(scores, float(threshold), window, min_score)
                assert edge_spikes(scores, float(threshold), window, min_score) == want, (scores, window, threshold)
                hits += len(want)
    assert hits > 1000  # the comparison is not one of empty lists


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


def test_cuts_closer_than_the_flash_window_keep_the_stronger():
    """A 3-frame 'shot' between two others (A B C, no revert) is no shot: one cut, not two."""
    frames, cuts = synth.shots_frames([30, 3, 30], seed=8)
    assert cuts == [30, 33]
    (cut,) = detect_cuts(frames, 24.0, PLAIN)
    assert cut in cuts


def _tone_step(frames, at, gain=1.35):
    """Frames from `at` on brighter by `gain` (a codec keyframe pulse or a light switched on: no new shot)."""
    out = frames.copy()
    out[at:] = np.clip(out[at:].astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return out


def test_a_quiet_change_right_after_a_cut_asks_the_second_opinion(second_opinion):
    frames, _ = synth.shots_frames([30, 60], seed=9)
    cfg = ShotConfig()
    near = {c.frame: c for c in classify_candidates(_tone_step(frames, 38), 24.0, cfg, second_opinion)}
    far = {c.frame: c for c in classify_candidates(_tone_step(frames, 70), 24.0, cfg, second_opinion)}
    assert near[30].verdict == "cut" and near[30].second_opinion is None  # the strong cut decides alone
    for cands, at in ((near, 38), (far, 70)):  # the step is a quiet spike that does not revert
        assert cands[at].score < cfg.content_threshold and cands[at].spike >= cfg.adaptive_threshold
    assert near[38].second_opinion is not None  # 8 frames after a stronger cut: TransNetV2 is asked
    assert far[70].second_opinion is None  # 1.7 s away: its own clear evidence decides
