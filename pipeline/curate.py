"""The curation job: raw videos (+ captions) and image-text pairs -> single-shot clips -> WebDataset shards.

    python -m pipeline.curate --input IN --output OUT [--config FILE] [key=value ...]

Runs unchanged under `ray job submit --working-dir . -- python -m pipeline.curate ...` (it connects to the
cluster in RAY_ADDRESS, which `ray job submit` sets; `RAY_ADDRESS=auto` picks the cluster `ray start`
made on this machine). Without RAY_ADDRESS it starts a local Ray bound to 127.0.0.1. OUT must be a path
the driver can write (on a multi-node cluster: an absolute path on shared storage).

Phases:
1. stream (Ray Data, no full materialisation): sources -> stage 1 ProcessSources (CPU actors, several
   sources at a time each: decode once, shots, cheap scores, encode; open_clip too on a cluster without a
   GPU) -> stage 2 ScoreClips (open_clip actors on GPUs, when there are some) -> the driver writes each
   finished source atomically to OUT/staging/<key>.parquet (the resume checkpoint).
2. finalize (driver, cheap): late filters + global near-duplicate pass over all staged rows, shards packed
   by bytes in clip_id order, manifests, stats. Deterministic, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from common.configtree import ConfigError
from curation import config as config_mod
from curation.config import CurateConfig
from curation.filters import apply_filters
from curation.inputs import InputItem, is_local, list_inputs, source_key
from curation.process import SourceResult, error_result
from pipeline import manifest, shards, staging
from pipeline.stats import build_stats, summary_lines, write_stats

log = logging.getLogger("pipeline.curate")


class JobError(RuntimeError):
    """The job cannot go on (a model failed to load in an actor); what is staged so far stays for a resume."""


RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Sections whose change makes staged results stale (job/output only change how the job runs).
RESULT_SECTIONS = ("decode", "shots", "scores", "filter", "encode")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    path = Path(__file__).resolve().parents[1] / "configs" / "curate_default.yaml"
    return path if path.is_file() else None


# --------------------------------------------------------------------------- ray


def init_ray(cfg: CurateConfig) -> None:
    """Connect to RAY_ADDRESS (set by `ray job submit`), else start a local cluster on 127.0.0.1."""
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs = {}
        if cfg.job.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.job.object_store_memory_mb * 2**20
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)


def actor_resources(cfg: CurateConfig, cluster: dict[str, float], node_cpus: list[float] | None = None) -> dict:
    """Resolve `job.clip_placement` and the `job.*` sizes left at None against the cluster's resources.

    `cluster`: ray.cluster_resources(); `node_cpus`: the CPUs of each alive node (None: one node).
    Returns clip_in_stage1 (open_clip runs inside the stage-1 actors), clip_gpus and clip_cpus (per
    open_clip actor in stage 2), threads (sources in flight per stage-1 actor), process_cpus (CPUs each
    stage-1 actor reserves) and process_actors (stage-1 pool size, fixed so all actors start together).
    Stage-1 actors get the CPUs that the open_clip actors do not reserve.
    """
    job = cfg.job
    has_gpu = cluster.get("GPU", 0) >= 1
    placement = job.clip_placement if job.clip_placement != "auto" else ("actors" if has_gpu else "stage1")
    in_stage1 = placement == "stage1"
    if in_stage1:
        clip_gpus = clip_cpus = 0.0
    else:
        clip_gpus = float(job.clip_num_gpus) if job.clip_num_gpus is not None else (1.0 if has_gpu else 0.0)
        clip_cpus = float(job.clip_cpus) if job.clip_cpus is not None else (1.0 if clip_gpus > 0 else 0.0)
    total = cluster.get("CPU", 1)
    free = total - (0.0 if in_stage1 else job.clip_actors * clip_cpus)
    biggest_node = max(node_cpus) if node_cpus else total
    # an actor must fit on one node: no more threads than one node has CPU shares for
    threads = max(1, min(job.sources_per_actor, int(biggest_node // job.process_cpus)))
    actor_cpus = job.process_cpus * threads
    if job.process_actors is not None:
        process_actors = job.process_actors
    else:
        slots = max(1, int(free // job.process_cpus))  # sources in flight over the whole cluster
        process_actors = max(1, math.ceil(slots / threads))
        if free > 0:
            # e.g. 3 CPUs, 2 threads: two actors of 1.5 CPUs, not one actor and an idle CPU
            actor_cpus = min(actor_cpus, free / process_actors)
    return {"clip_in_stage1": in_stage1, "clip_gpus": clip_gpus, "clip_cpus": clip_cpus, "threads": threads,
            "process_cpus": actor_cpus, "process_actors": process_actors}


def largest_first(items: list[InputItem]) -> list[InputItem]:
    """Local files biggest first (remote ones keep their order, after them): the long sources start early
    and the small ones fill the gaps at the end, so no actor idles while another works through a big file
    (longest-processing-time-first scheduling). The output does not depend on this order."""
    def size(item: InputItem) -> int:
        try:
            return os.path.getsize(item.uri) if is_local(item.uri) else -1
        except OSError:
            return -1  # missing or unreadable: it fails fast, whenever it comes

    return sorted(items, key=size, reverse=True)


def build_stream(cfg: CurateConfig, todo: list[InputItem]):
    """The Ray Data pipeline: items -> ProcessSources [-> ScoreClips] (lazy; consumed by the driver)."""
    import ray

    from pipeline.stages import ProcessSources, ScoreClips, item_to_row

    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    sizes = actor_resources(cfg, ray.cluster_resources(), nodes or None)
    threads = sizes["threads"]
    if sizes["clip_in_stage1"]:
        log.info("stage-1 actors: %d x %g CPU, %d sources at a time each, open_clip inside them",
                 sizes["process_actors"], sizes["process_cpus"], threads)
    else:
        log.info("stage-1 actors: %d x %g CPU, %d sources at a time each; open_clip actors: %d x (%g CPU, "
                 "%g GPU)", sizes["process_actors"], sizes["process_cpus"], threads, cfg.job.clip_actors,
                 sizes["clip_cpus"], sizes["clip_gpus"])
    ctx = ray.data.DataContext.get_current()
    # A worker that dies on a source (a native crash outside the decoder's own isolation) must not end the
    # job: the block is dropped and the driver records that source as an error after the stream.
    ctx.max_errored_blocks = -1
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ds = ray.data.from_items(
        [item_to_row(it) for it in todo],
        # one source per block (up to a cap): sources spread over the actors and finish one by one
        override_num_blocks=max(1, min(len(todo), 4096)),
    )
    ds = ds.map_batches(
        ProcessSources,
        fn_constructor_kwargs={"cfg": cfg, "score_clips": sizes["clip_in_stage1"]},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=sizes["process_actors"],
            # several sources run at once in one actor, on Ray's threads (not one after the other)
            max_concurrent_calls_per_actor=threads if threads > 1 else None,
            enable_true_multi_threading=threads > 1,
        ),
        num_cpus=sizes["process_cpus"],
    )
    if not sizes["clip_in_stage1"]:
        ds = ds.map_batches(
            ScoreClips,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.job.clip_sources_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.job.clip_actors),
            num_gpus=sizes["clip_gpus"],
            num_cpus=sizes["clip_cpus"],
        )
    return ds


def run_stream(cfg: CurateConfig, out: Path, todo: list[InputItem]) -> None:
    """Process `todo` on Ray and stage every finished source; sources lost to a dead worker become errors."""
    from pipeline.stages import CLIP_LOAD_ERROR, decode_payload

    staging_dir = out / "staging"
    by_key = {it.key: it for it in todo}
    done = 0
    if todo:
        ds = build_stream(cfg, todo)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for key, payload in zip(batch["key"], batch["payload"]):
                result: SourceResult = decode_payload(payload)
                if result.source_row.get(CLIP_LOAD_ERROR):
                    raise JobError(result.source_row[CLIP_LOAD_ERROR])
                key = str(key)
                staging.write_source(staging_dir, key, result.source_row, result.clip_rows, result.media)
                done += 1
                row = result.source_row
                detail = row.get("error") if row["status"] == "error" else f"{len(result.clip_rows)} clips"
                print(f"[{done}/{len(todo)}] {row['status']:5s} {row['source']}: {detail}", flush=True)
    finished = staging.finished_keys(staging_dir)
    for key, item in by_key.items():
        if key not in finished:
            result = error_result(item, "lost: the worker processing this source died (crash outside the "
                                  "decoder's isolation or out of memory)")
            staging.write_source(staging_dir, key, result.source_row, [], [])
            print(f"[lost] error {item.source}", flush=True)


# --------------------------------------------------------------------------- finalize


def _sample_members(row: dict, mp4: bytes | None, jpg: bytes | None) -> dict[str, bytes]:
    members = {"txt": (row.get("caption") or "").encode("utf-8"), "json": staging.dumps(public(row)).encode()}
    if row["kind"] == "video":
        members["mp4"] = mp4
    members["jpg"] = jpg
    return members


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def write_all_shards(
    out: Path, clip_rows: list[dict], sizes: dict[str, int], max_bytes: int
) -> tuple[dict[str, int], int]:
    """Plan and (re)write every shard; returns ({shard: samples}, total bytes)."""
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    kept = [r for r in clip_rows if r["kept"]]
    plan = shards.plan_shards(((r["clip_id"], r["kind"], sizes[r["clip_id"]]) for r in kept), max_bytes)
    for row in clip_rows:
        row["shard"] = plan.get(row["clip_id"])
    shards.clean_shard_dir(shard_dir, keep=set(plan.values()))
    by_shard: dict[str, list[dict]] = {}
    for row in sorted(kept, key=lambda r: r["clip_id"]):
        by_shard.setdefault(row["shard"], []).append(row)
    cache: dict[str, dict] = {}
    counts, total = {}, 0

    def media_of(row: dict):
        key = source_key(row["source"])
        if key not in cache:
            cache.clear()  # clips of one source are contiguous in clip_id order: one file in memory
            cache[key] = staging.read_media(staging.staging_path(out / "staging", key))
        return cache[key][row["clip_id"]]

    for name in sorted(by_shard):
        samples = ((r["clip_id"], _sample_members(r, *media_of(r))) for r in by_shard[name])
        counts[name] = shards.write_shard(shard_dir / name, samples)
        total += (shard_dir / name).stat().st_size
    return counts, total


def finalize(cfg: CurateConfig, out: Path, items: list[InputItem]) -> tuple[list[dict], list[dict], dict, int]:
    """Filters, dedup, shards and manifests from the staging area (for the sources in `items`)."""
    source_rows, clip_rows, sizes = [], [], {}
    for item in items:
        src_row, rows, nbytes = staging.read_rows(staging.staging_path(out / "staging", item.key))
        source_rows.append(src_row)
        for row, n in zip(rows, nbytes):
            clip_rows.append(row)
            sizes[row["clip_id"]] = n
    random_weights = any(r.get("_clip_random_weights") for r in source_rows)
    apply_filters(clip_rows, cfg.filter, media_bytes=[sizes[r["clip_id"]] for r in clip_rows],
                  random_weights=random_weights)
    counts, total = write_all_shards(out, clip_rows, sizes, cfg.output.shard_max_bytes)
    manifest.write_manifests(out, [public(r) for r in source_rows], [public(r) for r in clip_rows])
    return source_rows, clip_rows, counts, total


# --------------------------------------------------------------------------- main


def check_previous_config(out: Path, cfg: CurateConfig) -> None:
    """Refuse to resume over staged results made with different decode/shot/score/filter/encode settings."""
    path = out / "config.yaml"
    if not path.is_file() or not (out / "staging").is_dir():
        return
    import yaml

    old = yaml.safe_load(path.read_text()) or {}
    new = yaml.safe_load(config_mod.to_yaml(cfg))
    changed = [s for s in RESULT_SECTIONS if old.get(s) != new.get(s)]
    if changed:
        raise ConfigError(
            f"{out} holds a run made with different {', '.join(changed)} settings (see {path}); staged results "
            "would mix two configs. Use a new --output, or delete its staging/ folder to start over"
        )


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare(input_path: str, out_dir: str, cfg: CurateConfig) -> list[InputItem]:
    """Everything that can fail on a user mistake, before any work: inputs listed, OUT checked."""
    items = list_inputs(input_path)
    if not items:
        raise ValueError(f"no videos or images found in {input_path}")
    check_previous_config(Path(out_dir), cfg)
    return items


def run(input_path: str, out_dir: str, cfg: CurateConfig, items: list[InputItem] | None = None) -> dict:
    """The whole job; returns the stats dict."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if items is None:
        items = prepare(input_path, out_dir, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", config_mod.to_yaml(cfg))
    staging.clean_temp_files(out / "staging")
    finished = staging.finished_keys(out / "staging")
    todo = largest_first([it for it in items if it.key not in finished])
    print(f"curate: {len(items)} inputs, {len(items) - len(todo)} already staged, {len(todo)} to process",
          flush=True)
    t_list = time.perf_counter() - t0
    t1 = time.perf_counter()
    if todo:
        init_ray(cfg)
    t_ray = time.perf_counter() - t1
    run_stream(cfg, out, todo)  # includes the actors' start (model loads)
    t_stream = time.perf_counter() - t1 - t_ray
    t2 = time.perf_counter()
    source_rows, clip_rows, counts, total = finalize(cfg, out, items)
    t_final = time.perf_counter() - t2
    notes = []
    if any(r.get("_clip_random_weights") for r in source_rows):
        notes.append(f"open_clip model {cfg.scores.clip.model} has random weights: clip_similarity is recorded "
                     "but meaningless; it was not used to filter, and near-duplicates kept the sharpest clip")
    stats = build_stats(
        source_rows=source_rows,
        clip_rows=clip_rows,
        processed_keys={it.key for it in todo},
        key_of=source_key,
        durations={"list_s": t_list, "ray_init_s": t_ray, "stream_s": t_stream, "finalize_s": t_final,
                   "total_s": time.perf_counter() - t0},
        shards=counts,
        shard_bytes=total,
        notes=notes,
    )
    write_stats(out / "stats.json", stats)
    if not cfg.output.keep_staging:
        import shutil

        shutil.rmtree(out / "staging", ignore_errors=True)
    for line in summary_lines(stats):
        print(line, flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a config/input mistake)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = config_mod.load_config(args.config or default_config_path(), args.overrides)
        items = prepare(args.input, args.output, cfg)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"curate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        run(args.input, args.output, cfg, items)
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
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
