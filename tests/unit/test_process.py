"""Per-source orchestration without Ray: a synthetic 3-shot video, poison files, an image pair, captions."""

from __future__ import annotations

import codecs
import dataclasses
import errno
import io
import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from curation.config import load_config
from curation.errors import SourceError, is_input_error, reading_input
from curation.inputs import InputItem, list_inputs, read_source
from curation.probe import probe as probe_bytes
from curation.process import clip_id_for, process_source

REPO = Path(__file__).resolve().parents[2]
FPS = 24
SHOT_FRAMES = (40, 36, 44)  # hard cuts at 40 and 76


def _texture(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    tex = cv2.resize(base, (w * 2, h), interpolation=cv2.INTER_CUBIC)
    tint = np.array([(seed * 70) % 256, (seed * 130 + 60) % 256, (seed * 200 + 30) % 256], np.float32)
    return np.clip(tex * 0.6 + tint * 0.4, 0, 255).astype(np.uint8)


def synthetic_frames(h: int = 96, w: int = 160) -> np.ndarray:
    """Three shots of different textures, each panning 2 px per frame (moving, sharp, not static)."""
    frames = []
    for shot, n in enumerate(SHOT_FRAMES):
        tex = _texture(shot + 1, h, w)
        frames += [tex[:, 2 * i : 2 * i + w] for i in range(n)]
    return np.stack(frames)


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> Path:
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            out.mux(st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(st.encode(None))
    return path


@pytest.fixture(scope="module")
def cfg():
    # The job's default config (tiny random CLIP); short shots allowed so the synthetic shots count.
    return load_config(REPO / "configs" / "curate_default.yaml",
                       ["shots.min_shot_s=0.5", "filter.min_duration_s=0.5", "decode.timeout_s=60"])


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("vid") / "three_shots.mp4", synthetic_frames())


def _item(path: Path, caption: str = "a colourful texture pans slowly to the left", kind: str = "video"):
    return InputItem(source=str(path), uri=str(path), kind=kind, caption=caption)


def test_video_is_split_at_the_cuts_and_clips_are_encoded_exactly(cfg, video):
    res = process_source(_item(video), cfg)
    src = res.source_row
    assert src["status"] == "ok", src["error"]
    assert src["num_frames"] == sum(SHOT_FRAMES) and src["fps"] == pytest.approx(FPS)
    assert len(src["cuts"]) == 2
    assert abs(src["cuts"][0] - 40) <= 1 and abs(src["cuts"][1] - 76) <= 1
    bounds = [0, *src["cuts"], src["num_frames"]]
    assert len(res.clip_rows) == len(res.media) == len(res.clip_frames) >= 3
    for row, (mp4, jpg), frames in zip(res.clip_rows, res.media, res.clip_frames):
        s, e = row["start_frame"], row["end_frame"]
        # frame-exact: no clip contains a frame of a neighbouring shot
        assert any(lo <= s and e <= hi for lo, hi in zip(bounds, bounds[1:])), (s, e, bounds)
        assert row["clip_id"] == clip_id_for(str(video), s, e)
        assert row["duration_s"] == pytest.approx((e - s) / FPS)
        for score in ("motion", "flicker", "sharpness", "brightness", "contrast", "text_score"):
            assert np.isfinite(row[score]), score
        assert np.isnan(row["clip_similarity"])  # filled in by stage 2, not here
        assert frames.ndim == 4 and 1 <= len(frames) <= cfg.scores.clip.frames_per_clip
        assert mp4 is not None and jpg is not None, row  # moving, sharp, captioned: passes the cheap filters
        with av.open(io.BytesIO(mp4)) as c:
            n = sum(1 for _ in c.decode(video=0))
        assert n == e - s
        assert cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (row["out_height"],
                                                                                         row["out_width"])


def test_rejected_caption_skips_encoding_but_keeps_scores(cfg, video):
    res = process_source(_item(video, caption=""), cfg)
    assert res.source_row["status"] == "ok"
    assert res.clip_rows and all(r["text_issue"] == "empty" for r in res.clip_rows)
    assert all(m == (None, None) for m in res.media)
    assert all(np.isfinite(r["motion"]) and len(f) for r, f in zip(res.clip_rows, res.clip_frames))


@pytest.mark.parametrize(
    "name,data,expect",
    [
        ("empty.mp4", b"", "empty file"),
        ("text.mp4", b"this is a caption file, not a video\n" * 20, ""),
        ("truncated.mp4", None, ""),
    ],
)
def test_poison_files_become_error_rows(cfg, video, tmp_path, name, data, expect):
    path = tmp_path / name
    path.write_bytes(video.read_bytes()[:2000] if data is None else data)
    res = process_source(_item(path), cfg)
    assert res.source_row["status"] == "error"
    assert expect in res.source_row["error"] and "\n" not in res.source_row["error"]
    assert res.clip_rows == [] and res.media == []


def test_missing_file_and_unreadable_caption_are_errors(cfg, tmp_path):
    gone = process_source(_item(tmp_path / "gone.mp4"), cfg)
    assert gone.source_row["status"] == "error" and gone.source_row["error"].startswith("unreadable")
    bad = InputItem(source="x.mp4", uri=str(tmp_path / "x.mp4"), kind="video", caption="",
                    caption_error="caption unreadable: x.txt is not UTF-8 text")
    res = process_source(bad, cfg)
    assert res.source_row["status"] == "error" and "not UTF-8" in res.source_row["error"]


def test_image_pair_and_broken_image(cfg, tmp_path):
    frame = synthetic_frames()[10]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    img = tmp_path / "pair.png"
    img.write_bytes(buf.tobytes())
    (tmp_path / "pair.txt").write_text("a colourful abstract texture")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    items = {Path(i.source).name: i for i in list_inputs(str(tmp_path))}
    res = process_source(items["pair.png"], cfg)
    assert res.source_row["status"] == "ok" and res.source_row["num_frames"] == 1
    (row,) = res.clip_rows
    assert row["kind"] == "image" and row["caption"] == "a colourful abstract texture"
    assert row["clip_id"] == clip_id_for(items["pair.png"].source, 0, 1)
    mp4, jpg = res.media[0]
    assert mp4 is None and jpg is not None
    assert np.isfinite(row["sharpness"]) and row.get("motion") is None
    broken = process_source(items["broken.jpg"], cfg)
    assert broken.source_row["status"] == "error" and "image" in broken.source_row["error"]


def test_stage1_guard_turns_a_slow_source_into_an_error_row(cfg, video):
    """The per-source wall-clock bound of the Ray stage (called directly here, no Ray needed)."""
    import dataclasses

    from pipeline.stages import ProcessSources, decode_payload, item_to_row

    fast_limit = dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, source_timeout_s=0.001))
    stage = ProcessSources(fast_limit)
    out = stage({"item": np.array([item_to_row(_item(video))["item"]], dtype=object)})
    res = decode_payload(out["payload"][0])
    assert res.source_row["status"] == "error" and "timed out" in res.source_row["error"]
    stage.cfg = cfg  # the actor goes on with the next source on a fresh worker thread
    out = stage({"item": np.array([item_to_row(_item(video))["item"]], dtype=object)})
    assert decode_payload(out["payload"][0]).source_row["status"] == "ok"


