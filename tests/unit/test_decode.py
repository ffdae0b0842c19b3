"""probe() and decode_video()/decode_range() on synthetic videos and poison files (no Ray)."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest

from common import configtree
from common.configtree import ConfigError
from curation.decode import DecoderProcess, decode_range, decode_video
from curation.decode_types import DecodeConfig, DecodeRequest, small_size, work_size
from curation.errors import DecoderBugError, SourceError
from curation.probe import probe
from tests import synth
from tests.decoder_faults import fault_command, running_decoders

FPS = 24.0


@pytest.fixture(scope="module")
def shots_video(tmp_path_factory):
    path, cuts = synth.write_shots_video(tmp_path_factory.mktemp("dec") / "shots.mp4", (30, 24, 36), fps=FPS)
    return path, cuts, 90


def test_probe_reads_header(shots_video):
    path, _, n = shots_video
    info = probe(path)
    assert (info.codec, info.width, info.height) == ("h264", 160, 96)
    assert info.fps == pytest.approx(FPS)
    assert info.header_frames == n and not info.has_audio
    assert info.size_bytes == os.path.getsize(path)


def test_decode_video_single_pass_two_sizes(shots_video):
    path, cuts, n = shots_video
    v = decode_video(path, DecodeConfig())
    assert v.num_frames == n and v.backend == "pyav" and v.bad_frames == 0
    assert v.small.shape == (n, 76, 128, 3) and v.small.dtype == np.uint8
    assert (len(v.frames), v.frames.height, v.frames.width) == (n, 96, 160)  # never upscaled to 512
    assert v.frames.i420.shape == (n, 144, 160) and v.frames.rgb([0, 5]).shape == (2, 96, 160, 3)
    np.testing.assert_allclose(v.timestamps, np.arange(n) / FPS, atol=1e-3)
    # the content really changes at the known cuts and not between neighbours inside a shot
    diff = np.abs(np.diff(v.small.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert set(np.argsort(diff)[-2:] + 1) == set(cuts)


def test_sizes_are_even_and_never_upscale():
    cfg = DecodeConfig(detect_width=128, work_max_side=640)  # explicit: the default follows encode.max_side
    assert work_size(1920, 1080, cfg) == (640, 360)
    assert work_size(161, 97, cfg) == (160, 96)
    assert small_size(1280, 720, cfg) == (128, 72)
    assert all(x % 2 == 0 for x in small_size(641, 361, cfg) + work_size(1001, 777, cfg))


def test_bytes_input_and_inprocess_match_path(shots_video):
    path, _, n = shots_video
    ref = decode_video(path, DecodeConfig())
    from_bytes = decode_video(path.read_bytes(), DecodeConfig())
    inproc = decode_video(path, DecodeConfig(isolation="none"))
    for v in (from_bytes, inproc):
        assert v.num_frames == n
        np.testing.assert_array_equal(v.small, ref.small)
        np.testing.assert_array_equal(v.frames.i420, ref.frames.i420)


def test_memory_budget_and_decode_range(shots_video):
    path, _, n = shots_video
    full = decode_video(path, DecodeConfig())
    tight = decode_video(path, DecodeConfig(max_memory_mb=1))  # 90 I420 frames of 160x96 are ~2 MB
    assert tight.frames is None and tight.num_frames == n
    np.testing.assert_array_equal(tight.small, full.small)
    part = decode_range(path, 25, 40, DecodeConfig())
    np.testing.assert_array_equal(part.i420, full.frames[25:40].i420)
    # with the first decode's timestamps the decoder seeks instead of decoding from frame 0: same frames
    for s, e in ((0, 7), (25, 40), (31, 32), (70, 90)):
        part = decode_range(path, s, e, DecodeConfig(), timestamps=full.timestamps)
        np.testing.assert_array_equal(part.i420, full.frames[s:e].i420)
    assert decode_video(path, DecodeConfig(keep_frames=False)).frames is None


def test_seeking_decode_range_on_a_real_clip(shared_videos):
    path = shared_videos / "pyscenedetect" / "testvideo.mp4"  # 720 frames, 29.97 fps, keyframes every ~250
    cfg = DecodeConfig(work_max_side=128)
    full = decode_video(path, cfg)
    for s, e in ((0, 30), (300, 360), (650, 720)):
        part = decode_range(path, s, e, cfg, timestamps=full.timestamps)
        np.testing.assert_array_equal(part.i420, full.frames[s:e].i420)


@pytest.mark.parametrize("work_max_side", [512, 80])  # native size, and a 2x downscale
def test_pyav_backend_agrees_with_decord(shots_video, work_max_side):
    path, _, n = shots_video
    a = decode_video(path, DecodeConfig(backend="decord", work_max_side=work_max_side))
    b = decode_video(path, DecodeConfig(backend="pyav", work_max_side=work_max_side))
    assert (a.backend, b.backend) == ("decord", "pyav") and a.num_frames == b.num_frames == n
    np.testing.assert_allclose(b.timestamps, a.timestamps, atol=1e-3)
    # the same pictures in RGB (decord converts with swscale, PyAV frames with OpenCV: both BT.601)
    diff = np.abs(b.frames.rgb().astype(np.int16) - a.frames.rgb()).mean()
    assert diff < (2.0 if work_max_side == 512 else 4.0), diff
    assert np.abs(b.small.astype(np.int16) - a.small).mean() < 4.0


def test_no_scratch_files_left(shots_video, tmp_path):
    path, _, _ = shots_video
    v = decode_video(path, DecodeConfig(scratch_dir=str(tmp_path)))
    assert v.num_frames == 90 and os.listdir(tmp_path) == []
    with pytest.raises(SourceError):
        decode_video(synth.write_text_as_mp4(tmp_path / "x.mp4"), DecodeConfig(scratch_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == ["x.mp4"]


@pytest.mark.parametrize(
    "make, reason",
    [
        (synth.write_zero_byte, "empty file"),
        (synth.write_text_as_mp4, "not a readable video container"),
        (synth.write_truncated_mp4, "not a readable video container"),
        (synth.write_unsupported_codec_mp4, "unsupported video codec"),
        (synth.write_audio_only, "no video stream"),
    ],
)
def test_poison_files_raise_source_error(tmp_path, make, reason):
    path = make(tmp_path / "poison.mp4")
    with pytest.raises(SourceError, match=reason):
        probe(path)
    with pytest.raises(SourceError, match=reason) as err:
        decode_video(path, DecodeConfig())
    assert "\n" not in str(err.value)


def test_lying_header_decodes_what_is_there(tmp_path):
    path, claimed = synth.write_lying_header_mp4(tmp_path / "lying.mp4")
    assert probe(path).header_frames == claimed
    v = decode_video(path, DecodeConfig())
    assert 0 < v.num_frames < claimed  # counted by decoding, not from the header
    assert v.backend == "pyav"  # PyAV keeps what decodes (decord gives up mid-file on these)
    assert len(v.timestamps) == v.num_frames and np.all(np.diff(v.timestamps) > 0)


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="no AV1 encoder in this PyAV build")
def test_codec_decord_lacks_falls_back_to_pyav(tmp_path):
    path = synth.write_video(tmp_path / "av1.mp4", synth.moving_shot(12, 96, 160, seed=1), codec="libsvtav1")
    v = decode_video(path, DecodeConfig())
    assert v.num_frames == 12 and v.backend == "pyav"


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_decord_failing_on_an_input_is_a_source_error(tmp_path, isolation):
    """What decord raises on a bad input, while reading (a file cut short mid-way) or while opening (a codec
    its FFmpeg build lacks), is this source's error, in either isolation."""
    lying, _ = synth.write_lying_header_mp4(tmp_path / "lying.mp4")
    with pytest.raises(SourceError, match=r"^decord failed: .*av_read_frame failed"):
        decode_video(lying, DecodeConfig(backend="decord", isolation=isolation))
    if "libsvtav1" in av.codecs_available:
        av1 = synth.write_video(tmp_path / "av1.mp4", synth.moving_shot(12, 96, 160, seed=1), codec="libsvtav1")
        with pytest.raises(SourceError, match=r"^decord failed: .*cannot find video stream"):
            decode_video(av1, DecodeConfig(backend="decord", isolation=isolation))


