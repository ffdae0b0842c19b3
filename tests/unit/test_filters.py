"""Late filter: every rule, its order, missing scores, config validation and dedup among survivors."""

from __future__ import annotations

import math
import random

import pytest

from common.configtree import ConfigError
import typing

from curation.filters import (
    REJECT_REASONS,
    SCORE_COLUMNS,
    DedupPriority,
    FilterConfig,
    apply_filters,
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


def test_apply_filters_dedups_only_survivors_deterministically():
    rows = [
        good_row(clip_id="a", phash=0, clip_similarity=0.30),
        good_row(clip_id="b", phash=0b11, clip_similarity=0.40),  # near-dup of a, higher priority
        good_row(clip_id="c", phash=0b1, clip_similarity=0.90, motion=0.0),  # best but rejected: static
        good_row(clip_id="d", phash=-1, clip_similarity=0.25),  # far from the others
        good_row(clip_id="e", phash=None),
    ]
    outcomes = []
    for seed in range(4):
        shuffled = [dict(r) for r in rows]
        random.Random(seed).shuffle(shuffled)
        apply_filters(shuffled, CFG)
        outcomes.append({r["clip_id"]: (r["kept"], r["reject_reason"], r["duplicate_of"]) for r in shuffled})
    assert all(o == outcomes[0] for o in outcomes)
    got = outcomes[0]
    assert got["b"] == (True, None, None)
    assert got["a"] == (False, "duplicate", "b")
    assert got["c"] == (False, "static", None)
    assert got["d"] == (True, None, None)
    assert got["e"][:2] == (False, "missing_phash")
    no_dedup = apply_filters([dict(r) for r in rows], FilterConfig(**{**CFG.__dict__, "dedup_max_hamming": None}))
    assert {r["clip_id"] for r in no_dedup if r["kept"]} == {"a", "b", "d", "e"}
