"""List curation inputs and read their bytes.

An input is either
- a folder: every video (`.mp4 .webm .mkv .mov .avi .m4v`) and image (`.jpg .jpeg .png .webp .bmp .gif`)
  under it, searched recursively in sorted order; `NAME.txt` beside `NAME.mp4` / `NAME.jpg` is its
  caption, or
- a table (`.csv`, `.parquet`, `.jsonl` / `.json` lines): one row per input, column `video` or `image`
  (a local path, relative to the table's folder, or any fsspec / pyarrow-fs URL such as `s3://...`) and
  an optional `caption` column.

Text encodings (caption files, CSV/JSONL tables, bytes cells of a Parquet caption column): UTF-8 with or
without a byte-order mark, and UTF-16 with one (LE or BE, as Windows tools write "Unicode" text). Nothing
else is guessed: a legacy code page decodes to plausible wrong text, and UTF-16 without a BOM (or UTF-32)
decodes as UTF-8 with NUL characters, so text that is not valid UTF-8, or holds a NUL, is an error.

Nothing here raises on a bad *item* while listing: an unreadable caption is recorded on the item
(`caption_error`) and becomes a `status=error` row later, and `read_source` raises SourceError (a row too)
for an input that cannot be used. A bad *input argument* (missing folder, table without a `video` or
`image` column, a table that is not text in those encodings) raises `ValueError` before any work starts.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
from pathlib import Path

import fsspec

from curation.errors import SourceError, is_environment_error, reading_input

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TABLE_EXTS = (".csv", ".parquet", ".jsonl", ".json")


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One source to curate.

    source: the path/URL as the user gave it (the manifest's `source` column, the basis of every id).
    uri: where to read it from (absolute local path or URL), so workers in any cwd can open it.
    kind: "video" or "image".
    caption: the caption text ("" when there is none).
    caption_error: why the caption could not be read (the source is then recorded as an error), else None.
    """

    source: str
    uri: str
    kind: str
    caption: str = ""
    caption_error: str | None = None

    @property
    def key(self) -> str:
        """Stable file-system-safe id of this source (staging file name)."""
        return source_key(self.source)


