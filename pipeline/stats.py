"""OUT/stats.json: the funnel (per stage and per reject reason), durations and throughput of a run.

Counts cover the whole output (resumed sources included); durations and throughput cover the work done
by this invocation (`processed_this_run`), so a resumed run reports its own speed honestly.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from common.atomic import write_text

STAGE1_NODE = "_node"
"""Private source-row key (kept in staging, not in the manifest): IP of the node whose stage-1 actor
processed the source; counted per node as `stage1_sources_by_node`."""


def _error_head(reason: str | None) -> str:
    """Group free-text source errors by their head (text before the first ':'), e.g. 'timed out ...'."""
    if not reason:
        return "unknown"
    return reason.split(":", 1)[0].strip()[:80]


def shot_count(source_row: dict) -> int:
    """Shots of one source: cuts + 1 for a video that decoded, 1 for an image that did, 0 for an error.

    A shot shorter than shots.min_shot_s (after trims) gives no candidate clip and a long one is split at
    shots.max_clip_s, so candidate_clips may be below or above shots."""
    if source_row.get("status") != "ok":
        return 0
    if source_row.get("kind") == "image":
        return 1
    return len(source_row.get("cuts") or []) + 1 if (source_row.get("num_frames") or 0) > 0 else 0


def _sum_timing(source_rows: list[dict], key: str) -> float:
    return float(sum((r.get("_timing") or {}).get(key, 0.0) or 0.0 for r in source_rows))


def build_stats(
    *,
    source_rows: list[dict],
    clip_rows: list[dict],
    processed_keys: set[str],
    key_of,
    durations: dict[str, float],
    shards: dict[str, int],
    shard_bytes: int,
    notes: list[str],
) -> dict:
    """Stats dict. `processed_keys`: staging keys of the sources processed by this invocation."""
    by_kind_sources = Counter(r.get("kind") for r in source_rows)
    status = Counter(r.get("status") for r in source_rows)
    errors = Counter(_error_head(r.get("error")) for r in source_rows if r.get("status") == "error")
    reasons = Counter(r.get("reject_reason") or "kept" for r in clip_rows)
    funnel = {}
    for kind in ("video", "image"):
        srcs = [r for r in source_rows if r.get("kind") == kind]
        clips = [r for r in clip_rows if r.get("kind") == kind]
        encoded = [r for r in clips if r.get("out_width") is not None]
        funnel[kind] = {
            "inputs": len(srcs),
            "sources_ok": sum(r.get("status") == "ok" for r in srcs),
            "shots": sum(shot_count(r) for r in srcs),
            "candidate_clips": len(clips),
            "passed_cheap_filters_encoded": len(encoded),
            "kept": sum(bool(r.get("kept")) for r in clips),
        }
    this_run = [r for r in source_rows if key_of(r["source"]) in processed_keys]
    stream_s = durations.get("stream_s", 0.0)
    video_s = float(sum(r.get("_duration_s") or 0.0 for r in this_run))
    frames = int(sum(r.get("num_frames") or 0 for r in this_run if r.get("kind") == "video"))
    clips_this_run = sum(1 for c in clip_rows if key_of(c["source"]) in processed_keys)
    per = lambda x: (x / stream_s) if stream_s > 0 else None  # noqa: E731
    return {
        "sources": {
            "total": len(source_rows),
            "by_kind": dict(by_kind_sources),
            "ok": status.get("ok", 0),
            "error": status.get("error", 0),
            "errors_by_reason": dict(sorted(errors.items())),
            "resumed_from_staging": len(source_rows) - len(this_run),
            "processed_this_run": len(this_run),
        },
        "funnel": funnel,
        "clips": {
            "candidates": len(clip_rows),
            "kept": reasons.get("kept", 0),
            "rejected_by_reason": dict(sorted((k, v) for k, v in reasons.items() if k != "kept")),
        },
        "shards": {"count": len(shards), "samples": int(sum(shards.values())), "bytes": int(shard_bytes)},
        "durations_s": {k: round(v, 3) for k, v in durations.items()},
        # where stage 1 ran (node IP -> sources of this invocation): a cluster run shows its spread here
        "stage1_sources_by_node": dict(sorted(Counter(r.get(STAGE1_NODE) or "unknown" for r in this_run).items())),
        "worker_time_s": {
            k: round(_sum_timing(this_run, k), 3) for k in ("decode_s", "detect_s", "total_s", "clip_s")
        },
        "throughput": {
            "sources_per_s": per(len(this_run)),
            "video_seconds_per_s": per(video_s),
            "frames_per_s": per(frames),
            "clips_per_s": per(clips_this_run),
        },
        "notes": notes,
    }


def write_stats(path: str | Path, stats: dict) -> None:
    """Publish `stats` as indented JSON at `path` (common.atomic)."""
    write_text(path, json.dumps(stats, indent=2, sort_keys=False) + "\n")


def summary_lines(stats: dict) -> list[str]:
    """A few human lines for the end of the job."""
    s, c, t = stats["sources"], stats["clips"], stats["throughput"]
    lines = [
        f"sources: {s['total']} ({s['ok']} ok, {s['error']} error; {s['resumed_from_staging']} resumed)",
        f"clips:   {c['candidates']} candidates, {c['kept']} kept",
    ]
    if c["rejected_by_reason"]:
        lines.append("rejected: " + ", ".join(f"{k}={v}" for k, v in c["rejected_by_reason"].items()))
    if s["errors_by_reason"]:
        lines.append("source errors: " + ", ".join(f"{k}={v}" for k, v in s["errors_by_reason"].items()))
    sh = stats["shards"]
    lines.append(f"shards:  {sh['count']} ({sh['samples']} samples, {sh['bytes'] / 1e6:.1f} MB)")
    d = stats["durations_s"]
    if t["video_seconds_per_s"] is not None:
        lines.append(
            f"time:    {d.get('total_s', 0):.1f} s total, stream {d.get('stream_s', 0):.1f} s, "
            f"{t['video_seconds_per_s']:.2f} video-s/s, {t['sources_per_s']:.2f} sources/s"
        )
    lines.extend(f"note:    {n}" for n in stats["notes"])
    return lines
