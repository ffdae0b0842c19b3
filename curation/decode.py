"""Single-pass decoding of one video into two sizes, in a killable child process.

One decode of the source feeds every later stage: `small` frames (detect_width wide) for shot detection
and motion, `frames` at work size (long side <= work_max_side) for scoring and encoding. The frame count
is what the decoder actually returned (headers lie), timestamps come from frame pts.

Backends. decord (the project's decoder) is tried first. It fails on files whose header promises more
than the file holds (a truncated faststart mp4: it builds its frame index from the header, then
`av_read_frame` fails mid-way and no frame comes back) and on codecs its bundled FFmpeg 4.1 lacks (AV1).
For those the decode restarts with PyAV, which decodes sequentially, skips undecodable packets (counted in
`bad_frames`) and keeps every frame that does decode.

Isolation. A decoder is C code: it can segfault, abort or block forever on hostile input. By default the
decode runs in a forked child (os.fork via multiprocessing 'fork': starts in milliseconds, needs no
re-import; the child only runs decoder code, so locks held by the caller's other threads, e.g. a Ray
worker's gRPC threads, are never touched). 'forkserver' is available but multiprocessing makes every
forkserver child re-import the caller's __main__ (seconds under `python -m pipeline.curate`, an error in
unguarded scripts), so it is not the default. The child writes raw frames into
a scratch folder (tmpfs /dev/shm when available) and the parent maps them back without another copy. A
child that runs past `timeout_s` is SIGKILLed (`SourceError('decode timed out after N s')`); one that dies
from a signal becomes `SourceError('decoder crashed (SIGSEGV)')`. `isolation="none"` decodes in-process
(no timeout, no crash protection) for callers that are already isolated.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from curation.decode_backends import _decode_into, _FileSink, _MemorySink, small_size, work_size  # noqa: F401
from curation.errors import SourceError
from curation.probe import ProbeInfo, Source, probe

ISOLATION_MODES = ("forkserver", "fork", "none")
BACKENDS = ("auto", "decord", "pyav")


@dataclass
class DecodeConfig:
    """How one source is decoded (sizes, memory and time bounds, backend, isolation)."""

    detect_width: int = 128
    """Width of the small frames used for shot detection and motion (even; height keeps aspect, even)."""
    work_max_side: int = 640
    """Long side of the frames kept for scoring and encoding (even sizes; never upscales)."""
    max_memory_mb: int = 2048
    """If work-size frames would exceed this, keep only `small` (frames=None); the pipeline then
    re-decodes kept ranges with decode_range()."""
    timeout_s: float = 300.0
    """Wall-clock bound per source; a hanging decoder is killed: SourceError('decode timed out after N s')."""
    keep_frames: bool = True
    """False: produce only `small` (frames=None) and let the decoder scale straight to detect size,
    which is several times cheaper on HD sources (detection-only callers, benchmarks, tests)."""
    max_frames: int = 200_000
    """A source that decodes to more frames than this is rejected (SourceError), never silently cut."""
    isolation: str = "fork"
    """Where the decoder runs: 'fork' (forked child, default), 'forkserver' (child of a clean server;
    re-imports the caller's __main__ per child) or 'none' (in-process: no timeout, no crash protection)."""
    backend: str = "auto"
    """'auto' (decord, then PyAV when decord fails), 'decord' only, or 'pyav' only."""
    decoder_threads: int = 0
    """Decoder threads (0 = the library default). The pipeline's stage-1 actors turn 0 into their CPU share
    (job.process_cpus): their pool already fills every core."""
    batch_frames: int = 32
    """Frames fetched from decord per call (bounds the transient memory of one batch)."""
    scratch_dir: str | None = None
    """Folder for the child's frame files; None = /dev/shm when writable, else the system temp dir."""

    def __post_init__(self):
        if self.detect_width < 16 or self.detect_width % 2:
            raise ValueError(f"DecodeConfig.detect_width={self.detect_width}: must be even and >= 16")
        if self.work_max_side < 16 or self.work_max_side % 2:
            raise ValueError(f"DecodeConfig.work_max_side={self.work_max_side}: must be even and >= 16")
        if self.timeout_s <= 0:
            raise ValueError(f"DecodeConfig.timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.max_frames < 1 or self.batch_frames < 1:
            raise ValueError("DecodeConfig.max_frames and batch_frames must be >= 1")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"DecodeConfig.isolation={self.isolation!r}: valid values are {ISOLATION_MODES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"DecodeConfig.backend={self.backend!r}: valid values are {BACKENDS}")


@dataclass
class DecodedVideo:
    """Every frame of one source, decoded once, at two sizes."""

    fps: float
    """Frame rate (header average rate; from timestamps when the header has none)."""
    width: int
    """Native stream width."""
    height: int
    """Native stream height."""
    num_frames: int
    """Frames actually decoded (never the header count)."""
    timestamps: np.ndarray
    """(N,) float64 seconds from frame pts."""
    small: np.ndarray
    """(N, hs, ws, 3) uint8 RGB, ws = detect_width: for shot detection and motion."""
    frames: np.ndarray | None
    """(N, H', W', 3) uint8 RGB at work size, or None when over max_memory_mb."""
    bad_frames: int
    """Packets/frames the decoder reported corrupt and skipped."""
    backend: str = "decord"
    """Which decoder produced the frames ('decord' or 'pyav')."""


# --------------------------------------------------------------------------- isolation


_SCRATCH: str | None = None
_SWEPT: set[str] = set()
_PREFIX = "curation-decode-"


def _scratch_root(cfg: DecodeConfig) -> str:
    global _SCRATCH
    if cfg.scratch_dir:
        root = cfg.scratch_dir
    else:
        if _SCRATCH is None:
            shm = "/dev/shm"
            _SCRATCH = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
        root = _SCRATCH
    if root not in _SWEPT:
        _SWEPT.add(root)
        _sweep_stale(root)
    return root


def _sweep_stale(root: str) -> None:
    """Remove scratch folders of dead processes (a SIGKILLed caller cannot clean up; tmpfs is RAM)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        pid = name[len(_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:
            pass  # alive but not ours


def _inject(kind: str | None) -> None:
    """Test-only fault injection inside the child: 'hang' blocks in C (libc pause), 'crash' segfaults."""
    if kind == "hang":
        import ctypes

        ctypes.CDLL(None).pause()
    elif kind == "crash":
        import ctypes
        import faulthandler

        faulthandler.disable()  # the caller's (pytest's) handler would print a traceback for the test
        ctypes.string_at(0)


def _child_main(job: dict) -> None:
    """Child entry point: decode, write frames + meta.json into job['folder'], exit."""
    folder = job["folder"]
    try:
        _inject(job.get("inject"))
        cfg = DecodeConfig(**job["cfg"])
        info = ProbeInfo(**job["info"]) if job["info"] else probe(job["src"])
        sink = _FileSink(folder, keep_work=job["keep_work"])
        ts, bad, backend = _decode_into(job["src"], cfg, info, sink, job["start"], job["end"], job["small"])
        sink.close()
        meta = {"ok": True, "info": asdict(info), "count": sink.count, "keep_work": sink.keep_work,
                "bad": bad, "backend": backend}
        np.save(os.path.join(folder, "ts.npy"), ts)
    except SourceError as exc:
        meta = {"ok": False, "error": str(exc)}
    except Exception as exc:  # any other failure of a decoder library is a property of this source
        meta = {"ok": False, "error": f"decode failed: {type(exc).__name__}: {exc}"}
    tmp = os.path.join(folder, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(folder, "meta.json"))


_PRELOAD_SET = False


def _context(mode: str):
    global _PRELOAD_SET
    if mode == "fork":
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    if not _PRELOAD_SET:
        # Import decoders once in the server (children start in ms); replaces the default ['__main__'],
        # so the server never re-imports the caller's main module (a Ray worker, pytest ...).
        ctx.set_forkserver_preload(["curation.decode", "decord", "av", "PIL.Image"])
        _PRELOAD_SET = True
    return ctx


def _map(path: str, shape: tuple) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, np.uint8)
    # copy-on-write private mapping: no copy now, writable, memory lives as long as the array
    return np.asarray(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))


def _run(src: Source, cfg: DecodeConfig, info: ProbeInfo | None, *, start=0, end=None, small=True,
         keep_work=True, inject=None):
    """Decode in the configured isolation; returns (info, small, work, timestamps, bad, backend)."""
    if cfg.isolation == "none":
        _inject(inject)
        info = info or probe(src)
        if isinstance(src, (bytes, bytearray, memoryview)):
            return _run_isolated_bytes_inprocess(src, cfg, info, start, end, small, keep_work)
        sink = _MemorySink(keep_work)
        ts, bad, backend = _decode_into(src, cfg, info, sink, start, end, small)
        ww, wh = work_size(info.width, info.height, cfg)
        ws, hs = small_size(info.width, info.height, cfg)
        s, w = sink.arrays(ws, hs, ww, wh)
        if not small:
            s = np.zeros((sink.count, 0, 0, 3), np.uint8)
        return info, s, w, ts, bad, backend

    folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=_scratch_root(cfg))
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise SourceError("empty file (0 bytes)")
            path = os.path.join(folder, "source.bin")
            with open(path, "wb") as f:
                f.write(src)
            src = path
        job = {"src": os.fspath(src), "cfg": asdict(cfg), "info": asdict(info) if info else None,
               "folder": folder, "start": start, "end": end, "small": small, "keep_work": keep_work,
               "inject": inject}
        proc = _context(cfg.isolation).Process(target=_child_main, args=(job,), daemon=True)
        proc.start()
        proc.join(cfg.timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise SourceError(f"decode timed out after {cfg.timeout_s:g} s")
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            code = proc.exitcode
            if code is not None and code < 0:
                raise SourceError(f"decoder crashed ({signal.Signals(-code).name})")
            raise SourceError(f"decoder exited with code {code} and no result")
        with open(meta_path) as f:
            meta = json.load(f)
        if not meta["ok"]:
            raise SourceError(meta["error"])
        info = ProbeInfo(**meta["info"])
        n = meta["count"]
        ww, wh = work_size(info.width, info.height, cfg)
        ws, hs = small_size(info.width, info.height, cfg)
        s = _map(os.path.join(folder, "small.raw"), (n, hs, ws, 3) if small else (n, 0, 0, 3))
        w = _map(os.path.join(folder, "work.raw"), (n, wh, ww, 3)) if meta["keep_work"] else None
        ts = np.load(os.path.join(folder, "ts.npy"))
        return info, s, w, ts, meta["bad"], meta["backend"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # mapped pages stay valid until the arrays are freed


def _run_isolated_bytes_inprocess(src, cfg, info, start, end, small, keep_work):
    # decord and PyAV both want a seekable file; a temp file keeps one code path for both backends.
    with tempfile.NamedTemporaryFile(dir=_scratch_root(cfg), suffix=".bin") as f:
        f.write(src)
        f.flush()
        return _run(f.name, cfg, info, start=start, end=end, small=small, keep_work=keep_work)


# --------------------------------------------------------------------------- public API


def decode_video(src: Source, cfg: DecodeConfig, probe_info: ProbeInfo | None = None, *,
                 _inject: str | None = None) -> DecodedVideo:
    """Decode every frame of `src` once into `small` (detection) and `frames` (work size).

    Raises SourceError for unusable input (see probe()), no decodable frame, more than max_frames,
    a decoder crash, or a decode running past timeout_s. `_inject` is a test-only fault hook.
    """
    info = probe_info
    keep = cfg.keep_frames
    if keep and info is not None:
        ww, wh = work_size(info.width, info.height, cfg)
        est = info.header_frames or int((info.duration_s or 0) * (info.fps or 0))
        keep = est * ww * wh * 3 <= cfg.max_memory_mb * 2**20
    info, small, work, ts, bad, backend = _run(src, cfg, info, keep_work=keep, inject=_inject)
    n = len(small)
    if n == 0:
        raise SourceError(f"no decodable video frames ({info.codec}, {bad} bad packets)")
    fps = info.fps
    if not fps or fps <= 0:
        d = np.diff(ts)
        fps = float(1.0 / np.median(d)) if len(d) and np.median(d) > 0 else 25.0
    return DecodedVideo(fps=fps, width=info.width, height=info.height, num_frames=n, timestamps=ts,
                        small=small, frames=work, bad_frames=bad, backend=backend)


def decode_range(src: Source, start: int, end: int, cfg: DecodeConfig,
                 probe_info: ProbeInfo | None = None) -> np.ndarray:
    """Frames [start, end) at work size (the fallback when decode_video kept only `small`).

    Indices are decoded-frame indices, the same as decode_video's. Returns fewer frames when the source
    ends early; raises SourceError like decode_video.
    """
    if start < 0 or end < start:
        raise ValueError(f"decode_range: bad range [{start}, {end})")
    if end == start:
        return np.zeros((0, 2, 2, 3), np.uint8)
    _, _, work, _, _, _ = _run(src, cfg, probe_info, start=start, end=end, small=False, keep_work=True)
    return work