def source_key(source: str) -> str:
    """sha1 of the source string, 16 hex chars: the staging file name of a source."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


def _has_scheme(path: str) -> bool:
    return "://" in path


def is_local(uri: str) -> bool:
    """True for a plain local path (URLs, file:// included, are read through fsspec)."""
    return not _has_scheme(uri)


def _kind_of(name: str) -> str | None:
    low = name.lower()
    if low.endswith(VIDEO_EXTS):
        return "video"
    if low.endswith(IMAGE_EXTS):
        return "image"
    return None


TEXT_ENCODINGS = "UTF-8 or UTF-16 (with BOM)"
"""The text encodings read (module docstring); named in every decoding error."""

_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def text_encoding(head: bytes) -> str:
    """The Python codec for text starting with `head` (its first bytes): from the byte-order mark, else
    'utf-8'. The utf-16 and utf-8-sig codecs drop the mark."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return "utf-8"


def decode_text(raw: bytes) -> str:
    """`raw` as text (see the module docstring); ValueError naming the problem when it is not."""
    try:
        text = raw.decode(text_encoding(raw[:4]))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not {TEXT_ENCODINGS} text: {exc.encoding} {exc.reason} at byte {exc.start}") from None
    return check_text(text)


def check_text(text: str) -> str:
    """`text` itself; ValueError when it holds a NUL (UTF-16 without a BOM, or UTF-32, read as UTF-8)."""
    if "\x00" in text:
        raise ValueError(f"not {TEXT_ENCODINGS} text: it holds NUL characters (UTF-16 without a byte-order "
                         "mark, or UTF-32?)")
    return text


def read_caption_file(uri: str) -> tuple[str, str | None]:
    """(caption, error) for a caption file; a missing file is an empty caption, not an error."""
    name = Path(uri).name
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            return "", None
        with fs.open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:  # permissions, a directory named NAME.txt, a broken remote...
        if is_environment_error(exc):
            raise  # this machine, not the caption (curation.errors)
        return "", f"caption unreadable: {name}: {type(exc).__name__}: {exc}"
    try:
        return decode_text(raw).strip(), None
    except ValueError as exc:
        return "", f"caption unreadable: {name}: {exc}"


def list_folder(folder: str) -> list[InputItem]:
    """Videos and images under `folder` (recursive, sorted), captions from `NAME.txt` beside them."""
    root = Path(folder)
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        kind = _kind_of(path.name)
        if kind is None:
            continue
        source = str(Path(folder) / path.relative_to(root))
        caption, err = read_caption_file(str(path.with_suffix(".txt").resolve()))
        items.append(InputItem(source=source, uri=str(path.resolve()), kind=kind, caption=caption, caption_error=err))
    return items


def _read_table(path: str):
    import pandas as pd

    low = path.lower()
    if low.endswith(".parquet"):
        return pd.read_parquet(path)  # strings are UTF-8 by the format; bytes cells are decoded per row
    with fsspec.open(path, "rb") as fh:
        encoding = text_encoding(fh.read(4))
    try:
        if low.endswith(".csv"):
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
        return pd.read_json(path, lines=True, dtype=False, encoding=encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(f"input table {path}: not {TEXT_ENCODINGS} text: {exc.encoding} {exc.reason} "
                         f"at byte {exc.start}") from None


def list_table(table: str) -> list[InputItem]:
    """Rows of a CSV/Parquet/JSONL table with column `video` or `image` (and optional `caption`)."""
    import pandas as pd

    df = _read_table(table)
    if "video" not in df.columns and "image" not in df.columns:
        raise ValueError(f"input table {table} needs a `video` or `image` column; it has {list(df.columns)}")
    base = table.rsplit("/", 1)[0] if _has_scheme(table) else str(Path(table).resolve().parent)
    items = []
    for row in df.to_dict("records"):
        for kind in ("video", "image"):
            src = row.get(kind)
            if src is None or (isinstance(src, float) and pd.isna(src)) or str(src).strip() == "":
                continue
            src = str(src).strip()
            if _has_scheme(src) or Path(src).is_absolute():
                uri = src
            else:
                uri = f"{base}/{src}" if _has_scheme(base) else str(Path(base, src).resolve())
            cap = row.get("caption")
            caption, err = "", None
            if cap is None or (isinstance(cap, float) and pd.isna(cap)):
                caption = ""
            elif not isinstance(cap, (str, bytes)):
                err = f"caption unreadable: expected text, got {type(cap).__name__}"
            else:
                try:
                    caption = (decode_text(cap) if isinstance(cap, bytes) else check_text(cap)).strip()
                except ValueError as exc:
                    err = f"caption unreadable: {exc}"
            items.append(InputItem(source=src, uri=uri, kind=kind, caption=caption, caption_error=err))
    return items


def list_inputs(path: str) -> list[InputItem]:
    """All items of input `path` (folder or table), de-duplicated by `source` (first one wins)."""
    if not _has_scheme(path) and Path(path).is_dir():
        items = list_folder(path)
    elif path.lower().endswith(TABLE_EXTS):
        if not _has_scheme(path) and not Path(path).is_file():
            raise ValueError(f"input table {path} does not exist")
        items = list_table(path)
    else:
        raise ValueError(
            f"input {path} is neither a folder nor a table ({', '.join(TABLE_EXTS)}); "
            "give a folder of videos/images or a table with a `video` or `image` column"
        )
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.source not in seen:
            seen.add(item.source)
            unique.append(item)
    return unique


def read_source(uri: str, max_bytes: int, *, as_bytes: bool = True) -> str | bytes:
    """The input at `uri` for a decoder: its bytes, or its path when it is a local file and not `as_bytes`
    (the decoders open local files themselves: no copy in memory). URLs are read through fsspec.

    THE size check of an input: SourceError (the manifest reason) when it is empty or larger than
    `max_bytes` (job.max_source_bytes; checked before reading when the file system tells the size), and
    when it cannot be read: missing, no permission, a broken remote, a URL of an unknown protocol. An
    OSError that describes this machine (curation.errors.ENVIRONMENT_ERRNOS) propagates.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ValueError as exc:  # fsspec: a protocol it does not know
        raise SourceError(f"unreadable: {exc}") from None
    with reading_input("unreadable"):
        size = fs.size(path)  # None: a server that does not say (HTTP without Content-Length)
        if size is not None:
            _check_size(size, max_bytes)
            if is_local(uri) and not as_bytes:
                return uri
        with fs.open(path, "rb") as fh:
            data = fh.read() if size is not None else fh.read(max_bytes + 1)  # past the limit: rejected
    if size is None:
        _check_size(len(data), max_bytes, exact=False)
    return data


def _check_size(size: int, max_bytes: int, exact: bool = True) -> None:
    """SourceError for an empty input or one over `max_bytes` (`size`: its size, or with `exact=False`
    what was read of it, at most max_bytes + 1)."""
    if size == 0:
        raise SourceError("empty file (0 bytes)")
    if size > max_bytes:
        told = f"is {size} bytes, over" if exact else "is larger than"
        raise SourceError(f"file {told} job.max_source_bytes={max_bytes}")
