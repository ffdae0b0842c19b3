"""Per-source staging files: the resume checkpoint of the curation job.

Every finished source (ok or error) becomes exactly one file `OUT/staging/<source_key>.parquet`, published
by common.atomic (temp file, fsync, rename), so a file either exists whole or not at all, whatever moment
the previous run was killed at. A re-run skips the sources whose staging file exists.

File layout (fixed schema, so a source with zero clips is an empty table):
    row_json: string   one candidate clip's manifest row as JSON (scores included, before global dedup)
    mp4:      binary   the encoded clip (null when the clip was rejected before encoding, or for images)
    jpg:      binary   the first frame / the image (null when not encoded)
    nbytes:   int64    len(mp4) + len(jpg), so shards can be planned without loading the media
Schema metadata `source_row`: the source's manifest row as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_write, is_temp, remove_temp_files

SCHEMA = pa.schema(
    [("row_json", pa.string()), ("nbytes", pa.int64()), ("mp4", pa.binary()), ("jpg", pa.binary())]
)
SUFFIX = ".parquet"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(row: dict) -> str:
    """JSON of a manifest row; NaN floats become null so the text is standard JSON."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    return json.dumps(clean, default=_json_default, sort_keys=True)


def folder_of(out_dir: str | Path) -> Path:
    """OUT/staging: the staging area of the job writing to OUT."""
    return Path(out_dir) / "staging"


def staging_path(staging_dir: str | Path, key: str) -> Path:
    """OUT/staging/<key>.parquet."""
    return Path(staging_dir) / f"{key}{SUFFIX}"


def write_source(
    staging_dir: str | Path,
    key: str,
    source_row: dict,
    clip_rows: list[dict],
    media: Iterable[tuple[bytes | None, bytes | None]],
) -> Path:
    """Atomically write one source's result (rows + encoded bytes) to the staging area."""
    staging_dir = Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    media = list(media)
    if len(media) != len(clip_rows):
        raise ValueError(f"{len(clip_rows)} clip rows but {len(media)} media entries for source {key}")
    table = pa.table(
        {
            "row_json": [dumps(r) for r in clip_rows],
            "nbytes": [len(m[0] or b"") + len(m[1] or b"") for m in media],
            "mp4": [m[0] for m in media],
            "jpg": [m[1] for m in media],
        },
        schema=SCHEMA.with_metadata({"source_row": dumps(source_row)}),
    )
    final = staging_path(staging_dir, key)
    with atomic_write(final) as fh:
        pq.write_table(table, fh)
    return final


def clean_temp_files(staging_dir: str | Path) -> int:
    """Delete leftovers of writes that were killed mid-way; returns how many were removed."""
    return remove_temp_files(staging_dir)


def finished_keys(staging_dir: str | Path) -> set[str]:
    """Source keys that already have a complete staging file."""
    staging_dir = Path(staging_dir)
    if not staging_dir.is_dir():
        return set()
    return {p.name[: -len(SUFFIX)] for p in staging_dir.iterdir() if p.name.endswith(SUFFIX) and not is_temp(p.name)}


def read_rows(path: str | Path) -> tuple[dict, list[dict], list[int]]:
    """(source_row, clip_rows, media_bytes per clip) of one staging file, without loading the media."""
    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    source_row = json.loads(meta[b"source_row"])
    table = pf.read(columns=["row_json", "nbytes"])
    rows = [json.loads(s) for s in table.column("row_json").to_pylist()]
    sizes = table.column("nbytes").to_pylist()
    return source_row, rows, sizes


def read_media(path: str | Path) -> dict[str, tuple[bytes | None, bytes | None]]:
    """{clip_id: (mp4, jpg)} of one staging file."""
    table = pq.read_table(path)
    rows = [json.loads(s) for s in table.column("row_json").to_pylist()]
    mp4 = table.column("mp4").to_pylist()
    jpg = table.column("jpg").to_pylist()
    return {r["clip_id"]: (a, b) for r, a, b in zip(rows, mp4, jpg)}
