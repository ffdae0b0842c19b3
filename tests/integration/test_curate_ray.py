"""The curation job end to end on a real local Ray cluster.

Inputs: the short real clips of ../shared (skipped without it) + generated poison files (0 bytes, text
renamed .mp4, truncated, a faststart mp4 cut in half whose header lies about its frame count, a caption that
is not UTF-8) + an image-text pair. Checks the output contract, every shard kind read back through a
`webdataset` pipeline (members, json = manifest row), exact clip durations, and that a run whose driver
is SIGKILLed mid-way and then resumed equals an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from common.atomic import is_temp

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

SHARED_CLIPS = ["clip_01_tears_of_steel.mp4", "clip_02_caminandes.mp4"]
# one source per open_clip batch: every source is staged the moment it is done (finer resume points)
OVERRIDES = ["decode.timeout_s=120", "job.source_timeout_s=300", "job.clip_sources_per_batch=1"]


def _remux_faststart(src: Path, dst: Path) -> None:
    """Copy the video packets into an mp4 with the index (moov) first, without re-encoding."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        ist = inp.streams.video[0]
        ost = out.add_stream_from_template(ist)
        for pkt in inp.demux(ist):
            if pkt.dts is None:
                continue
            pkt.stream = ost
            out.mux(pkt)


def _decoded_frames(path: Path) -> int:
    n = 0
    try:
        with av.open(str(path)) as c:
            for _ in c.decode(video=0):
                n += 1
    except av.error.FFmpegError:
        pass
    return n


