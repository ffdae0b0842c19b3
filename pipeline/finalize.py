"""Phase 2 of the curation job (driver, cheap): staged rows -> late filter -> shards and manifests.

Reads every staged source of the run's inputs, runs the late filter (curation.filters.apply_filters: per-row
rules, then near-duplicates over all clips), packs the kept clips into WebDataset shards by bytes in clip_id
order (pipeline.shards) and writes the Parquet manifests (pipeline.manifest). Everything here is a
deterministic function of the staged files, so a resumed run equals an uninterrupted one byte for byte.

A shard sample's json member is the clip's manifest row (`public(row)`: the private `_` keys dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curation.config import CurateConfig
from curation.filters import apply_filters
from curation.inputs import InputItem, source_key
from pipeline import manifest, shards, staging


@dataclass
class Finalized:
    """What finalize wrote: all rows (with kept / reject_reason / shard set) and the shards."""

    source_rows: list[dict]
    clip_rows: list[dict]
    shard_samples: dict[str, int]
    """{shard file name: samples in it}."""
    shard_bytes: int
    random_weights: bool
    """open_clip had random weights (tiny-random): clip_similarity was recorded but not used."""


def public(row: dict) -> dict:
    """A row without its private keys (those starting with '_': timings, flags for the driver)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def sample_members(row: dict, mp4: bytes | None, jpg: bytes | None) -> dict[str, bytes]:
    """{extension: bytes} of one shard sample: txt (caption), json (manifest row), jpg, and mp4 for video."""
    members = {"txt": (row.get("caption") or "").encode("utf-8"), "json": staging.dumps(public(row)).encode()}
    if row["kind"] == "video":
        members["mp4"] = mp4
    members["jpg"] = jpg
    return members


def write_all_shards(
    out: Path, clip_rows: list[dict], sizes: dict[str, int], max_bytes: int
) -> tuple[dict[str, int], int]:
    """Plan and (re)write every shard; sets each row's `shard`; returns ({shard: samples}, total bytes)."""
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    kept = [r for r in clip_rows if r["kept"]]
    plan = shards.plan_shards(((r["clip_id"], r["kind"], sizes[r["clip_id"]]) for r in kept), max_bytes)
    for row in clip_rows:
        row["shard"] = plan.get(row["clip_id"])
    shards.clean_shard_dir(shard_dir, keep=set(plan.values()))
    by_shard: dict[str, list[dict]] = {}
    for row in sorted(kept, key=lambda r: r["clip_id"]):
        by_shard.setdefault(row["shard"], []).append(row)
    cache: dict[str, dict] = {}
    counts, total = {}, 0

    def media_of(row: dict):
        key = source_key(row["source"])
        if key not in cache:
            cache.clear()  # clips of one source are contiguous in clip_id order: one file in memory
            cache[key] = staging.read_media(staging.staging_path(staging.folder_of(out), key))
        return cache[key][row["clip_id"]]

    for name in sorted(by_shard):
        samples = ((r["clip_id"], sample_members(r, *media_of(r))) for r in by_shard[name])
        counts[name] = shards.write_shard(shard_dir / name, samples)
        total += (shard_dir / name).stat().st_size
    return counts, total


def finalize(cfg: CurateConfig, out: Path, items: list[InputItem]) -> Finalized:
    """Late filter, shards and manifests from the staging area (for the sources in `items`)."""
    source_rows, clip_rows, sizes = [], [], {}
    for item in items:
        src_row, rows, nbytes = staging.read_rows(staging.staging_path(staging.folder_of(out), item.key))
        source_rows.append(src_row)
        for row, n in zip(rows, nbytes):
            clip_rows.append(row)
            sizes[row["clip_id"]] = n
    random_weights = any(r.get("_clip_random_weights") for r in source_rows)
    apply_filters(clip_rows, cfg.filter, media_bytes=[sizes[r["clip_id"]] for r in clip_rows],
                  random_weights=random_weights)
    counts, total = write_all_shards(out, clip_rows, sizes, cfg.output.shard_max_bytes)
    manifest.write_manifests(out, [public(r) for r in source_rows], [public(r) for r in clip_rows])
    return Finalized(source_rows, clip_rows, counts, total, random_weights)
