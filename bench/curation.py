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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "videos"
VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".mov", ".avi"}


def list_videos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS)


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


def start_ray_head(workers: int, tmp: Path) -> tuple[str, float]:
    """Start a loopback Ray head with `workers` CPUs; returns (address, seconds it took)."""
    port = _free_port()
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", str(workers), "--include-dashboard", "false",
         "--disable-usage-stats", "--temp-dir", str(tmp / "ray")],
        check=True, capture_output=True, env=_ray_env(),
    )
    return f"127.0.0.1:{port}", time.perf_counter() - start


def stop_ray_head(tmp: Path) -> None:
    """Stop only the Ray processes of this bench's temp dir (never `ray stop`, which stops every Ray)."""
    marker = str(tmp / "ray")
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    for pid in out:
        if int(pid) != os.getpid():
            subprocess.run(["kill", "-9", pid], check=False)


def run_pipeline(input_dir: Path, out_dir: Path, address: str) -> tuple[float, dict]:
    env = _ray_env() | {"RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.curate", "--input", str(input_dir),
                           "--output", str(out_dir)], env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"(c) pipeline failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, json.loads((out_dir / "stats.json").read_text())


def _ray_env() -> dict[str, str]:
    return dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
                RAY_USAGE_STATS_ENABLED="0")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="folder of videos (default: ../shared/data/videos)")
    parser.add_argument("--workers", type=int, default=2, help="parallel files / Ray CPUs for all three (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder with all outputs")
    args = parser.parse_args(argv)

    videos = list_videos(args.input)
    if not videos:
        raise SystemExit(f"no videos under {args.input}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    try:
        t_decode, frames = run_bare_decode(videos, args.workers)
        t_scd, scd_failures = run_scenedetect_cli(videos, args.workers, tmp / "scenedetect")
        address, t_ray = start_ray_head(args.workers, tmp)
        try:
            t_pipe, stats = run_pipeline(args.input, tmp / "curated", address)
        finally:
            stop_ray_head(tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("(a) bare decode (decord, native size)", t_decode),
        ("(b) scenedetect detect-adaptive + split-video", t_scd),
        ("(c) pipeline.curate end to end", t_pipe),
    ]
    print(f"{len(videos)} videos, {frames} decoded frames, {args.workers} workers")
    print(f"{'run':48s} {'seconds':>9s} {'frames/s':>9s}")
    for name, seconds in rows:
        print(f"{name:48s} {seconds:9.2f} {frames / seconds:9.1f}")
    print(f"(ray head start-up, one-off, not in (c): {t_ray:.2f} s; scenedetect failures: {scd_failures})")
    result = {
        "videos": len(videos), "frames": frames, "workers": args.workers,
        "bare_decode_s": round(t_decode, 3), "scenedetect_s": round(t_scd, 3), "pipeline_s": round(t_pipe, 3),
        "ray_start_s": round(t_ray, 3), "clips_kept": stats.get("clips", {}).get("kept") if isinstance(stats.get("clips"), dict) else None,
        "speedup_vs_scenedetect": round(t_scd / t_pipe, 3),
        "fraction_of_decode": round(t_decode / t_pipe, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
