"""Reading one still image safely: the header first, then the pixels.

`decode_image` reads the header (PIL, nothing decoded) and rejects, before any pixel is decoded:
- a header that no reader here knows (not an image, or truncated before its size);
- more pixels than `decode.max_pixels` (a decompression bomb: a 1 MB PNG can declare 30000 x 30000
  pixels, 2.7 GB as RGB; several at once exhaust a worker). PIL's own bomb check (DecompressionBombError,
  or its warning turned into an error) is caught here too, never a crash;
- an animation (an animated GIF, APNG or WebP with more than one frame). Why not keep its first frame:
  the caption of an animation describes the animation, and its first frame is often a blank, a fade-in or
  a title card, so a still made from it is a pair of unknown quality; picking "a representative frame"
  is a video problem (curate it as a video: GIF and APNG decode through PyAV given in a table's `video`
  column). The source row records the reason, so nothing is lost silently. A multi-picture JPEG (MPO,
  what phones and 3D cameras write: the photo plus a preview or depth picture) is not an animation:
  its first picture is the photo, and it is kept.
Only then the pixels are decoded (OpenCV; PIL for the variants OpenCV lacks).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from curation.decode_types import over_max_pixels
from curation.errors import SourceError

ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")
"""PIL formats whose extra frames are an animation (MPO's extra pictures are not)."""

# What PIL raises on a header it cannot read or refuses (Image.open turns a plugin's SyntaxError,
# IndexError, TypeError or struct.error into UnidentifiedImageError, an OSError).
_PIL_ERRORS = (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError,
                      Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares (nothing decoded)."""

    format: str
    """PIL's format name, e.g. 'JPEG', 'PNG', 'WEBP', 'GIF', 'MPO'."""
    width: int
    height: int
    animated: bool
    """More than one frame, in a format where that is an animation (ANIMATED_FORMATS)."""
    frames: int | None
    """Frame count when the header holds it (APNG, WebP); None for GIF (counting means reading it all)."""


def read_image_header(data: bytes) -> ImageHeader:
    """Format, size and animation of an encoded image from its header, without decoding pixels.

    Raises SourceError when no reader knows the header or PIL's decompression-bomb check refuses it.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or "unknown"
            width, height = im.size
            animated = fmt in ANIMATED_FORMATS and bool(getattr(im, "is_animated", False))
            frames = int(im.n_frames) if animated and fmt != "GIF" else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SourceError(f"image refused before decoding: {exc} (PIL's decompression-bomb check)") from None
    except _PIL_ERRORS as exc:
        raise SourceError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    return ImageHeader(format=fmt, width=int(width), height=int(height), animated=animated, frames=frames)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an encoded still image; SourceError for an unusable one (see the module
    docstring: an unknown header, more than `max_pixels` pixels, an animation, undecodable pixels)."""
    if len(data) == 0:
        raise SourceError("empty file (0 bytes)")
    head = read_image_header(data)
    if reason := over_max_pixels(head.width, head.height, max_pixels):
        raise SourceError(f"image of {reason}")
    if head.animated:
        count = f"{head.frames} frames" if head.frames else "several frames"
        raise SourceError(f"animated {head.format} ({count}): an animation is not a still image (curate it as a "
                          "video); no frame of it is kept")
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise SourceError(f"not a decodable image (OpenCV: {exc})") from None
    if arr is not None:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    try:  # formats OpenCV lacks (some webp/cmyk jpeg variants): PIL as a second reader
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except _PIL_ERRORS as exc:
        raise SourceError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
