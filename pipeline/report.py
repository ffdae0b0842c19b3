"""OUT/report.html: a self-contained page a person reads after a curation run.

    python -m pipeline.report OUT        # rebuild the report of an existing output folder

The job (pipeline.curate) writes it at the end of every run, resumed ones included, after stats.json,
the manifests and the shards, and before it deletes the staging area (whose media shows rejected clips).
Sections: the funnel (the counts of OUT/stats.json, per kind and per reject reason), a histogram of every
score column of OUT/manifest/clips.parquet with its thresholds from the run's resolved config (OUT/config.yaml
or the config the job ran with), sampled thumbnails (pipeline.report_thumbs), time and throughput per stage,
and the source errors of OUT/manifest/sources.parquet.

Self-contained: inline CSS, inline SVG charts (pipeline.report_charts), images as data: URIs; no script,
no link to anything outside the file. Its size is bounded whatever the run's size: thumbnails are
sampled with fixed caps and size caps, the error list is cut at MAX_ERROR_ROWS (so a 5,000-clip run gives a
report of a few hundred kB to a few MB, tests/unit/test_report.py).

Failure policy: a stored clip that cannot be read becomes a note on its thumbnail; anything else that
fails here is a bug and fails the job loudly (exit status 1). Every output the report reads is already
written by then, so nothing is lost: rerunning the job on OUT resumes from staging (no source is processed
again) and writes the report, or `python -m pipeline.report OUT` rebuilds it alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import configtree
from common.atomic import write_text
from curation.config import CurateConfig
from curation.filters import DURATION_RULE, REJECT_REASONS, SCORE_RULES, VIDEO_ONLY_FIELDS, FilterConfig
from pipeline import staging
from pipeline.manifest import NON_SCORE
from pipeline.report_charts import Threshold, bar_chart, esc, fmt, histogram_svg
from pipeline.report_sections import page, table, thumbs_section, time_section
from pipeline.report_thumbs import MediaStore, make_thumb, sample_groups

REPORT_NAME = "report.html"
MAX_ERROR_ROWS = 200
"""Source errors listed one by one (the rest are counted: sources.parquet holds them all)."""

THRESHOLDS: dict[str, list[tuple[str, str, str]]] = {
    rule.score: [(field, side, reason) for field, side, reason in (
        (rule.min_field, "min", rule.low_reason), (rule.max_field, "max", rule.high_reason)) if field]
    for rule in (DURATION_RULE, *SCORE_RULES)
}
"""Score column -> [(FilterConfig field, "min"|"max", the reject reason it gives)]: curation.filters' rules."""
VIDEO_ONLY = set(VIDEO_ONLY_FIELDS)
"""Thresholds that do not apply to images (curation.filters.for_kind)."""
REASON_SCORE = {reason: score for score, rules in THRESHOLDS.items() for _, _, reason in rules}

FUNNEL_LABELS = {"inputs": "inputs", "sources_ok": "sources decoded (ok)", "shots": "shots",
                 "candidate_clips": "candidate clips", "passed_cheap_filters_encoded": "passed cheap filters (encoded)",
                 "kept": "kept"}


def load_run_config(out: Path) -> CurateConfig:
    """The resolved config the run wrote (OUT/config.yaml), read without the job's checks (a moved
    aesthetic head or checkpoint does not matter to the report)."""
    return configtree.load(CurateConfig, out / "config.yaml")


