"""Curation speed, side by side in one run: bare decode vs the `scenedetect` CLI vs this pipeline.

    python -m bench.curation [--input DIR] [--workers 2] [--keep]

(a) bare decode: every frame of every input decoded once with decord (the project's named decoder) to
    RGB at native size, nothing else (the floor any curation job pays), `--workers` files at a time.
    Also shown, not used for the ratios' names: (a2) PyAV decoding the same files without any conversion
    (the codec's own cost: lower than decord's RGB output), with `fraction_of_pyav_decode` beside it.
(b) PySceneDetect CLI, the usual glue script: `scenedetect -i FILE detect-adaptive split-video` per
    file (re-encodes every shot with ffmpeg), `--workers` files at a time. Uses `ffmpeg` from PATH, else
    the static build of the `imageio-ffmpeg` package (the `bench` extra).
(c) this pipeline end to end: `python -m pipeline.curate` (probe, one decode, shot detection, all
    scores, filter, H.264 encode, WebDataset shards + manifests) submitted to a Ray cluster that is
    already running with `--workers` CPUs, as `ray job submit` would. The cluster's start-up and a first
    one-video job (which leaves Ray Data's detached service actors running, as on any cluster that has run
    a job before) are one-off costs, reported on their own lines, not inside (c); (c) starts once that
    first job's actors have exited. (c) does include this job's own start-up: its actors, their model
    loads, the decoder processes.

Prints a table, then, last, one JSON line with `speedup_vs_scenedetect` = (b)/(c) and
`fraction_of_decode` = (a)/(c) (1.0 would mean curation costs no more than decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline.local_cluster import ray_env, start_head

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "videos"
VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".mov", ".avi"}


def list_videos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS)


def build_inputs(src: Path, repeat: int, dst: Path) -> Path:
    """The bench's input folder: each video linked `repeat` times, with a caption beside it.

    Captions are the first sentence of the video's `content` in ground_truth.json when there is one (real
    text, so caption rules keep real clips and the encode cost is measured), else a neutral sentence.
    """
    truth_path = src / "ground_truth.json"
    truth = json.loads(truth_path.read_text()) if truth_path.is_file() else {}
    dst.mkdir(parents=True)
    for video in list_videos(src):
        rel = video.relative_to(src).as_posix()
        content = truth.get(rel, {}).get("content") if isinstance(truth.get(rel), dict) else None
        caption = content.split(". ")[0].strip() if content else f"A video clip from {video.stem}."
        for k in range(repeat):
            name = f"r{k}_{rel.replace('/', '_')}"
            (dst / name).symlink_to(video.resolve())
            (dst / name).with_suffix(".txt").write_text(caption + "\n")
    return dst


def _decode_all(path: str) -> int:
    import decord

    reader = decord.VideoReader(path)
    count = 0
    while True:
        try:
            reader.next()
        except StopIteration:
            return count
        count += 1


def _decode_pyav(path: str) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def run_bare_decode(videos: list[Path], workers: int, fn=_decode_all) -> tuple[float, int]:
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        frames = sum(pool.map(fn, [str(v) for v in videos]))
    return time.perf_counter() - start, frames


def _scenedetect_one(args: tuple[str, str]) -> int:
    video, out_dir = args
    cmd = [str(Path(sys.executable).parent / "scenedetect"), "-q", "-i", video, "-o", out_dir,
           "detect-adaptive", "split-video", "-q"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode


def ensure_ffmpeg(shim_dir: Path) -> str:
    """Path of the ffmpeg that `scenedetect split-video` will run: the one on PATH, else the static build
    that the `imageio-ffmpeg` package ships (the `bench` extra, installed by `make setup`), put on PATH
    under the name `ffmpeg` through a symlink in `shim_dir`."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        raise SystemExit("(b) needs ffmpeg for `scenedetect split-video`: install the bench extra "
                         "(pip install -e '.[bench]', done by `make setup`) or ffmpeg itself (apt-get install ffmpeg)")
    shim_dir.mkdir(parents=True, exist_ok=True)
    link = shim_dir / "ffmpeg"
    if not link.exists():
        link.symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return str(link.resolve())


def run_scenedetect_cli(videos: list[Path], workers: int, out_dir: Path) -> tuple[float, int]:
    jobs = [(str(v), str(out_dir / v.stem)) for v in videos]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        failures = sum(rc != 0 for rc in pool.map(_scenedetect_one, jobs))
    return time.perf_counter() - start, failures


