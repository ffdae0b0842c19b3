"""Phase 1 of the curation job: the sources still to do stream through Ray Data and are staged one by one.

items -> ProcessSources (stage-1 CPU actors: decode once, shots, cheap scores, encode; open_clip too when
the plan puts it there) [-> ScoreClips (open_clip actors, on GPUs when there are some)] -> the driver
writes each finished source to OUT/staging/<key>.parquet (pipeline.staging: the resume checkpoint). No
full materialisation: results are consumed as they arrive.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from curation.config import CurateConfig
from curation.inputs import InputItem, is_local
from curation.process import SourceResult, error_result
from pipeline import staging
from pipeline.cluster import ActorPlan


class JobError(RuntimeError):
    """The job cannot go on (a model failed to load in an actor); what is staged so far stays for a resume."""


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


def build_stream(cfg: CurateConfig, todo: list[InputItem], plan: ActorPlan):
    """The Ray Data pipeline: items -> ProcessSources [-> ScoreClips] (lazy; consumed by the driver)."""
    import ray

    from pipeline.stages import ProcessSources, ScoreClips, item_to_row

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
        fn_constructor_kwargs={"cfg": cfg, "score_clips": plan.clip_in_stage1},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=plan.process_actors,
            # several sources run at once in one actor, on Ray's threads (not one after the other)
            max_concurrent_calls_per_actor=plan.threads if plan.threads > 1 else None,
            enable_true_multi_threading=plan.threads > 1,
        ),
        num_cpus=plan.process_cpus,
    )
    if not plan.clip_in_stage1:
        ds = ds.map_batches(
            ScoreClips,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.job.clip_sources_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.job.clip_actors),
            num_gpus=plan.clip_gpus,
            num_cpus=plan.clip_cpus,
        )
    return ds


def run_stream(cfg: CurateConfig, out: Path, todo: list[InputItem], plan: ActorPlan | None,
               while_running: Callable[[], object] | None = None) -> None:
    """Process `todo` on Ray and stage every finished source; sources lost to a dead worker become errors.

    `plan` may be None only when there is nothing to do. JobError when open_clip failed to load in an actor.
    `while_running`: called once, when the first result arrives, to start driver work that overlaps with
    the rest of the stream (the shard writer's import). Not before: the driver's threads share one
    interpreter lock, and a thread importing modules while the stream is being built (importing ray.data,
    starting the actors) slows that down several times over, and with it the start of every actor.
    """
    staging_dir = staging.folder_of(out)
    if todo:
        if plan is None:
            raise ValueError("run_stream needs an ActorPlan when there are sources to process")
        ds = build_stream(cfg, todo, plan)
        # one bar for the stream (stderr); a line of its own only for a source that failed
        with tqdm(total=len(todo), desc="curate", unit="source", dynamic_ncols=True) as bar:
            _consume(ds, staging_dir, bar, while_running)
    finished = staging.finished_keys(staging_dir)
    for item in {it.key: it for it in todo}.values():
        if item.key not in finished:
            result = error_result(item, "lost: the worker processing this source died (crash outside the "
                                  "decoder's isolation or out of memory)")
            staging.write_source(staging_dir, item.key, result.source_row, [], [])
            print(f"[lost] error {item.source}", flush=True)


def _consume(ds, staging_dir: Path, bar: tqdm, while_running: Callable[[], object] | None) -> None:
    """Stage every result of the stream as it arrives; JobError for a model that did not load or a bug."""
    from pipeline.stages import CLIP_LOAD_ERROR, STAGE_BUG, decode_payload

    counts = {"ok": 0, "error": 0, "clips": 0}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        if while_running is not None:
            while_running()
            while_running = None
        for key, payload in zip(batch["key"], batch["payload"]):
            result: SourceResult = decode_payload(payload)
            if result.source_row.get(CLIP_LOAD_ERROR):
                raise JobError(result.source_row[CLIP_LOAD_ERROR])
            if result.source_row.get(STAGE_BUG):
                raise JobError(f"an error that is not about the input (a bug, or this machine failing) on "
                               f"{result.source_row['source']} (nothing of it staged), in "
                               f"{result.source_row[STAGE_BUG]}")
            staging.write_source(staging_dir, str(key), result.source_row, result.clip_rows, result.media)
            row = result.source_row
            counts["error" if row["status"] == "error" else "ok"] += 1
            counts["clips"] += len(result.clip_rows)
            if row["status"] == "error":
                bar.write(f"error {row['source']}: {row.get('error')}")
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
