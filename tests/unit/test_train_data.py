"""Training data loader (training/data.py) on shards built in code from a real clip (tests/train_shards.py).

Shard sets: `good` (11 marked clips at 24/12/30 fps in two shards, five of them with a keyframe every 7
frames, + 4 images), `bad` (the kinds of damage a real dataset has: garbage mp4 bytes, an mp4 of an
unknown codec, a member missing, a clip shorter than F, a caption that is not UTF-8, a garbled tar header,
a tar truncated inside a member, an empty shard, a garbage jpg, among good samples) and `crashing` (good
clips and one on which decord segfaults). Every loader test has a pytest timeout: a hang fails instead of
blocking CI.
"""

from __future__ import annotations

import faulthandler
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter

import av
import numpy as np
import pytest
import torch

from common.configtree import ConfigError, from_dict
from curation.encode import EncodeConfig
from tests.train_shards import (
    REPO, far_chunk_offset, garble_header, image_sample, marked_frames, marker_index, truncate_inside,
    unreferenced_pictures, video_sample, write_tar,
)
from training.data import DataConfig, DataError, TrainLoader, check_shards, validation_items
from training.data_order import micro_step_kind
from training.frames import read_clip, unit_range
from training.loader_workers import LoaderWorkerError, WorkerPool
from training.shardindex import index_tar

pytestmark = pytest.mark.timeout(120)

