"""Inline SVG charts of the curation report (pipeline.report): horizontal bars and score histograms.

Every function returns a self-contained `<svg>` string (no script, no external style or font: the report
must open offline), sized in pixels, with the numbers it draws written into `data-` attributes as well so
that a test or a browser check reads them without parsing geometry. Text is escaped here; callers pass
plain strings.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

KEPT_COLOUR = "#3a7d44"
REJECTED_COLOUR = "#c2583f"
BAR_COLOUR = "#4a6fa5"
THRESHOLD_COLOUR = "#d1202a"


def esc(text) -> str:
    """HTML/SVG-escaped text (quotes included, so it is safe inside attributes too)."""
    return html.escape(str(text), quote=True)


def fmt(value: float | int | None) -> str:
    """A short human number: ints as they are, floats with 3 significant digits, None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{float(value):,.0f}"
    return f"{float(value):.3g}"


def bar_chart(items: list[tuple[str, float]], *, unit: str = "", width: int = 560, row_h: int = 22,
              css_class: str = "bars") -> str:
    """Horizontal bars, one per (label, value), longest = full width; values written after each bar."""
    label_w, value_w = 210, 90
    plot_w = width - label_w - value_w
    top = max((v for _, v in items), default=0) or 1
    height = row_h * len(items) + 4
    out = [f'<svg class="{esc(css_class)}" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for i, (label, value) in enumerate(items):
        y = i * row_h + 2
        w = max(0.0, plot_w * float(value) / top)
        out.append(
            f'<g data-label="{esc(label)}" data-value="{esc(value)}">'
            f'<text x="{label_w - 6}" y="{y + row_h * 0.7:.1f}" text-anchor="end" font-size="12">{esc(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{BAR_COLOUR}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + row_h * 0.7:.1f}" font-size="12">{esc(fmt(value))}{esc(unit)}</text>'
            "</g>")
    out.append("</svg>")
    return "".join(out)


@dataclass
class Threshold:
    """A filter threshold drawn on a histogram: `field` of FilterConfig, its value, and its side."""

    field: str
    value: float
    side: str
    """"min" (clips below are rejected) or "max" (clips above are rejected)."""


def histogram_counts(values: np.ndarray, kept: np.ndarray, lo: float, hi: float, bins: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges, kept counts, rejected counts) of the finite `values` over [lo, hi] in `bins` equal bins."""
    finite = np.isfinite(values)
    edges = np.linspace(lo, hi, bins + 1)
    k, _ = np.histogram(values[finite & kept], bins=edges)
    r, _ = np.histogram(values[finite & ~kept], bins=edges)
    return edges, k, r


def histogram_svg(name: str, values: np.ndarray, kept: np.ndarray, thresholds: list[Threshold], *,
                  bins: int = 30, width: int = 520, height: int = 170) -> str:
    """Histogram of one score column (kept stacked under rejected) with a vertical line per threshold.

    `values`: float64 (NaN = not measured, left out and counted in the caption by the caller); `kept`:
    bool of the same length. The x range covers the values and every threshold, so a marker is always
    inside the plot.
    """
    finite = values[np.isfinite(values)]
    points = [t.value for t in thresholds]
    if finite.size:
        points += [float(finite.min()), float(finite.max())]
    lo, hi = (min(points), max(points)) if points else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.02
    lo, hi = lo - pad, hi + pad
    edges, k, r = histogram_counts(values, kept, lo, hi, bins)
    left, right, top, bottom = 40, 10, 18, 30
    pw, ph = width - left - right, height - top - bottom
    peak = int((k + r).max()) if (k + r).size else 0
    scale = ph / peak if peak else 0.0
    x_of = lambda v: left + pw * (v - lo) / (hi - lo)  # noqa: E731
    out = [f'<svg class="hist" data-score="{esc(name)}" data-n="{int(finite.size)}" '
           f'width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img">',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>']
    bw = pw / bins
    for i in range(bins):
        x = left + i * bw
        hk, hr = k[i] * scale, r[i] * scale
        if k[i]:
            out.append(f'<rect x="{x:.1f}" y="{top + ph - hk:.1f}" width="{bw - 1:.1f}" height="{hk:.1f}" '
                       f'fill="{KEPT_COLOUR}"><title>{esc(fmt(edges[i]))}–{esc(fmt(edges[i + 1]))}: '
                       f'{int(k[i])} kept</title></rect>')
        if r[i]:
            out.append(f'<rect x="{x:.1f}" y="{top + ph - hk - hr:.1f}" width="{bw - 1:.1f}" height="{hr:.1f}" '
                       f'fill="{REJECTED_COLOUR}"><title>{esc(fmt(edges[i]))}–{esc(fmt(edges[i + 1]))}: '
                       f'{int(r[i])} rejected</title></rect>')
    for t in thresholds:
        x = x_of(t.value)
        anchor = "start" if x < left + pw * 0.7 else "end"
        dx = 3 if anchor == "start" else -3
        out.append(
            f'<g class="threshold" data-field="{esc(t.field)}" data-value="{t.value!r}" data-side="{esc(t.side)}">'
            f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{top + ph}" stroke="{THRESHOLD_COLOUR}" '
            f'stroke-width="2" stroke-dasharray="4 2"/>'
            f'<text x="{x + dx:.1f}" y="{top - 8 + 10}" font-size="11" fill="{THRESHOLD_COLOUR}" '
            f'text-anchor="{anchor}">{esc(t.side)} {esc(fmt(t.value))}</text></g>')
    for v, anchor in ((lo, "start"), (hi, "end")):
        out.append(f'<text x="{x_of(v):.1f}" y="{height - 12}" font-size="11" text-anchor="{anchor}">'
                   f'{esc(fmt(v))}</text>')
    out.append(f'<text x="{left - 4}" y="{top + 8}" font-size="11" text-anchor="end">{peak}</text>')
    out.append("</svg>")
    return "".join(out)


def placeholder_svg(lines: list[str], *, width: int = 128, height: int = 72) -> str:
    """A grey box with a few short text lines: stands in for a thumbnail whose frames were not stored."""
    out = [f'<svg class="noframes" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><rect width="{width}" height="{height}" fill="#ddd"/>']
    for i, line in enumerate(lines[:4]):
        out.append(f'<text x="{width / 2}" y="{16 + 15 * i}" font-size="10" text-anchor="middle" fill="#444">'
                   f'{esc(line)}</text>')
    out.append("</svg>")
    return "".join(out)
