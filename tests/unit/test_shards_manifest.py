"""Staging files, shard planning/writing, finalize and manifests: deterministic, atomic, and every shard
kind read back through a `webdataset` pipeline as the training loader reads it."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curation.config import CurateConfig
from curation.inputs import InputItem
from pipeline import manifest, shards, staging
from pipeline.finalize import finalize


def test_plan_is_by_bytes_sorted_and_order_independent():
    samples = [(f"id{i:03d}", "video", 400) for i in range(10)] + [("img001", "image", 50)]
    plan = shards.plan_shards(samples, max_bytes=3 * (400 + 3072))
    again = shards.plan_shards(list(reversed(samples)), max_bytes=3 * (400 + 3072))
    assert plan == again
    video = sorted((cid, s) for cid, s in plan.items() if s.startswith("video"))
    assert [s for _, s in video] == ["video-000000.tar"] * 3 + ["video-000001.tar"] * 3 + \
        ["video-000002.tar"] * 3 + ["video-000003.tar"]
    assert plan["img001"] == "image-000000.tar"
    # a sample larger than the limit still gets written, alone
    big = shards.plan_shards([("a", "video", 10), ("b", "video", 10**9), ("c", "video", 10)], max_bytes=10**6)
    assert big == {"a": "video-000000.tar", "b": "video-000001.tar", "c": "video-000002.tar"}
    with pytest.raises(ValueError):
        shards.plan_shards(samples, 0)


def test_write_shard_is_atomic_deterministic_and_webdataset_readable(tmp_path):
    samples = [
        ("abc_000000_000010", {"mp4": b"\x00mp4", "jpg": b"\xffjpg", "txt": b"a cat", "json": b'{"k": 1}'}),
        ("abc_000010_000020", {"mp4": b"\x01mp4", "jpg": b"\xfejpg", "txt": b"a dog", "json": b'{"k": 2}'}),
    ]
    path = tmp_path / "video-000000.tar"
    assert shards.write_shard(path, samples) == 2
    first = path.read_bytes()
    shards.write_shard(path, [(k, dict(reversed(m.items()))) for k, m in samples])  # members in another order
    assert path.read_bytes() == first  # mtime 0, fixed order: byte-identical rewrite
    assert [p.name for p in tmp_path.iterdir()] == ["video-000000.tar"]  # no temp file left
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{k}.{ext}" for k, _ in samples for ext in ("jpg", "json", "mp4", "txt")]
    assert {(m.mtime, m.uname, m.gname, m.uid, m.gid, m.mode) for m in members} == {(0, "", "", 0, 0, 0o644)}
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["abc_000000_000010", "abc_000010_000020"]
    assert got[1]["mp4"] == b"\x01mp4" and got[1]["txt"] == b"a dog" and json.loads(got[1]["json"]) == {"k": 2}
    with pytest.raises(ValueError, match="must not contain"):
        shards.write_shard(tmp_path / "x.tar", [("a.b", {"txt": b""})])
    assert not (tmp_path / "x.tar").exists() and len(list(tmp_path.iterdir())) == 1  # the failed write left nothing


def test_clean_shard_dir_removes_temp_and_stale(tmp_path):
    for name in ("video-000000.tar", "video-000001.tar", "video-000002.tar.tmp", "image-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    assert shards.clean_shard_dir(tmp_path, keep={"video-000000.tar", "image-000000.tar"}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image-000000.tar", "video-000000.tar"]


def test_staging_roundtrip_and_resume_bookkeeping(tmp_path):
    src = {"source": "a.mp4", "kind": "video", "status": "ok", "error": None, "cuts": [5], "_timing": {"x": 1.0}}
    rows = [{"clip_id": "k_000000_000005", "motion": float("nan"), "phash": -5},
            {"clip_id": "k_000005_000010", "motion": 2.5, "phash": 7}]
    staging.write_source(tmp_path, "key1", src, rows, [(b"mp4bytes", b"jpg"), (None, None)])
    staging.write_source(tmp_path, "empty", {**src, "status": "error", "error": "bad"}, [], [])
    (tmp_path / "key2.parquet.tmp-123").write_bytes(b"half")  # a killed write
    assert staging.finished_keys(tmp_path) == {"key1", "empty"}
    assert staging.clean_temp_files(tmp_path) == 1
    got_src, got_rows, sizes = staging.read_rows(staging.staging_path(tmp_path, "key1"))
    assert got_src == src and sizes == [len(b"mp4bytes") + 3, 0]
    assert got_rows[0]["motion"] is None and got_rows[1]["motion"] == 2.5 and got_rows[0]["phash"] == -5
    media = staging.read_media(staging.staging_path(tmp_path, "key1"))
    assert media == {"k_000000_000005": (b"mp4bytes", b"jpg"), "k_000005_000010": (None, None)}
    e_src, e_rows, _ = staging.read_rows(staging.staging_path(tmp_path, "empty"))
    assert e_src["error"] == "bad" and e_rows == []
    with pytest.raises(ValueError):
        staging.write_source(tmp_path, "bad", src, rows, [])


def test_manifests_follow_the_contract(tmp_path):
    sources = [
        {"source": "b.mp4", "kind": "video", "status": "ok", "error": None, "num_frames": 48, "fps": 24.0,
         "width": 64, "height": 48, "cuts": [12, 30], "_timing": {}},
        {"source": "a.mp4", "kind": "video", "status": "error", "error": "empty file (0 bytes)",
         "num_frames": None, "fps": None, "width": None, "height": None, "cuts": []},
    ]
    clip = {"clip_id": "z_000000_000012", "source": "b.mp4", "kind": "video", "shot_index": 0, "start_frame": 0,
            "end_frame": 12, "start_s": 0.0, "end_s": 0.5, "fps": 24.0, "width": 64, "height": 48,
            "caption": "a cat", "text_issue": None, "motion": 1.5, "sharpness": None, "clip_similarity": float("nan"),
            "phash": -3, "kept": True, "reject_reason": None, "shard": "video-000000.tar", "duplicate_of": None}
    clip2 = {**clip, "clip_id": "a_000012_000030", "kept": False, "reject_reason": "static", "shard": None}
    s_path, c_path = manifest.write_manifests(tmp_path, sources, [clip, clip2])
    s = pq.read_table(s_path)
    assert s.column_names == ["source", "kind", "status", "error", "num_frames", "fps", "width", "height", "cuts"]
    assert s.column("source").to_pylist() == ["a.mp4", "b.mp4"]  # sorted, not arrival order
    assert pa.types.is_list(s.schema.field("cuts").type) and s.schema.field("cuts").type.value_type == pa.int64()
    assert s.column("cuts").to_pylist() == [[], [12, 30]]
    c = pq.read_table(c_path)
    for col in ("clip_id", "source", "shot_index", "start_frame", "end_frame", "start_s", "end_s", "fps", "width",
                "height", "caption", "kept", "reject_reason", "shard"):
        assert col in c.column_names
    for score in ("motion", "sharpness", "clip_similarity"):
        assert str(c.schema.field(score).type) == "double"
    assert c.column("clip_id").to_pylist() == ["a_000012_000030", "z_000000_000012"]
    assert c.column("kept").to_pylist() == [False, True]
    assert math.isnan(c.column("clip_similarity").to_pylist()[0])
    assert c.column("sharpness").to_pylist() == [None, None]


def _clip(source: str, kind: str, start: int, **kw) -> dict:
    """A clip row as stage 1 stages it (every score the default filter reads, passing values)."""
    from curation.process import clip_id_for

    end = start + (48 if kind == "video" else 1)
    row = {"clip_id": clip_id_for(source, start, end), "source": source, "kind": kind, "shot_index": 0,
           "start_frame": start, "end_frame": end, "start_s": start / 24, "end_s": end / 24, "fps": 24.0,
           "duration_s": 2.0, "width": 64, "height": 48, "caption": f"caption of {source}", "text_issue": None,
           "text_score": 0.9, "out_fps": 24.0, "out_width": 64, "out_height": 48, "sharpness": 100.0,
           "brightness": 0.5, "contrast": 0.2, "colorfulness": 10.0, "blank_fraction": 0.0,
           "clip_similarity": 0.3, "phash": (start + 1) * 0x0101010101, "motion": 5.0, "flicker": 0.1}
    if kind == "image":
        row.update(motion=None, flicker=None, duration_s=None, fps=None, out_fps=None)
    row.update(kw)
    return row


def _stage_inputs(out: Path) -> list[InputItem]:
    """Two videos (3 + 1 clips: one static, one a near-duplicate of a.mp4's clip) and one image, staged as
    stage 1 leaves them (random CLIP weights, as with tiny-random)."""
    items = [InputItem("b.mp4", "/in/b.mp4", "video", "caption of b.mp4"),
             InputItem("a.mp4", "/in/a.mp4", "video", "caption of a.mp4"),
             InputItem("still.jpg", "/in/still.jpg", "image", "caption of still.jpg")]
    clips = {
        "b.mp4": [_clip("b.mp4", "video", 0), _clip("b.mp4", "video", 48, motion=0.0),  # static: rejected
                  _clip("b.mp4", "video", 96)],
        "a.mp4": [_clip("a.mp4", "video", 0, clip_similarity=float("nan"), sharpness=200.0)],  # = b's first phash
        "still.jpg": [_clip("still.jpg", "image", 0)],
    }
    for item in items:
        rows = clips[item.source]
        media = [((f"mp4 of {r['clip_id']}".encode() * 40) if item.kind == "video" else None,
                  f"jpg of {r['clip_id']}".encode()) for r in rows]
        src = {"source": item.source, "kind": item.kind, "status": "ok", "error": None, "num_frames": 144,
               "fps": 24.0, "width": 64, "height": 48, "cuts": [48, 96], "_clip_random_weights": True}
        staging.write_source(staging.folder_of(out), item.key, src, rows, media)
    return items


def _manifest_rows(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "manifest" / "clips.parquet").to_pylist()
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731  (json has null)
    return {r["clip_id"]: {k: clean(v) for k, v in r.items()} for r in rows}


@pytest.mark.parametrize("kind, members", [("video", {"mp4", "jpg", "txt", "json"}), ("image", {"jpg", "txt", "json"})])
def test_every_shard_kind_reads_back_through_a_webdataset_pipeline(tmp_path, kind, members):
    """finalize (what the job runs) -> shards -> wds.WebDataset(...).decode(): every kept clip once, in its
    manifest shard, with exactly the layout the training loader reads, and json = its manifest row."""
    out = tmp_path / "out"
    items = _stage_inputs(out)
    cfg = CurateConfig()
    cfg.output.shard_max_bytes = 2 * 3072 + 1000  # two samples per shard: two video shards
    final = finalize(cfg, out, items)
    manifest_rows = _manifest_rows(out)
    kept = {cid for cid, r in manifest_rows.items() if r["kept"] and r["kind"] == kind}
    urls = sorted(str(p) for p in (out / "shards").glob(f"{kind}-*.tar"))
    assert [Path(u).name for u in urls] == sorted(n for n in final.shard_samples if n.startswith(kind))
    assert len(urls) == (2 if kind == "video" else 1)
    media = {}
    for item in items:
        media.update(staging.read_media(staging.staging_path(staging.folder_of(out), item.key)))
    pipeline = wds.WebDataset(urls, shardshuffle=False).decode()
    seen = []
    for sample in pipeline:
        key = sample["__key__"]
        seen.append(key)
        assert {k for k in sample if not k.startswith("__")} == members
        row = manifest_rows[key]
        assert sample["json"] == {k: row[k] for k in sample["json"]}  # the manifest row, key for key
        assert set(row) - set(sample["json"]) <= {k for k, v in row.items() if v is None}
        assert Path(sample["__url__"]).name == row["shard"] and sample["txt"] == row["caption"]
        assert sample["jpg"] == media[key][1] and sample.get("mp4") == media[key][0]
    assert seen == sorted(kept) and len(kept) == (2 if kind == "video" else 1)
    rejected = {r["reject_reason"] for r in manifest_rows.values() if not r["kept"]}
    assert rejected == {"static", "duplicate"}
    assert all(manifest_rows[c]["shard"] is None for c in manifest_rows if not manifest_rows[c]["kept"])


def test_finalize_twice_gives_identical_bytes_and_drops_stale_shards(tmp_path):
    out = tmp_path / "out"
    items = _stage_inputs(out)
    cfg = CurateConfig()
    cfg.output.shard_max_bytes = 2 * 3072 + 1000
    finalize(cfg, out, items)
    first = {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}
    first_manifest = (out / "manifest" / "clips.parquet").read_bytes()
    (out / "shards" / "video-000007.tar").write_bytes(b"from an older plan")
    (out / "shards" / "video-000000.tar").unlink()
    finalize(cfg, out, list(reversed(items)))
    assert {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())} == first
    assert (out / "manifest" / "clips.parquet").read_bytes() == first_manifest