GOOD_VIDEO = [f"v{i:02d}" for i in range(11)]
GOOD_IMAGE = [f"i{i:02d}" for i in range(4)]
CLIP_FPS = {**{k: 24.0 for k in GOOD_VIDEO}, "v04": 12.0, "v05": 30.0}
BAD_GOOD_VIDEO = ["vA", "vF", "vH", "vI"]
BAD_GOOD_IMAGE = ["iA", "iC"]
BAD_EXPECTED = {  # (key, reason) of every sample the bad set must skip
    ("vB", "undecodable_video"), ("vC", "missing_member"), ("vD", "too_short"), ("vE", "corrupt_member"),
    ("vG", "missing_member"), ("vJ", "corrupt_member"), ("vK", "undecodable_video"), ("iB", "undecodable_image"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    # the second shard's clips have a keyframe every 7 frames (+ B-frames): random access must seek right
    samples = [video_sample(k, 40, CLIP_FPS[k], offset=3 * i, keyint=7 if i >= 6 else None)
               for i, k in enumerate(GOOD_VIDEO)]
    write_tar(root / "shards" / "video-000000.tar", samples[:6])
    write_tar(root / "shards" / "video-000001.tar", samples[6:])
    write_tar(root / "shards" / "image-000000.tar", [image_sample(k, frame=i) for i, k in enumerate(GOOD_IMAGE)])
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    no_mp4 = video_sample("vC")
    del no_mp4["mp4"]
    bad_caption = video_sample("vE")
    bad_caption["txt"] = b"\xff\xfe not utf-8 \xc3"
    shard0 = write_tar(root / "video-000000.tar", [
        video_sample("vA"), {**video_sample("vB"), "mp4": b"\x00\x00\x00\x18ftypisom" + os.urandom(3000)},
        no_mp4, video_sample("vD", num_frames=3), bad_caption, video_sample("vF"), video_sample("vG"),
        video_sample("vH"),
    ])
    garble_header(shard0, "vF.jpg")  # a member the loader does not need: vF stays usable
    garble_header(shard0, "vG.mp4")  # vG loses its clip
    unknown_codec = video_sample("vK")  # a valid container whose stream no decoder knows
    unknown_codec["mp4"] = unknown_codec["mp4"].replace(b"avc1", b"zzzz")
    shard1 = write_tar(root / "video-000001.tar", [video_sample("vI"), unknown_codec, video_sample("vJ")])
    truncate_inside(shard1, "vJ.mp4")
    (root / "video-000002.tar").write_bytes(b"")
    write_tar(root / "image-000000.tar", [
        image_sample("iA"), {**image_sample("iB"), "jpg": b"\xff\xd8\xff garbage"}, image_sample("iC", frame=5),
    ])
    return root


def cfg_for(root, **kw) -> DataConfig:
    base = dict(shards=[str(root)], num_frames=4, fps_choices=[8], batch_size=2, num_workers=0, timeout_s=60)
    base.update(kw)
    return DataConfig(**base)


def take(loader: TrainLoader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def epoch_of(sid: int) -> int:
    return int(sid) >> 33


# --------------------------------------------------------------------------- config and discovery


def test_config_rejects_bad_values_naming_the_field():
    for field, value in [("height", 60), ("num_frames", 0), ("image_fraction", 1.5), ("fps_choices", []),
                         ("batch_size", 0), ("reader", "opencv"), ("timeout_s", 0)]:
        with pytest.raises(ConfigError, match=field):
            from_dict(DataConfig, {field: value})


def test_no_shards_is_an_error_naming_the_paths(tmp_path, good):
    missing, empty_dir = tmp_path / "nowhere", tmp_path / "empty"
    empty_dir.mkdir()
    cfg = DataConfig(shards=[str(missing), str(empty_dir)])
    for build in (lambda: check_shards(cfg), lambda: TrainLoader(cfg, seed=0)):
        with pytest.raises(DataError) as err:
            build()
        assert str(missing) in str(err.value) and str(empty_dir) in str(err.value)
    # an image mix without image shards names the gap
    only_video = tmp_path / "only_video"
    (only_video / "shards").mkdir(parents=True)
    os.symlink(good / "shards" / "video-000000.tar", only_video / "shards" / "video-000000.tar")
    with pytest.raises(DataError, match="no image-"):
        check_shards(DataConfig(shards=[str(only_video)], image_fraction=0.2))
    assert check_shards(DataConfig(shards=[str(only_video)]))["video"]


def test_shard_index_survives_damage(bad):
    index = index_tar(str(bad / "video-000000.tar"))
    assert list(index.samples) == ["vA", "vB", "vC", "vD", "vE", "vF", "vG", "vH"]
    assert "jpg" not in index.samples["vF"] and "mp4" in index.samples["vF"]
    assert "mp4" not in index.samples["vG"] and "txt" in index.samples["vG"]
    cut = index_tar(str(bad / "video-000001.tar"))
    assert cut.samples["vJ"]["mp4"].truncated and not cut.samples["vI"]["mp4"].truncated
    assert index_tar(str(bad / "video-000002.tar")).problem is not None


# --------------------------------------------------------------------------- bad samples


def test_bad_samples_are_skipped_counted_and_logged(bad, caplog):
    caplog.set_level(logging.INFO, logger="training.data")
    cfg = cfg_for(bad, image_fraction=0.3, num_workers=2)
    with TrainLoader(cfg, seed=3) as loader:
        batches = take(loader, 30)
        skipped = loader.skipped()
    seen = Counter(k for b in batches for k in b.keys)
    assert set(seen) == set(BAD_GOOD_VIDEO + BAD_GOOD_IMAGE)
    assert all(b.pixels.shape[0] == 2 for b in batches)  # skipped samples are replaced: batches stay full
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    logged = {(line.split(" sample ")[1].split(" ")[0], line.split("): ")[1].split(":")[0])
              for line in lines if " sample " in line}
    assert logged == BAD_EXPECTED
    assert skipped["unreadable_shard"] == 1 and any("video-000002.tar" in line for line in lines)
    per_reason = Counter(line.split("): ")[1].split(":")[0] for line in lines if " sample " in line)
    assert {k: v for k, v in skipped.items() if k != "unreadable_shard"} == dict(per_reason)


def test_only_bad_samples_is_an_error_not_a_hang(tmp_path):
    write_tar(tmp_path / "video-000000.tar",
              [video_sample("short", num_frames=3), {**video_sample("junk"), "mp4": b"junk"}])
    with TrainLoader(cfg_for(tmp_path, num_workers=2), seed=0) as loader, \
            pytest.raises(DataError, match="no usable video sample"):
        take(loader, 5)


def test_lying_header_clip_falls_back_to_pyav_within_real_length(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="training.data")
    sample = video_sample("cut", num_frames=40)
    sample["mp4"] = sample["mp4"][: int(len(sample["mp4"]) * 0.7)]  # moov still claims 40 frames
    write_tar(tmp_path / "video-000000.tar", [sample])
    decodable = 0
    with av.open(io.BytesIO(sample["mp4"])) as container:
        assert container.streams.video[0].frames == 40
        try:
            for _ in container.decode(video=0):
                decodable += 1
        except av.FFmpegError:
            pass
    assert 4 < decodable < 36
    for reader in ("decord", "pyav"):
        with TrainLoader(cfg_for(tmp_path, fps_choices=[24], batch_size=1, reader=reader), seed=0) as loader:
            for b in take(loader, 6):
                marks = [marker_index(b.pixels[0, :, i]) for i in range(4)]
                assert marks == list(range(marks[0], marks[0] + 4)) and marks[-1] < decodable
    assert any("decord failed" in r.getMessage() and "read with PyAV" in r.getMessage() for r in caplog.records)
    # PyAV reads it sequentially (its header counts more frames than the file holds), and says so
    assert any("decoded sequentially" in r.getMessage() and "the header counts 40 frames" in r.getMessage()
               for r in caplog.records)
    # F frames that do not fit into the frames that really decode: too_short, counted
    write_tar(tmp_path / "video-000001.tar", [video_sample("ok")])
    with TrainLoader(cfg_for(tmp_path, fps_choices=[24], num_frames=decodable + 1, batch_size=1), seed=0) as loader:
        take(loader, 3)
        assert set(loader.skipped()) == {"too_short"}  # counted at every visit (once per epoch)
    assert any("sample cut" in r.getMessage() and "too_short" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- what a sample holds


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_frame_sampling_follows_fps_frames_and_crop(good, reader):
    cfg = cfg_for(good, fps_choices=[4, 8, 24], batch_size=4, reader=reader)
    fps_seen = Counter()
    lefts, seeking_starts = set(), set()
    with TrainLoader(cfg, seed=5) as loader:
        for b in take(loader, 8):
            assert b.pixels.shape == (4, 3, 4, 64, 64) and b.pixels.dtype == torch.float32
            assert b.pixels.min() >= -1.0 and b.pixels.max() <= 1.0
            for px, fps, key in zip(b.pixels, b.fps.tolist(), b.keys):
                src_fps = CLIP_FPS[key]
                usable = [f for f in (4, 8, 24) if f <= src_fps]
                assert fps in usable
                fps_seen[fps] += 1
                marks = [marker_index(px[:, i]) for i in range(4)]
                stride = src_fps / fps
                assert marks == [marks[0] + round(i * stride) for i in range(4)], (key, fps, marks)
                assert 0 <= marks[0] and marks[-1] < 40
                if GOOD_VIDEO.index(key) >= 6:
                    seeking_starts.add(marks[0])
                # the crop is an exact 64x64 window of the 96x64 source frame (no resize needed here)
                offset = 3 * GOOD_VIDEO.index(key)
                ref = torch.from_numpy(marked_frames(40, offset)[marks[0]]).permute(2, 0, 1).float() / 127.5 - 1
                errors = [float((ref[:, :, x : x + 64] - px[:, 0]).abs().mean()) for x in range(33)]
                assert min(errors) < 0.03, min(errors)
                lefts.add(int(np.argmin(errors)))
    assert set(fps_seen) == {4, 8, 24}  # the seeded choice uses every usable rate
    assert max(seeking_starts) >= 7  # some reads started past the first keyframe of a short-GOP clip
    assert len(lefts) > 3  # random crop offsets, not a fixed centre crop


def test_readers_give_the_frames_of_a_full_decode_bit_for_bit(good):
    """PyAV's indexed path (IDR seek, unreferenced pictures skipped) and decord return exactly the frames a
    plain sequential decode of the whole clip gives at the planned positions."""
    clips = {}
    for shard in sorted((good / "shards").glob("video-*.tar")):
        with tarfile.open(shard) as tar:
            clips.update({m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".mp4")})
    assert len(clips) == len(GOOD_VIDEO)
    uniforms = np.random.default_rng(0).random((12, 2))
    for key, mp4 in clips.items():
        unreferenced, keyframes = unreferenced_pictures(mp4)
        # the premise: B-frames everywhere; a keyframe every 7 frames in the second shard, every
        # keyframe_interval_s (the curation job's encoder setting) in the first
        job_gop = round(EncodeConfig().keyframe_interval_s * CLIP_FPS[key])
        assert unreferenced >= 2 and keyframes == (6 if GOOD_VIDEO.index(key) >= 6 else math.ceil(40 / job_gop))
        with av.open(io.BytesIO(mp4)) as container:
            full = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        starts = set()
        for num_frames, (u_fps, u_start) in zip([1, 4, 9] * 4, uniforms):
            plans = []
            for reader in ("pyav", "decord"):
                frames, plan, note = read_clip(mp4, num_frames=num_frames, fps_choices=[4, 8, 24], u_fps=u_fps,
                                               u_start=u_start, reader=reader)
                assert note is None and np.array_equal(frames, full[list(plan.positions)]), (key, reader, plan)
                plans.append(plan)
            assert plans[0] == plans[1]
            starts.add(plans[0].positions[0])
        assert max(starts) >= 7  # reads that start past the first keyframe (seeking clips)


def test_pixels_become_float_in_the_training_process_only():
    """Workers hand over uint8; unit_range is x / 127.5 - 1 in float32 arithmetic (what the workers computed
    before), the extremes exactly -1 and 1. The training process imports the loader without PyAV or decord
    (a GPU machine may have neither)."""
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit_range(values), values.float() / 127.5 - 1.0)
    assert torch.allclose(unit_range(values).double(), values.double() / 127.5 - 1.0, rtol=0, atol=1e-7)
    assert unit_range(values)[[0, -1]].tolist() == [-1.0, 1.0]
    code = ("import sys; sys.modules['av'] = sys.modules['decord'] = None\n"
            "from training.data import Batch, TrainLoader, validation_items\n"
            "from training.frames import unit_range, resize_cover_crop\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_validation_items_are_fixed_and_start_at_the_conditioning_frame(good):
    cfg = cfg_for(good, fps_choices=[8, 24])
    first, again = validation_items(cfg, 3), validation_items(cfg, 3)
    assert [i["key"] for i in first] == GOOD_VIDEO[:3]
    for a, b in zip(first, again):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])
        assert a["video"].shape == (3, 4, 64, 64) and a["image"].shape == (3, 64, 64)
        assert torch.equal(a["image"], a["video"][:, 0])  # conditioning image = first frame
        assert [marker_index(a["video"][:, i]) for i in range(4)] == [0, 3, 6, 9]  # start 0, lowest fps (8)


# --------------------------------------------------------------------------- order, split, mix, resume


def test_mix_schedule_holds_within_binomial_tolerance():
    """Tolerance: |count - n p| <= 4 sqrt(n p (1 - p)) (a fair schedule fails it with p < 1e-4)."""
    n = 20000
    for fraction in (0.1, 0.25, 0.5, 0.9):
        images = sum(micro_step_kind(7, m, fraction) == "image" for m in range(n))
        assert abs(images - n * fraction) <= 4 * math.sqrt(n * fraction * (1 - fraction)), (fraction, images)
    assert {micro_step_kind(7, m, 0.0) for m in range(100)} == {"video"}
    assert {micro_step_kind(7, m, 1.0) for m in range(100)} == {"image"}


def test_loader_follows_the_mix_schedule(good):
    n, fraction = 300, 0.3
    cfg = cfg_for(good, image_fraction=fraction, batch_size=1, image_batch_size=3, height=16, width=16, num_frames=2)
    with TrainLoader(cfg, seed=11) as loader:
        batches = take(loader, n)
    assert [b.kind for b in batches] == [micro_step_kind(11, m, fraction) for m in range(n)]
    images = sum(b.kind == "image" for b in batches)
    assert abs(images - n * fraction) <= 4 * math.sqrt(n * fraction * (1 - fraction))
    assert all(b.pixels.shape[:3] == ((3, 3, 1) if b.kind == "image" else (1, 3, 2)) for b in batches)


@pytest.mark.parametrize("which", ["good", "bad"])
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(which, good, bad):
    root = good if which == "good" else bad
    expected = GOOD_VIDEO if which == "good" else BAD_GOOD_VIDEO
    cfg = cfg_for(root, num_workers=2, height=32, width=32)
    epoch0 = []
    for rank in (0, 1):
        with TrainLoader(cfg, seed=2, rank=rank, world_size=2) as loader:
            it = iter(loader)
            while True:  # a rank's stream is in epoch order: after its first epoch-1 sample, epoch 0 is done
                b = next(it)
                epoch0 += [k for k, s in zip(b.keys, b.sample_ids.tolist()) if epoch_of(s) == 0]
                if any(epoch_of(s) > 0 for s in b.sample_ids.tolist()):
                    break
    assert sorted(epoch0) == sorted(expected)  # no duplicate, none missing


def test_resume_is_position_exact(bad):
    cfg = cfg_for(bad, image_fraction=0.3, num_workers=2)
    with TrainLoader(cfg, seed=9) as loader:
        it = iter(loader)
        k = 0
        while True:  # stop where a kind is part-way through a chunk (a skip shifted the batches)
            next(it)
            k += 1
            state = json.loads(json.dumps(loader.state_dict()))
            if any(p["taken"] for p in state["positions"].values()) or k > 40:
                break
        assert k <= 40, "no mid-chunk position reached"
        expected = [next(it) for _ in range(8)]
    with TrainLoader(cfg, seed=9) as resumed:
        resumed.load_state_dict(state)
        got = take(resumed, 8)
        assert resumed.skipped() == {**state["skipped"], **resumed.skipped()}
    for a, b in zip(expected, got):
        assert (a.kind, a.keys, a.captions) == (b.kind, b.keys, b.captions)
        assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.fps, b.fps)
        assert torch.equal(a.pixels, b.pixels)
    with TrainLoader(cfg_for(bad, image_fraction=0.3), seed=9, rank=0, world_size=2) as other:
        with pytest.raises(DataError, match="world_size"):
            other.load_state_dict(state)


