"""The one exception type of the clip path.

A `SourceError` means "this input cannot be used": the pipeline catches it per source and records
`status=error` with `error=str(exc)` in `manifest/sources.parquet`; the job goes on. Config mistakes are
not SourceErrors: they raise `common.configtree.ConfigError` before any work starts.
"""


class SourceError(Exception):
    """An input (video, image or caption) is unusable; the message is the one-line manifest reason."""

    def __init__(self, reason: str):
        # Manifest reasons are one line: collapse whatever the decoder printed.
        super().__init__(" ".join(str(reason).split())[:500])

    @property
    def reason(self) -> str:
        return str(self)
