"""The curation job: raw videos (+ captions) and image-text pairs -> single-shot clips -> WebDataset shards.

    python -m pipeline.curate --input IN --output OUT [--config FILE] [key=value ...]

Runs unchanged under `ray job submit --working-dir . -- python -m pipeline.curate ...` (it connects to the
cluster in RAY_ADDRESS, which `ray job submit` sets; `RAY_ADDRESS=auto` picks the cluster `ray start`
made on this machine). Without RAY_ADDRESS it starts a local Ray bound to 127.0.0.1. OUT must be a path
the driver can write (on a multi-node cluster: an absolute path on shared storage).

Phases:
0. checks (before any work): config (curation.config), inputs, OUT's previous config (pipeline.resume),
   the cluster's resources against the config (pipeline.cluster).
1. stream (pipeline.stream, Ray Data, no full materialisation): sources -> stage 1 ProcessSources (CPU
   actors, several sources at a time each: decode once, shots, cheap scores, encode; open_clip too on a
   cluster without a GPU) -> stage 2 ScoreClips (open_clip actors on GPUs, when there are some) -> the
   driver writes each finished source atomically to OUT/staging/<key>.parquet (the resume checkpoint).
2. finalize (pipeline.finalize, driver, cheap): late filter + global near-duplicate pass over all staged
   rows, shards packed by bytes in clip_id order, manifests; then stats (pipeline.stats). Deterministic,
   so a resumed run equals an uninterrupted one.
3. report (pipeline.report): OUT/report.html, written last on every run (resumed ones too); its last
   summary line points to it.
With `tracking.enabled=true` the job is also one MLflow run (pipeline.tracking): config, stats as metrics,
report.html + stats.json as artifacts; an unusable store stops the job in phase 0.

Exit status: 0 done; 2 a config or input mistake (nothing written); 1 the job could not go on (a model did
not load in an actor; what was staged stays for a resume).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from common.configtree import ConfigError
from common.tracking_store import TrackingError
from curation import config as config_mod
from curation.config import CurateConfig
from curation.inputs import InputItem, list_inputs, source_key
from pipeline import resume, shards, staging
from pipeline.cluster import init_ray, plan_for_cluster
from pipeline.finalize import finalize
from pipeline.report import write_report
from pipeline.stats import build_stats, summary_lines, write_stats
from pipeline.stream import JobError, largest_first, run_stream
from pipeline.tracking import finish_run, open_tracker, start_run
from training.tracking import Tracker


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.curate",
        description="Curate videos and image-text pairs into single-shot clips and WebDataset shards.",
    )
    p.add_argument("--input", required=True, help="folder of videos/images (+ NAME.txt captions) or a "
                   "CSV/Parquet/JSONL table with a `video` or `image` column and `caption`")
    p.add_argument("--output", required=True, help="output folder (re-running on it resumes)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/curate_default.yaml when "
                   "present, else built-in defaults)")
    p.add_argument("overrides", nargs="*", help="config overrides like scores.clip.checkpoint=/path")
    return p.parse_args(argv)


def default_config_path() -> Path | None:
    """configs/curate_default.yaml of this checkout, when present."""
    path = Path(__file__).resolve().parents[1] / "configs" / "curate_default.yaml"
    return path if path.is_file() else None


def prepare(input_path: str, out_dir: str, cfg: CurateConfig) -> list[InputItem]:
    """Everything that can fail on a user mistake before Ray starts: inputs listed, OUT checked."""
    items = list_inputs(input_path)
    if not items:
        raise ValueError(f"no videos or images found in {input_path}")
    resume.check_previous_config(Path(out_dir), cfg)
    return items


def run(input_path: str, out_dir: str, cfg: CurateConfig, items: list[InputItem] | None = None,
        tracker: Tracker | None = None) -> dict:
    """The whole job; returns the stats dict. ConfigError (before anything is written) when the cluster
    cannot honour the config; JobError when the job cannot go on. `tracker`: pipeline.tracking.open_tracker's
    (opened here when not given; inactive unless tracking.enabled)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if items is None:
        items = prepare(input_path, out_dir, cfg)
    tracker = tracker or open_tracker(cfg)
    start_run(tracker, cfg, input_path, out)
    try:
        stats, report = _run_tracked(input_path, out, cfg, items, t0)
    except BaseException:
        tracker.end("FAILED")
        raise
    finish_run(tracker, stats, out, report)
    return stats


