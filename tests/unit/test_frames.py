"""YuvFrames and the I420 helpers (curation/frames.py): layout, conversions, downscaling."""

from __future__ import annotations

import numpy as np
import pytest

from curation.frames import YuvFrames, i420_to_rgb, pack_i420, plane_views, resize_plane, rgb_to_i420


def smooth_rgb(n: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 255 // w + 10 * i) % 256
        out[i, ..., 1] = yy * 255 // h
        out[i, ..., 2] = 128
    return out


def test_layout_and_round_trip():
    rgb = smooth_rgb(4, 48, 64)
    frames = YuvFrames.from_rgb(rgb)
    assert frames.i420.shape == (4, 72, 64) and (len(frames), frames.height, frames.width) == (4, 48, 64)
    y, u, v = plane_views(frames.i420[0])
    assert y.shape == (48, 64) and u.shape == v.shape == (24, 32)
    back = frames.rgb()
    assert back.shape == rgb.shape
    assert np.abs(back.astype(np.int16) - rgb).mean() < 3.0  # 4:2:0 chroma subsampling of smooth images


def test_indexing_gives_frames_and_rgb_of_a_subset():
    frames = YuvFrames.from_rgb(smooth_rgb(6, 32, 32))
    part = frames[2:5]
    assert isinstance(part, YuvFrames) and len(part) == 3
    np.testing.assert_array_equal(part.i420[0], frames.i420[2])
    np.testing.assert_array_equal(frames.rgb([4])[0], frames[4].rgb()[0])


def test_resized_matches_resizing_rgb():
    rgb = smooth_rgb(2, 96, 160)
    small = YuvFrames.from_rgb(rgb).resized(64, 38)
    assert (small.width, small.height) == (64, 38)
    import cv2

    ref = np.stack([cv2.resize(f, (64, 38), interpolation=cv2.INTER_AREA) for f in rgb])
    assert np.abs(small.rgb().astype(np.int16) - ref).mean() < 3.0


def test_resize_plane_integer_then_bilinear():
    plane = np.tile(np.arange(256, dtype=np.uint8), (144, 5))[:, :1280]
    out = resize_plane(plane, 512, 58)
    assert out.shape == (58, 512)
    assert resize_plane(plane, 1280, 144) is plane


def test_pack_and_convert_single_frames():
    rgb = smooth_rgb(1, 20, 30)[0]
    i420 = rgb_to_i420(rgb)
    assert i420.shape == (30, 30)
    small = i420_to_rgb(i420, 10, 6)
    assert small.shape == (6, 10, 3)
    packed = pack_i420(*plane_views(i420), 30, 20)
    np.testing.assert_array_equal(packed, i420)


@pytest.mark.parametrize("shape", [(2, 10, 8), (2, 11, 8), (2, 12, 7), (12, 8)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="YuvFrames"):
        YuvFrames(np.zeros(shape, np.uint8))
