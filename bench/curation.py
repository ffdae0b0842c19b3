"""Curation speed, side by side in one run: bare decode vs the `scenedetect` CLI vs this pipeline.

    python -m bench.curation [--input DIR] [--workers 2] [--keep]

(a) bare decode: every frame of every input decoded once with decord at native size, nothing else
    (the floor any curation job pays), `--workers` files at a time.
(b) PySceneDetect CLI, the usual glue script: `scenedetect -i FILE detect-adaptive split-video` per
    file (re-encodes every shot with ffmpeg), `--workers` files at a time. Needs `ffmpeg` on PATH.
(c) this pipeline end to end: `python -m pipeline.curate` (probe, one decode, shot detection, all
    scores, filter, H.264 encode, WebDataset shards + manifests) submitted to a Ray cluster that is
    already running with `--workers` CPUs, as `ray job submit` would: the cluster's start-up is a one-off
    cost and is reported on its own line, not inside (c).

Prints a table, then, last, one JSON line with `speedup_vs_scenedetect` = (b)/(c) and
`fraction_of_decode` = (a)/(c) (1.0 would mean curation costs no more than decoding).
"""

from __future__ import annotations

import argparse
import json
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


def run_bare_decode(videos: list[Path], workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        frames = sum(pool.map(_decode_all, [str(v) for v in videos]))
    return time.perf_counter() - start, frames


def _scenedetect_one(args: tuple[str, str]) -> int:
    video, out_dir = args
    cmd = [str(Path(sys.executable).parent / "scenedetect"), "-q", "-i", video, "-o", out_dir,
           "detect-adaptive", "split-video", "-q"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode


def run_scenedetect_cli(videos: list[Path], workers: int, out_dir: Path) -> tuple[float, int]:
    if shutil.which("ffmpeg") is None:
        raise SystemExit("(b) needs ffmpeg on PATH for `scenedetect split-video` (apt-get install ffmpeg)")
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
        t_decode, frames = run_bare_decode(videos, args.workers)
        t_scd, scd_failures = run_scenedetect_cli(videos, args.workers, tmp / "scenedetect")
        t0 = time.perf_counter()
        head = start_head(num_cpus=args.workers)
        t_ray = time.perf_counter() - t0
        try:
            t_pipe, stats = run_pipeline(inputs, tmp / "curated", head.address)
        finally:
            head.stop()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("(a) bare decode (decord, native size)", t_decode),
        ("(b) scenedetect detect-adaptive + split-video", t_scd),
        ("(c) pipeline.curate end to end", t_pipe),
    ]
    print(f"{len(videos)} videos ({args.repeat}x each of {args.input}), {frames} decoded frames, "
          f"{args.workers} workers")
    print(f"{'run':48s} {'seconds':>9s} {'frames/s':>9s}")
    for name, seconds in rows:
        print(f"{name:48s} {seconds:9.2f} {frames / seconds:9.1f}")
    print(f"(ray head start-up, one-off, not in (c): {t_ray:.2f} s; scenedetect failures: {scd_failures})")
    result = {
        "videos": len(videos), "frames": frames, "workers": args.workers,
        "bare_decode_s": round(t_decode, 3), "scenedetect_s": round(t_scd, 3), "pipeline_s": round(t_pipe, 3),
        "ray_start_s": round(t_ray, 3), "clips_kept": stats["clips"]["kept"], "clips_candidates": stats["clips"]["candidates"],
        "speedup_vs_scenedetect": round(t_scd / t_pipe, 3),
        "fraction_of_decode": round(t_decode / t_pipe, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
