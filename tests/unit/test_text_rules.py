"""Caption text rules: issue codes and the soft text score."""

from __future__ import annotations

import pytest

from curation.text_rules import TEXT_ISSUES, TextRuleConfig, caption_issues

CFG = TextRuleConfig()


@pytest.mark.parametrize(
    "caption, issue",
    [
        (None, "empty"),
        ("", "empty"),
        ("   ... !!", "empty"),
        ("IMG_1234.mp4", "filename"),
        ("my holiday clip.MOV", "filename"),
        ("DSC0042", "filename"),
        ("https://youtu.be/abc123", "url_only"),
        ("#fun #summer @bob www.example.com", "url_only"),
        ("Subscribe for more videos!", "boilerplate"),
        ("click here to watch the full movie", "boilerplate"),
        ("Like and subscribe", "boilerplate"),
        ("video of", "boilerplate"),
        ("Untitled", "boilerplate"),
        ("CafÃ© au lait on a wooden table", "mojibake"),
        ("a dog \ufffd running", "mojibake"),
        ("text with a \x00 control char", "mojibake"),
        ("a cat", "too_short"),
        ("Video of a dog", "too_short"),  # the 'video of' prefix is not content
        ("a " + "long " * 130 + "caption", "too_long"),
        ("dog dog dog dog dog", "repeated_tokens"),
        ("wow wow wow wow look at this", "repeated_tokens"),
    ],
)
def test_issue_codes(caption, issue):
    score, found = caption_issues(caption, CFG)
    assert found == issue
    assert found in TEXT_ISSUES
    assert 0.0 <= score <= 1.0


@pytest.mark.parametrize(
    "caption",
    [
        "A man rides a red bicycle down a hill",
        "video of a dog running on the beach",
        "Café au lait on a wooden table",
        "Two kids play soccer in the park ⚽",
        "A woman slicing tomatoes in a kitchen. www.example.com",
    ],
)
def test_good_captions_pass_with_high_score(caption):
    score, issue = caption_issues(caption, CFG)
    assert issue is None
    assert score >= 0.9


def test_hard_issues_score_zero_and_soft_ones_order_by_quality():
    assert caption_issues("IMG_1234.mp4", CFG)[0] == 0.0
    assert caption_issues("subscribe now", CFG)[0] == 0.0
    one_word, two_words, good = (caption_issues(c, CFG)[0] for c in ("sunset", "red sunset", "a red sunset sky"))
    assert one_word < two_words < good


def test_config_changes_rules():
    cfg = TextRuleConfig(min_words=1, max_words=5, boilerplate=[r"\bfoo\b"])
    assert caption_issues("sunset", cfg)[1] is None
    assert caption_issues("a foo at sunset", cfg)[1] == "boilerplate"
    assert caption_issues("subscribe", cfg)[1] is None  # default patterns replaced
    assert caption_issues("one two three four five six", cfg)[1] == "too_long"
