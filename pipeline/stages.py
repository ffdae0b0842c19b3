"""Thin callable classes that Ray Data's `map_batches` instantiates once per actor.

Models load in `__init__` (once per actor); `__call__` maps a batch of rows to a batch of rows. A row
between the stages is one source: `key` (its staging name) and `payload` (a pickled
curation.process.SourceResult). Heavy frame arrays never leave stage 1 except the few sampled frames per
clip that open_clip needs, and the open_clip scoring drops those.

Where open_clip runs (`job.clip_placement`, resolved by pipeline.cluster.plan_actors): in its own actors (stage 2,
ScoreClips) when there is a GPU to put it on, else inside the stage-1 actors (ProcessSources with
`score_clips=True`), which then score their own clips: no extra process importing torch and open_clip,
and on a CPU-only cluster the scoring spreads over every core instead of queueing on one actor.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import pickle
import threading
import time
import traceback

import numpy as np

from curation.config import CurateConfig
from curation.errors import is_input_error
from curation.inputs import InputItem
from curation.process import CLIP_SIMILARITY, SourceResult, error_result, process_source
from pipeline.stats import STAGE1_NODE

log = logging.getLogger(__name__)

CLIP_LOAD_ERROR = "_clip_load_error"
"""Private source-row key: open_clip failed to load in a stage-1 actor (the driver stops the job)."""
STAGE_BUG = "_stage_bug"
"""Private source-row key: a stage raised an error that is not about the input on this source, a programming
error or this machine failing (curation.errors.is_input_error); the driver stops the job.
Handed to the driver as data because Ray Data drops a block whose task raised (pipeline/stream.py sets
max_errored_blocks=-1 so a dead worker does not end the job): the source would be "lost" and the job exit 0."""


def flag_bug(result: SourceResult, stage: str, exc: Exception) -> SourceResult:
    """Mark `result` as hit by a programming error in `stage` (traceback kept for the driver's message)."""
    result.clip_frames = []
    result.source_row[STAGE_BUG] = f"{stage}: " + "".join(traceback.format_exception(exc))[-4000:]
    return result


def encode_payload(result: SourceResult) -> bytes:
    return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


def decode_payload(blob) -> SourceResult:
    return pickle.loads(bytes(blob))


def item_to_row(item: InputItem) -> dict:
    """One input as a Ray Data row: a JSON string column (no type inference turning None into NaN)."""
    return {"item": json.dumps(dataclasses.asdict(item))}


def item_from_row(row: dict) -> InputItem:
    return InputItem(**json.loads(str(row["item"])))


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: batch[k][i] for k in batch} for i in range(n)]


def _make_second_opinion(cfg: CurateConfig):
    """The shot detector's second opinion (TransNetV2), loaded once per actor; None when disabled."""
    from curation.shots import default_second_opinion

    return default_second_opinion(cfg.shots)


def _size_threads(cfg: CurateConfig, cpus: int) -> CurateConfig:
    """Library-chosen thread counts (decode.decoder_threads / encode.threads == 0) sized to the actor's CPUs.

    The stage-1 pool fills the cluster with one source in flight per `process_cpus`, so every core is already busy:
    FFmpeg's and x264's automatic thread counts (about 1.5 per core of the machine) only add switching and
    frame-threading overhead there (more CPU per decode and per encode for the same output). Explicit
    non-zero settings are kept.
    """
    decode, encode = cfg.decode, cfg.encode
    if decode.decoder_threads == 0:
        decode = dataclasses.replace(decode, decoder_threads=cpus)
    if encode.threads == 0:
        encode = dataclasses.replace(encode, threads=cpus)
    return dataclasses.replace(cfg, decode=decode, encode=encode)


class ClipScoring:
    """open_clip (and the optional aesthetic head) loaded once per actor; fills each clip row's
    clip_similarity (and aesthetic) in place.

    With random weights (model tiny-random) the scores are recorded but flagged, and the driver does not
    filter on them. Thread-safe: inference only, the model is never changed after __init__.
    """

    def __init__(self, cfg: CurateConfig):
        # imported here, not at module level: actors that do not score have no use for open_clip
        from curation.clip_score import build_seeded_scorer, clip_similarity

        self._clip_similarity = clip_similarity
        # seeded: every actor (and a resumed run) builds the same tiny random model and records the same scores
        self.scorer = build_seeded_scorer(cfg.scores.clip)
        self.head = None
        if cfg.scores.quality.aesthetic_head:
            from curation.quality import AestheticHead

            self.head = AestheticHead(cfg.scores.quality.aesthetic_head)
        if self.scorer.random_weights:
            log.warning("open_clip %s has random weights: clip_similarity is recorded, never filtered on",
                        cfg.scores.clip.model)

    def score(self, result: SourceResult) -> None:
        """Fill clip_similarity (and aesthetic) into result.clip_rows; drop the sampled frames."""
        t0 = time.perf_counter()
        frames, rows = result.clip_frames, result.clip_rows
        if rows and len(frames) == len(rows):
            caption = rows[0].get("caption") or ""
            text = self.scorer.embed_texts([caption])[0] if caption.strip() else None
            for row, emb in zip(rows, self.scorer.embed_clips(frames)):
                if emb is None:
                    continue  # no frames: the row keeps no similarity (a missing-score rejection)
                row[CLIP_SIMILARITY] = self._clip_similarity(emb, text) if text is not None else float("nan")
                if self.head is not None:
                    row["aesthetic"] = float(self.head(emb))
        result.clip_frames = []
        result.source_row["_clip_random_weights"] = bool(self.scorer.random_weights)
        result.source_row.setdefault("_timing", {})["clip_s"] = time.perf_counter() - t0

    def score_or_reject(self, result: SourceResult) -> None:
        """score(), where an input or library failure rejects this source's clips (score_error) and nothing
        more; a programming error propagates (curation.errors.is_input_error decides)."""
        try:
            self.score(result)
        except Exception as exc:
            if not is_input_error(exc):
                raise
            result.clip_frames = []
            msg = f"clip scoring failed: {type(exc).__name__}: {exc}"[:500]
            for clip_row in result.clip_rows:
                clip_row["score_error"] = msg