def test_max_frames_is_an_error_not_a_silent_cut(shots_video):
    path, _, _ = shots_video
    with pytest.raises(SourceError, match="max_frames=50"):
        decode_video(path, DecodeConfig(max_frames=50))


# The isolation itself is DecoderProcess.run (what decode_video calls with the calling thread's decoder):
# these tests give it decoder processes that fail on purpose (tests/decoder_faults.py).


def _request(path, folder, **cfg) -> DecodeRequest:
    return DecodeRequest(src=str(path), cfg=DecodeConfig(**cfg), folder=str(folder))


def test_hanging_decoder_is_killed(shots_video, tmp_path):
    path, _, _ = shots_video
    # a decoder process that blocks inside C (libc pause()) on its request; only killing it can end it
    hanging = DecoderProcess(fault_command("hang"))
    with pytest.raises(SourceError, match="decode timed out after 1 s"):
        hanging.run(_request(path, tmp_path), timeout_s=1.0)
    assert hanging.proc is None  # killed and reaped
    assert decode_video(path, DecodeConfig()).num_frames == 90  # the caller is fine afterwards


def test_crashing_decoder_is_an_error_not_a_crash(shots_video, tmp_path):
    path, _, _ = shots_video
    crashing = DecoderProcess(fault_command("crash"))  # segfaults in C on its request
    with pytest.raises(SourceError, match="decoder crashed \\(SIGSEGV\\)"):
        crashing.run(_request(path, tmp_path), timeout_s=60)
    assert crashing.proc is None
    assert decode_video(path, DecodeConfig()).num_frames == 90


