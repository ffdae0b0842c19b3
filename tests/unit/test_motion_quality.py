"""Motion/flicker and image quality scores on synthetic frames with known answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from curation.motion import MotionConfig, motion_score, motion_scores, pair_indices
from curation.quality import AestheticHead, QualityConfig, colorfulness, quality_scores

RNG = np.random.default_rng(0)
TEXTURE = cv2.GaussianBlur((RNG.random((200, 3000)) * 255).astype(np.uint8), (0, 0), 2)
TEXTURE = np.repeat(TEXTURE[..., None], 3, axis=-1)


def pan(px_per_frame: float, frames: int = 32, width: int = 128, height: int = 72) -> np.ndarray:
    """A camera panning over a texture: content moves px_per_frame (at this width) per frame."""
    scale = width / 128
    tex = cv2.resize(TEXTURE, (int(TEXTURE.shape[1] * scale), int(TEXTURE.shape[0] * scale)))
    return np.stack([tex[:height, round(i * px_per_frame * scale):][:, :width] for i in range(frames)])


def expected(px_per_frame: float, fps: float) -> float:
    return px_per_frame / 128 * 100 * fps  # % of width per second


@pytest.mark.parametrize("speed", [0.5, 2.0, 6.0, 20.0, 40.0])
def test_motion_measures_pan_speed(speed):
    got = motion_score(pan(speed), 24.0, MotionConfig())
    assert got == pytest.approx(expected(speed, 24.0), rel=0.15)


def test_motion_is_resolution_and_fps_independent():
    cfg = MotionConfig()
    base = motion_score(pan(2.0), 24.0, cfg)
    assert motion_score(pan(2.0, width=256, height=144), 24.0, cfg) == pytest.approx(base, rel=0.1)
    # the same physical speed filmed at 12 fps moves twice as far per frame
    assert motion_score(pan(4.0), 12.0, cfg) == pytest.approx(base, rel=0.1)


def test_static_strobe_and_degenerate_clips():
    cfg = MotionConfig()
    still = pan(0.0)
    noisy = np.clip(still.astype(int) + RNG.integers(-2, 3, still.shape), 0, 255).astype(np.uint8)
    assert motion_scores(still, 30.0, cfg)["motion"] < 0.1
    assert motion_scores(noisy, 30.0, cfg)["motion"] < 1.0
    assert motion_scores(noisy, 30.0, cfg)["flicker"] < 0.5
    strobe = np.zeros((20, 72, 128, 3), np.uint8)
    strobe[::2] = 255
    assert motion_scores(strobe, 24.0, cfg)["flicker"] == pytest.approx(100.0)
    flashes = still.copy()
    flashes[::2] //= 4
    assert motion_scores(flashes, 24.0, cfg)["flicker"] > 20.0
    for bad in (still[:1], still[:0]):
        assert np.isnan(motion_score(bad, 24.0, cfg))
    assert np.isnan(motion_score(still, 0.0, cfg))


def test_pair_indices_spread_and_capped():
    assert pair_indices(5, 16) == [0, 1, 2, 3]
    idx = pair_indices(241, 16)
    assert len(idx) == 16 and idx[0] < 15 and idx[-1] > 220 and max(idx) <= 239


def _photo(h: int, w: int) -> np.ndarray:
    img = cv2.resize((RNG.random((h // 8, w // 8, 3)) * 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.addWeighted(img, 0.5, cv2.resize(TEXTURE[:100, :200], (w, h)), 0.5, 0)


def test_quality_sharpness_brightness_blank():
    cfg = QualityConfig()
    sharp = np.stack([_photo(360, 640)] * 3)
    blurry = np.stack([cv2.GaussianBlur(f, (0, 0), 4) for f in sharp])
    qs, qb = quality_scores(sharp, cfg), quality_scores(blurry, cfg)
    assert qs["sharpness"] > 5 * qb["sharpness"]
    # size-normalised: the same picture at twice the resolution scores about the same
    big = np.stack([cv2.resize(f, (1280, 720), interpolation=cv2.INTER_CUBIC) for f in sharp])
    assert quality_scores(big, cfg)["sharpness"] == pytest.approx(qs["sharpness"], rel=0.35)
    black = np.zeros((9, 90, 160, 3), np.uint8)
    qk = quality_scores(black, cfg)
    assert qk["brightness"] == 0.0 and qk["contrast"] == 0.0 and qk["blank_fraction"] == 1.0
    half = np.concatenate([black[:3], sharp[:1].repeat(3, 0)[:, :90, :160]])  # blank first half
    assert quality_scores(half, QualityConfig(frames_per_clip=2))["blank_fraction"] == 0.5
    assert 0.0 < qs["brightness"] < 1.0 and qs["contrast"] > 0.05
    assert "aesthetic" not in qs  # no head configured: no aesthetic score is invented
    assert np.isnan(quality_scores(black[:0], cfg)["sharpness"])


def test_colorfulness_orders_gray_below_saturated():
    gray = np.full((32, 32, 3), 128, np.uint8)
    red_blue = np.zeros((32, 32, 3), np.uint8)
    red_blue[:, :16, 0] = 255
    red_blue[:, 16:, 2] = 255
    assert colorfulness(gray) == 0.0
    assert colorfulness(red_blue) > 100.0


def test_aesthetic_head_linear_stack(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    path = tmp_path / "aesthetic.pth"
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, path)
    head = AestheticHead(str(path))
    emb = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    mean = emb.mean(0) / np.linalg.norm(emb.mean(0))
    with torch.no_grad():
        want = float(mlp.eval()(torch.from_numpy(mean)))
    assert head(emb) == pytest.approx(want, abs=1e-5)
    frames = np.stack([_photo(72, 128)] * 2)
    cfg = QualityConfig(aesthetic_head=str(path))
    assert quality_scores(frames, cfg, image_emb=emb, head=head)["aesthetic"] == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="aesthetic_head"):
        quality_scores(frames, cfg)  # configured but not passed
    with pytest.raises(ValueError, match="32-d"):
        head(np.ones((2, 64), np.float32))


def test_aesthetic_head_missing_file_names_it(tmp_path):
    missing = tmp_path / "sac_vit_h14_linear.pth"
    with pytest.raises(FileNotFoundError) as err:
        AestheticHead(str(missing))
    assert str(missing) in str(err.value) and "scores.quality.aesthetic_head" in str(err.value)
