"""Shard encoders: H.264 mp4 bytes (duration, even sizes, moov first, fps cap) and JPEG bytes."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from curation.encode import (
    EncodeConfig,
    encode_jpeg,
    encode_mp4,
    faststart,
    output_frame_indices,
    resize_max_side,
)


def moving(frames: int, h: int, w: int) -> np.ndarray:
    """A gradient with a bright square sliding right one step per frame (frame order is visible)."""
    base = np.zeros((h, w, 3), np.uint8)
    base[...] = np.linspace(0, 200, w, dtype=np.uint8)[None, :, None]
    out = np.repeat(base[None], frames, axis=0)
    size = max(2, min(h, w) // 4)
    for i in range(frames):
        x = (i * 3) % max(1, w - size)
        out[i, :size, x : x + size] = 255
    return out


def decode(data: bytes) -> tuple[list[np.ndarray], float, av.video.stream.VideoStream]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        end = float((frames[-1].pts - frames[0].pts) * stream.time_base)
        info = (stream.codec_context.name, frames[0].format.name)
        return [f.to_ndarray(format="rgb24") for f in frames], end, info


def box_ids(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i : i + 4], "big")
        out.append(data[i + 4 : i + 8])
        i += size
    return out


@pytest.mark.parametrize(
    "frames, fps, h, w",
    [(48, 24.0, 72, 128), (50, 30000 / 1001, 121, 215), (90, 60.0, 360, 640), (7, 25.0, 99, 101), (1, 24.0, 64, 64)],
)
def test_mp4_duration_size_and_layout(frames, fps, h, w):
    cfg = EncodeConfig(max_side=256)
    data, out_fps = encode_mp4(moving(frames, h, w), fps, cfg)
    decoded, end, (codec, pix_fmt) = decode(data)
    assert codec == "h264" and pix_fmt == "yuv420p"
    assert out_fps == pytest.approx(min(fps, cfg.max_fps), rel=1e-3)
    duration = len(decoded) / out_fps
    assert abs(duration - frames / fps) <= 1.0 / out_fps + 1e-9  # within one frame
    assert end == pytest.approx((len(decoded) - 1) / out_fps, abs=1e-3)  # timestamps, not just counts
    oh, ow = decoded[0].shape[:2]
    assert oh % 2 == 0 and ow % 2 == 0 and max(oh, ow) <= 256 and oh <= h and ow <= w
    ids = box_ids(data)
    assert ids.index(b"moov") < ids.index(b"mdat")  # streamable from a tar


def test_fps_cap_drops_frames_evenly_in_order():
    idx, out_fps = output_frame_indices(60, 60.0, 24.0)
    assert out_fps == 24.0 and len(idx) == 24
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] >= 57
    steps = np.diff(idx)
    assert set(steps.tolist()) <= {2, 3}  # 60 -> 24 fps: alternately 2 and 3 source frames
    assert output_frame_indices(10, 24.0, 24.0) == (list(range(10)), 24.0)


def test_decoded_content_matches_source():
    clip = moving(24, 96, 160)
    decoded, _, _ = decode(encode_mp4(clip, 24.0, EncodeConfig(crf=18))[0])
    err = np.mean([np.abs(d.astype(int) - s.astype(int)).mean() for d, s in zip(decoded, clip)])
    assert err < 6.0
    # frame order survives: the square's column of frame 5 is where the source put it
    col = lambda f: int(np.argmax(f[:10, :, 0].astype(int).sum(0) > 2000))  # noqa: E731
    assert abs(col(decoded[5]) - col(clip[5])) <= 2


@pytest.mark.parametrize("interval_s, fps", [(2.0, 24.0), (1.0, 30000 / 1001), (None, 24.0)])
def test_keyframes_at_most_the_configured_interval_apart(interval_s, fps):
    """A training loader decodes from the keyframe before its first sampled frame: keyframes come at least
    every keyframe_interval_s of the output (x264 may add more at scene changes), and None keeps x264's one
    per 250 frames."""
    data, out_fps = encode_mp4(moving(150, 64, 96), fps, EncodeConfig(keyframe_interval_s=interval_s))
    with av.open(io.BytesIO(data)) as container:
        flags = [p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size]
    keys = [i for i, k in enumerate(flags) if k]
    assert keys[0] == 0 and len(flags) >= 100
    if interval_s is None:
        assert keys == [0]  # no scene change in the clip: x264's default gives only the first
    else:
        want = round(interval_s * out_fps)
        assert max(b - a for a, b in zip(keys, keys[1:] + [len(flags)])) <= want
        assert len(keys) >= len(flags) // want


def test_faststart_is_byte_identical_to_ffmpeg(tmp_path):
    """Same frames through FFmpeg's own +faststart (needs a real file) give the very same bytes."""
    clip = moving(20, 64, 96)
    data, _ = encode_mp4(clip, 24.0, EncodeConfig(threads=1))
    path = tmp_path / "ffmpeg.mp4"
    rate = Fraction(24)
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.time_base = 1 / rate
        stream.codec_context.thread_count = 1
        stream.codec_context.gop_size = round(EncodeConfig().keyframe_interval_s * 24)
        stream.options = {"crf": "23", "preset": EncodeConfig().preset}
        for i, f in enumerate(clip):
            frame = av.VideoFrame.from_ndarray(cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
            frame.pts, frame.time_base = i, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert data == path.read_bytes()
    assert faststart(data) == data  # already in front: unchanged


def test_resize_max_side_even_never_upscale():
    assert resize_max_side(np.zeros((5, 1080, 1920, 3), np.uint8), 512).shape == (5, 288, 512, 3)
    assert resize_max_side(np.zeros((99, 101, 3), np.uint8), 512).shape == (98, 100, 3)
    small = np.zeros((2, 64, 48, 3), np.uint8)
    assert resize_max_side(small, 512) is small
    assert resize_max_side(np.zeros((3, 1920, 1080, 3), np.uint8), 511).shape[1:3] == (510, 286)


def test_jpeg_round_trip_and_bad_input():
    frame = moving(1, 90, 160)[0]
    data = encode_jpeg(frame, 90)
    assert data[:2] == b"\xff\xd8"
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(back.astype(int) - frame.astype(int)).mean() < 3.0  # RGB order kept
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((0, 64, 64, 3), np.uint8), 24.0, EncodeConfig())
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((3, 64, 64, 3), np.uint8), 0.0, EncodeConfig())
