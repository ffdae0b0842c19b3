"""The decoder process: a long-lived child of one caller that decodes one source per request.

    python -m curation.decode_worker      (started by curation.decode, never by hand)

Why a separate, long-lived process: a decoder is C code that can segfault, abort or block forever on
hostile input, so it must run where it can be killed; starting a fresh interpreter per source would cost
~0.3 s each, and a forked child may not use OpenCV (a thread pool inherited through fork deadlocks). This
process starts once per caller (a Ray actor, a test run), is killed on a timeout or dies on a crash, and
the caller starts a new one for the next source.

Protocol, one request at a time: the caller writes one JSON line (the job) to stdin; the worker decodes
into the job's scratch folder (small.raw, work.raw, ts.npy) and answers with one JSON line (the meta) on
the original stdout. Everything else a library prints goes to stderr. EOF on stdin ends the worker.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import numpy as np


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the caller dies (a SIGKILLed Ray worker cannot clean up after itself)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker still ends at EOF on stdin


def inject(kind: str | None) -> None:
    """Test-only fault injection: 'hang' blocks in C (libc pause), 'crash' segfaults."""
    if kind == "hang":
        import ctypes

        ctypes.CDLL(None).pause()
    elif kind == "crash":
        import ctypes
        import faulthandler

        faulthandler.disable()  # no Python traceback on stderr for an intended crash
        ctypes.string_at(0)


def run_job(job: dict) -> dict:
    """Decode job['src'] into job['folder']; returns the meta dict (never raises for a bad source)."""
    from curation.decode import DecodeConfig
    from curation.decode_backends import _decode_into, _FileSink
    from curation.errors import SourceError
    from curation.probe import ProbeInfo, probe

    folder = job["folder"]
    try:
        inject(job.get("inject"))
        cfg = DecodeConfig(**job["cfg"])
        info = ProbeInfo(**job["info"]) if job["info"] else probe(job["src"])
        sink = _FileSink(folder, keep_work=job["keep_work"])
        ts, bad, backend = _decode_into(job["src"], cfg, info, sink, job["start"], job["end"], job["small"],
                                        job.get("span"))
        sink.close()
        np.save(os.path.join(folder, "ts.npy"), ts)
        return {"ok": True, "info": asdict(info), "count": sink.count, "keep_work": sink.keep_work,
                "bad": bad, "backend": backend}
    except SourceError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # any other failure of a decoder library is a property of this source
        return {"ok": False, "error": f"decode failed: {type(exc).__name__}: {exc}"}


def main() -> int:
    _die_with_parent()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from C or Python libraries must not corrupt the protocol
    import cv2

    cv2.setNumThreads(1)  # one source at a time per worker; callers run as many workers as they have CPUs
    for line in sys.stdin:
        if not line.strip():
            continue
        answers.write(json.dumps(run_job(json.loads(line))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
