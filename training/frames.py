"""Pixels of one training sample: which frames of a clip to read, reading them, resize-to-cover + crop.

Frame choice (`plan_clip`): the fps condition is chosen among the configured `fps_choices` the clip can
give (<= its own fps; if none, its own fps rounded) AND that fit F frames into the clip; frame i is source
frame round(start + i * stride) with stride = source fps / target fps; the start is random such that all
F frames fit. No fitting choice -> the sample is `too_short`. Frame n is the n-th frame in presentation
order: decord and PyAV's indexed path count packet timestamps, PyAV's sequential path counts decoded
frames (the same for a clean clip).

Reading (`read_clip`): decord from memory by default, with random access (only the GOPs of the sampled
frames are decoded). decord is never asked to resize (it crashes on odd sizes): every reader hands back
native-size RGB and `resize_cover_crop` does the same thing for both readers and for images. When decord
fails on a clip (it cannot open a truncated mp4, a packet does not decode), PyAV reads it. When decord
crashes instead (a segfault on a damaged sample table), nothing here can catch it: the loader runs this
in worker processes and skips the sample (training.loader_workers).
PyAV reads a clean clip from its packet index (`_decode_indexed`): decoding starts at the last IDR
keyframe at or before the first sampled frame, stops once the last sampled frame is out, converts only
the sampled frames to RGB, and skips every H.264 picture that no other picture references (nal_ref_idc
0: most B-frames of an x264 clip) unless it is a sampled frame. Leaving such a picture out changes no
other frame, bit for bit (tested against a full sequential decode and against decord). A clip that is
not clean (the header's frame count differs from its packets, a packet flagged corrupt, timestamps
missing or repeated, no keyframe first, a decode error) is decoded sequentially from its first frame,
and read_clip's note says why. Header frame counts lie (a cut mp4 still announces all its frames): the
sequential path counts the frames that really decode, and when a planned frame lies beyond that real end
the plan is redone with the real count (the same random draws, so it stays deterministic), which may make
the sample `too_short`; frames are never repeated to pad a clip.

Pixels leave here as uint8 (`resize_cover_crop`); `unit_range` makes them float32 in [-1, 1] where the
batch is assembled (the training process), so loader workers hand over a quarter of the bytes.

All random draws come in as uniforms in [0, 1) from the caller (seeded per sample), so this module holds
no RNG state. PyAV and decord are imported where they are used: the training process needs this module
for the pixel conversion only, on machines that may have neither.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Reader = Literal["decord", "pyav"]


class SampleError(Exception):
    """A sample that cannot be used; `reason` is the counted skip reason, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ClipPlan:
    """The frames to read from one clip and the fps condition they represent."""

    fps: int
    """The fps condition of the sample (the rate the sampled frames play at)."""
    positions: tuple[int, ...]
    """0-based source frame indices, increasing; positions[0] is the conditioning frame."""


def usable_fps(source_fps: float, fps_choices: list[int]) -> list[int]:
    """The configured fps a clip at `source_fps` can give (<= its own), else its own fps rounded."""
    usable = sorted({f for f in fps_choices if f <= source_fps + 1e-6})
    return usable or [max(1, round(source_fps))]


def _span(num_frames: int, stride: float) -> int:
    """Source frames covered by num_frames frames at `stride` (first to last, inclusive)."""
    return round((num_frames - 1) * stride) + 1


def plan_clip(
    clip_frames: int, source_fps: float, fps_choices: list[int], num_frames: int, u_fps: float, u_start: float
) -> ClipPlan | None:
    """Frames to sample from a clip of `clip_frames` frames at `source_fps`; None when F frames do not fit."""
    fitting = [f for f in usable_fps(source_fps, fps_choices) if _span(num_frames, source_fps / f) <= clip_frames]
    if not fitting:
        return None
    fps = fitting[min(len(fitting) - 1, int(u_fps * len(fitting)))]
    stride = source_fps / fps
    slack = clip_frames - _span(num_frames, stride)
    start = min(slack, int(u_start * (slack + 1)))
    return ClipPlan(fps=fps, positions=tuple(start + round(i * stride) for i in range(num_frames)))


def _too_short(clip_frames: int, source_fps: float, fps_choices: list[int], num_frames: int) -> SampleError:
    fastest = max(usable_fps(source_fps, fps_choices))
    need = _span(num_frames, source_fps / fastest)
    return SampleError(
        "too_short",
        f"{clip_frames} frames at {source_fps:g} fps; {num_frames} frames at {fastest} fps need {need}",
    )


def _read_decord(decord, data: bytes, fps_choices: list[int], num_frames: int, u_fps: float,
                 u_start: float) -> tuple[np.ndarray, ClipPlan]:
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    clip_frames, source_fps = len(reader), float(reader.get_avg_fps())
    if clip_frames <= 0 or not source_fps > 0:
        raise RuntimeError(f"decord reports {clip_frames} frames at {source_fps} fps")
    plan = plan_clip(clip_frames, source_fps, fps_choices, num_frames, u_fps, u_start)
    if plan is None:
        raise _too_short(clip_frames, source_fps, fps_choices, num_frames)
    frames = reader.get_batch(list(plan.positions)).asnumpy()
    if frames.shape[0] != num_frames:
        raise RuntimeError(f"decord returned {frames.shape[0]} of {num_frames} frames")
    return frames, plan


