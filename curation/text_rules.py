"""Caption text rules (stage 4): is this caption usable as a training text?

`caption_issues` returns a soft `text_score` in [0, 1] and the first hard issue found (or None). Issue codes
(checked in this order): empty, mojibake, url_only, filename, boilerplate, too_short, too_long,
repeated_tokens. The filter stage turns an issue into the reject reason `caption_<issue>` and can also
threshold the score (`filter.min_text_score`).

text_score = length factor * diversity factor * cleanliness factor (each in [0, 1], documented below), and
0.0 whenever the issue is empty, mojibake, url_only, filename or boilerplate.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

TEXT_ISSUES: dict[str, str] = {
    "empty": "no caption, or only whitespace/punctuation",
    "mojibake": "broken encoding: replacement or control characters, or UTF-8 read as Latin-1 (e.g. 'Ã©')",
    "url_only": "nothing but URLs, hashtags, handles or punctuation",
    "filename": "a file or camera name (IMG_1234.mp4, DSC0001, clip.mov) instead of a description",
    "boilerplate": "matches a boilerplate pattern (subscribe, click here, 'video of' alone, untitled, ...)",
    "too_short": "fewer content words than text_rules.min_words",
    "too_long": "more words than text_rules.max_words",
    "repeated_tokens": "one token repeated (spam or a generation loop)",
}

_URL = re.compile(r"(https?://\S+|www\.\S+|\b\S+\.(com|net|org|io|ly|tv|be)(/\S*)?\b)", re.IGNORECASE)
_TAG = re.compile(r"[#@]\w+")
_FILENAME = re.compile(
    r"^\s*(?:[\w\-. ()\[\]]+\.(?:mp4|mov|avi|mkv|webm|m4v|flv|wmv|mpg|mpeg|3gp|jpe?g|png|gif|heic|bmp|tiff?)"
    r"|(?:img|vid|dsc|dscn|dscf|mvi|gopr|gh0\d|pxl|mov|clip|video|screen ?recording)[\s_-]*\d[\w\-]*)\s*$",
    re.IGNORECASE,
)
# UTF-8 bytes decoded as Latin-1/cp1252: 'Ã©', 'â€™', 'Â ' and friends.
_MOJIBAKE = re.compile(r"Ã[\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u2018-\u203a\u20ac\u2122]|â€|Â[\u00a0-\u00bf]")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)
# Leading phrases that describe the medium, not the content ("video of a dog" has content "a dog").
_MEDIUM_PREFIX = re.compile(
    r"^\s*(?:(?:a|an|the|this|stock)\s+)?(?:video|clip|footage|shot|movie|film|image|picture|photo)(?:\s+(?:of|showing|shows))?\b[\s:,-]*",
    re.IGNORECASE,
)

DEFAULT_BOILERPLATE = [
    r"\bsubscribe\b",
    r"\bclick (?:here|the link|below)\b",
    r"\blink in (?:the )?(?:bio|description)\b",
    r"\bfollow (?:us|me)\b",
    r"\b(?:like|share) (?:and|&) (?:subscribe|share|comment)\b",
    r"\bcheck out (?:my|our) (?:channel|page|website)\b",
    r"\ball rights reserved\b",
    r"\bdownload (?:now|the app|free)\b",
    r"\bsponsored by\b",
    r"^\s*(?:untitled|no (?:title|description|caption)|n/?a|none|null|nan|test|placeholder|lorem ipsum)\b[\s.!]*$",
]


@dataclass
class TextRuleConfig:
    """Caption rules (`scores.text`)."""

    min_words: int = 3
    """Fewer content words (after dropping URLs, tags and a leading 'video of') is `too_short`."""
    max_words: int = 120
    """More words is `too_long` (CLIP reads 77 tokens; much longer texts are usually scraped pages)."""
    boilerplate: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    """Case-insensitive regular expressions; a caption matching any of them is `boilerplate`."""
    max_repeat_fraction: float = 0.5
    """`repeated_tokens` when one token makes up more than this fraction of >= 4 words ..."""
    max_repeat_run: int = 4
    """... or the same token appears this many times in a row."""


def _is_bad_char(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    if ch == "\ufffd":
        return True
    return unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")


def caption_issues(caption: str | None, cfg: TextRuleConfig) -> tuple[float, str | None]:
    """(text_score in [0, 1], first issue code from TEXT_ISSUES or None) for one caption."""
    if caption is None or not isinstance(caption, str):
        return 0.0, "empty"
    text = unicodedata.normalize("NFC", caption).strip()
    if not _WORD.search(text):
        return 0.0, "empty"
    bad_chars = sum(_is_bad_char(c) for c in text)
    if bad_chars or _MOJIBAKE.search(text):
        return 0.0, "mojibake"
    without_links = _TAG.sub(" ", _URL.sub(" ", text))
    if not _WORD.search(without_links):
        return 0.0, "url_only"
    if _FILENAME.match(text):
        return 0.0, "filename"
    for pattern in cfg.boilerplate:
        if re.search(pattern, text, re.IGNORECASE):
            return 0.0, "boilerplate"
    content = _MEDIUM_PREFIX.sub("", without_links, count=1)
    words = [w.lower() for w in _WORD.findall(content)]
    if not words:
        return 0.0, "boilerplate"  # "a video of" and nothing else

    # Length factor: linear up to min_words, 1 up to max_words, then decays.
    n = len(words)
    length = min(1.0, n / max(1, cfg.min_words))
    if n > cfg.max_words:
        length = cfg.max_words / n
    # Diversity factor: share of distinct tokens, forgiving in short captions ("a dog and a cat").
    counts = Counter(words)
    top = counts.most_common(1)[0][1]
    diversity = min(1.0, len(counts) / n + 0.3)
    run, longest = 1, 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    # Cleanliness factor: share of the text that is words rather than links, tags, symbols.
    letters = sum(len(w) for w in _WORD.findall(text))
    clean = min(1.0, 0.2 + letters / max(1, len(text.replace(" ", ""))))
    score = round(length * diversity * clean, 4)

    if n < cfg.min_words:
        return score, "too_short"
    if n > cfg.max_words:
        return score, "too_long"
    if (n >= 4 and top / n > cfg.max_repeat_fraction) or longest >= cfg.max_repeat_run:
        return score, "repeated_tokens"
    return score, None
