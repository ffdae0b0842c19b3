"""The exception types of the clip path, and THE rule for which exceptions are data and which are bugs.

A `SourceError` means "this input cannot be used": the pipeline catches it per source and records
`status=error` with `error=str(exc)` in `manifest/sources.parquet`; the job goes on. Config mistakes are
not SourceErrors: they raise `common.configtree.ConfigError` before any work starts.

`is_input_error` decides, in one place, what else the per-source code records as data instead of
raising; everything it does not name is a bug and propagates, so the Ray job fails with a non-zero exit.

OSError is not on that list: the same types come from reading an input (missing, no permission, a broken
remote) and from this machine failing the job's own writes (the decoder's scratch files on a full
/dev/shm, a read-only file system, too many open files). Recording the second kind as data would mark
sources "bad input" that are fine, exit 0, and a resume would skip them. So the code that opens or reads
an input turns an OSError into SourceError where it happens (`reading_input`, or its own except clause),
and an OSError anywhere else fails the job. Even while reading an input, the errors that describe this
machine (`ENVIRONMENT_ERRNOS`) are never data.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Iterator


class SourceError(Exception):
    """An input (video, image or caption) is unusable; the message is the one-line manifest reason."""

    def __init__(self, reason: str):
        # Manifest reasons are one line: collapse whatever the decoder printed.
        super().__init__(" ".join(str(reason).split())[:500])

    @property
    def reason(self) -> str:
        return str(self)


class DecoderBugError(Exception):
    """The decoder process failed in our code or on this machine, not on the input: it answered with a
    traceback of an exception that is not an input error (a bug, or e.g. no space left for its scratch
    files), or it exited without answering and without a signal (a Python exception escaped it, or it could
    not start). Never recorded as a source row: it fails the job."""


ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE})
"""OSError numbers that describe this machine, never an input: no space or quota left, a read-only file
system, no file descriptor left (in this process or the system). They fail the job wherever they happen."""


def is_environment_error(exc: BaseException) -> bool:
    """True for an OSError (a library's subclass included, e.g. PyAV's) whose errno is one of
    ENVIRONMENT_ERRNOS."""
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS


@contextlib.contextmanager
def reading_input(what: str) -> Iterator[None]:
    """Run code that opens or reads an input: an OSError it raises (missing, no permission, a directory, a
    broken remote) becomes SourceError(f"{what}: {type}: {message}"), except an environment error
    (is_environment_error), which propagates and fails the job."""
    try:
        yield
    except OSError as exc:
        if is_environment_error(exc):
            raise
        raise SourceError(f"{what}: {type(exc).__name__}: {exc}") from None


@functools.cache
def input_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that describe the input (or the library reading it), not our code. Built on first
    use, so that importing this module (curation.inputs does) imports no decoder library.

    decord's errors are not listed: decord is imported only in the decoder process, and
    curation.decode_backends turns them into SourceError where it calls decord.
    """
    import av
    import cv2
    from PIL import Image

    return (
        SourceError,  # our own verdict on an input (probe, decode, caption, image header checks, reading it)
        EOFError,  # a file that ends inside a header
        MemoryError,  # an input too large for the worker's memory
        av.error.FFmpegError,  # PyAV: demuxing, decoding or encoding this input's streams
        cv2.error,  # OpenCV decoding or converting this input's pixels
        Image.UnidentifiedImageError,  # PIL: no reader knows this image's header (an OSError, named on its own)
        Image.DecompressionBombError,  # PIL refusing an image header that declares too many pixels
        Image.DecompressionBombWarning,  # the same, when warnings are turned into errors (python -W error)
    )


def is_input_error(exc: BaseException) -> bool:
    """True when `exc` says "this input is unusable" (the source becomes a status=error row); False when it
    is a bug (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError, ValueError,
    RuntimeError, DecoderBugError, ...) or this machine failing (a plain OSError, an environment error even
    from a decoder library), which the caller must re-raise.

    Why an allow-list: a curation job runs millions of inputs, so what an input can do to a decoder must
    never stop it; but a programming error turned into an error row makes every source fail "as data" and
    the job still exits 0 with an empty dataset. Only exceptions that the input itself (or a library
    reading it) raises are data; an unknown type fails the job loudly. When a real input shows a library
    raising some other type, catch that type where the library is called and raise SourceError there (as
    curation.probe does for av.open) instead of widening this list.
    """
    return isinstance(exc, input_error_types()) and not is_environment_error(exc)
