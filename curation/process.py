"""Per-source orchestration, no Ray: one video (or image-text pair) in, manifest rows + encoded samples out.

`process_source` is what a stage-1 Ray actor calls for every input. Whatever goes wrong with the input
becomes `status="error"` and a one-line reason in the source row; a bug in our code raises, so the job
fails loudly (curation.errors.is_input_error is the rule between the two).

Video path (each source is decoded ONCE; the decode feeds both shot detection and scoring):
    bytes -> probe -> decode (small frames for detection/motion + work-resolution frames)
          -> detect cuts -> clip spans -> per clip: motion, quality, phash, caption rules, K frames for CLIP
          -> cheap filters (everything but CLIP similarity) -> encode survivors: H.264 mp4 + first-frame jpg
Image path: bytes -> header checks (curation/images.py) -> decode -> quality, phash, caption rules, the image
            for CLIP -> jpg.

The open_clip similarity (stage 2, GPU actors) and the final filter / global dedup (driver, after the
stream) fill in `clip_similarity`, `kept`, `reject_reason` and `shard` later: filtering is late, and every
candidate clip keeps all its scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import cv2
import numpy as np

from curation.clip_score import sample_frame_indices
from curation.config import CurateConfig
from curation.decode import decode_range, decode_video, local_copy
from curation.dedup import phash64
from curation.encode import encode_jpeg, encode_mp4, resize_max_side
from curation.errors import SourceError, is_input_error
from curation.filters import FilterConfig, for_kind, reject_reason
from curation.images import decode_image
from curation.inputs import InputItem, read_source
from curation.motion import motion_scores
from curation.probe import probe
from curation.quality import quality_scores
from curation.shots import detect_cuts, shots_to_clips
from curation.text_rules import caption_issues

CLIP_SIMILARITY = "clip_similarity"


@dataclasses.dataclass
class SourceResult:
    """Everything one source produced.

    source_row: the sources.parquet row (+ private `_`-prefixed keys: timings, notes for stats).
    clip_rows: one manifest row per candidate clip (an image-text pair is one "clip" of one frame).
    media: per clip (mp4 bytes | None, jpg bytes | None); None when the clip was rejected before encoding.
    clip_frames: per clip, the (k, h, w, 3) uint8 frames open_clip scores in stage 2 (dropped after it).
    """

    source_row: dict
    clip_rows: list[dict] = dataclasses.field(default_factory=list)
    media: list[tuple[bytes | None, bytes | None]] = dataclasses.field(default_factory=list)
    clip_frames: list[np.ndarray] = dataclasses.field(default_factory=list)


def clip_id_for(source: str, start_frame: int, end_frame: int) -> str:
    """Deterministic clip id: sha1(source)[:12] + frame range; no dots (WebDataset splits keys on them)."""
    return f"{hashlib.sha1(source.encode('utf-8')).hexdigest()[:12]}_{start_frame:06d}_{end_frame:06d}"


def one_line(exc: BaseException) -> str:
    """A manifest reason: SourceError text as is, anything else prefixed with its type."""
    text = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500] or type(exc).__name__


def source_row(item: InputItem, status: str = "ok", error: str | None = None, **fields) -> dict:
    """A sources.parquet row with nulls for what is unknown."""
    row = {
        "source": item.source,
        "kind": item.kind,
        "status": status,
        "error": error,
        "num_frames": None,
        "fps": None,
        "width": None,
        "height": None,
        "cuts": [],
    }
    row.update(fields)
    return row


def error_result(item: InputItem, reason: str, **timings) -> SourceResult:
    return SourceResult(source_row(item, "error", reason, _timing=timings))


def cheap_filter_cfg(cfg: CurateConfig, kind: str = "video"):
    """The filter config used in stage 1 to decide what to encode: everything but the CLIP and aesthetic
    thresholds (those scores are not known before stage 2)."""
    return for_kind(dataclasses.replace(cfg.filter, min_clip_similarity=None, min_aesthetic=None), kind)


def _quality_cfg(cfg: CurateConfig):
    # The aesthetic head needs CLIP image embeddings: it runs in stage 2, not here.
    return dataclasses.replace(cfg.scores.quality, aesthetic_head=None)


def _shrink_short_side(frames: np.ndarray, side: int) -> np.ndarray:
    """Shrink (k, H, W, 3) so the shortest side is `side` (never enlarges): less data to the CLIP actors."""
    h, w = frames.shape[1:3]
    scale = side / min(h, w)
    if scale >= 1.0:
        return np.ascontiguousarray(frames)
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def _base_clip_row(item: InputItem, text_issue: str | None, text_score: float) -> dict:
    return {
        "source": item.source,
        "kind": item.kind,
        "caption": item.caption,
        "text_issue": text_issue,
        "text_score": float(text_score),
        CLIP_SIMILARITY: float("nan"),
        "out_fps": None,
        "out_width": None,
        "out_height": None,
    }


def _score_and_encode_clip(item: InputItem, span, clip, dv, cfg: CurateConfig, rules: FilterConfig,
                           text_score: float, issue: str | None
                           ) -> tuple[dict, tuple[bytes | None, bytes | None], np.ndarray]:
    """One clip's manifest row (every cheap score), its media (encoded when it passes the cheap filters,
    `rules` = cheap_filter_cfg(cfg)) and the frames open_clip scores in stage 2."""
    s, e, fps = int(span.start_frame), int(span.end_frame), float(dv.fps)
    ts = np.asarray(dv.timestamps, dtype=np.float64)
    # RGB only for the frames a score looks at; the encoder takes the YUV frames as they are
    quality_idx = sample_frame_indices(0, len(clip), cfg.scores.quality.frames_per_clip)
    clip_idx = [i - s for i in sample_frame_indices(s, e, cfg.scores.clip.frames_per_clip)]
    needed = sorted({0, len(clip) // 2, *quality_idx, *clip_idx})
    rgb = dict(zip(needed, clip.rgb(needed)))
    row = _base_clip_row(item, issue, text_score)
    row.update(
        clip_id=clip_id_for(item.source, s, e),
        shot_index=int(span.shot_index),
        start_frame=s,
        end_frame=e,
        start_s=float(ts[s]) if s < len(ts) else s / fps,
        end_s=float(ts[e]) if e < len(ts) else (float(ts[-1]) + 1.0 / fps if len(ts) else e / fps),
        fps=fps,
        duration_s=(e - s) / fps,
        width=int(dv.width),
        height=int(dv.height),
        phash=int(phash64(rgb[len(clip) // 2])),
    )
    row.update(motion_scores(dv.small[s:e], fps, cfg.scores.motion))
    row.update(quality_scores(np.stack([rgb[i] for i in quality_idx]), _quality_cfg(cfg)))
    frames = _shrink_short_side(np.stack([rgb[i] for i in clip_idx]), cfg.job.clip_frame_side)
    media: tuple[bytes | None, bytes | None] = (None, None)
    if reject_reason(row, rules) is None:
        mp4, out_fps = encode_mp4(clip, fps, cfg.encode)
        first = resize_max_side(rgb[0], cfg.encode.max_side)
        media = (mp4, encode_jpeg(first, cfg.encode.jpeg_quality))
        row.update(out_fps=float(out_fps), out_width=int(first.shape[1]), out_height=int(first.shape[0]))
    return row, media, frames


def process_video(item: InputItem, data: bytes | str, cfg: CurateConfig, second_opinion=None) -> SourceResult:
    """One video (`data`: its bytes, or a local path): decode once, split into shots/clips, score, and
    encode the clips that pass the cheap filters.

    Raises SourceError for an unusable input (the caller records it).
    """
    t0 = time.perf_counter()
    info = probe(data)
    dv = decode_video(data, cfg.decode, probe_info=info)
    t_decode = time.perf_counter() - t0
    if dv.num_frames < 1:
        raise SourceError("no decodable frame")
    fps = float(dv.fps)
    cuts = [int(c) for c in detect_cuts(dv.small, fps, cfg.shots, second_opinion=second_opinion)]
    spans = shots_to_clips(cuts, dv.num_frames, fps, cfg.shots)
    t_detect = time.perf_counter() - t0 - t_decode

    text_score, issue = caption_issues(item.caption, cfg.scores.text)
    result = SourceResult(
        source_row(
            item,
            num_frames=int(dv.num_frames),
            fps=fps,
            width=int(dv.width),
            height=int(dv.height),
            cuts=cuts,
            _bad_frames=int(getattr(dv, "bad_frames", 0) or 0),
            _duration_s=float(dv.num_frames / fps) if fps > 0 else 0.0,
        )
    )
    rules = cheap_filter_cfg(cfg)
    # over max_memory_mb only `small` was kept: clips are re-decoded one by one (by seeking), from a file
    with local_copy(data, cfg.decode, needed=dv.frames is None) as range_src:
        for span in spans:
            s, e = int(span.start_frame), int(span.end_frame)
            if dv.frames is not None:
                clip = dv.frames[s:e]
            else:  # the whole source was too big for memory at work resolution: decode just this clip
                clip = decode_range(range_src, s, e, cfg.decode, probe_info=info, timestamps=dv.timestamps)
            if len(clip) == 0:
                continue
            row, media, frames = _score_and_encode_clip(item, span, clip, dv, cfg, rules, text_score, issue)
            result.clip_frames.append(frames)
            result.clip_rows.append(row)
            result.media.append(media)
    result.source_row["_timing"] = {
        "decode_s": t_decode,
        "detect_s": t_detect,
        "total_s": time.perf_counter() - t0,
    }
    return result


def process_image(item: InputItem, data: bytes, cfg: CurateConfig) -> SourceResult:
    """One image-text pair: the same scores and filters as a one-frame clip; the sample is a jpg."""
    t0 = time.perf_counter()
    img = decode_image(data, cfg.decode.max_pixels)
    h, w = img.shape[:2]
    text_score, issue = caption_issues(item.caption, cfg.scores.text)
    row = _base_clip_row(item, issue, text_score)
    row.update(
        clip_id=clip_id_for(item.source, 0, 1),
        shot_index=0,
        start_frame=0,
        end_frame=1,
        start_s=0.0,
        end_s=0.0,
        fps=None,
        duration_s=None,
        width=int(w),
        height=int(h),
        phash=int(phash64(img)),
    )
    row.update(quality_scores(img[None], _quality_cfg(cfg)))
    result = SourceResult(source_row(item, num_frames=1, width=int(w), height=int(h)))
    result.clip_frames.append(_shrink_short_side(img[None], cfg.job.clip_frame_side))
    media: tuple[bytes | None, bytes | None] = (None, None)
    if reject_reason(row, cheap_filter_cfg(cfg, "image")) is None:
        small = resize_max_side(img[None], cfg.encode.max_side)[0]
        media = (None, encode_jpeg(small, cfg.encode.jpeg_quality))
        row.update(out_width=int(small.shape[1]), out_height=int(small.shape[0]))
    result.clip_rows.append(row)
    result.media.append(media)
    result.source_row["_timing"] = {"decode_s": 0.0, "detect_s": 0.0, "total_s": time.perf_counter() - t0}
    return result


def process_source(item: InputItem, cfg: CurateConfig, second_opinion=None) -> SourceResult:
    """Read, decode and score one input.

    An unusable input is a status=error row (its caption, reading it: curation.inputs.read_source, or any
    input error of curation.errors.is_input_error while decoding and scoring it); any other exception is a
    bug of ours, or this machine failing, and propagates (the Ray job fails with its traceback).
    """
    t0 = time.perf_counter()
    if item.caption_error:
        return error_result(item, item.caption_error)
    try:
        # a local video goes to the decoder by path (no copy); images and URLs are read into memory
        data = read_source(item.uri, cfg.job.max_source_bytes, as_bytes=item.kind == "image")
        if item.kind == "image":
            return process_image(item, data, cfg)
        return process_video(item, data, cfg, second_opinion=second_opinion)
    except MemoryError:
        return error_result(item, "out of memory while decoding (lower decode.max_memory_mb)",
                            total_s=time.perf_counter() - t0)
    except Exception as exc:
        if not is_input_error(exc):
            raise  # a bug, or this machine failing: fail the job rather than record it as this input's fault
        return error_result(item, one_line(exc), total_s=time.perf_counter() - t0)