def test_one_rank_with_2b_is_the_union_of_two_ranks_with_b(good):
    base = dict(image_fraction=0.4, height=32, width=32, fps_choices=[4, 8])
    steps = 14  # 11 video samples: crosses epoch boundaries at both batch sizes
    with TrainLoader(cfg_for(good, batch_size=4, image_batch_size=2, num_workers=2, **base), seed=4) as one:
        single = take(one, steps)
    pair = []
    for rank in (0, 1):
        with TrainLoader(cfg_for(good, batch_size=2, image_batch_size=1, **base), seed=4, rank=rank, world_size=2) as r:
            pair.append(take(r, steps))
    for s, r0, r1 in zip(single, *pair):
        assert s.kind == r0.kind == r1.kind
        by_id = {int(i): (px, f) for b in (r0, r1) for i, px, f in zip(b.sample_ids, b.pixels, b.fps)}
        assert sorted(by_id) == sorted(s.sample_ids.tolist())
        for i, px, f in zip(s.sample_ids.tolist(), s.pixels, s.fps):
            assert torch.equal(px, by_id[i][0]) and f == by_id[i][1]
    assert any(epoch_of(i) > 0 for b in single for i in b.sample_ids.tolist())


# --------------------------------------------------------------------------- workers never hang silently


def test_worker_timeout_is_an_error_naming_the_shard(good):
    with TrainLoader(cfg_for(good, num_workers=1, timeout_s=0.001), seed=0) as loader:
        with pytest.raises(LoaderWorkerError, match="video-00000"):
            take(loader, 1)