class ProcessSources:
    """Stage 1 (CPU): read -> probe -> decode once -> shots -> clips -> cheap scores -> encode
    [-> open_clip scores, with `score_clips`].

    Ray Data may call one instance from several threads at once (job.sources_per_actor): each thread
    gets its own watchdog thread and decoder process; the models (TransNetV2, open_clip) are shared.
    """

    def __init__(self, cfg: CurateConfig, score_clips: bool = False):
        import cv2

        # One source = job.process_cpus cores: OpenCV's own thread pool would oversubscribe them.
        cpus = max(1, int(cfg.job.process_cpus))
        cv2.setNumThreads(cpus)
        self.cfg = _size_threads(cfg, cpus)
        self.second_opinion = _make_second_opinion(cfg)
        import ray

        # the node this actor runs on, recorded per source (OUT/stats.json: where stage 1 ran); None when
        # called outside Ray (a unit test)
        self.node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else None
        self._local = threading.local()
        self._scoring = None
        if score_clips:
            # open_clip (torch + open_clip imports, the model: seconds) loads in the background while the
            # first sources decode; only their scoring waits for it
            loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-load")
            self._scoring = loader.submit(ClipScoring, cfg)
            loader.shutdown(wait=False)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """This calling thread's watchdog worker (one source at a time per calling thread)."""
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        return pool

    def _guarded(self, item: InputItem) -> SourceResult:
        """process_source with a wall-clock bound: a hung decoder becomes status=error, the actor goes on."""
        future = self._pool().submit(process_source, item, self.cfg, self.second_opinion)
        try:
            return future.result(timeout=self.cfg.job.source_timeout_s)
        except concurrent.futures.TimeoutError:
            # The stuck thread cannot be killed; abandon it (its decoder has its own timeout) and go on
            # with a fresh worker thread so the next source is not queued behind it.
            self._pool().shutdown(wait=False, cancel_futures=True)
            self._local.pool = None
            return error_result(item, f"timed out after {self.cfg.job.source_timeout_s:g} s (job.source_timeout_s)")

    def _score(self, result: SourceResult) -> None:
        limit = self.cfg.job.source_timeout_s
        try:
            # bounded: a load that never ends (a stuck import or file system) must stop the job with a
            # reason, not leave every source of this actor waiting forever
            scoring = self._scoring.result(timeout=limit)
        except Exception as exc:
            # a model that cannot load is a setup error, not a property of this source: the source is
            # flagged and the driver stops the job with this reason (nothing of this source is staged)
            why = (f"not loaded within {limit:g} s (job.source_timeout_s)"
                   if isinstance(exc, concurrent.futures.TimeoutError) else f"{type(exc).__name__}: {exc}")
            result.clip_frames = []
            result.source_row[CLIP_LOAD_ERROR] = f"open_clip did not load: {why}"[:500]
            return
        scoring.score_or_reject(result)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys, payloads = [], []
        for row in _rows(batch):
            item = item_from_row(row)
            result = None
            try:
                result = self._guarded(item)
                if self._scoring is not None:
                    self._score(result)
            except Exception as exc:  # only bugs get here (curation.errors.is_input_error)
                result = flag_bug(result or error_result(item, f"stage 1 failed: {type(exc).__name__}"),
                                  "stage 1", exc)
            result.source_row[STAGE1_NODE] = self.node_ip
            keys.append(item.key)
            payloads.append(encode_payload(result))
        return {"key": keys, "payload": payloads}


class ScoreClips:
    """Stage 2 (its own actors, on a GPU when there is one): open_clip similarity of each clip's sampled
    frames and its caption."""

    def __init__(self, cfg: CurateConfig):
        self.scoring = ClipScoring(cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys, payloads = [], []
        for row in _rows(batch):
            result = decode_payload(row["payload"])
            try:
                self.scoring.score_or_reject(result)
            except Exception as exc:  # only bugs get here (curation.errors.is_input_error)
                flag_bug(result, "stage 2 (open_clip)", exc)
            keys.append(str(row["key"]))
            payloads.append(encode_payload(result))
        return {"key": keys, "payload": payloads}
