"""HTML pieces of the curation report (pipeline.report): the page frame, tables, thumbnails, time.

Pure functions from data to HTML strings; every text that comes from the run (paths, captions, error
messages) is escaped here (pipeline.report_charts.esc). No script and no external resource: the page's
CSS is inline and every image is a data: URI or an inline SVG.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from pipeline.report_charts import bar_chart, esc, fmt, placeholder_svg
from pipeline.report_thumbs import KEPT_CAP, MAX_REASON_GROUPS, PER_REASON_CAP, THUMB_PX, Thumb
from pipeline.stats import summary_lines

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.4em 0 1em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
font-size:13px;vertical-align:top}th{background:#f3f3f3}table.errors td{max-width:640px;word-break:break-word}
pre.summary{background:#f7f7f7;padding:.6em;white-space:pre-wrap;font-size:12px}
figure.score{display:inline-block;margin:.4em 1em .8em 0;vertical-align:top}
figure.score figcaption{font-size:12px;max-width:520px}
.threshold-off{color:#888}.threshold-none{color:#888}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
figure.thumb{margin:0;width:%(w)dpx;font-size:11px;word-break:break-all}
figure.thumb img{display:inline-block;margin-right:4px}figure.thumb .note{color:#a33}
nav a{margin-right:1em}
""" % {"w": 2 * THUMB_PX + 8}


def table(headers: list[str], rows: list[list[str]], css_class: str = "") -> str:
    """A table; a cell already starting with "<td" is used as it is (to carry data- attributes)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, stats: dict, body: str) -> str:
    """The whole document: title, the job's summary lines and notes, a table of contents, `body`."""
    summary = "\n".join(esc(line) for line in summary_lines(stats))
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("funnel", "Funnel"), ("scores", "Scores"), ("thumbnails", "Thumbnails"), ("time", "Time"),
        ("errors", "Source errors")))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><nav>{nav}</nav>"
            f'<pre class="summary">{summary}</pre>\n{body}\n</body></html>\n')


def _caption(row: dict, reason_score: dict[str, str]) -> str:
    name = PurePosixPath(str(row["source"])).name
    span = ""
    if row["kind"] == "video" and row.get("start_s") is not None and row.get("end_s") is not None:
        span = f" {row['start_s']:.1f}–{row['end_s']:.1f} s"
    text = f"{esc(name[:60])}{esc(span)}"
    reason = row.get("reject_reason")
    score = reason_score.get(reason or "")
    if score:
        text += f"<br>{esc(score)} = {esc(fmt(row.get(score)))}"
    elif reason == "duplicate" and row.get("duplicate_of"):
        text += f"<br>duplicate of {esc(row['duplicate_of'])}"
    return text


def _figure(group: str, row: dict, thumb: Thumb, reason_score: dict[str, str]) -> str:
    if thumb.first_frame:
        images = f'<img class="first" alt="first frame" src="{thumb.first_frame}">'
        if thumb.strip:
            images += f'<img class="strip" alt="frames of the clip" src="{thumb.strip}">'
    else:
        images = placeholder_svg(["no frames stored", *(thumb.note or "").split(" (")[:1]],
                                 width=THUMB_PX, height=THUMB_PX * 9 // 16)
    note = f'<div class="note">{esc(thumb.note)}</div>' if thumb.note else ""
    return (f'<figure class="thumb" data-group="{esc(group)}" data-clip="{esc(row["clip_id"])}">{images}'
            f"<figcaption>{_caption(row, reason_score)}{note}</figcaption></figure>")


def thumbs_section(groups: dict[str, list[tuple[dict, Thumb]]], counts: dict[str, int],
                   reason_score: dict[str, str]) -> str:
    """Thumbnails per group (kept, then reject reasons); `counts`: clips per group (stats.json)."""
    parts = [
        '<h2 id="thumbnails">Thumbnails</h2>',
        f"<p>A seeded sample: up to {KEPT_CAP} kept clips and {PER_REASON_CAP} per reject reason (the "
        f"{MAX_REASON_GROUPS} largest reasons); first frame, then a few frames of the clip, animated. Kept "
        "clips are read from the shards. Rejected clips show frames only when they were stored: stage 1 "
        "encodes just the clips that pass its cheap filters, so a clip rejected there has none (a placeholder "
        "stands in; the source video is not decoded again), while one rejected later (near-duplicate, late "
        "rule) has its frames in staging/ as long as output.keep_staging is true.</p>"]
    for group, shown in groups.items():
        total = counts.get(group)
        label = "kept" if group == "kept" else f"rejected: {group}"
        count = "" if total is None else f" ({len(shown)} of {total})"
        parts.append(f'<h3 data-thumb-group="{esc(group)}">{esc(label)}{esc(count)}</h3><div class="thumbs">'
                     + "".join(_figure(group, row, thumb, reason_score) for row, thumb in shown) + "</div>")
    left = [r for r in counts if r not in groups and r != "kept"]
    if left:
        parts.append("<p>No thumbnails for the smaller reasons: " + ", ".join(esc(r) for r in sorted(left)) + ".</p>")
    return "\n".join(parts)


def time_section(stats: dict) -> str:
    """Durations of the job's phases, worker time per step, throughput, and where stage 1 ran."""
    d = stats.get("durations_s", {})
    phases = [(k.removesuffix("_s"), float(v)) for k, v in d.items() if k != "total_s"]
    s = stats["sources"]
    parts = ['<h2 id="time">Time and throughput</h2>',
             f"<p>This invocation processed {s['processed_this_run']} sources ({s['resumed_from_staging']} "
             f"were resumed from staging); total {fmt(d.get('total_s'))} s wall clock.</p>",
             "<h3>Wall clock per phase (driver)</h3>", bar_chart(phases, unit=" s", css_class="durations")]
    worker = [(k.removesuffix("_s"), float(v)) for k, v in stats.get("worker_time_s", {}).items()]
    if worker:
        parts += ["<h3>Worker time per step (summed over sources, seconds)</h3>",
                  bar_chart(worker, unit=" s", css_class="worker-time")]
    tp = stats.get("throughput", {})
    parts.append("<h3>Throughput (this invocation's stream phase)</h3>" + table(
        ["measure", "per second"], [[esc(k.removesuffix("_per_s").replace("_", " ")), esc(fmt(v))]
                                    for k, v in tp.items()]))
    nodes = stats.get("stage1_sources_by_node", {})
    if nodes:
        rows = [[f"<code>{esc(n)}</code>", str(c)] for n, c in list(nodes.items())[:100]]
        parts.append("<h3>Stage 1 sources per node</h3>" + table(["node", "sources"], rows))
    return "\n".join(parts)
