"""Late filter: every rule, its order, missing scores, config validation and dedup among survivors."""

from __future__ import annotations

import math
import random
import typing

import pytest

from common.configtree import ConfigError
from curation.config import CurateConfig
from curation.filters import (
    REJECT_REASONS,
    SCORE_COLUMNS,
    DedupPriority,
    FilterConfig,
    apply_filters,
    for_kind,
    reject_reason,
    validate_filter_config,
)

CFG = FilterConfig(min_text_score=0.5, min_aesthetic=4.0, min_clip_similarity=0.2, max_duration_s=20.0)


def good_row(**changes) -> dict:
    row = {
        "clip_id": "v-000", "duration_s": 4.0, "text_score": 0.9, "text_issue": None, "blank_fraction": 0.0,
        "brightness": 0.4, "contrast": 0.2, "sharpness": 120.0, "motion": 10.0, "flicker": 0.5,
        "aesthetic": 5.5, "clip_similarity": 0.3, "phash": 12345,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({}, None),
        ({"duration_s": 0.5}, "too_short"),
        ({"duration_s": 25.0}, "too_long"),
        ({"text_issue": "boilerplate", "text_score": 0.0}, "caption_boilerplate"),
        ({"text_issue": "empty"}, "caption_empty"),
        ({"text_score": 0.3}, "low_text_score"),
        ({"blank_fraction": 0.67}, "blank_frames"),
        ({"brightness": 0.01}, "too_dark"),
        ({"brightness": 0.99}, "too_bright"),
        ({"contrast": 0.005}, "low_contrast"),
        ({"sharpness": 3.0}, "blurry"),
        ({"motion": 0.1}, "static"),
        ({"motion": 400.0}, "too_fast"),
        ({"flicker": 30.0}, "flicker"),
        ({"aesthetic": 3.0}, "low_aesthetic"),
        ({"clip_similarity": 0.05}, "caption_mismatch"),
        ({"clip_similarity": float("nan")}, "missing_clip_similarity"),
        ({"motion": None}, "missing_motion"),
        ({"score_error": "decoder hiccup"}, "score_error"),
    ],
)
def test_each_rule(changes, reason):
    assert reject_reason(good_row(**changes), CFG) == reason
    assert reason is None or reason in REJECT_REASONS


def test_first_failing_rule_wins_in_documented_order():
    row = good_row(duration_s=0.2, text_issue="too_short", motion=0.0, clip_similarity=0.0)
    assert reject_reason(row, CFG) == "too_short"
    row["duration_s"] = 5.0
    assert reject_reason(row, CFG) == "caption_too_short"
    row["text_issue"] = None
    assert reject_reason(row, CFG) == "static"


def test_duration_from_frame_bounds_when_absent():
    row = good_row(start_frame=10, end_frame=22, fps=24.0)
    del row["duration_s"]
    assert reject_reason(row, CFG) == "too_short"  # 0.5 s
    row["end_frame"] = 130
    assert reject_reason(row, CFG) is None


def test_disabled_rules_ignore_missing_scores():
    off = FilterConfig(**{k: None for k in (
        "min_duration_s", "max_blank_fraction", "min_brightness", "max_brightness", "min_contrast",
        "min_sharpness", "min_motion", "max_motion", "max_flicker")}, caption_rules=False)
    assert reject_reason({"clip_id": "x"}, off) is None
    assert reject_reason({"clip_id": "x"}, FilterConfig()) == "missing_duration_s"


def test_random_rows_never_crash_and_use_registered_codes():
    rng = random.Random(0)
    values = [None, float("nan"), "junk", -1.0, 0.0, 0.5, 1e9, math.inf]
    keys = list(good_row())
    for _ in range(500):
        row = good_row(**{k: rng.choice(values) for k in rng.sample(keys[1:], 3) if k != "text_issue"})
        reason = reject_reason(row, CFG)
        assert reason is None or reason in REJECT_REASONS


def test_validate_filter_config():
    validate_filter_config(FilterConfig())
    with pytest.raises(ConfigError, match="min_clip_similarity"):
        validate_filter_config(FilterConfig(min_clip_similarity=0.2), clip_random_weights=True)
    with pytest.raises(ConfigError, match="min_motion"):
        validate_filter_config(FilterConfig(min_motion=5.0, max_motion=1.0))
    with pytest.raises(ConfigError, match="dedup_bands"):
        validate_filter_config(FilterConfig(dedup_max_hamming=20, dedup_bands=2))
    with pytest.raises(ConfigError, match="aesthetic_head"):
        validate_filter_config(FilterConfig(min_aesthetic=5.0), has_aesthetic=False)
    with pytest.raises(ConfigError, match="dedup_priority=aesthetic"):
        validate_filter_config(FilterConfig(dedup_priority="aesthetic"), has_aesthetic=False)


def test_dedup_priority_choices_are_numeric_score_columns():
    choices = typing.get_args(DedupPriority)
    assert "clip_similarity" in choices and set(choices) <= set(SCORE_COLUMNS)
    assert not {"text_issue", "phash", "score_error", "duplicate_of"} & set(choices)  # not scores to rank by