def _open_pyav(data: bytes):
    """(container, video stream, source fps) of mp4 bytes; raises SampleError(`undecodable_video`)."""
    import av

    try:
        container = av.open(io.BytesIO(data))
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise SampleError("undecodable_video", f"not a readable container: {exc}") from None
    streams = container.streams.video
    rate = (streams[0].average_rate or streams[0].guessed_rate) if streams else None
    if not streams or not rate or not float(rate) > 0:
        container.close()
        raise SampleError("undecodable_video", "no video stream with a frame rate")
    return container, streams[0], float(rate)


def _h264_length_size(codec) -> int | None:
    """Bytes of the NAL length prefixes of an H.264 stream stored mp4-style (avcC extradata); None for any
    other codec or layout (then every packet is decoded)."""
    extradata = codec.extradata
    if codec.name != "h264" or not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None
    return (extradata[4] & 3) + 1


def _h264_slices(packet, length_size: int) -> list[tuple[int, int]]:
    """(nal_ref_idc, nal_unit_type) of the slice NAL units of an mp4 H.264 packet; [] when its length
    prefixes do not add up (then nothing is concluded from it)."""
    buf = memoryview(packet)
    out, i, n = [], 0, len(buf)
    while i < n:
        if i + length_size >= n:
            return []
        size = int.from_bytes(buf[i : i + length_size], "big")
        head = buf[i + length_size]
        if size == 0 or i + length_size + size > n:
            return []
        if head & 0x1F in (1, 5):  # coded slice of a non-IDR / IDR picture
            out.append(((head >> 5) & 3, head & 0x1F))
        i += length_size + size
    return out


def _keep(frames, wanted: dict[int, int], kept: dict[int, np.ndarray], rgb) -> None:
    """Convert the decoded frames whose timestamp is wanted to RGB with the VideoReformatter `rgb`, by
    frame index (one reformatter per clip: frame.to_ndarray(format=...) sets up a swscale context for
    every frame; the conversion is the same)."""
    for frame in frames:
        index = wanted.get(frame.pts)
        if index is not None:
            kept[index] = rgb.reformat(frame, format="rgb24").to_ndarray()


def _decode_indexed(container, stream, positions: tuple[int, ...]) -> dict[int, np.ndarray] | str:
    """The frames at `positions` of a clean clip, decoded from its packet index (module docstring), by
    position; or why the clip is not clean (then the caller decodes it sequentially)."""
    import av

    codec = stream.codec_context
    if codec is None:
        return "no decoder for its codec"
    try:
        packets = [p for p in container.demux(stream) if p.size]
    except (av.FFmpegError, ValueError, OSError) as exc:
        return f"its packets do not demux: {exc}"
    stamps = [p.pts for p in packets]
    if len(packets) != stream.frames:
        return f"the header counts {stream.frames} frames, the file holds {len(packets)} packets"
    if None in stamps or len(set(stamps)) != len(stamps):
        return "packet timestamps missing or repeated"
    if not packets[0].is_keyframe or any(p.is_corrupt for p in packets):
        return "no keyframe first" if not packets[0].is_keyframe else "a packet is flagged corrupt"
    order = sorted(stamps)
    wanted = {order[p]: p for p in positions}
    length_size = _h264_length_size(codec)
    start = 0
    if length_size is not None:  # the last IDR at or before the first sampled frame: nothing before it is needed
        first = order[positions[0]]
        for k, p in enumerate(packets):
            if p.is_keyframe and p.pts <= first:
                slices = _h264_slices(p, length_size)
                if slices and all(t == 5 for _, t in slices):
                    start = k
    codec.thread_count = 1
    kept: dict[int, np.ndarray] = {}
    rgb = av.video.reformatter.VideoReformatter()
    try:
        for p in packets[start:]:
            if length_size is not None and p.pts not in wanted:
                slices = _h264_slices(p, length_size)
                if slices and all(ref == 0 for ref, _ in slices):
                    continue  # a picture no other one is predicted from, and not a sampled frame
            _keep(codec.decode(p), wanted, kept, rgb)
            if len(kept) == len(wanted):
                break
        else:
            _keep(codec.decode(None), wanted, kept, rgb)
    except (av.FFmpegError, ValueError, OSError) as exc:
        return f"a packet does not decode: {exc}"
    if len(kept) != len(wanted):
        return f"{len(wanted) - len(kept)} sampled frames did not come out of the decoder"
    return kept


