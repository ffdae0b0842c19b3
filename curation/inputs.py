"""List curation inputs and read their bytes.

An input is either
- a folder: every video (`.mp4 .webm .mkv .mov .avi .m4v`) and image (`.jpg .jpeg .png .webp .bmp`) under
  it, searched recursively in sorted order; `NAME.txt` beside `NAME.mp4` / `NAME.jpg` is its caption, or
- a table (`.csv`, `.parquet`, `.jsonl` / `.json` lines): one row per input, column `video` or `image`
  (a local path, relative to the table's folder, or any fsspec / pyarrow-fs URL such as `s3://...`) and
  an optional `caption` column.

Nothing here raises on a bad *item*: an unreadable caption is recorded on the item (`caption_error`) and
becomes a `status=error` row later. A bad *input argument* (missing folder, table without a `video` or
`image` column) raises `ValueError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
import fsspec

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
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


def read_caption_file(uri: str) -> tuple[str, str | None]:
    """(caption, error) for a caption file; a missing file is an empty caption, not an error."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            return "", None
        with fs.open(path, "rb") as fh:
            raw = fh.read()
        return raw.decode("utf-8").strip(), None
    except UnicodeDecodeError as exc:
        return "", f"caption unreadable: {Path(uri).name} is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except Exception as exc:  # permissions, a directory named NAME.txt, a broken remote...
        return "", f"caption unreadable: {Path(uri).name}: {type(exc).__name__}: {exc}"


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
    if low.endswith(".csv"):
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if low.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True, dtype=False)


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
            elif isinstance(cap, bytes):
                try:
                    caption = cap.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    err = f"caption unreadable: not UTF-8 ({exc.reason} at byte {exc.start})"
            elif not isinstance(cap, str):
                err = f"caption unreadable: expected text, got {type(cap).__name__}"
            else:
                caption = cap.strip()
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


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole content of `uri` (local path or fsspec URL); raises OSError / ValueError when unreadable."""
    fs, path = fsspec.core.url_to_fs(uri)
    if max_bytes is not None:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise ValueError(f"file is {size} bytes, over the {max_bytes}-byte limit (io.max_source_bytes)")
    with fs.open(path, "rb") as fh:
        return fh.read()
