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

`--cpu` also counts CPU-seconds (user + system): of (a)'s worker processes (from their exit), and of (c) by
process role: the driver (exact, from its exit status) and, polled with psutil every 0.1 s, the stage-1
actors, their decoder processes, open_clip actors, Ray Data's service actors and Ray itself (processes
started before (c) count from their CPU at its start). What the actors spend after the driver has exited
(their teardown, not part of (c)'s time) is counted apart. A loaded machine stretches (c)'s time but hardly
its CPU-seconds: on a shared machine compare those (`fraction_of_decode_cpu` = CPU of (a) / CPU of (c)).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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


def children_cpu() -> float:
    """CPU-seconds (user + system) of this process's children that have exited and been waited for."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_bare_decode(videos: list[Path], workers: int, fn=_decode_all) -> tuple[float, int, float]:
    """(seconds, frames, CPU-seconds of the worker processes)."""
    cpu0 = children_cpu()
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        frames = sum(pool.map(fn, [str(v) for v in videos]))
    elapsed = time.perf_counter() - start
    return elapsed, frames, children_cpu() - cpu0  # the pool's workers are joined (waited for) on exit


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


# (role, text in the command line), first match wins; anything else under the head is Ray's own
ROLE_MARKERS = (
    ("driver", "pipeline.curate"),
    ("decoders", "curation.decode_worker"),
    ("stage-1 actors", "ProcessSources"),
    ("open_clip actors", "ScoreClips"),
    ("Ray Data service actors", "ray::_StatsActor"),
    ("Ray Data service actors", "ray::ActorLocationTracker"),
    ("Ray Data service actors", "ray::_AutoscalingCoordinatorActor"),
)


def process_role(cmdline: str) -> str:
    """The bench's name for a process of (c), from its command line."""
    for role, marker in ROLE_MARKERS:
        if marker in cmdline:
            return role
    return "Ray (services, idle workers)"


class CpuMeter:
    """CPU-seconds (user + system) of every process under `roots`, by role, polled on a thread.

    A process that existed at start() counts from its CPU then. A process that ends between two polls
    loses what it spent since the last one (at most `interval` seconds' worth per core). `mark()` splits the count:
    `before` is up to the mark, `after` from it to stop().
    """

    def __init__(self, roots: list[int], interval: float = 0.1):
        import psutil

        self._psutil = psutil
        self.roots, self.interval = list(roots), interval
        self._base: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], tuple[str, float]] = {}
        self._at_mark: dict[tuple[int, float], float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def _processes(self):
        procs = []
        for pid in self.roots:
            try:
                root = self._psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except self._psutil.Error:
                continue  # a root that has exited
        return procs

    def _poll(self) -> None:
        for p in self._processes():
            try:
                key = (p.pid, p.create_time())
                times = p.cpu_times()
                # read every time: a forked child shows its parent's command line until it execs, and an
                # idle Ray worker takes an actor's name when it becomes one (the last name seen counts; a
                # process on its way out shows an empty one and keeps its role)
                cmdline = " ".join(p.cmdline())
            except self._psutil.Error:
                continue  # vanished while being read
            role = process_role(cmdline) if cmdline else self._last.get(key, ("Ray (services, idle workers)",))[0]
            self._last[key] = (role, times.user + times.system)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def start(self) -> "CpuMeter":
        self._poll()
        self._base = {key: cpu for key, (_, cpu) in self._last.items()}
        self._thread.start()
        return self

    def add_root(self, pid: int) -> None:
        self.roots.append(pid)

    def mark(self) -> None:
        self._poll()
        self._at_mark = {key: cpu for key, (_, cpu) in self._last.items()}

    def stop(self) -> tuple[dict[str, float], dict[str, float]]:
        """({role: CPU-s up to the mark}, {role: CPU-s after it}); without a mark everything is `before`."""
        self._stop.set()
        self._thread.join()
        self._poll()
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        for key, (role, cpu) in self._last.items():
            start = self._base.get(key, 0.0)
            # no mark: all of it is `before`; born after the mark: all of it is `after`
            mark = cpu if self._at_mark is None else self._at_mark.get(key, 0.0)
            before[role] = before.get(role, 0.0) + max(0.0, mark - start)
            after[role] = after.get(role, 0.0) + max(0.0, cpu - max(mark, start))
        return before, after


def run_pipeline(input_dir: Path, out_dir: Path, address: str, meter: CpuMeter | None = None,
                 overrides: list[str] | None = None) -> tuple[float, dict, float]:
    """(c): seconds, stats.json, and the driver's own CPU-seconds (user + system, from its exit status).
    `overrides`: config settings (key=value) for pipeline.curate."""
    env = ray_env(RAY_ADDRESS=address, PYTHONPATH=str(REPO))
    log = out_dir.with_name(out_dir.name + ".log")
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.curate", "--input", str(input_dir),
                                 "--output", str(out_dir), *(overrides or [])], env=env, cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT)
        if meter is not None:
            meter.add_root(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the exit status and the driver's CPU time
        proc.returncode = os.waitstatus_to_exitcode(status)
        if meter is not None:
            meter.mark()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"(c) pipeline failed (rc={proc.returncode}):\n{log.read_text()[-6000:]}")
    return elapsed, json.loads((out_dir / "stats.json").read_text()), usage.ru_utime + usage.ru_stime


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
    parser.add_argument("--cpu", action="store_true",
                        help="also count the CPU-seconds of (a) and of (c) by process role (psutil polling)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for (c) and its warm-up job, e.g. --set job.sources_per_actor=2 "
                             "(repeatable; default: the job's defaults)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    inputs = build_inputs(args.input, args.repeat, tmp / "inputs")
    videos = list_videos(inputs)
    if not videos:
        raise SystemExit(f"no videos under {args.input}")
    try:
        ffmpeg = ensure_ffmpeg(tmp / "bin")  # before any timing: fail early when (b) cannot run
        t_decode, frames, cpu_decode = run_bare_decode(videos, args.workers)
        t_pyav, _, _ = run_bare_decode(videos, args.workers, _decode_pyav)
        t_scd, scd_failures = run_scenedetect_cli(videos, args.workers, tmp / "scenedetect")
        t0 = time.perf_counter()
        head = start_head(num_cpus=args.workers)
        t_ray = time.perf_counter() - t0
        try:
            warm_in = tmp / "warmup"
            warm_in.mkdir()
            shortest = min(videos, key=lambda v: v.resolve().stat().st_size)
            (warm_in / shortest.name).symlink_to(shortest.resolve())
            t_warm, _, _ = run_pipeline(warm_in, tmp / "warmup-out", head.address, overrides=args.set)
            t_teardown = wait_job_workers_gone(head)
            meter = CpuMeter([head.proc.pid]).start() if args.cpu else None
            t_pipe, stats, cpu_driver = run_pipeline(inputs, tmp / "curated", head.address, meter, args.set)
            if meter is not None:
                wait_job_workers_gone(head)  # the actors' teardown, counted apart
                cpu_job, cpu_after = meter.stop()
                cpu_job["driver"] = cpu_driver  # exact (wait4), where polling misses its last moments
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
          f"{args.workers} workers" + (f"; (c) with {' '.join(args.set)}" if args.set else ""))
    print(f"{'run':48s} {'seconds':>9s} {'frames/s':>9s}")
    for name, seconds in rows:
        print(f"{name:48s} {seconds:9.2f} {frames / seconds:9.1f}")
    print(f"(one-off, not in (c): ray head start-up {t_ray:.2f} s, first one-video job {t_warm:.2f} s "
          f"+ {t_teardown:.2f} s until its actors exited; "
          f"scenedetect failures: {scd_failures}; ffmpeg: {ffmpeg})")
    result = {
        "videos": len(videos), "frames": frames, "workers": args.workers, "settings": args.set,
        "bare_decode_s": round(t_decode, 3), "scenedetect_s": round(t_scd, 3), "pipeline_s": round(t_pipe, 3),
        "pyav_decode_s": round(t_pyav, 3), "ray_start_s": round(t_ray, 3), "warmup_job_s": round(t_warm, 3),
        "warmup_teardown_s": round(t_teardown, 3),
        "clips_kept": stats["clips"]["kept"], "clips_candidates": stats["clips"]["candidates"],
        "speedup_vs_scenedetect": round(t_scd / t_pipe, 3),
        "fraction_of_decode": round(t_decode / t_pipe, 3),
        "fraction_of_pyav_decode": round(t_pyav / t_pipe, 3), "ffmpeg": ffmpeg,
    }
    if args.cpu:
        total = sum(cpu_job.values())
        print(f"CPU-seconds: (a) {cpu_decode:.2f}; (c) {total:.2f} until the driver exited, of which "
              + ", ".join(f"{role} {cpu:.2f}" for role, cpu in sorted(cpu_job.items(), key=lambda kv: -kv[1]))
              + f"; after it exited (actor teardown, not in (c)'s time): {sum(cpu_after.values()):.2f}")
        result.update(bare_decode_cpu_s=round(cpu_decode, 2), pipeline_cpu_s=round(total, 2),
                      pipeline_cpu_by_role={role: round(cpu, 2) for role, cpu in sorted(cpu_job.items())},
                      pipeline_cpu_after_exit_s=round(sum(cpu_after.values()), 2),
                      fraction_of_decode_cpu=round(cpu_decode / total, 3))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