def test_stage1_actor_sizes_library_thread_counts_to_its_cpus(cfg):
    """Automatic decoder/x264 thread counts (0) become the actor's CPU share; explicit ones are kept."""
    import dataclasses

    from pipeline.stages import ProcessSources

    auto = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, decoder_threads=0),
                               encode=dataclasses.replace(cfg.encode, threads=0),
                               job=dataclasses.replace(cfg.job, process_cpus=2.0))
    stage = ProcessSources(auto)
    assert (stage.cfg.decode.decoder_threads, stage.cfg.encode.threads) == (2, 2)
    assert (auto.decode.decoder_threads, auto.encode.threads) == (0, 0)  # the caller's config is untouched
    explicit = dataclasses.replace(auto, decode=dataclasses.replace(cfg.decode, decoder_threads=3),
                                   encode=dataclasses.replace(cfg.encode, threads=4))
    stage = ProcessSources(explicit)
    assert (stage.cfg.decode.decoder_threads, stage.cfg.encode.threads) == (3, 4)


def test_cli_config_mistakes_fail_early_with_the_field_named(tmp_path, capsys):
    from pipeline.curate import main

    sample = str(REPO / "tests" / "assets" / "sample")
    assert main(["--input", sample, "--output", str(tmp_path / "o"), "scores.clip.model=ViT-H-14"]) == 2
    assert "scores.clip.checkpoint" in capsys.readouterr().err
    missing = tmp_path / "vit_h_14.safetensors"
    assert main(["--input", sample, "--output", str(tmp_path / "o"), "scores.clip.model=ViT-H-14",
                 f"scores.clip.checkpoint={missing}"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["--input", sample, "--output", str(tmp_path / "o"), "filter.min_clip_similarity=0.2"]) == 2
    assert "random weights" in capsys.readouterr().err
    assert main(["--input", sample, "--output", str(tmp_path / "o"), "encode.max_side=1024"]) == 2
    assert "decode.work_max_side" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()  # nothing written before the checks pass


def test_cli_process_exit_status_and_messages_survive_the_fast_exit(tmp_path):
    """`python -m pipeline.curate` leaves through os._exit (exit_now): the status and stderr still arrive."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline.curate", "--input", str(REPO / "tests" / "assets" / "sample"),
           "--output", str(tmp_path / "o"), "encode.max_side=1024"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "decode.work_max_side" in res.stderr


def test_over_memory_budget_gives_the_same_clips_by_seeking(cfg, video):
    """A source too big for decode.max_memory_mb keeps only the small frames and re-decodes each clip (by
    seeking, from a path or from bytes written once): same rows, same mp4 bytes as the in-memory path."""
    import dataclasses

    from curation.process import process_video

    item = InputItem(source="three_shots.mp4", uri=str(video), kind="video", caption="a panning texture",
                     caption_error=None)
    ref = process_video(item, str(video), cfg)
    tight = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, max_memory_mb=0))
    for data in (str(video), video.read_bytes()):
        got = process_video(item, data, tight)
        assert [r["clip_id"] for r in got.clip_rows] == [r["clip_id"] for r in ref.clip_rows]
        assert got.media == ref.media and len(ref.media) == 3
        for a, b in zip(got.clip_rows, ref.clip_rows):
            assert a["sharpness"] == b["sharpness"] and a["motion"] == b["motion"]


# --------------------------------------------------------------------------- robust inputs


def _png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_captions_in_utf16_are_read_and_other_encodings_are_error_rows(cfg, tmp_path):
    (tmp_path / "a.png").write_bytes(_png(synthetic_frames()[10]))
    (tmp_path / "a.txt").write_bytes(codecs.BOM_UTF16_LE + "ein bunter Stoff, Café".encode("utf-16-le"))
    (tmp_path / "b.png").write_bytes(_png(synthetic_frames()[50]))
    (tmp_path / "b.txt").write_bytes("ein bunter Stoff, Café".encode("cp1252"))
    items = {Path(i.source).name: i for i in list_inputs(str(tmp_path))}
    good = process_source(items["a.png"], cfg)
    assert good.source_row["status"] == "ok" and good.clip_rows[0]["caption"] == "ein bunter Stoff, Café"
    bad = process_source(items["b.png"], cfg).source_row
    assert bad["status"] == "error"
    assert bad["error"].startswith("caption unreadable: b.txt: not UTF-8 or UTF-16 (with BOM) text: utf-8")


def test_oversized_and_animated_images_are_error_rows_with_the_reason(cfg, tmp_path):
    from PIL import Image

    frames = [Image.fromarray(synthetic_frames()[i]) for i in (0, 60)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    (tmp_path / "big.png").write_bytes(_png(synthetic_frames()[0]))  # 160 x 96 = 15360 pixels
    small_limit = load_config(REPO / "configs" / "curate_default.yaml", ["decode.max_pixels=15359"])
    items = {Path(i.source).name: i for i in list_inputs(str(tmp_path))}
    gif = process_source(items["anim.gif"], cfg).source_row
    webp = process_source(items["anim.webp"], cfg).source_row
    big = process_source(items["big.png"], small_limit).source_row
    assert gif["status"] == webp["status"] == big["status"] == "error"
    assert gif["error"].startswith("animated GIF") and webp["error"].startswith("animated WEBP (2 frames)")
    assert big["error"] == "image of 160x96 pixels (0.0 MP), over decode.max_pixels=15359: not decoded"
    assert process_source(items["big.png"], cfg).source_row["status"] == "ok"


# --------------------------------------------------------------------------- input errors vs bugs


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test wants the exception object
        return exc
    raise AssertionError("expected an exception")


@pytest.mark.parametrize("make", [
    lambda: _raised(lambda: probe_bytes(b"not a video")),  # SourceError
    lambda: _raised(lambda: read_source("/nonexistent/input.mp4", 100)),  # reading an input: its OSError as data
    lambda: _raised(lambda: av.open(io.BytesIO(b"\x00" * 64))),  # PyAV
    lambda: _raised(lambda: cv2.resize(np.zeros((0, 0), np.uint8), (2, 2))),  # OpenCV
    lambda: _raised(lambda: __import__("PIL.Image").Image.open(io.BytesIO(b"junk"))),  # PIL: an OSError
    lambda: __import__("PIL.Image").Image.DecompressionBombError("Image size (900000000 pixels) exceeds ..."),
    lambda: MemoryError(),
    lambda: EOFError("compressed file ended before the end-of-stream marker was reached"),
], ids=["SourceError", "unreadable", "av", "cv2", "PIL", "DecompressionBombError", "MemoryError", "EOFError"])
def test_input_and_library_errors_are_data(make):
    assert is_input_error(make())


def _no_space() -> OSError:
    """A real 'No space left on device': a write to /dev/full."""
    with open("/dev/full", "wb", buffering=0) as fh:
        return _raised(lambda: fh.write(b"x"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_oserrors_are_data_only_where_an_input_is_read_and_never_about_this_machine(tmp_path):
    """A bare OSError (our scratch files, staging, shards) is no input error; reading an input turns its
    OSError into SourceError, except the ones that describe this machine (a full disk...), which propagate."""
    full = _no_space()
    assert full.errno == errno.ENOSPC and not is_input_error(full)
    assert not is_input_error(_raised(lambda: open(tmp_path / "missing" / "frames.raw", "wb")))
    with pytest.raises(OSError) as err, reading_input("unreadable"):
        open("/dev/full", "wb", buffering=0).write(b"x")
    assert err.value.errno == errno.ENOSPC and not isinstance(err.value, SourceError)
    with pytest.raises(SourceError, match="^unreadable: FileNotFoundError: "), reading_input("unreadable"):
        open(tmp_path / "gone.mp4", "rb")
    assert is_input_error(_raised(lambda: read_source(str(tmp_path), 100)))  # a folder: IsADirectoryError


def test_a_scratch_folder_that_cannot_be_written_stops_the_job_while_a_missing_input_is_a_row(cfg, video, tmp_path):
    """decode.scratch_dir is a file here (the decoder's scratch cannot be created): that is this machine
    failing, so process_source raises instead of recording the source as bad input (a resume would skip
    it); the same config still records a missing input as a status=error row."""
    blocked = tmp_path / "scratch"
    blocked.write_text("not a folder")
    broken = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, scratch_dir=str(blocked)))
    with pytest.raises(NotADirectoryError):
        process_source(_item(video), broken)
    gone = process_source(_item(tmp_path / "gone.mp4"), broken).source_row
    assert gone["status"] == "error" and gone["error"].startswith("unreadable: FileNotFoundError")
    assert process_source(_item(video), cfg).source_row["status"] == "ok"


@pytest.mark.parametrize("fn", [
    lambda: 1 + "1", lambda: None.width, lambda: undefined_name, lambda: {}["fps"],  # noqa: F821
    lambda: [][0], lambda: int("x"), lambda: np.zeros(3).reshape(2, 2),
])
def test_programming_errors_are_not_data(fn):
    from curation.errors import DecoderBugError

    assert not is_input_error(_raised(fn))
    assert not is_input_error(AssertionError()) and not is_input_error(DecoderBugError("x"))


def _config_bug(cfg):
    """A config given a value of the wrong type after its validation (a bug in our code)."""
    import copy

    bad = copy.deepcopy(cfg)
    bad.decode.max_pixels = "64 MP"
    return bad


def test_bugs_in_process_source_propagate_instead_of_becoming_rows(cfg, video, tmp_path):
    """The same source is an ok row with a sound config; with a bug the exception escapes: a TypeError in
    this process for an image, DecoderBugError (the decoder process's TypeError) for a video."""
    from curation.errors import DecoderBugError

    img = tmp_path / "x.png"
    img.write_bytes(_png(synthetic_frames()[0]))
    assert process_source(_item(img, kind="image"), cfg).source_row["status"] == "ok"
    with pytest.raises(TypeError):
        process_source(_item(img, kind="image"), _config_bug(cfg))
    with pytest.raises(DecoderBugError, match="TypeError"):
        process_source(_item(video), _config_bug(cfg))
    assert process_source(_item(video), cfg).source_row["status"] == "ok"  # the decoder process goes on