def funnel_section(stats: dict) -> str:
    """The funnel per kind (bars + a table) and the rejections per reason, all from stats.json."""
    parts = ['<h2 id="funnel">Funnel</h2>']
    for kind, counts in stats["funnel"].items():
        if not counts.get("inputs"):
            continue
        items = [(FUNNEL_LABELS.get(k, k), v) for k, v in counts.items()]
        rows = [[esc(label), f'<td data-funnel="{esc(kind)}.{esc(k)}">{v}</td>']
                for (label, v), k in zip(items, counts)]
        parts.append(f"<h3>{esc(kind)}s</h3>" + bar_chart(items, css_class="funnel") + table(["stage", "count"], rows))
    c = stats["clips"]
    parts.append("<h3>All kinds</h3>" + table(["", "clips"], [
        ["candidate clips", f'<td data-clips="candidates">{c["candidates"]}</td>'],
        ["kept", f'<td data-clips="kept">{c["kept"]}</td>']]))
    rejected = c["rejected_by_reason"]
    if rejected:
        total = max(1, c["candidates"])
        rows = [[f"<code>{esc(r)}</code>", f'<td data-reject="{esc(r)}">{n}</td>', f"{100 * n / total:.1f} %",
                 esc(REJECT_REASONS.get(r, ""))] for r, n in sorted(rejected.items(), key=lambda x: (-x[1], x[0]))]
        parts.append("<h3>Rejected, per reason</h3>" + table(["reason", "clips", "share", "rule"], rows))
    else:
        parts.append("<p>No clip was rejected.</p>")
    return "\n".join(parts)


def score_thresholds(score: str, filt: FilterConfig) -> tuple[list[Threshold], list[str]]:
    """(thresholds drawn, labels of those that are off or limited) of one score column."""
    drawn, labels = [], []
    for field, side, _reason in THRESHOLDS.get(score, []):
        value = getattr(filt, field)
        if value is None:
            labels.append(f'<span class="threshold-off" data-field="{field}">filter.{field}: off (null)</span>')
            continue
        drawn.append(Threshold(field, float(value), side))
        if field in VIDEO_ONLY:
            labels.append(f"filter.{field} = {fmt(value)} (videos only)")
    if score not in THRESHOLDS:
        labels.append('<span class="threshold-none">no filter uses this score</span>')
    return drawn, labels


