"""OUT/report.html (pipeline.report) built from synthetic output folders made by the job's own writers.

No Ray: the staging files are written with pipeline.staging (real H.264 clips and JPEG frames), then the
job's real finalize (late filter, near-duplicates, shards, manifests) and stats run on them, exactly as in
pipeline.curate after the stream. Stage 1's rule is mimicked: only clips passing its filter get media.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.atomic import write_text
from curation import config as config_mod
from curation.config import CurateConfig
from curation.encode import EncodeConfig, encode_jpeg, encode_mp4
from curation.filters import for_kind, reject_reason
from curation.inputs import InputItem, source_key
from pipeline import report, report_thumbs, staging
from pipeline.finalize import finalize
from pipeline.manifest import NON_SCORE
from pipeline.stats import build_stats, shot_count, write_stats

RNG_SEED = 7
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curate_default.yaml"


def _media(variant: int) -> tuple[bytes, bytes]:
    """A real 1 s H.264 clip (160x90, moving gradient + noise) and its first frame as JPEG."""
    rng = np.random.default_rng(variant)
    x = np.linspace(0, 255, 160)[None, :, None]
    frames = np.stack([np.clip(x + 40 * np.sin(t / 3 + variant) + rng.normal(0, 12, (90, 160, 3)), 0, 255)
                       for t in range(24)]).astype(np.uint8)
    mp4, _ = encode_mp4(frames, 24.0, EncodeConfig())
    return mp4, encode_jpeg(frames[0])


GOOD = {"duration_s": 3.0, "blank_fraction": 0.0, "brightness": 0.5, "contrast": 0.2, "sharpness": 100.0,
        "motion": 5.0, "flicker": 1.0, "colorfulness": 30.0, "text_score": 0.9, "clip_similarity": 0.1}
# group -> score changes; "duplicate" clips repeat the phash of the latest kept clip (rejected late: media)
GROUPS = {"kept": {}, "too_short": {"duration_s": 0.4}, "blurry": {"sharpness": 3.0},
          "static": {"motion": 0.1}, "too_dark": {"brightness": 0.01}, "duplicate": {"clip_similarity": 0.0}}


def make_out(out: Path, n_sources: int, clips_per_source: int, cfg: CurateConfig, pattern: list[str]) -> dict:
    """A finished curation output folder (no Ray): staging -> finalize -> stats.json, config.yaml."""
    rng = np.random.default_rng(RNG_SEED)
    media = [_media(v) for v in range(3)]
    out.mkdir(parents=True)
    write_text(out / "config.yaml", config_mod.to_yaml(cfg))
    items, anchor = [], None  # anchor: phash of the latest kept clip, which "duplicate" clips repeat
    for s in range(n_sources + 2):
        kind = "image" if s == n_sources + 1 else "video"
        name = f"in/src_{s:04d}.{'jpg' if kind == 'image' else 'mp4'}"
        item = InputItem(name, "/nowhere/" + name, kind)
        items.append(item)
        key = source_key(name)
        if s == n_sources:  # a broken upload
            src = {"source": name, "kind": "video", "status": "error", "cuts": [],
                   "error": "not a readable video container: Invalid data found"}
            staging.write_source(staging.folder_of(out), key, src, [], [])
            continue
        n = 1 if kind == "image" else clips_per_source
        src = {"source": name, "kind": kind, "status": "ok", "error": None, "num_frames": 24 * n, "fps": 24.0,
               "width": 160, "height": 90, "cuts": [24 * i for i in range(1, n)], "_duration_s": float(n),
               "_timing": {"decode_s": 0.1, "total_s": 0.3}, "_node": "127.0.0.1"}
        rows, blobs = [], []
        for i in range(n):
            group = "kept" if kind == "image" else pattern[(s * n + i) % len(pattern)]
            row = {"clip_id": f"{key[:12]}_{24 * i:06d}_{24 * i + 24:06d}", "source": name, "kind": kind,
                   "shot_index": i, "start_frame": 24 * i, "end_frame": 24 * i + 24, "start_s": float(i),
                   "end_s": i + 1.0, "fps": 24.0, "width": 160, "height": 90, "caption": "a gradient",
                   "text_issue": None, **GOOD, **GROUPS[group],
                   "phash": anchor if group == "duplicate" else int(rng.integers(-2**63, 2**63 - 1))}
            anchor = row["phash"] if group == "kept" else anchor
            if kind == "image":
                for k in ("duration_s", "motion", "flicker"):
                    row[k] = float("nan")
            encoded = reject_reason(row, for_kind(cfg.filter, kind)) is None  # stage 1 encodes what passes its rules
            mp4, jpg = media[(s + i) % 3] if encoded else (None, None)
            mp4 = mp4 if kind == "video" else None
            row.update(out_fps=24.0 if encoded else None, out_width=160 if encoded else None,
                       out_height=90 if encoded else None)
            rows.append(row)
            blobs.append((mp4, jpg))
        staging.write_source(staging.folder_of(out), key, src, rows, blobs)
    final = finalize(cfg, out, items)
    stats = build_stats(source_rows=final.source_rows, clip_rows=final.clip_rows,
                        processed_keys={it.key for it in items}, key_of=source_key,
                        durations={"list_s": 0.01, "ray_init_s": 1.0, "stream_s": 4.0, "finalize_s": 0.5,
                                   "total_s": 5.6},
                        shards=final.shard_samples, shard_bytes=final.shard_bytes, notes=[])
    write_stats(out / "stats.json", stats)
    return stats


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict, str]:
    cfg = config_mod.load_config(DEFAULT_CONFIG, ["filter.max_duration_s=null", "output.shard_max_bytes=200000"])
    out = tmp_path_factory.mktemp("small") / "out"
    pattern = ["kept", "too_short", "kept", "blurry", "duplicate", "kept", "static", "too_dark", "duplicate"]
    stats = make_out(out, 4, 9, cfg, pattern)
    path = report.write_report(out)  # thresholds from OUT/config.yaml, as `python -m pipeline.report`
    return out, stats, path.read_text()


def _cells(html: str, attr: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(rf'<td {attr}="([^"]+)">(\d+)</td>', html)}


def test_funnel_numbers_equal_stats_json(small):
    out, stats, html = small
    stats = json.loads((out / "stats.json").read_text())
    funnel = _cells(html, "data-funnel")
    expected = {f"{kind}.{k}": v for kind, c in stats["funnel"].items() for k, v in c.items()}
    assert funnel == expected and funnel["video.candidate_clips"] == 36 and funnel["image.kept"] == 1
    sources = pq.read_table(out / "manifest" / "sources.parquet").to_pylist()
    assert funnel["video.shots"] == sum(shot_count(r) for r in sources if r["kind"] == "video") == 36
    assert _cells(html, "data-clips") == {"candidates": stats["clips"]["candidates"], "kept": stats["clips"]["kept"]}
    rejected = _cells(html, "data-reject")
    assert rejected == stats["clips"]["rejected_by_reason"]
    assert set(rejected) == set(GROUPS) - {"kept"}
    assert _cells(html, "data-error-head") == {"not a readable video container": 1}
    assert "src_0004.mp4" in html and "Invalid data found" in html  # the error row with its reason


def test_every_score_has_a_histogram_with_its_thresholds(small):
    out, _, html = small
    cfg = report.load_run_config(out)
    columns = [c for c in pq.read_schema(out / "manifest" / "clips.parquet").names if c not in NON_SCORE]
    assert {"motion", "sharpness", "duration_s", "colorfulness"} <= set(columns)
    for col in columns:
        fig = re.search(rf'<figure class="score" data-score="{col}">(.*?)</figure>', html, re.S)
        assert fig and '<svg class="hist"' in fig.group(1), col
        for field, side, _ in report.THRESHOLDS.get(col, []):
            value = getattr(cfg.filter, field)
            if value is None:
                assert f'class="threshold-off" data-field="{field}"' in fig.group(1), field
            else:
                assert f'data-field="{field}" data-value="{float(value)!r}" data-side="{side}"' in fig.group(1)
        if col not in report.THRESHOLDS:
            assert "no filter uses this score" in fig.group(1)
    assert 'data-field="max_duration_s"' in html and "filter.max_duration_s: off (null)" in html


def test_threshold_table_matches_the_filter_rules():
    """report.THRESHOLDS names the rule curation.filters applies: crossing a threshold gives that reason."""
    cfg = config_mod.load_config(DEFAULT_CONFIG, ["filter.min_text_score=0.5", "filter.max_duration_s=20"])
    for score, rules in report.THRESHOLDS.items():
        for field, side, reason in rules:
            value = getattr(cfg.filter, field)
            if value is None:
                continue
            row = {**GOOD, "kind": "video", score: value - 1e-3 if side == "min" else value + 1e-3}
            assert reject_reason(row, cfg.filter) == reason, (score, field)


def _images(html: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', html)


def test_thumbnails_are_inline_images_and_nothing_points_outside(small):
    out, stats, html = small
    assert not re.search(r"https?://", html)
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:image/", "#")), attr[:80]
    assert "<script" not in html and "<link" not in html and "url(" not in html
    srcs = _images(html)
    assert srcs
    animated = 0
    for src in srcs:
        mime, b64 = re.match(r"data:(image/[a-z]+);base64,(.+)", src).groups()
        with Image.open(io.BytesIO(__import__("base64").b64decode(b64))) as im:
            im.load()
            assert max(im.size) <= report_thumbs.THUMB_PX and im.format.lower() in mime
            animated += getattr(im, "n_frames", 1) > 1
    assert animated >= 1
    # kept clips from the shards; late rejects (duplicate) from staging; stage-1 rejects: placeholders
    groups = dict(re.findall(r'<figure class="thumb" data-group="([^"]+)" data-clip="[^"]+">(<img|<svg)', html))
    assert groups["kept"] == "<img" and groups["duplicate"] == "<img" and groups["too_short"] == "<svg"
    assert "rejected before encoding" in html


def test_without_staging_late_rejects_say_so(small, tmp_path):
    out, _, _ = small
    copy = tmp_path / "out"
    for p in out.rglob("*"):
        if p.is_file() and "staging" not in p.parts:
            (copy / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(out)).write_bytes(p.read_bytes())
    html = report.build_report(copy)
    dup = re.findall(r'data-group="duplicate"[^>]*>(.*?)</figure>', html, re.S)
    assert dup and all("staging deleted" in f and "<img" not in f for f in dup)


def test_sampling_is_seeded_and_capped():
    ids = [f"c{i:05d}" for i in range(5000)]
    reasons = [None if i % 3 == 0 else f"r{i % 17}" for i in range(5000)]
    media = [i % 2 == 0 for i in range(5000)]
    a = report_thumbs.sample_groups(ids, reasons, media, seed=1)
    assert a == report_thumbs.sample_groups(list(reversed(ids)), list(reversed(reasons)), list(reversed(media)),
                                            seed=1)
    assert a != report_thumbs.sample_groups(ids, reasons, media, seed=2)
    assert len(a["kept"]) == report_thumbs.KEPT_CAP
    assert len(a) == 1 + report_thumbs.MAX_REASON_GROUPS
    pos = {c: i for i, c in enumerate(ids)}
    for group, chosen in a.items():
        if group != "kept":
            assert len(chosen) == report_thumbs.PER_REASON_CAP and all(media[pos[c]] for c in chosen)


MAX_REPORT_BYTES = 3_000_000
"""The bound on the 5,000-clip report (thumbnails: 12 kept + 6 x 5 reasons, each <= ~50 kB by its caps)."""


def test_large_run_report_stays_small(tmp_path):
    cfg = config_mod.load_config(DEFAULT_CONFIG, ["output.shard_max_bytes=4000000"])
    pattern = ["kept", "kept", "too_short", "kept", "blurry", "duplicate", "static", "too_dark", "duplicate", "kept"]
    stats = make_out(tmp_path / "out", 50, 100, cfg, pattern)
    assert stats["clips"]["candidates"] == 5001
    html = report.write_report(tmp_path / "out", cfg).read_text()
    size = len(html.encode())
    assert size < MAX_REPORT_BYTES, size
    figures = re.findall(r'<figure class="thumb" data-group="([^"]+)"', html)
    counts = {g: figures.count(g) for g in set(figures)}
    assert counts == {"kept": 12, **{r: 6 for r in stats["clips"]["rejected_by_reason"]}}
    assert _cells(html, "data-reject") == stats["clips"]["rejected_by_reason"]
