"""Decoder processes as the isolation tests of curation.decode see them (never used by a job).

    python -m tests.decoder_faults hang|crash|exit

A decoder process that fails on purpose: it is started the way the real one is
(`curation.decode.DecoderProcess(command=fault_command(kind))`) and takes requests of the same protocol
(curation/decode_types.py), then, on the first request:
- hang:  blocks inside C (libc pause()): no Python-level timeout can end it, only a kill;
- crash: dereferences NULL in C (SIGSEGV);
- exit:  exits with status 3 without answering, as an escaped Python exception would.
The production worker (curation/decode_worker.py) has no such switch. `running_decoders` lists the real
decoder processes of the test process, as the operating system shows them.
"""

from __future__ import annotations

import ctypes
import faulthandler
import sys

from curation.decode_types import DecodeRequest

KINDS = ("hang", "crash", "exit")


def fault_command(kind: str) -> list[str]:
    """The command line of a decoder process that fails with `kind` on its first request."""
    if kind not in KINDS:
        raise ValueError(f"unknown fault {kind!r}; valid: {KINDS}")
    return [sys.executable, "-m", "tests.decoder_faults", kind]


def running_decoders() -> set[int]:
    """PIDs of the live decoder processes (curation/decode_worker.py) that this process started."""
    import psutil

    from curation.decode import WORKER_COMMAND

    pids = set()
    for child in psutil.Process().children():
        try:
            if child.cmdline()[1:] == list(WORKER_COMMAND[1:]) and child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return pids


def main(kind: str) -> int:
    for line in sys.stdin:
        DecodeRequest.from_json(line)  # a well-formed request, as the real worker would get it
        if kind == "hang":
            ctypes.CDLL(None).pause()
        elif kind == "crash":
            faulthandler.disable()  # no Python traceback on stderr for an intended crash
            ctypes.string_at(0)
        else:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