def test_dead_worker_is_an_error_naming_the_shard(good):
    with TrainLoader(cfg_for(good, num_workers=2, prefetch=1), seed=0) as loader:
        it = iter(loader)
        next(it)
        for pid in loader.worker_pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(LoaderWorkerError, match="died.*video-00000"):
            for _ in range(20):
                next(it)


# --------------------------------------------------------------------------- a decoder that crashes


CRASH_GOOD = [f"w{i}" for i in range(6)]


@pytest.fixture(scope="module")
def crashing(tmp_path_factory):
    """Six good clips and `w2x` (third in key order), whose damaged sample table makes decord segfault."""
    root = tmp_path_factory.mktemp("crashing")
    samples = [video_sample(k, offset=3 * i) for i, k in enumerate(CRASH_GOOD)]
    crasher = video_sample("w2x")
    crasher["mp4"] = far_chunk_offset(crasher["mp4"])
    samples.insert(3, crasher)
    write_tar(root / "video-000000.tar", samples)
    return root


def _read_with_decord(mp4: bytes) -> None:
    faulthandler.disable()  # the crash is expected: no stack dump
    read_clip(mp4, num_frames=4, fps_choices=[8], u_fps=0.0, u_start=0.0, reader="decord")


def test_decoder_crash_is_a_skipped_sample_and_positions_stay_exact(crashing, caplog):
    caplog.set_level(logging.WARNING)
    with tarfile.open(crashing / "video-000000.tar") as tar:
        crasher = tar.extractfile("w2x.mp4").read()
    # the premise: decord really dies on it (SIGSEGV in native code), in a child so that pytest survives
    child = multiprocessing.get_context("fork").Process(target=_read_with_decord, args=(crasher,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGSEGV, f"decord no longer crashes on this input (exit {child.exitcode})"

    cfg = cfg_for(crashing, num_workers=2, height=32, width=32)
    steps = 10  # 20 samples: more than 3 epochs of the 6 usable clips
    with TrainLoader(cfg, seed=1) as loader:
        it = iter(loader)
        started = set(loader.worker_pids())
        states, batches = [], []
        for _ in range(steps):
            states.append(json.loads(json.dumps(loader.state_dict())))
            batches.append(next(it))
        skipped, now = loader.skipped(), set(loader.worker_pids())
    assert all(len(b.keys) == 2 for b in batches)  # the crashed sample was replaced: batches stay full
    assert {k for b in batches for k in b.keys} == set(CRASH_GOOD)
    assert set(skipped) == {"decoder_crash"} and skipped["decoder_crash"] >= 3  # once per epoch visited
    assert now != started and len(now) == 2  # crashed workers were replaced
    skip_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rank 0: skipped")]
    assert len(skip_lines) == skipped["decoder_crash"]
    assert all("sample w2x (" in line and "video-000000.tar): decoder_crash" in line and "SIGSEGV" in line
               for line in skip_lines)

    # the same batches as a run where that sample is a clean skip (PyAV: no frame decodes)
    with TrainLoader(cfg_for(crashing, num_workers=2, height=32, width=32, reader="pyav"), seed=1) as clean:
        for a, b in zip(batches, take(clean, steps)):
            assert a.keys == b.keys and torch.equal(a.sample_ids, b.sample_ids)
        assert clean.skipped() == {"undecodable_video": skipped["decoder_crash"]}

    # resuming before and after crashes gives exactly the remaining data, and the same counts at the end
    for k in (1, 5):
        with TrainLoader(cfg, seed=1) as resumed:
            resumed.load_state_dict(states[k])
            for a, b in zip(batches[k:], take(resumed, steps - k)):
                assert a.keys == b.keys and torch.equal(a.sample_ids, b.sample_ids)
                assert torch.equal(a.pixels, b.pixels) and torch.equal(a.fps, b.fps)
            assert resumed.skipped() == skipped

    # validation clips load the same way (in a worker): the crasher is skipped, the next clip takes its place
    caplog.clear()
    assert [i["key"] for i in validation_items(cfg, 4)] == ["w0", "w1", "w2", "w3"]
    assert any("w2x" in r.getMessage() and "decoder_crash" in r.getMessage() for r in caplog.records)


def _echo_items(payload, crashed, progress):
    """Test work function: returns the items of `payload` not in `crashed`, dying of SIGSEGV on "crash"."""
    out = []
    for j, item in enumerate(payload):
        if j in crashed:
            continue
        progress(j)
        if item == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        out.append(item)
    progress(-1)
    return out


def test_worker_pool_blames_only_a_crash_on_an_item():
    pool = WorkerPool(1, _echo_items, timeout_s=60, describe=lambda t: f"task {t}")
    try:
        pool.submit("a", ["x", "crash", "y", "crash"])
        pid = pool.pids[0]
        assert pool.next_result() == ("a", ["x", "y"])  # rerun twice, each time without one more item
        assert pool.pids[0] != pid
        os.kill(pool.pids[0], signal.SIGSEGV)  # a crash while the worker waits for work: nobody to blame
        pool.submit("b", ["z"])
        with pytest.raises(LoaderWorkerError, match=r"died \(pid \d+, SIGSEGV, outside any item.*task b"):
            pool.next_result()
    finally:
        pool.close()
