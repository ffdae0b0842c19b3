"""The decoder process: a long-lived child of one caller that decodes one source per request.

    python -m curation.decode_worker      (started by curation.decode, never by hand)

Why a separate, long-lived process: a decoder is C code that can segfault, abort or block forever on
hostile input, so it must run where it can be killed; starting a fresh interpreter per source would cost
an interpreter start each time, and a forked child may not use OpenCV (a thread pool inherited through fork deadlocks). This
process starts once per caller (a Ray actor, a test run), is killed on a timeout or dies on a crash, and
the caller starts a new one for the next source.

Protocol (curation/decode_types.py), one request at a time: the caller writes one DecodeRequest as a JSON
line to stdin; the worker decodes into the request's scratch folder (small.raw, work.raw, ts.npy) and
answers with one DecodeAnswer JSON line on the original stdout. Everything else a library prints goes to
stderr. EOF on stdin ends the worker.
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np

from curation.decode_backends import FileSink, decode_into
from curation.decode_types import DecodeAnswer, DecodeRequest
from curation.errors import SourceError, is_input_error
from curation.probe import probe


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the caller dies (a SIGKILLed Ray worker cannot clean up after itself)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker still ends at EOF on stdin


def run_job(request: DecodeRequest) -> DecodeAnswer:
    """Decode request.src into request.folder. An unusable input is an answer with `error`; an exception
    that is not an input error (curation.errors.is_input_error: a bug, or this machine failing, e.g. no space
    left in the scratch folder) is an answer with `bug` (its traceback)."""
    try:
        info = request.info or probe(request.src)
        sink = FileSink(request.folder, keep_work=request.keep_work)
        ts, bad, backend = decode_into(request.src, request.cfg, info, sink, request.start, request.end,
                                       request.small, request.span)
        sink.close()
        np.save(os.path.join(request.folder, "ts.npy"), ts)
        return DecodeAnswer(info=info, count=sink.count, keep_work=sink.keep_work, bad=bad, backend=backend)
    except SourceError as exc:
        return DecodeAnswer(error=str(exc))
    except Exception as exc:
        if is_input_error(exc):  # a decoder library's own error: a property of this source
            return DecodeAnswer(error=f"decode failed: {type(exc).__name__}: {exc}")
        return DecodeAnswer(bug=traceback.format_exc())


def main() -> int:
    _die_with_parent()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from C or Python libraries must not corrupt the protocol
    import cv2

    cv2.setNumThreads(1)  # one source at a time per worker; callers run as many workers as they have CPUs
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = DecodeRequest.from_json(line)
        except Exception:  # a request our caller built wrong: a bug, answered with its traceback
            answers.write(DecodeAnswer(bug=traceback.format_exc()).to_json() + "\n")
            continue
        answers.write(run_job(request).to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