@pytest.fixture(scope="module")
def inputs(shared_videos, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("inputs")
    captions = {
        "clip_01_tears_of_steel": "a robot, a man on a canal bridge and two people in a neon-lit room",
        "clip_02_caminandes": "a cartoon llama stands by a desert road while cars race past",
    }
    for name in SHARED_CLIPS:
        (folder / name).symlink_to(shared_videos / name)
        (folder / name).with_suffix(".txt").write_text(captions[Path(name).stem])
    tears = (shared_videos / SHARED_CLIPS[0]).read_bytes()
    (folder / "poison_empty.mp4").write_bytes(b"")
    (folder / "poison_text.mp4").write_text("definitely not a video\n" * 50)
    (folder / "poison_truncated.mp4").write_bytes(tears[: len(tears) // 3])  # moov at the end: index lost
    fast = folder / "full_faststart.tmp"
    _remux_faststart(shared_videos / SHARED_CLIPS[0], fast)
    data = fast.read_bytes()
    fast.unlink()
    lying = folder / "header_lies.mp4"  # index first, media cut: the header claims all 240 frames
    lying.write_bytes(data[: len(data) // 2])
    (folder / "header_lies.txt").write_text("a robot close-up and a man on a canal bridge")
    (folder / "bad_caption.mp4").symlink_to(shared_videos / SHARED_CLIPS[1])
    # Latin-1 without a byte-order mark: neither UTF-8 nor UTF-16 (b"\xff\xfe..." would be UTF-16 with a BOM)
    (folder / "bad_caption.txt").write_bytes(b"caf\xe9 cr\xe8me br\xfbl\xe9e, broken")
    (folder / "still.jpg").write_bytes((REPO / "tests/assets/sample/tears_of_steel_frame_0040.jpg").read_bytes())
    (folder / "still.txt").write_text("a young man faces a giant robot on a bridge over a canal")
    with av.open(str(lying)) as c:
        header_frames = c.streams.video[0].frames
    return {"folder": folder, "lying_header_frames": header_frames, "lying_decodable": _decoded_frames(lying)}


def _curate_cmd(inp: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "pipeline.curate", "--input", str(inp), "--output", str(out), *OVERRIDES, *extra]


def _run_driver(ray_cluster, inp, out, timeout=240, extra: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}
    res = subprocess.run(_curate_cmd(inp, out, extra), env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def full_run(ray_cluster, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    res = _run_driver(ray_cluster, inputs["folder"], out)
    (out.parent / "driver_stdout.txt").write_text(res.stdout)
    return out


def _table(out: Path, name: str):
    return pq.read_table(out / "manifest" / f"{name}.parquet").to_pandas()


def test_poison_is_recorded_and_good_sources_are_ok(full_run, inputs):
    src = _table(full_run, "sources")
    by_name = {Path(row["source"]).name: row for _, row in src.iterrows()}
    assert set(by_name) == {p.name for p in inputs["folder"].iterdir() if p.suffix in (".mp4", ".jpg")}
    for name in ("poison_empty.mp4", "poison_text.mp4", "poison_truncated.mp4", "bad_caption.mp4"):
        row = by_name[name]
        assert row["status"] == "error" and isinstance(row["error"], str) and row["error"], name
        assert "\n" not in row["error"]
    assert "empty" in by_name["poison_empty.mp4"]["error"]
    assert "caption" in by_name["bad_caption.mp4"]["error"]
    for name in SHARED_CLIPS + ["still.jpg"]:
        assert by_name[name]["status"] == "ok", (name, by_name[name]["error"])
    tears = by_name["clip_01_tears_of_steel.mp4"]
    assert tears["num_frames"] == 240 and list(tears["cuts"]) and all(0 < c < 240 for c in tears["cuts"])
    # the lying header is not trusted: the decoded count is what really decodes
    lying = by_name["header_lies.mp4"]
    assert inputs["lying_header_frames"] > inputs["lying_decodable"] > 0
    if lying["status"] == "ok":
        assert abs(int(lying["num_frames"]) - inputs["lying_decodable"]) <= 2
        assert lying["num_frames"] < inputs["lying_header_frames"]
    else:
        assert lying["error"]
    stats = json.loads((full_run / "stats.json").read_text())
    assert stats["sources"]["error"] == int((src["status"] == "error").sum()) >= 4
    assert stats["clips"]["kept"] == int(_table(full_run, "clips")["kept"].sum()) > 0
    assert any("random weights" in n for n in stats["notes"])
    assert (full_run / "config.yaml").is_file()
    # the report: written by the job, its funnel = stats.json, the failed sources listed with their reason
    html = (full_run / "report.html").read_text()
    funnel = {k: int(v) for k, v in re.findall(r'<td data-funnel="([^"]+)">(\d+)</td>', html)}
    assert funnel == {f"{kind}.{k}": v for kind, c in stats["funnel"].items() for k, v in c.items()}
    assert funnel["video.shots"] >= funnel["video.sources_ok"] > 0
    assert {k: int(v) for k, v in re.findall(r'<td data-clips="([^"]+)">(\d+)</td>', html)} == {
        "candidates": stats["clips"]["candidates"], "kept": stats["clips"]["kept"]}
    assert {k: int(v) for k, v in re.findall(r'<td data-reject="([^"]+)">(\d+)</td>', html)} == \
        stats["clips"]["rejected_by_reason"]
    assert "poison_empty.mp4" in html and 'class="thumb" data-group="kept"' in html
    last = (full_run.parent / "driver_stdout.txt").read_text().strip().splitlines()[-1]
    assert last.startswith(f"report:  {full_run / 'report.html'} ("), last


SHARD_MEMBERS = {"video": {"mp4", "jpg", "txt", "json"}, "image": {"jpg", "txt", "json"}}


def _shard_samples(out: Path) -> dict[str, dict]:
    """Every sample of every shard, read per kind through one webdataset pipeline as a loader reads them."""
    samples = {}
    for kind, members in SHARD_MEMBERS.items():
        urls = sorted(str(p) for p in (out / "shards").glob(f"{kind}-*.tar"))
        if not urls:
            continue
        for s in wds.WebDataset(urls, shardshuffle=False):
            assert s["__key__"] not in samples, f"{s['__key__']} written twice"
            assert {k for k in s if not k.startswith("__")} == members, (kind, sorted(s))
            samples[s["__key__"]] = {**s, "shard": Path(s["__url__"]).name}
    return samples


def test_shards_hold_exactly_the_kept_clips_with_exact_durations(full_run):
    clips = _table(full_run, "clips")
    samples = _shard_samples(full_run)
    kept = clips[clips["kept"]]
    assert set(samples) == set(kept["clip_id"])  # every kept row in one shard, nothing else in any shard
    assert clips.loc[~clips["kept"], "shard"].isna().all() and clips.loc[~clips["kept"], "reject_reason"].notna().all()
    assert kept["reject_reason"].isna().all()
    # no temp file of an atomic write (NAME.tmp-PID-HEX, or an older writer's NAME.tmp) left in either folder
    for folder in ("shards", "staging"):
        assert (full_run / folder).is_dir(), folder
        assert not [p.name for p in (full_run / folder).iterdir() if is_temp(p.name)], folder
    assert {s["shard"].split("-")[0] for s in samples.values()} == {"video", "image"}  # both kinds written
    manifest_rows = {r["clip_id"]: r for r in pq.read_table(full_run / "manifest" / "clips.parquet").to_pylist()}
    for row in kept.itertuples():
        s = samples[row.clip_id]
        assert s["shard"] == row.shard
        meta = json.loads(s["json"])
        assert meta["clip_id"] == row.clip_id and meta["kept"] is True and meta["shard"] == row.shard
        nan_free = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in manifest_rows[row.clip_id].items()}
        assert meta == {k: nan_free[k] for k in meta}  # the json member is the clip's manifest row
        assert s["txt"].decode() == row.caption and s["jpg"][:2] == b"\xff\xd8"
        if row.kind == "image":
            assert "mp4" not in s and row.shard.startswith("image-")
            continue
        assert row.shard.startswith("video-")
        with av.open(io.BytesIO(s["mp4"])) as c:
            st = c.streams.video[0]
            n = sum(1 for _ in c.decode(st))
            out_fps = float(st.average_rate)
        expected = (row.end_frame - row.start_frame) / row.fps
        assert abs(n / out_fps - expected) <= 1.0 / row.fps + 1e-6, (row.clip_id, n, out_fps, expected)


def _canonical(out: Path):
    src = _table(out, "sources").sort_values("source").reset_index(drop=True)
    clips = _table(out, "clips").sort_values("clip_id").reset_index(drop=True)
    return src, clips


def _assert_same_tables(a, b):
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype.kind == "f":
            assert np.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True), col
        else:
            assert [str(v) for v in x] == [str(v) for v in y], col


def test_killed_then_resumed_run_equals_uninterrupted(ray_cluster, inputs, full_run, tmp_path):
    out = tmp_path / "out"
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}
    # One stage-1 actor and one source per open_clip batch: sources reach staging one by one, so the kill
    # lands mid-run however fast the machine is (job.* settings may differ between a run and its resume).
    # The killed run scores in open_clip actors of their own, the resume inside stage 1 with two sources
    # per actor, the full run inside stage 1 one source at a time: all three must agree.
    slow = ["job.process_actors=1", "job.clip_sources_per_batch=1", "job.clip_placement=actors"]
    proc = subprocess.Popen(_curate_cmd(inputs["folder"], out, slow), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_inputs = len([p for p in inputs["folder"].iterdir() if p.suffix in (".mp4", ".jpg")])
    deadline = time.monotonic() + 180
    staged: list[Path] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            staged = list((out / "staging").glob("*.parquet")) if (out / "staging").is_dir() else []
            if len(staged) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    n_staged = len(list((out / "staging").glob("*.parquet")))
    assert 1 <= n_staged < n_inputs  # really killed mid-run
    assert not (out / "manifest" / "clips.parquet").exists()
    res = _run_driver(ray_cluster, inputs["folder"], out, extra=["job.sources_per_actor=2"])
    assert f"{n_staged} already staged" in res.stdout
    a_src, a_clips = _canonical(full_run)
    b_src, b_clips = _canonical(out)
    _assert_same_tables(a_src, b_src)
    _assert_same_tables(a_clips, b_clips)
    a, b = _shard_samples(full_run), _shard_samples(out)
    assert {k: v["shard"] for k, v in a.items()} == {k: v["shard"] for k, v in b.items()}
    assert all(a[k].get("mp4") == b[k].get("mp4") for k in a)  # the same encoded bytes


def _sample_inputs(folder: Path, *extra: str) -> Path:
    """`folder` holding the one image-text pair of tests/assets/sample (+ the `extra` files named from there)."""
    folder.mkdir()
    sample = REPO / "tests" / "assets" / "sample"
    for name in ("tears_of_steel_frame_0040.jpg", "tears_of_steel_frame_0040.txt", *extra):
        (folder / name).write_bytes((sample / name).read_bytes())
    return folder


def test_cli_under_ray_job_submit(ray_cluster, tmp_path):
    """`ray job submit --working-dir . -- python -m pipeline.curate ...` as a user runs it."""
    out = tmp_path / "out"
    inp = _sample_inputs(tmp_path / "inp", "broken_upload.mp4")
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
           "--working-dir", ".", "--", "python", "-m", "pipeline.curate", "--input", str(inp), "--output", str(out)]
    res = subprocess.run(cmd, env=ray_cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    src = _table(out, "sources")
    assert sorted(src["status"]) == ["error", "ok"]
    clips = _table(out, "clips")
    assert len(clips) == 1 and clips["kind"][0] == "image"
    assert set(_shard_samples(out)) == set(clips.loc[clips["kept"], "clip_id"])


def test_cuda_for_open_clip_on_a_cluster_without_gpu_is_refused_before_any_work(ray_cluster, tmp_path):
    """The cluster has no GPU: scores.clip.device=cuda stops the job with exit status 2 and the field named,
    before any source is processed or anything is written to OUT."""
    inp = _sample_inputs(tmp_path / "inp")
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}
    res = subprocess.run(_curate_cmd(inp, tmp_path / "out", ["scores.clip.device=cuda"]), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "scores.clip.device: 'cuda' but open_clip gets no GPU" in res.stderr
    assert not (tmp_path / "out").exists()


def test_open_clip_that_cannot_load_stops_the_job_with_its_reason(ray_cluster, tmp_path):
    """open_clip loads inside the stage-1 actors here (no GPU): a checkpoint that exists but does not load
    ends the job with that reason and exit status 1, not with every clip silently rejected."""
    broken = tmp_path / "open_clip_model.safetensors"
    broken.write_bytes(b"not a safetensors file")
    inp = _sample_inputs(tmp_path / "inp")
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}
    res = subprocess.run(_curate_cmd(inp, tmp_path / "out", [f"scores.clip.checkpoint={broken}"]), env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "open_clip did not load" in res.stderr
    assert not (tmp_path / "out" / "manifest").exists()