def _run_tracked(input_path: str, out: Path, cfg: CurateConfig, items: list[InputItem], t0: float
                 ) -> tuple[dict, Path]:
    """Phases 1-3 (module docstring); returns (stats, report path)."""
    todo = largest_first(resume.pending(out, items))
    print(f"curate: {len(items)} inputs, {len(items) - len(todo)} already staged, {len(todo)} to process",
          flush=True)
    t_list = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan = None
    if todo:
        init_ray(cfg)
        plan = plan_for_cluster(cfg)  # may refuse the config: nothing in OUT has changed yet
    t_ray = time.perf_counter() - t1
    resume.start_output(out, cfg)
    # includes the actors' start (model loads); the shard writer's import (torch) runs once the stream is
    # running, while the driver waits on it
    run_stream(cfg, out, todo, plan, while_running=shards.preload_writer)
    t_stream = time.perf_counter() - t1 - t_ray
    t2 = time.perf_counter()
    final = finalize(cfg, out, items)
    t_final = time.perf_counter() - t2
    notes = []
    if final.random_weights:
        notes.append(f"open_clip model {cfg.scores.clip.model} has random weights: clip_similarity is recorded "
                     "but meaningless; it was not used to filter, and near-duplicates kept the sharpest clip")
    stats = build_stats(
        source_rows=final.source_rows,
        clip_rows=final.clip_rows,
        processed_keys={it.key for it in todo},
        key_of=source_key,
        durations={"list_s": t_list, "ray_init_s": t_ray, "stream_s": t_stream, "finalize_s": t_final,
                   "total_s": time.perf_counter() - t0},
        shards=final.shard_samples,
        shard_bytes=final.shard_bytes,
        notes=notes,
    )
    write_stats(out / "stats.json", stats)
    for line in summary_lines(stats):
        print(line, flush=True)
    # after every other output (a report that fails loses nothing: see pipeline.report), before staging
    # goes (its media shows rejected clips)
    t3 = time.perf_counter()
    report = write_report(out, cfg)
    print(f"report:  {report} ({report.stat().st_size / 1e3:.0f} kB, {time.perf_counter() - t3:.1f} s)", flush=True)
    if not cfg.output.keep_staging:
        shutil.rmtree(staging.folder_of(out), ignore_errors=True)
    return stats, report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a config/input mistake, 1 when the job stopped)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = config_mod.load_config(args.config or default_config_path(), args.overrides)
        items = prepare(args.input, args.output, cfg)
        tracker = open_tracker(cfg)  # an unusable MLflow store stops the job here, before any work
    except (ConfigError, ValueError, FileNotFoundError, TrackingError) as exc:
        print(f"curate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        run(args.input, args.output, cfg, items, tracker)
    except (ConfigError, TrackingError) as exc:
        print(f"curate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except JobError as exc:
        print(f"curate: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def exit_now(code: int) -> None:
    """End the driver process with `code`, skipping the interpreter's teardown.

    By now every output is written and closed; Ray is disconnected here first (what its atexit hook would
    do). What is skipped is the garbage collection of every module the driver imported (pyarrow, pandas,
    Ray Data): 0.3-0.5 s of nothing, measured on a one-video job, that a user waits for at every run.
    """
    # No garbage collection from here on: a collection that a still running thread (the shard writer's
    # import, Ray Data's threads) happens to trigger after ray.shutdown() would run Ray objects' finalizers
    # against a core worker that is gone, and Ray then ends the process with status 1.
    gc.disable()
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