def _decode_pyav(data: bytes, wanted: set[int], stop: int | None) -> tuple[dict[int, np.ndarray], int]:
    """Decode sequentially up to frame `stop` (to the end when None), keeping the frames in `wanted`.

    Returns (kept frames by index, frames that decoded); a decode error ends the clip there."""
    import av

    container, stream, _ = _open_pyav(data)
    kept: dict[int, np.ndarray] = {}
    count = 0
    with container:
        stream.thread_count = 1
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    kept[count] = frame.to_ndarray(format="rgb24")
                count += 1
                if stop is not None and count > stop:
                    break
        except (av.FFmpegError, ValueError, OSError):
            pass  # a cut or damaged stream ends here: `count` frames really decode
    return kept, count


def _read_pyav(data: bytes, fps_choices: list[int], num_frames: int, u_fps: float,
               u_start: float) -> tuple[np.ndarray, ClipPlan, str | None]:
    """(frames, plan, why the clip was decoded sequentially or None)."""
    container, stream, source_fps = _open_pyav(data)
    with container:
        header_frames = stream.frames
        plan, why = None, "the header counts no frames"
        if header_frames > 0:
            plan = plan_clip(header_frames, source_fps, fps_choices, num_frames, u_fps, u_start)
        if plan is not None:
            why = _decode_indexed(container, stream, plan.positions)
    if not isinstance(why, str):
        return _stack(why, plan), plan, None
    if plan is not None:
        kept, count = _decode_pyav(data, set(plan.positions), plan.positions[-1])
        if all(p in kept for p in plan.positions):
            return _stack(kept, plan), plan, why
    else:
        _, count = _decode_pyav(data, set(), None)  # no usable header count: count the frames
    if count == 0:
        raise SampleError("undecodable_video", "no frame decodes")
    # the header lied (or was absent): plan again with the frames that really decode
    plan = plan_clip(count, source_fps, fps_choices, num_frames, u_fps, u_start)
    if plan is None:
        raise _too_short(count, source_fps, fps_choices, num_frames)
    kept, _ = _decode_pyav(data, set(plan.positions), plan.positions[-1])
    return _stack(kept, plan), plan, why


def _stack(kept: dict[int, np.ndarray], plan: ClipPlan) -> np.ndarray:
    frames = [kept[p] for p in plan.positions]
    if len({f.shape for f in frames}) != 1:
        raise SampleError("undecodable_video", "the frame size changes inside the clip")
    return np.stack(frames)


def read_clip(
    data: bytes, *, num_frames: int, fps_choices: list[int], u_fps: float, u_start: float, reader: Reader
) -> tuple[np.ndarray, ClipPlan, str | None]:
    """(frames (F, h, w, 3) uint8 RGB, plan, note) of mp4 bytes; the note says when decord fell back to
    PyAV and when PyAV decoded the clip sequentially (why), else None.

    Raises SampleError(`undecodable_video` | `too_short`)."""
    note = None
    if reader == "decord":
        import decord  # outside the try: a missing decord is a setup error, not a clip for PyAV

        try:
            frames, plan = _read_decord(decord, data, fps_choices, num_frames, u_fps, u_start)
            return frames, plan, None
        except SampleError:
            raise
        except Exception as exc:  # decord raises DECORDError/RuntimeError/IndexError on bad streams
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            note = f"decord failed ({first_line.split(': ', 1)[-1][:160]}); read with PyAV"
    frames, plan, sequential = _read_pyav(data, fps_choices, num_frames, u_fps, u_start)
    if sequential is not None:
        note = f"{note or 'PyAV'}: decoded sequentially, not from the packet index ({sequential[:160]})"
    return frames, plan, note


def read_image(data: bytes, height: int, width: int) -> np.ndarray:
    """Image bytes -> (1, h, w, 3) uint8 RGB, JPEGs decoded at the smallest scale that still covers
    (height, width). Raises SampleError(`undecodable_image`)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            scale = max(height / h, width / w)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            rgb = np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleError("undecodable_image", str(exc)[:200]) from None
    return rgb[None]


def resize_cover_crop(frames: np.ndarray, height: int, width: int, u_y: float, u_x: float) -> torch.Tensor:
    """(T, h, w, 3) uint8 -> (3, T, height, width) uint8 (`unit_range` makes it float in [-1, 1]).

    Resize (antialiased bilinear) so the frames cover (height, width), then crop at offsets u_y, u_x in
    [0, 1) of the slack (0.5 = centre). The resize runs on uint8 in channels-last layout (torch's
    vectorised path: ~10x faster than on float here; results within 1/255 of it)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top = min(size[0] - height, int(u_y * (size[0] - height + 1)))
    left = min(size[1] - width, int(u_x * (size[1] - width + 1)))
    return x[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3).contiguous()


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 pixels / 127.5 - 1, in [-1, 1] (same shape, contiguous).

    A uint8 -> float copy, then in-place float ops: all vectorised (dividing the uint8 tensor directly
    takes torch's much slower type-promoting path)."""
    out = torch.empty(pixels.shape, dtype=torch.float32)
    return out.copy_(pixels).div_(127.5).sub_(1.0)