def scores_section(clips: pa.Table, filt: FilterConfig, notes: list[str]) -> str:
    """A histogram per score column (kept green, rejected red) with the config's thresholds drawn."""
    kept = np.asarray(clips.column("kept").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    parts = ['<h2 id="scores">Scores</h2><p>Every candidate clip, kept (green) stacked under rejected (red); '
             "dashed lines: thresholds of the run's config (filter.*).</p>"]
    random_clip = any("random weights" in n for n in notes)
    for name in [n for n in clips.column_names if n not in NON_SCORE]:
        values = np.asarray(clips.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        drawn, labels = score_thresholds(name, filt)
        missing = int((~np.isfinite(values)).sum())
        if missing:
            labels.append(f"{missing} clips without a value")
        if name == "clip_similarity" and random_clip:
            labels.append("CLIP had random weights: recorded, not used")
        parts.append(f'<figure class="score" data-score="{esc(name)}"><figcaption><b>{esc(name)}</b> '
                     f'{" · ".join(labels)}</figcaption>{histogram_svg(name, values, kept, drawn)}</figure>')
    return "\n".join(parts)


def thumbnails(out: Path, clips: pa.Table, seed: int) -> dict[str, list[tuple[dict, object]]]:
    """{group: [(clip row, Thumb)]} for the sampled clips (pipeline.report_thumbs)."""
    ids = clips.column("clip_id").to_pylist()
    reasons = clips.column("reject_reason").to_pylist()
    encoded = clips.column("out_width").is_valid().to_pylist()
    staged = staging.folder_of(out).is_dir()
    has_media = [e and (r is None or staged) for e, r in zip(encoded, reasons)]
    groups = sample_groups(ids, reasons, has_media, seed=seed)
    position = {cid: i for i, cid in enumerate(ids)}
    wanted = sorted({position[c] for chosen in groups.values() for c in chosen})
    rows = {r["clip_id"]: r for r in clips.take(pa.array(wanted, type=pa.int64())).to_pylist()}
    # the stored media are read in order (one staging file at a time), the thumbnails (a decode and an
    # animated WebP each: most of the report's time) are made on every core; the page does not depend on
    # which thread made what
    store, media = MediaStore(out), []
    try:
        for group, chosen in groups.items():
            for cid in sorted(chosen, key=lambda c: (rows[c]["source"], c)):
                row, mp4, jpg, problem = rows[cid], None, None, None
                if row.get("kept"):
                    mp4, jpg, problem = store.from_shard(row["shard"], cid)
                elif has_media[position[cid]]:
                    mp4, jpg = store.from_staging(row["source"], cid)
                else:
                    problem = ("rejected before encoding" if not encoded[position[cid]]
                               else "staging deleted (output.keep_staging=false)")
                media.append((group, row, mp4, jpg, problem))
    finally:
        store.close()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        thumbs = list(pool.map(lambda m: make_thumb(m[1]["kind"], m[2], m[3]), media))
    result: dict[str, list[tuple[dict, object]]] = {group: [] for group in groups}
    for (group, row, _, _, problem), thumb in zip(media, thumbs):
        thumb.note = problem or thumb.note
        result[group].append((row, thumb))
    return {group: sorted(shown, key=lambda x: x[0]["clip_id"]) for group, shown in result.items()}


def errors_section(sources: pa.Table, stats: dict) -> str:
    """Source errors: counts per kind of error (stats.json), then each failed source with its reason."""
    parts = ['<h2 id="errors">Source errors</h2>']
    by_head = stats["sources"].get("errors_by_reason") or {}
    if not by_head:
        return parts[0] + "<p>No source failed.</p>"
    parts.append(table(["error", "sources"], [[esc(k), f'<td data-error-head="{esc(k)}">{v}</td>']
                                              for k, v in by_head.items()]))
    failed = sources.filter(pc.equal(sources.column("status"), "error"))
    rows = failed.select(["source", "error"]).slice(0, MAX_ERROR_ROWS).to_pylist()
    parts.append(table(["source", "reason"], [[f"<code>{esc(r['source'][:300])}</code>",
                                               esc((r["error"] or "unknown")[:400])] for r in rows],
                       css_class="errors"))
    if failed.num_rows > MAX_ERROR_ROWS:
        parts.append(f"<p>{failed.num_rows - MAX_ERROR_ROWS} more failed sources not listed: see "
                     "manifest/sources.parquet (status = error).</p>")
    return "\n".join(parts)


def build_report(out: str | Path, cfg: CurateConfig | None = None, *, seed: int = 0) -> str:
    """The HTML of OUT's report; `cfg` = the config the run used (default: OUT/config.yaml)."""
    out = Path(out)
    cfg = cfg if cfg is not None else load_run_config(out)
    stats = json.loads((out / "stats.json").read_text())
    clips = pq.read_table(out / "manifest" / "clips.parquet")
    sources = pq.read_table(out / "manifest" / "sources.parquet")
    groups = thumbnails(out, clips, seed)
    body = [funnel_section(stats), scores_section(clips, cfg.filter, stats.get("notes", [])),
            thumbs_section(groups, {"kept": stats["clips"]["kept"], **stats["clips"]["rejected_by_reason"]},
                           REASON_SCORE),
            time_section(stats), errors_section(sources, stats)]
    return page(f"Curation report: {out.name}", stats, "\n".join(body))


def write_report(out: str | Path, cfg: CurateConfig | None = None) -> Path:
    """Build OUT/report.html and publish it atomically (common.atomic); returns its path."""
    return write_text(Path(out) / REPORT_NAME, build_report(out, cfg))


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.report OUT`: rebuild OUT/report.html."""
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    p.add_argument("output", help="output folder of a curation run")
    args = p.parse_args(argv)
    if not (Path(args.output) / "stats.json").is_file():
        print(f"report: error: {args.output} has no stats.json (not a finished curation run)", file=sys.stderr)
        return 2
    print(f"report: {write_report(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