def run_pipeline(input_dir: Path, out_dir: Path, address: str) -> tuple[float, dict]:
    env = ray_env(RAY_ADDRESS=address, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.curate", "--input", str(input_dir),
                           "--output", str(out_dir)], env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"(c) pipeline failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, json.loads((out_dir / "stats.json").read_text())


def wait_job_workers_gone(head, timeout: float = 30.0) -> float:
    """Seconds spent waiting until no Ray Data actor process (`ray::MapWorker(...)`) is left under the head,
    at most `timeout` (the first job's actors shut down for a few seconds after its driver exits; their
    teardown is that job's cost, not (c)'s)."""
    import psutil

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            procs = psutil.Process(head.proc.pid).children(recursive=True)
            if not any("MapWorker" in " ".join(p.cmdline()) for p in procs):
                break
        except psutil.Error:
            pass  # a process vanished while listing: look again
        time.sleep(0.2)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="folder of videos (default: ../shared/data/videos)")
    parser.add_argument("--workers", type=int, default=2, help="parallel files / Ray CPUs for all three (default 2)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="each input video appears this many times (a bigger job, so one-off start-up "
                             "costs weigh as they do on a real dataset; default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder with all outputs")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    inputs = build_inputs(args.input, args.repeat, tmp / "inputs")
    videos = list_videos(inputs)
    if not videos:
        raise SystemExit(f"no videos under {args.input}")
    try:
        ffmpeg = ensure_ffmpeg(tmp / "bin")  # before any timing: fail early when (b) cannot run
        t_decode, frames = run_bare_decode(videos, args.workers)
        t_pyav, _ = run_bare_decode(videos, args.workers, _decode_pyav)
        t_scd, scd_failures = run_scenedetect_cli(videos, args.workers, tmp / "scenedetect")
        t0 = time.perf_counter()
        head = start_head(num_cpus=args.workers)
        t_ray = time.perf_counter() - t0
        try:
            warm_in = tmp / "warmup"
            warm_in.mkdir()
            shortest = min(videos, key=lambda v: v.resolve().stat().st_size)
            (warm_in / shortest.name).symlink_to(shortest.resolve())
            t_warm, _ = run_pipeline(warm_in, tmp / "warmup-out", head.address)
            t_teardown = wait_job_workers_gone(head)
            t_pipe, stats = run_pipeline(inputs, tmp / "curated", head.address)
        finally:
            head.stop()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("(a) bare decode (decord, RGB, native size)", t_decode),
        ("(a2) info: PyAV decode, no conversion", t_pyav),
        ("(b) scenedetect detect-adaptive + split-video", t_scd),
        ("(c) pipeline.curate end to end", t_pipe),
    ]
    print(f"{len(videos)} videos ({args.repeat}x each of {args.input}), {frames} decoded frames, "
          f"{args.workers} workers")
    print(f"{'run':48s} {'seconds':>9s} {'frames/s':>9s}")
    for name, seconds in rows:
        print(f"{name:48s} {seconds:9.2f} {frames / seconds:9.1f}")
    print(f"(one-off, not in (c): ray head start-up {t_ray:.2f} s, first one-video job {t_warm:.2f} s "
          f"+ {t_teardown:.2f} s until its actors exited; "
          f"scenedetect failures: {scd_failures}; ffmpeg: {ffmpeg})")
    result = {
        "videos": len(videos), "frames": frames, "workers": args.workers,
        "bare_decode_s": round(t_decode, 3), "scenedetect_s": round(t_scd, 3), "pipeline_s": round(t_pipe, 3),
        "pyav_decode_s": round(t_pyav, 3), "ray_start_s": round(t_ray, 3), "warmup_job_s": round(t_warm, 3),
        "warmup_teardown_s": round(t_teardown, 3),
        "clips_kept": stats["clips"]["kept"], "clips_candidates": stats["clips"]["candidates"],
        "speedup_vs_scenedetect": round(t_scd / t_pipe, 3),
        "fraction_of_decode": round(t_decode / t_pipe, 3),
        "fraction_of_pyav_decode": round(t_pyav / t_pipe, 3), "ffmpeg": ffmpeg,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
