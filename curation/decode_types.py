"""The types that the decode modules share: the config, frame sizes, the decoder process's protocol, and
the picture-size check (`over_max_pixels`, which curation.images applies to still images too).

A leaf module (it imports nothing of curation but curation.probe's ProbeInfo), so that curation.decode
(the caller's side), curation.decode_backends (the PyAV and decord passes) and curation.decode_worker (the
decoder process) all import it and not each other:

    decode_types  <-  decode_backends  <-  decode_worker
         ^                  ^
         +---------------- decode   (starts `python -m curation.decode_worker`; never imports it)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from common.configtree import check_fields
from curation.probe import ProbeInfo

Isolation = Literal["process", "none"]
Backend = Literal["auto", "decord", "pyav"]


@dataclass
class DecodeConfig:
    """How one source is decoded (sizes, memory and time bounds, backend, isolation)."""

    detect_width: int = 128
    """Width of the small frames used for shot detection and motion (even; height keeps aspect, even)."""
    work_max_side: int = 512
    """Long side of the frames kept for scoring and encoding (even sizes; never upscales). Keep it equal to
    encode.max_side: larger costs a resize of every encoded frame, smaller loses resolution."""
    max_memory_mb: int = 2048
    """If work-size frames would exceed this, keep only `small` (frames=None); the pipeline then
    re-decodes kept ranges with decode_range()."""
    timeout_s: float = 300.0
    """Wall-clock bound per source; a hanging decoder is killed: SourceError('decode timed out after N s')."""
    keep_frames: bool = True
    """False: produce only `small` (frames=None) and let the decoder scale straight to detect size,
    which is several times cheaper on HD sources (detection-only callers, benchmarks, tests)."""
    max_frames: int = 200_000
    """A source that decodes to more frames than this is rejected (SourceError), never silently cut."""
    max_pixels: int = 64_000_000
    """Largest picture accepted, width x height as the header declares it, checked before anything is
    decoded: a still image, or one frame of a video. Larger ones are a recorded rejection: a 1 MB PNG can
    declare 30000 x 30000 pixels (2.7 GB as RGB), a decompression bomb. 64 MP holds the photos of real
    cameras (61 MP full frame, 50 MP phones) and 8K video (33 MP); raise it for 100 MP medium-format photos.
    PIL refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS (179 MP) whatever this says."""
    isolation: Isolation = "process"
    """Where the decoder runs: 'process' (the caller's killable decoder process, default) or 'none'
    (in-process: no timeout, no crash protection)."""
    backend: Backend = "auto"
    """'auto' (PyAV, then decord when PyAV fails or decodes nothing), 'pyav' only, or 'decord' only."""
    decoder_threads: int = 0
    """Decoder threads (0 = the library default). The pipeline's stage-1 actors turn 0 into their CPU share
    (job.process_cpus): their pool already fills every core."""
    batch_frames: int = 32
    """Frames fetched from decord per call (bounds the transient memory of one batch)."""
    scratch_dir: str | None = None
    """Folder for the child's frame files; None = /dev/shm when writable, else the system temp dir."""

    def __post_init__(self):
        check_fields(
            self,
            ("detect_width", self.detect_width >= 16 and self.detect_width % 2 == 0, "must be even and >= 16"),
            ("work_max_side", self.work_max_side >= 16 and self.work_max_side % 2 == 0, "must be even and >= 16"),
            ("timeout_s", self.timeout_s > 0, "must be > 0 seconds"),
            ("max_frames", self.max_frames >= 1, "must be >= 1"),
            ("batch_frames", self.batch_frames >= 1, "must be >= 1"),
            ("max_pixels", self.max_pixels >= 1, "must be >= 1"),
        )


def over_max_pixels(width: int, height: int, max_pixels: int) -> str | None:
    """THE decompression-bomb check of a picture's declared size, for still images (curation.images) and
    video frames (curation.decode_backends) alike: the rejection reason when width x height is over
    `max_pixels` (decode.max_pixels), else None."""
    if width * height <= max_pixels:
        return None
    return (f"{width}x{height} pixels ({width * height / 1e6:.1f} MP), over decode.max_pixels={max_pixels}: "
            "not decoded")


# --------------------------------------------------------------------------- sizes


def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def small_size(width: int, height: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(w, h) of the detection frames: detect_width wide, even height keeping the aspect."""
    return cfg.detect_width, _even(height * cfg.detect_width / width)


def work_size(width: int, height: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(w, h) of the work frames: long side <= work_max_side, even, never upscaled."""
    scale = min(1.0, cfg.work_max_side / max(width, height))
    w, h = _even(width * scale), _even(height * scale)
    # never upscale through rounding
    return min(w, width - width % 2 or 2), min(h, height - height % 2 or 2)


# --------------------------------------------------------------------------- decoder process protocol


@dataclass
class DecodeRequest:
    """One job for the decoder process (one JSON line on its stdin): decode `src` into `folder`."""

    src: str
    """Path of the source (bytes are written to the scratch folder first)."""
    cfg: DecodeConfig
    folder: str
    """Scratch folder the answer's frames are written to: small.raw, work.raw, ts.npy."""
    info: ProbeInfo | None = None
    """The caller's probe of `src`; None = the decoder process probes it."""
    start: int = 0
    """First decoded-frame index wanted."""
    end: int | None = None
    """One past the last decoded-frame index wanted (None = to the end)."""
    small: bool = True
    """Also write the detection-size frames."""
    keep_work: bool = True
    """Write the work-size frames (they may still be dropped over cfg.max_memory_mb)."""
    span: tuple[float, float, int] | None = None
    """decode_range's seek: (first timestamp, last timestamp, frame count) of the wanted range."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> DecodeRequest:
        raw = json.loads(line)
        raw["cfg"] = DecodeConfig(**raw["cfg"])
        raw["info"] = ProbeInfo(**raw["info"]) if raw["info"] else None
        raw["span"] = tuple(raw["span"]) if raw["span"] else None
        return cls(**raw)


@dataclass
class DecodeAnswer:
    """The decoder process's answer to one request (one JSON line on its stdout).

    Exactly one of: frames written (`info` set), `error` (the input is unusable: a SourceError reason) or
    `bug` (the traceback of an exception that is not about the input, a bug or this machine failing: the
    caller raises DecoderBugError).
    """

    info: ProbeInfo | None = None
    count: int = 0
    """Frames written."""
    keep_work: bool = False
    """Whether work.raw holds the work-size frames (False when they went over cfg.max_memory_mb)."""
    bad: int = 0
    """Packets the decoder reported corrupt and skipped."""
    backend: str = ""
    """Which decoder produced the frames ('pyav' or 'decord')."""
    error: str | None = None
    bug: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: bytes | str) -> DecodeAnswer:
        raw = json.loads(line)
        raw["info"] = ProbeInfo(**raw["info"]) if raw["info"] else None
        return cls(**raw)
