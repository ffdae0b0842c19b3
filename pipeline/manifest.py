"""Parquet manifests of the curation job (the output contract other tools read; keep the names).

OUT/manifest/sources.parquet: one row per input
    source, kind, status ("ok" | "error"), error, num_frames, fps, width, height, cuts list<int64>
OUT/manifest/clips.parquet: one row per candidate clip
    clip_id, source, kind, shot_index, start_frame (incl.), end_frame (excl.), start_s, end_s, fps, width,
    height, caption, text_issue, out_fps/out_width/out_height (the encoded sample; null if not encoded),
    <one float64 column per score>, phash, score_error, duplicate_of, kept, reject_reason, shard

Rows are sorted (by source / clip_id) so two runs over the same inputs write identical files whatever
order Ray finished the sources in. Both files are published atomically (common.atomic).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_write

SOURCE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("kind", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("cuts", pa.list_(pa.int64())),
    ]
)

CLIP_HEAD = [
    ("clip_id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("shot_index", pa.int64()),
    ("start_frame", pa.int64()),
    ("end_frame", pa.int64()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("fps", pa.float64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("caption", pa.string()),
    ("text_issue", pa.string()),
    ("out_fps", pa.float64()),
    ("out_width", pa.int64()),
    ("out_height", pa.int64()),
]
CLIP_TAIL = [
    ("phash", pa.int64()),
    ("score_error", pa.string()),
    ("duplicate_of", pa.string()),
    ("kept", pa.bool_()),
    ("reject_reason", pa.string()),
    ("shard", pa.string()),
]
NON_SCORE = {name for name, _ in CLIP_HEAD + CLIP_TAIL}


def score_columns(rows: list[dict]) -> list[str]:
    """Names of the score columns: every row key outside the fixed columns, sorted."""
    names: set[str] = set()
    for row in rows:
        names.update(k for k in row if k not in NON_SCORE)
    return sorted(names)


def _float_or_none(value) -> float | None:
    if value is None:
        return None
    return float(value)


def clips_table(rows: list[dict]) -> pa.Table:
    """Arrow table of clip rows (sorted by clip_id); scores become float64 columns (NaN when not measured)."""
    rows = sorted(rows, key=lambda r: r["clip_id"])
    scores = score_columns(rows)
    schema = pa.schema(CLIP_HEAD + [(s, pa.float64()) for s in scores] + CLIP_TAIL)
    data = {}
    for name, typ in CLIP_HEAD + CLIP_TAIL:
        data[name] = [r.get(name) for r in rows]
    for s in scores:
        data[s] = [_float_or_none(r.get(s)) for r in rows]
    return pa.table({f.name: pa.array(data[f.name], type=f.type) for f in schema}, schema=schema)


def sources_table(rows: list[dict]) -> pa.Table:
    """Arrow table of source rows (sorted by source)."""
    rows = sorted(rows, key=lambda r: r["source"])
    data = {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in SOURCE_SCHEMA}
    return pa.table(data, schema=SOURCE_SCHEMA)


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Publish `table` as the parquet file `path` (common.atomic), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        pq.write_table(table, fh)
    return path


def write_manifests(out_dir: str | Path, source_rows: list[dict], clip_rows: list[dict]) -> tuple[Path, Path]:
    """OUT/manifest/sources.parquet and OUT/manifest/clips.parquet."""
    mdir = Path(out_dir) / "manifest"
    return (
        write_parquet(sources_table(source_rows), mdir / "sources.parquet"),
        write_parquet(clips_table(clip_rows), mdir / "clips.parquet"),
    )