def test_images_skip_duration_and_motion_rules():
    img = for_kind(CFG, "image")
    assert (img.min_duration_s, img.max_duration_s, img.min_motion, img.max_motion, img.max_flicker) == (None,) * 5
    assert img.min_sharpness == CFG.min_sharpness and for_kind(CFG, "video") is CFG


def _apply(rows: list[dict], cfg: FilterConfig) -> list[dict]:
    apply_filters(rows, cfg, media_bytes=[10] * len(rows), random_weights=False)
    return rows


def test_apply_filters_dedups_only_survivors_deterministically():
    rows = [
        good_row(clip_id="a", phash=0, clip_similarity=0.30),
        good_row(clip_id="b", phash=0b11, clip_similarity=0.40),  # near-dup of a, higher priority
        good_row(clip_id="c", phash=0b1, clip_similarity=0.90, motion=0.0),  # best but rejected: static
        good_row(clip_id="d", phash=-1, clip_similarity=0.25),  # far from the others
        good_row(clip_id="e", phash=None),
    ]
    for row in rows:
        row["kind"] = "video"
    outcomes = []
    for seed in range(4):
        shuffled = [dict(r) for r in rows]
        random.Random(seed).shuffle(shuffled)
        _apply(shuffled, CFG)
        outcomes.append({r["clip_id"]: (r["kept"], r["reject_reason"], r["duplicate_of"]) for r in shuffled})
    assert all(o == outcomes[0] for o in outcomes)
    got = outcomes[0]
    assert got["b"] == (True, None, None)
    assert got["a"] == (False, "duplicate", "b")
    assert got["c"] == (False, "static", None)
    assert got["d"] == (True, None, None)
    assert got["e"][:2] == (False, "missing_phash")
    no_dedup = _apply([dict(r) for r in rows], FilterConfig(**{**CFG.__dict__, "dedup_max_hamming": None}))
    assert {r["clip_id"] for r in no_dedup if r["kept"]} == {"a", "b", "d", "e"}


def _row(cid, kind="video", **kw):
    row = {"clip_id": cid, "source": cid.split("_")[0], "kind": kind, "start_frame": 0, "end_frame": 48,
           "fps": 24.0 if kind == "video" else None, "text_issue": None, "text_score": 0.9, "motion": 5.0,
           "flicker": 0.1, "sharpness": 100.0, "brightness": 0.5, "contrast": 0.2, "blank_fraction": 0.0,
           "clip_similarity": 0.3, "phash": 0x0F0F0F0F0F0F0F0F}
    if kind == "image":
        row.update(motion=None, flicker=None, end_frame=1)
    row.update(kw)
    return row


def test_job_filter_kinds_dedup_random_weights_and_unencoded():
    """The late filter as pipeline.finalize calls it: per kind, dedup per kind, random CLIP weights, a
    rejected clip that stage 1 never encoded, and a passing one that it never encoded (a bug: it raises)."""
    cfg = CurateConfig().filter
    cfg.min_clip_similarity = 0.25
    rows = [
        _row("a_1"),                                   # kept
        _row("b_1", clip_similarity=0.35, phash=0x0F0F0F0F0F0F0F0E),  # 1 bit from a_1, higher priority
        _row("c_1", motion=0.0, phash=1),              # static
        _row("d_1", clip_similarity=0.1, phash=2**40), # caption mismatch (real weights)
        _row("e_1", kind="image"),                     # images: no motion/duration rules; own dedup group
        _row("f_1", phash=2**50 + 3, score_error="clip scoring failed: ValueError: x"),  # stage 2 failed on it
        _row("g_1", kind="image", clip_similarity=0.35, phash=0x0F0F0F0F0F0F0F0E),  # = b_1 hash, other kind
    ]
    unencoded = _row("h_1", phash=2**55 + 7)  # passes every rule, but stage 1 encoded nothing for it
    with pytest.raises(RuntimeError, match="clip h_1 passes the late filter but stage 1 encoded nothing"):
        apply_filters([dict(r) for r in rows] + [unencoded], cfg, media_bytes=[10] * len(rows) + [0],
                      random_weights=False)
    apply_filters(rows, cfg, media_bytes=[10, 10, 0, 10, 10, 0, 10], random_weights=False)  # c_1, f_1: rejected
    got = {r["clip_id"]: r["reject_reason"] for r in rows}
    assert got == {"a_1": "duplicate", "b_1": None, "c_1": "static", "d_1": "caption_mismatch", "e_1": "duplicate",
                   "f_1": "score_error", "g_1": None}
    assert rows[0]["duplicate_of"] == "b_1" and rows[4]["duplicate_of"] == "g_1"
    assert [r["kept"] for r in rows] == [False, True, False, False, False, False, True]
    assert rows[5]["score_error"] == "clip scoring failed: ValueError: x" and rows[2]["score_error"] is None
    # random weights: no similarity threshold, and the sharper duplicate wins instead of the "better match"
    rows = [_row("d_1", clip_similarity=0.1, sharpness=300.0), _row("g_1", clip_similarity=0.9, phash=rows[0]["phash"])]
    apply_filters(rows, cfg, media_bytes=[10, 10], random_weights=True)
    assert [(r["kept"], r["reject_reason"]) for r in rows] == [(True, None), (False, "duplicate")]
    with pytest.raises(ValueError, match="media sizes"):
        apply_filters(rows, cfg, media_bytes=[10], random_weights=False)
