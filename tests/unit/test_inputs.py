"""Input listing: folders with NAME.txt captions, CSV/Parquet/JSONL tables, unreadable captions, fsspec reads."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pandas as pd
import pytest

from curation.errors import SourceError
from curation.inputs import InputItem, list_inputs, read_source, source_key


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_lists_videos_and_images_with_captions(tmp_path):
    _touch(tmp_path / "b.mp4")
    (tmp_path / "b.txt").write_text("  a dog runs on a beach \n")
    _touch(tmp_path / "a.webm")  # no caption file -> empty caption, not an error
    _touch(tmp_path / "sub" / "c.jpg")
    (tmp_path / "sub" / "c.txt").write_text("a red car")
    _touch(tmp_path / "notes.json")  # ignored
    items = list_inputs(str(tmp_path))
    assert [(Path(i.source).name, i.kind) for i in items] == [("a.webm", "video"), ("b.mp4", "video"),
                                                              ("c.jpg", "image")]
    by_name = {Path(i.source).name: i for i in items}
    assert by_name["b.mp4"].caption == "a dog runs on a beach"
    assert by_name["a.webm"].caption == "" and by_name["a.webm"].caption_error is None
    assert by_name["c.jpg"].caption == "a red car"
    assert all(Path(i.uri).is_absolute() for i in items)
    assert by_name["b.mp4"].source == str(tmp_path / "b.mp4")  # as given (here: absolute because tmp_path is)


def test_unreadable_caption_is_recorded_not_raised(tmp_path):
    _touch(tmp_path / "v.mp4")
    (tmp_path / "v.txt").write_bytes(b"caf\xe9 \xff\xfe broken")
    _touch(tmp_path / "w.mp4")
    (tmp_path / "w.txt").mkdir()  # a folder where the caption file should be
    items = {Path(i.source).name: i for i in list_inputs(str(tmp_path))}
    assert items["v.mp4"].caption_error and "not UTF-8" in items["v.mp4"].caption_error
    assert items["w.mp4"].caption_error and items["w.mp4"].caption_error.startswith("caption unreadable")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_tables_resolve_relative_paths_and_keep_source_as_given(tmp_path, fmt):
    _touch(tmp_path / "media" / "x.mp4")
    _touch(tmp_path / "media" / "y.png")
    df = pd.DataFrame({"video": ["media/x.mp4", None], "image": [None, "media/y.png"],
                       "caption": ["a cat sleeps", "a sunny street"]})
    path = tmp_path / f"table.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if v is not None})
                                  for r in df.to_dict("records")))
    items = list_inputs(str(path))
    assert [(i.source, i.kind, i.caption) for i in items] == [
        ("media/x.mp4", "video", "a cat sleeps"), ("media/y.png", "image", "a sunny street")]
    assert items[0].uri == str((tmp_path / "media" / "x.mp4").resolve())


def test_table_urls_and_bad_tables(tmp_path):
    df = pd.DataFrame({"video": ["s3://bucket/a.mp4", "s3://bucket/a.mp4"], "caption": ["one", "dup"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    items = list_inputs(str(tmp_path / "t.csv"))
    assert len(items) == 1 and items[0].uri == "s3://bucket/a.mp4" and items[0].caption == "one"
    pd.DataFrame({"path": ["a.mp4"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="`video` or `image` column"):
        list_inputs(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="neither a folder nor a table"):
        list_inputs(str(tmp_path / "missing_folder"))
    # a non-text caption cell is a recorded error
    pd.DataFrame({"video": ["a.mp4"], "caption": [3.5]}).to_parquet(tmp_path / "num.parquet")
    assert "expected text" in list_inputs(str(tmp_path / "num.parquet"))[0].caption_error


def test_read_source_local_and_fsspec_memory(tmp_path):
    import fsspec

    p = _touch(tmp_path / "v.mp4", b"abc")
    assert read_source(str(p), 3) == b"abc"
    assert read_source(str(p), 3, as_bytes=False) == str(p)  # a local video goes to the decoder by path
    with fsspec.open("memory://curate-test/v.mp4", "wb") as fh:
        fh.write(b"remote-bytes")
    assert read_source("memory://curate-test/v.mp4", 100, as_bytes=False) == b"remote-bytes"  # URLs: bytes
    for uri in (str(p), "memory://curate-test/v.mp4"):  # one size limit for every input, checked unread
        with pytest.raises(SourceError, match=r"^file is \d+ bytes, over job.max_source_bytes=2$"):
            read_source(uri, 2, as_bytes=False)
    with pytest.raises(SourceError, match="^empty file"):
        read_source(str(_touch(tmp_path / "e.mp4", b"")), 100)
    with pytest.raises(SourceError, match="^unreadable: FileNotFoundError"):
        read_source(str(tmp_path / "nope.mp4"), 100)
    with pytest.raises(SourceError, match="^unreadable: .*nosuchproto"):  # fsspec's ValueError, as data
        read_source("nosuchproto://bucket/v.mp4", 100)


def test_source_key_is_stable_and_distinct():
    assert source_key("a/b.mp4") == source_key("a/b.mp4")
    assert source_key("a/b.mp4") != source_key("a/c.mp4")
    assert len(source_key("x")) == 16


def test_largest_local_files_are_scheduled_first(tmp_path):
    from pipeline.curate import largest_first

    for name, size in (("a.mp4", 10), ("b.mp4", 300), ("c.mp4", 20)):
        (tmp_path / name).write_bytes(b"x" * size)
    uri = {"remote1": "s3://bucket/remote1.mp4"}
    items = [InputItem(source=n, uri=uri.get(n, str(tmp_path / n)), kind="video", caption="", caption_error=None)
             for n in ("a.mp4", "remote1", "b.mp4", "missing.mp4", "c.mp4")]
    order = [it.source for it in largest_first(items)]
    assert order == ["b.mp4", "c.mp4", "a.mp4", "remote1", "missing.mp4"]  # unknown sizes keep their order


CAPTION = "Ein Café am Fluss, 川沿いのカフェ"
ENCODINGS = {  # name -> the bytes a tool writes for CAPTION + CRLF
    "utf-8": (CAPTION + "\r\n").encode("utf-8"),
    "utf-8 with BOM": codecs.BOM_UTF8 + (CAPTION + "\r\n").encode("utf-8"),  # Notepad's "UTF-8 with BOM"
    "utf-16-le with BOM": codecs.BOM_UTF16_LE + (CAPTION + "\r\n").encode("utf-16-le"),  # Windows "Unicode"
    "utf-16-be with BOM": codecs.BOM_UTF16_BE + (CAPTION + "\r\n").encode("utf-16-be"),
}
UNDECODABLE = {  # name -> (bytes, what the reason says)
    "latin-1": ("café au lait".encode("latin-1"), "utf-8 invalid continuation byte at byte 3"),
    "ascii as utf-16-le without BOM": ("a dog".encode("utf-16-le"), "NUL characters"),  # valid UTF-8 + NULs
    "utf-16-le without BOM": (CAPTION.encode("utf-16-le"), "utf-8 invalid"),
    "utf-32 with BOM": (CAPTION.encode("utf-32"), "NUL characters"),  # FF FE 00 00: UTF-16 BOM, then NULs
    "utf-16 with BOM, odd length": (codecs.BOM_UTF16_LE + "ab".encode("utf-16-le") + b"c", "truncated data"),
    "utf-16 with BOM, lone surrogate": (codecs.BOM_UTF16_LE + b"\x00\xd8a\x00", "utf-16-le"),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_caption_files_in_utf8_and_utf16_with_bom_are_read(tmp_path, encoding):
    _touch(tmp_path / "v.mp4")
    (tmp_path / "v.txt").write_bytes(ENCODINGS[encoding])
    (item,) = list_inputs(str(tmp_path))
    assert item.caption_error is None and item.caption == CAPTION  # BOM and line ending gone


@pytest.mark.parametrize("encoding", list(UNDECODABLE))
def test_undecodable_caption_files_are_recorded_with_the_reason(tmp_path, encoding):
    raw, detail = UNDECODABLE[encoding]
    _touch(tmp_path / "v.mp4")
    (tmp_path / "v.txt").write_bytes(raw)
    (item,) = list_inputs(str(tmp_path))
    assert item.caption == ""
    assert item.caption_error.startswith("caption unreadable: v.txt: not UTF-8 or UTF-16 (with BOM) text: ")
    assert detail in item.caption_error


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_tables_in_utf8_and_utf16_with_bom_are_read(tmp_path, fmt, encoding):
    rows = [{"video": "a.mp4", "caption": CAPTION}, {"video": "b.mp4", "caption": "zwei Kähne"}]
    if fmt == "csv":
        text = pd.DataFrame(rows).to_csv(index=False, lineterminator="\r\n")
    else:
        text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    codec = encoding.split()[0]
    bom = ENCODINGS[encoding][: len(ENCODINGS[encoding]) - len((CAPTION + "\r\n").encode(codec))]
    (tmp_path / f"t.{fmt}").write_bytes(bom + text.encode(codec))
    items = list_inputs(str(tmp_path / f"t.{fmt}"))
    assert [(i.source, i.caption, i.caption_error) for i in items] == [("a.mp4", CAPTION, None),
                                                                       ("b.mp4", "zwei Kähne", None)]


def test_text_table_in_another_encoding_is_an_input_error(tmp_path):
    (tmp_path / "t.csv").write_bytes("video,caption\na.mp4,café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"input table .*t\.csv: not UTF-8 or UTF-16 \(with BOM\) text"):
        list_inputs(str(tmp_path / "t.csv"))


def test_parquet_caption_cells_of_bytes_are_decoded_like_caption_files(tmp_path):
    cells = [raw for raw in ENCODINGS.values()] + [raw for raw, _ in UNDECODABLE.values()] + ["a NUL\x00 in a string"]
    videos = [f"v{i}.mp4" for i in range(len(cells))]
    pd.DataFrame({"video": videos[:-1], "caption": cells[:-1]}).to_parquet(tmp_path / "b.parquet")
    pd.DataFrame({"video": videos[-1:], "caption": cells[-1:]}).to_parquet(tmp_path / "s.parquet")
    items = list_inputs(str(tmp_path / "b.parquet")) + list_inputs(str(tmp_path / "s.parquet"))
    good, bad = items[: len(ENCODINGS)], items[len(ENCODINGS):]
    assert [(i.caption, i.caption_error) for i in good] == [(CAPTION, None)] * len(ENCODINGS)
    details = [d for _, d in UNDECODABLE.values()] + ["NUL characters"]
    for item, detail in zip(bad, details, strict=True):
        assert item.caption == "" and item.caption_error.startswith("caption unreadable: not UTF-8 or UTF-16")
        assert detail in item.caption_error
