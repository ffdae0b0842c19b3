"""Late filter (stage 5): every candidate clip keeps all its scores; this decides `kept` and `reject_reason`.

`apply_filters` is the late filter the job runs (pipeline.finalize calls it on every staged clip row): per
row `reject_reason` with the rules of the row's kind (`for_kind`), then near-duplicates per kind.

A row is a dict holding a clip's columns (see SCORE_COLUMNS). `reject_reason` walks the rules in the order
below and returns the first failing one's code (a key of REJECT_REASONS), or None to keep the clip. Every
threshold is None = off. A score that an enabled rule needs but that is missing or NaN rejects the clip with
`missing_<score>`; it never raises. Stage 1 calls `reject_reason` too, with the thresholds known there, to
decide which clips to encode.

Near-duplicates are decided last and globally (`mark_duplicates`): only among clips that passed every
other rule, so a duplicate is never dropped in favour of a clip that is itself rejected.

Rule order (cheap and structural first, semantic later, dedup last):
 1 duration (min/max_duration_s)      2 caption rules (caption_<issue>)   3 min_text_score
 4 max_blank_fraction                 5 min/max_brightness                6 min_contrast
 7 min_sharpness                      8 min/max_motion                    9 max_flicker
10 min_aesthetic                     11 min_clip_similarity              12 duplicate (mark_duplicates)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from common.configtree import ConfigError
from curation.dedup import DedupIndex, find_duplicates
from curation.text_rules import TEXT_ISSUES

# Column names of the per-clip scores in clips.parquet (rows given to reject_reason use these keys).
SCORE_COLUMNS: dict[str, str] = {
    "duration_s": "(end_frame - start_frame) / fps",
    "text_score": "caption quality in [0, 1] (curation.text_rules)",
    "text_issue": "first caption issue code or null (curation.text_rules.TEXT_ISSUES); a string column",
    "clip_similarity": "open_clip cosine between mean frame embedding and caption (curation.clip_score)",
    "motion": "mean optical flow, % of frame width per second (curation.motion)",
    "flicker": "mean global brightness jump between consecutive frames, % of range (curation.motion)",
    "sharpness": "variance of the Laplacian at 256 px width (curation.quality)",
    "brightness": "mean luma in [0, 1] (curation.quality)",
    "contrast": "luma standard deviation in [0, 1] (curation.quality)",
    "colorfulness": "Hasler-Suesstrunk colourfulness (curation.quality)",
    "blank_fraction": "share of sampled frames that are uniform (curation.quality)",
    "aesthetic": "LAION-style aesthetic rating; only when scores.quality.aesthetic_head is set",
    "phash": "64-bit perceptual hash of the middle frame, int64 (curation.dedup)",
    "score_error": "message when a scoring stage failed on this clip, else null; a string column",
    "duplicate_of": "clip_id of the kept near-duplicate, or null (curation.dedup); a string column",
}

REJECT_REASONS: dict[str, str] = {
    "too_short": "clip shorter than filter.min_duration_s",
    "too_long": "clip longer than filter.max_duration_s",
    **{f"caption_{code}": f"caption rule: {text}" for code, text in TEXT_ISSUES.items()},
    "low_text_score": "text_score below filter.min_text_score",
    "blank_frames": "blank_fraction above filter.max_blank_fraction (black, white or flat frames)",
    "too_dark": "brightness below filter.min_brightness",
    "too_bright": "brightness above filter.max_brightness",
    "low_contrast": "contrast below filter.min_contrast",
    "blurry": "sharpness below filter.min_sharpness",
    "static": "motion below filter.min_motion",
    "too_fast": "motion above filter.max_motion (whip pans, shaky footage)",
    "flicker": "flicker above filter.max_flicker (strobes, flashes)",
    "low_aesthetic": "aesthetic below filter.min_aesthetic",
    "caption_mismatch": "clip_similarity below filter.min_clip_similarity",
    "duplicate": "near-duplicate (phash within filter.dedup_max_hamming bits) of a kept clip with higher priority",
    "score_error": "a scoring stage failed on this clip (the message is in the job log and stats)",
    **{f"missing_{col}": f"{col} is missing or NaN but a filter on it is enabled" for col in (
        "duration_s", "text_score", "blank_fraction", "brightness", "contrast", "sharpness", "motion",
        "flicker", "aesthetic", "clip_similarity", "phash")},
}


DedupPriority = Literal[
    "clip_similarity", "aesthetic", "sharpness", "contrast", "colorfulness", "text_score", "motion", "duration_s"
]
"""Score columns that can rank a near-duplicate group (highest kept)."""


@dataclass
class FilterConfig:
    """Thresholds of the late filter (`filter`); None switches a rule off."""

    min_duration_s: float | None = 1.0
    """Reject clips shorter than this (seconds)."""
    max_duration_s: float | None = None
    """Reject clips longer than this (seconds); shots are already split at shots.max_clip_s."""
    caption_rules: bool = True
    """Reject captions with a text issue (empty, boilerplate, file name, ...): reason caption_<issue>."""
    min_text_score: float | None = None
    """Reject when text_score (0-1) is below this."""
    max_blank_fraction: float | None = 0.34
    """Reject when more than this share of the sampled frames is blank (uniform)."""
    min_brightness: float | None = 0.04
    """Reject very dark clips (mean luma below this, 0-1)."""
    max_brightness: float | None = 0.97
    """Reject washed-out clips (mean luma above this, 0-1)."""
    min_contrast: float | None = 0.02
    """Reject flat clips (luma std below this, 0-1)."""
    min_sharpness: float | None = 15.0
    """Reject blurry clips (variance of the Laplacian at 256 px wide below this)."""
    min_motion: float | None = 0.5
    """Reject static clips (motion below this, % of width per second; a still scene on a tripod is ~0-0.3)."""
    max_motion: float | None = 150.0
    """Reject clips moving faster than this (% of width per second, i.e. 1.5 frame widths per second)."""
    max_flicker: float | None = 8.0
    """Reject strobing clips (mean global brightness jump per frame above this, % of range)."""
    min_aesthetic: float | None = None
    """Reject clips rated below this by the aesthetic head (needs scores.quality.aesthetic_head)."""
    min_clip_similarity: float | None = None
    """Reject clips whose caption matches the frames less than this (open_clip cosine; ~0.2 for ViT-H-14).
    Must stay null with scores.clip.model=tiny-random (random weights): see validate_filter_config."""
    dedup_max_hamming: int | None = 6
    """Near-duplicates: phash within this many bits of a kept clip; None switches dedup off."""
    dedup_bands: int = 4
    """LSH bands for dedup (curation.dedup): 4 suits up to a few million clips per dedup pass."""
    dedup_priority: DedupPriority = "clip_similarity"
    """Score column deciding which clip of a duplicate group is kept (highest; NaN lowest; ties: clip_id).
    With random CLIP weights (tiny-random) clip_similarity is replaced by sharpness (see apply_filters)."""


@dataclass(frozen=True)
class ScoreRule:
    """One threshold rule of the late filter: a score column, the FilterConfig fields of its lower and
    upper bound (None: the rule has no such bound) and the reject reasons for falling below / above them.
    The one table of rules: reject_reason applies it, the curation report (pipeline.report) draws it."""

    score: str
    min_field: str | None
    max_field: str | None
    low_reason: str = ""
    high_reason: str = ""

    def bounds(self, cfg: FilterConfig) -> tuple[float | None, float | None]:
        """(lower, upper) threshold of this rule in `cfg`; None where off or not a bound of this rule."""
        return (getattr(cfg, self.min_field) if self.min_field else None,
                getattr(cfg, self.max_field) if self.max_field else None)


DURATION_RULE = ScoreRule("duration_s", "min_duration_s", "max_duration_s", "too_short", "too_long")
"""Rule 1 (before the caption rules)."""
SCORE_RULES: tuple[ScoreRule, ...] = (
    ScoreRule("text_score", "min_text_score", None, "low_text_score"),
    ScoreRule("blank_fraction", None, "max_blank_fraction", high_reason="blank_frames"),
    ScoreRule("brightness", "min_brightness", "max_brightness", "too_dark", "too_bright"),
    ScoreRule("contrast", "min_contrast", None, "low_contrast"),
    ScoreRule("sharpness", "min_sharpness", None, "blurry"),
    ScoreRule("motion", "min_motion", "max_motion", "static", "too_fast"),
    ScoreRule("flicker", None, "max_flicker", high_reason="flicker"),
    ScoreRule("aesthetic", "min_aesthetic", None, "low_aesthetic"),
    ScoreRule("clip_similarity", "min_clip_similarity", None, "caption_mismatch"),
)
"""Rules 3-11, in the order reject_reason applies them (after duration and the caption rules)."""
VIDEO_ONLY_FIELDS: tuple[str, ...] = ("min_duration_s", "max_duration_s", "min_motion", "max_motion", "max_flicker")
"""Thresholds that do not apply to images (no duration, motion or flicker): off in for_kind(cfg, "image")."""


def validate_filter_config(cfg: FilterConfig, *, clip_random_weights: bool = False, has_aesthetic: bool = True) -> None:
    """Raise ConfigError for inconsistent thresholds, before any work starts."""
    for lo, hi in (("min_duration_s", "max_duration_s"), ("min_brightness", "max_brightness"),
                   ("min_motion", "max_motion")):
        a, b = getattr(cfg, lo), getattr(cfg, hi)
        if a is not None and b is not None and a > b:
            raise ConfigError(f"filter.{lo} ({a}) is above filter.{hi} ({b})")
    if cfg.dedup_max_hamming is not None:
        try:
            DedupIndex(cfg.dedup_max_hamming, cfg.dedup_bands)
        except ValueError as exc:
            raise ConfigError(f"filter.dedup_max_hamming / filter.dedup_bands: {exc}") from exc
    if cfg.min_clip_similarity is not None and clip_random_weights:
        raise ConfigError(
            "filter.min_clip_similarity is set but scores.clip has random weights (tiny-random, no checkpoint): "
            "its scores mean nothing. Set filter.min_clip_similarity=null or give scores.clip.checkpoint"
        )
    if cfg.min_aesthetic is not None and not has_aesthetic:
        raise ConfigError("filter.min_aesthetic needs scores.quality.aesthetic_head (or set it to null)")
    if cfg.dedup_priority == "aesthetic" and not has_aesthetic:
        raise ConfigError("filter.dedup_priority=aesthetic needs scores.quality.aesthetic_head")
    if cfg.dedup_bands < 1:
        raise ConfigError("filter.dedup_bands must be >= 1")


def for_kind(cfg: FilterConfig, kind: str) -> FilterConfig:
    """The thresholds that apply to a clip of `kind`: images have no duration, motion or flicker."""
    if kind == "image":
        return dataclasses.replace(cfg, **{field: None for field in VIDEO_ONLY_FIELDS})
    return cfg


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def reject_reason(row: dict, cfg: FilterConfig) -> str | None:
    """First failing rule's code in the documented order (duplicates excluded: see mark_duplicates).

    A row with a non-empty `score_error` is rejected as "score_error" before any rule."""
    if row.get("score_error"):
        return "score_error"
    if _value(row, "duration_s") is None and all(_value(row, k) is not None for k in ("start_frame", "end_frame", "fps")):
        if float(row["fps"]) > 0:
            row = {**row, "duration_s": (float(row["end_frame"]) - float(row["start_frame"])) / float(row["fps"])}
    if (r := _check(row, DURATION_RULE, cfg)):
        return r
    if cfg.caption_rules and row.get("text_issue"):
        code = f"caption_{row['text_issue']}"
        return code if code in REJECT_REASONS else "caption_boilerplate"
    for rule in SCORE_RULES:
        if (r := _check(row, rule, cfg)) is not None:
            return r
    return None


def _check(row: dict, rule: ScoreRule, cfg: FilterConfig) -> str | None:
    lo, hi = rule.bounds(cfg)
    if lo is None and hi is None:
        return None
    v = _value(row, rule.score)
    if v is None:
        return f"missing_{rule.score}"
    if lo is not None and v < lo:
        return rule.low_reason
    if hi is not None and v > hi:
        return rule.high_reason
    return None


def mark_duplicates(rows: list[dict], cfg: FilterConfig) -> dict[str, str]:
    """Among rows with no reject_reason yet, find near-duplicates; sets `duplicate_of`, `reject_reason`
    ("duplicate", or "missing_phash") and `kept` on the rows in place and returns {dup_id: kept_id}.

    Rows need `clip_id`, `phash` and the priority column. Deterministic whatever the row order.
    """
    if cfg.dedup_max_hamming is None:
        return {}
    items = []
    for row in rows:
        if row.get("reject_reason") is not None:
            continue
        h = row.get("phash")
        if h is None or (isinstance(h, float) and math.isnan(h)):
            row.update(reject_reason="missing_phash", kept=False)
            continue
        p = _value(row, cfg.dedup_priority)
        items.append((str(row["clip_id"]), int(h), float("nan") if p is None else p))
    dups = find_duplicates(items, cfg.dedup_max_hamming, cfg.dedup_bands)
    for row in rows:
        kept_id = dups.get(str(row.get("clip_id")))
        if kept_id is not None and row.get("reject_reason") is None:
            row.update(duplicate_of=kept_id, reject_reason="duplicate", kept=False)
    return dups


def apply_filters(rows: list[dict], cfg: FilterConfig, *, media_bytes: list[int], random_weights: bool) -> None:
    """The job's late filter: set `reject_reason`, `kept` and `duplicate_of` on every row (and a null
    `score_error` where stage 2 left none) in place: per-row rules of the row's kind, then near-duplicates
    among the survivors of each kind.

    `media_bytes[i]`: bytes stage 1 encoded for rows[i]. A row that passes here was encoded there (stage 1
    encodes what passes every rule it can check, a subset of these, and a resume refuses a changed `filter`
    section), so one that passes without media is a bug: RuntimeError naming the clip.
    `random_weights`: the open_clip scores are meaningless (tiny-random): no similarity threshold, and
    duplicate groups keep their sharpest clip instead of the "best matching" one.
    """
    if len(media_bytes) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(media_bytes)} media sizes")
    if random_weights:
        cfg = dataclasses.replace(cfg, min_clip_similarity=None)
        if cfg.dedup_priority == "clip_similarity":
            cfg = dataclasses.replace(cfg, dedup_priority="sharpness")
    rules = {kind: for_kind(cfg, kind) for kind in {row["kind"] for row in rows}}
    for row, size in zip(rows, media_bytes):
        row.setdefault("score_error", None)
        row.setdefault("duplicate_of", None)
        reason = reject_reason(row, rules[row["kind"]])
        if reason is None and size == 0:
            raise RuntimeError(f"clip {row.get('clip_id')} passes the late filter but stage 1 encoded nothing for "
                               "it: stage 1's filter must never be stricter than the late one (a bug)")
        row["reject_reason"] = reason
        row["kept"] = reason is None
    for kind in sorted({row["kind"] for row in rows}):
        mark_duplicates([r for r in rows if r["kind"] == kind], cfg)
