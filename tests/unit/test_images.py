"""curation/images.py: header checks before decoding (pixel limit, PIL's bomb check, animations), decoding."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from curation.errors import SourceError
from curation.images import decode_image, read_image_header

REPO = Path(__file__).resolve().parents[2]
MAX_PIXELS = 64_000_000  # decode.max_pixels' default


def zero_png(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of `width` x `height` black pixels, at deflate's best ratio (~1 KB per
    MP: 30000 x 30000 is a 0.9 MB file that decodes to 900 MB of gray, 2.7 GB as RGB).

    Built without compressing every row: after a full flush deflate starts afresh, so each block of
    identical rows compresses to identical bytes; only the checksum is computed over all of the data.
    """
    row = bytes(width + 1)  # filter byte 0, then `width` pixels of 0
    rows_per_block = max(1, min(height, (1 << 22) // len(row)))
    block = row * rows_per_block
    full, rest = divmod(height, rows_per_block)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the zlib header and checksum are added here
    chunk = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.compress(row * rest) + comp.flush()
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = b"\x78\xda" + chunk * full + tail + struct.pack(">I", adler)

    def chunk_of(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk_of(b"IHDR", ihdr) + chunk_of(b"IDAT", idat) + chunk_of(b"IEND", b"")


def encode(frames: list[np.ndarray], fmt: str) -> bytes:
    """Frames (RGB) as one image file of PIL format `fmt` (several frames: an animation, or an MPO)."""
    buf = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    options = {"lossless": True} if fmt == "WEBP" else {}
    first.save(buf, format=fmt, save_all=bool(rest), append_images=rest, **options)
    return buf.getvalue()


def picture(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_zero_png_is_a_valid_png():
    data = zero_png(70, 3000)  # several blocks and a rest
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (3000, 70) and not gray.any()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # PIL checks the CRCs and the zlib stream
        assert im.size == (70, 3000) and im.mode == "L"


def test_decompression_bomb_is_rejected_from_its_header_fast_and_in_little_memory(tmp_path):
    """The issue's 1 MB PNG declaring 30000 x 30000 pixels, in a fresh process: rejected before decoding,
    its peak memory hardly moves, and the rejection takes a small fraction of merely inflating the file
    (which a decode must do first), measured side by side."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(zero_png(30000, 30000))
    assert bomb.stat().st_size < 1_000_000
    script = textwrap.dedent(f"""
        import json, resource, time, zlib
        from curation.errors import SourceError
        from curation.images import decode_image
        data = open({str(bomb)!r}, "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            decode_image(data, {MAX_PIXELS})
            reason = None
        except SourceError as exc:
            reason = str(exc)
        t_reject = time.perf_counter() - t0
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        t0 = time.perf_counter()
        inflate, rest, out = zlib.decompressobj(), data[data.index(b"IDAT") + 4:], 0
        while not inflate.eof:
            out += len(inflate.decompress(rest, 1 << 20))
            rest = inflate.unconsumed_tail
        print(json.dumps(dict(reason=reason, rss_kb=rss_kb, t_reject=t_reject,
                              t_inflate=time.perf_counter() - t0, inflated=out)))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["reason"] and "900000000 pixels" in got["reason"] and "before decoding" in got["reason"]
    assert got["inflated"] >= 30000 * 30000  # the file really holds every row
    assert got["rss_kb"] < 64 * 1024, got  # a decode would need >= 900 MB
    assert got["t_reject"] < 0.05 * got["t_inflate"], got


def test_pil_bomb_warning_is_a_rejection_not_a_crash_or_an_accept():
    """100 MP: over PIL's warning threshold (89 MP), under its error (179 MP). With default warnings our
    limit rejects it; with warnings as errors (python -W error) PIL's warning becomes the rejection."""
    data = zero_png(10000, 10000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
            SourceError, match=r"image of 10000x10000 pixels \(100.0 MP\), over decode.max_pixels"):
        decode_image(data, MAX_PIXELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SourceError, match="decompression-bomb"):
            decode_image(data, 200_000_000)


def test_pixel_limit_is_checked_against_the_header():
    data = encode([picture(0)], "PNG")  # 64 x 48 = 3072 pixels
    with pytest.raises(SourceError, match=r"64x48 pixels .* over decode.max_pixels=3071: not decoded"):
        decode_image(data, 3071)
    np.testing.assert_array_equal(decode_image(data, 3072), picture(0))


@pytest.mark.parametrize("fmt, count", [("GIF", "several frames"), ("PNG", "2 frames"), ("WEBP", "2 frames")])
def test_animated_images_are_rejected_and_their_stills_decode(fmt, count):
    frames = [picture(1), picture(2)]
    with pytest.raises(SourceError, match=f"animated {fmt} \\({count}\\): an animation is not a still image"):
        decode_image(encode(frames, fmt), MAX_PIXELS)
    still = decode_image(encode(frames[:1], fmt), MAX_PIXELS)
    assert still.shape == (48, 64, 3)
    if fmt != "GIF":  # GIF has a 256-colour palette
        np.testing.assert_array_equal(still, frames[0])


def test_multi_picture_jpeg_is_a_still_photo():
    """MPO (a phone's photo + preview/depth picture) has two frames for PIL but is no animation: kept."""
    first, second = np.full((48, 64, 3), 40, np.uint8), np.full((48, 64, 3), 220, np.uint8)
    data = encode([first, second], "MPO")
    head = read_image_header(data)
    assert (head.format, head.animated) == ("MPO", False)
    assert np.abs(decode_image(data, MAX_PIXELS).astype(int) - 40).max() <= 2  # the first picture


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"\xff\xd8 not really a jpeg", "not a decodable image"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a decodable image"),  # cut inside the header
])
def test_broken_images_are_source_errors(data, reason):
    with pytest.raises(SourceError, match=reason):
        decode_image(data, MAX_PIXELS)


def test_header_is_read_without_decoding():
    head = read_image_header(encode([picture(3, 30, 40)], "JPEG"))
    assert (head.format, head.width, head.height, head.animated, head.frames) == ("JPEG", 40, 30, False, None)