def test_decoder_failing_in_our_code_is_a_bug_not_a_source_error(shots_video, tmp_path):
    """A decoder process that exits without a signal, or whose decode raises an exception of our code (here
    a caller passing a string as a frame index to the real worker), fails loudly: DecoderBugError, which is
    not an input error, so process_source re-raises it and the job fails."""
    path, _, n = shots_video
    with pytest.raises(DecoderBugError, match="exited with code 3"):
        DecoderProcess(fault_command("exit")).run(_request(path, tmp_path), timeout_s=60)
    real = DecoderProcess()  # the production worker (curation/decode_worker.py)
    bad = DecodeRequest(src=str(path), cfg=DecodeConfig(), folder=str(tmp_path), start="0")
    with pytest.raises(DecoderBugError, match="TypeError"):
        real.run(bad, timeout_s=60)
    pid = real.proc.pid
    assert real.run(_request(path, tmp_path), timeout_s=60).count == n  # the same worker goes on
    assert real.proc.pid == pid
    real.kill()


def test_one_decoder_process_serves_many_sources(shots_video):
    path, _, n = shots_video
    decode_video(path, DecodeConfig())
    before = running_decoders()
    assert before  # this thread's decoder process
    for _ in range(3):
        assert decode_video(path, DecodeConfig()).num_frames == n
    assert running_decoders() == before  # none started, none gone


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_video_frames_over_max_pixels_are_rejected_before_decoding(shots_video, isolation):
    path, _, _ = shots_video  # 160 x 96 = 15360 pixels per frame
    with pytest.raises(SourceError, match="video frames of 160x96 pixels .* over decode.max_pixels=15359"):
        decode_video(path, DecodeConfig(max_pixels=15359, isolation=isolation))
    assert decode_video(path, DecodeConfig(max_pixels=15360, isolation=isolation)).num_frames == 90


@pytest.mark.parametrize("field, value", [("detect_width", 127), ("work_max_side", 0), ("isolation", "thread"),
                                          ("backend", "opencv"), ("timeout_s", 0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"^decode.{field}"):  # loaded: a ConfigError naming the dotted key
        configtree.from_dict(DecodeConfig, {field: value}, "decode")


def test_decode_after_caller_used_opencv_threads(shots_video):
    """Regression: a caller whose OpenCV thread pool is running (scenedetect does that) must not deadlock
    the decoder (it was a forked child once; now a separate process)."""
    import cv2

    cv2.resize(np.zeros((1080, 1920, 3), np.uint8), (960, 540), interpolation=cv2.INTER_AREA)
    path, _, n = shots_video
    assert decode_video(path, DecodeConfig(timeout_s=60)).num_frames == n


def test_scratch_of_dead_processes_is_swept(shots_video, tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    stale = tmp_path / f"curation-decode-{dead.pid}-abc"
    stale.mkdir()
    (stale / "work.raw").write_bytes(b"x" * 1000)
    live = tmp_path / f"curation-decode-{os.getpid()}-xyz"
    live.mkdir()
    decode_video(shots_video[0], DecodeConfig(scratch_dir=str(tmp_path)))
    assert not stale.exists() and live.exists()


def test_curation_modules_have_no_import_cycle_and_import_no_private_names():
    """House rule, checked on the source: curation's modules (decode, decode_backends and decode_worker
    were a cycle once) import each other's public names only, with no cycle, lazy imports included."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "curation"
    graph: dict[str, set[str]] = {}
    private = []
    for path in sorted(root.glob("*.py")):
        name = f"curation.{path.stem}"
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("curation."):
                graph[name].add(node.module)
                private += [(name, node.module, a.name) for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("curation."))
    assert private == []
    assert graph["curation.decode"] >= {"curation.decode_types", "curation.decode_backends"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == goal or (dep not in seen and (seen.add(dep) or reaches(dep, goal, seen))):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []
