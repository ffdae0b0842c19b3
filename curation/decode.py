"""Single-pass decoding of one video into two sizes, in a killable child process.

One decode of the source feeds every later stage: `small` frames (detect_width wide) for shot detection
and motion, `frames` at work size (long side <= work_max_side) for scoring and encoding. The frame count
is what the decoder actually returned (headers lie), timestamps come from frame pts.

Backends. PyAV (default) decodes sequentially, keeps frames in YUV and scales the planes with OpenCV;
packets that fail to decode are skipped and counted in `bad_frames`, every frame that decodes is kept (a
truncated file gives what it holds). decord returns only RGB (swscale converts at full size, then scales):
about 2x the CPU per frame here, so it is the fallback ('auto') or chosen explicitly ('decord').

Isolation. A decoder is C code: it can segfault, abort or block forever on hostile input. By default the
decode runs in the caller's decoder process (curation/decode_worker.py): a clean interpreter started once
per caller, fed one source at a time through a pipe. It writes raw frames into a scratch folder (tmpfs
/dev/shm when available) and the caller maps them back without another copy. A decode that runs past
`timeout_s` gets the process SIGKILLed (`SourceError('decode timed out after N s')`); a process that dies
from a signal becomes `SourceError('decoder crashed (SIGSEGV)')`. Either way the next source starts a new
one. A decoder process that fails in our code (an exception that is not an input error, or an exit without
a signal) raises `curation.errors.DecoderBugError`: a bug (or this machine failing, e.g. no space left for
the scratch files), which fails the job. `isolation="none"` decodes
in-process (no timeout, no crash protection) for callers that are already isolated.

Module layout (no import cycle): the shared types (DecodeConfig, sizes, the process protocol) are in
curation/decode_types.py, the PyAV/decord passes in curation/decode_backends.py; this module and the
decoder process (curation/decode_worker.py) both use those and never import each other.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curation.decode_backends import MemorySink, decode_into
from curation.decode_types import DecodeAnswer, DecodeConfig, DecodeRequest, small_size, work_size
from curation.errors import DecoderBugError, SourceError
from curation.frames import YuvFrames
from curation.probe import ProbeInfo, Source, probe

__all__ = ["DecodedVideo", "DecoderProcess", "WORKER_COMMAND", "decode_range", "decode_video", "local_copy"]


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
    frames: YuvFrames | None
    """N frames at work size as I420 (curation/frames.py; `.rgb()` converts), or None when over
    max_memory_mb."""
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


WORKER_COMMAND = (sys.executable, "-m", "curation.decode_worker")
"""How a decoder process is started: curation/decode_worker.py in a fresh interpreter."""


class DecoderProcess:
    """One decoder process (by default curation/decode_worker.py): started on first use, restarted after
    a timeout or crash, one request at a time (a lock: Ray actors may call from a watchdog thread).

    `command` is any program that speaks the protocol of curation/decode_types.py (DecodeRequest in,
    DecodeAnswer out, one JSON line each); `proc` is the running process (None before the first request
    and after a kill).
    """

    def __init__(self, command: Sequence[str] = WORKER_COMMAND):
        self.command = list(command)
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        return subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
                                close_fds=True)

    def kill(self) -> None:
        """SIGKILL the process and reap it (the next request starts a new one)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, request: DecodeRequest, timeout_s: float) -> DecodeAnswer:
        """Send one request and wait for its answer. Raises SourceError when the process runs past
        `timeout_s` (it is killed) or dies from a signal (a crash on this input), DecoderBugError when it
        exits without a signal or answers with a bug."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = self._start()
            proc = self.proc
            try:
                proc.stdin.write((request.to_json() + "\n").encode())
                line = _read_line(proc.stdout.fileno(), time.monotonic() + timeout_s)
            except BrokenPipeError:
                line = b""
            if line is None:
                self.kill()
                raise SourceError(f"decode timed out after {timeout_s:g} s")
            if not line.endswith(b"\n"):  # EOF: the process died in the middle of this source
                code = proc.wait()
                self.proc = None
                if code < 0:
                    raise SourceError(f"decoder crashed ({signal.Signals(-code).name})")
                # no signal: a Python exception escaped the worker (its traceback is on stderr) or it could
                # not start; that is our code failing, on every source alike, not this input
                raise DecoderBugError(f"decoder process {self.command} exited with code {code} without "
                                      "answering (its traceback is on stderr)")
            answer = DecodeAnswer.from_json(line)
            if answer.bug:
                raise DecoderBugError(f"decoder process failed in our code or on this machine, not on the input:\n"
                                      f"{answer.bug}")
            return answer


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One line from `fd` (b'...' without a newline at EOF), or None when `deadline` passes first."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return buf
        buf += chunk
    return buf


class _DecoderPool:
    """One decoder process per calling thread: a stage-1 actor that runs several sources at once (threads)
    decodes them in parallel, each in its own killable process; a timeout or crash only restarts the
    decoder of the thread it happened in."""

    def __init__(self):
        self._local = threading.local()
        self._all: list[DecoderProcess] = []
        self._lock = threading.Lock()

    def current(self) -> DecoderProcess:
        """This thread's decoder (created on first use; its process starts on its first request)."""
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            decoder = self._local.decoder = DecoderProcess()
            with self._lock:
                self._all.append(decoder)
        return decoder

    def kill_all(self) -> None:
        with self._lock:
            decoders, self._all = self._all, []
        for decoder in decoders:
            decoder.kill()


_DECODERS = _DecoderPool()
atexit.register(_DECODERS.kill_all)
# A forked child (multiprocessing, a DataLoader worker) must not talk to its parent's decoder processes
# through the inherited pipes: it starts its own on first use.
os.register_at_fork(after_in_child=lambda: _DECODERS.__init__())


def _map(path: str, shape: tuple) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, np.uint8)
    # copy-on-write private mapping: no copy now, writable, memory lives as long as the array
    return np.asarray(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))


def _run(src: Source, cfg: DecodeConfig, info: ProbeInfo | None, *, start=0, end=None, small=True,
         keep_work=True, span=None):
    """Decode in the configured isolation; returns (info, small, work, timestamps, bad, backend)."""
    if cfg.isolation == "none":
        info = info or probe(src)
        if isinstance(src, (bytes, bytearray, memoryview)):
            return _run_isolated_bytes_inprocess(src, cfg, info, start, end, small, keep_work, span)
        sink = MemorySink(keep_work)
        ts, bad, backend = decode_into(src, cfg, info, sink, start, end, small, span)
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
        request = DecodeRequest(src=os.fspath(src), cfg=cfg, folder=folder, info=info, start=start, end=end,
                                small=small, keep_work=keep_work, span=span)
        answer = _DECODERS.current().run(request, cfg.timeout_s)
        if answer.error is not None:
            raise SourceError(answer.error)
        info, n = answer.info, answer.count
        ww, wh = work_size(info.width, info.height, cfg)
        ws, hs = small_size(info.width, info.height, cfg)
        s = _map(os.path.join(folder, "small.raw"), (n, hs, ws, 3) if small else (n, 0, 0, 3))
        w = _map(os.path.join(folder, "work.raw"), (n, wh * 3 // 2, ww)) if answer.keep_work else None
        ts = np.load(os.path.join(folder, "ts.npy"))
        return info, s, w, ts, answer.bad, answer.backend
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # mapped pages stay valid until the arrays are freed


def _run_isolated_bytes_inprocess(src, cfg, info, start, end, small, keep_work, span):
    # decord and PyAV both want a seekable file; a temp file keeps one code path for both backends.
    with tempfile.NamedTemporaryFile(dir=_scratch_root(cfg), suffix=".bin") as f:
        f.write(src)
        f.flush()
        return _run(f.name, cfg, info, start=start, end=end, small=small, keep_work=keep_work, span=span)


# --------------------------------------------------------------------------- public API


def decode_video(src: Source, cfg: DecodeConfig, probe_info: ProbeInfo | None = None) -> DecodedVideo:
    """Decode every frame of `src` once into `small` (detection) and `frames` (work size).

    With isolation 'process' the calling thread's decoder process does the work (one per thread, started on
    first use). Raises SourceError for unusable input (see probe()), frames over max_pixels, no decodable
    frame, more than max_frames, a decoder crash, or a decode running past timeout_s; DecoderBugError when
    the decoder process fails in our code or on this machine.
    """
    info = probe_info
    keep = cfg.keep_frames
    if keep and info is not None:
        ww, wh = work_size(info.width, info.height, cfg)
        est = info.header_frames or int((info.duration_s or 0) * (info.fps or 0))
        keep = est * ww * wh * 3 // 2 <= cfg.max_memory_mb * 2**20
    info, small, work, ts, bad, backend = _run(src, cfg, info, keep_work=keep)
    n = len(small)
    if n == 0:
        raise SourceError(f"no decodable video frames ({info.codec}, {bad} bad packets)")
    fps = info.fps
    if not fps or fps <= 0:
        d = np.diff(ts)
        fps = float(1.0 / np.median(d)) if len(d) and np.median(d) > 0 else 25.0
    return DecodedVideo(fps=fps, width=info.width, height=info.height, num_frames=n, timestamps=ts,
                        small=small, frames=None if work is None else YuvFrames(work), bad_frames=bad,
                        backend=backend)


@contextlib.contextmanager
def local_copy(src: Source, cfg: DecodeConfig, needed: bool = True):
    """A path for `src`: itself when it is a path (or when not `needed`), else its bytes written once to
    the scratch folder and removed afterwards (so several decode_range calls do not copy them each time)."""
    if not needed or not isinstance(src, (bytes, bytearray, memoryview)):
        yield src
        return
    fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", suffix=".bin", dir=_scratch_root(cfg))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(src)
        yield path
    finally:
        os.unlink(path)


def decode_range(src: Source, start: int, end: int, cfg: DecodeConfig, probe_info: ProbeInfo | None = None,
                 timestamps: np.ndarray | None = None) -> YuvFrames:
    """Frames [start, end) at work size (the fallback when decode_video kept only `small`).

    Indices are decoded-frame indices, the same as decode_video's. With `timestamps` (decode_video's) the
    decoder seeks to the range instead of decoding from the first frame, so a long source's clips cost
    about their own length each, not the source's (it decodes from 0 when the seek does not reproduce the
    range exactly). Returns fewer frames when the source ends early; raises SourceError like decode_video.
    """
    if start < 0 or end < start:
        raise ValueError(f"decode_range: bad range [{start}, {end})")
    if end == start:
        return YuvFrames(np.zeros((0, 3, 2), np.uint8))
    span = None
    if timestamps is not None and end <= len(timestamps):
        span = (float(timestamps[start]), float(timestamps[end - 1]), end - start)
    _, _, work, _, _, _ = _run(src, cfg, probe_info, start=start, end=end, small=False, keep_work=True, span=span)
    return YuvFrames(work)
