"""Thin callable classes that Ray Data's `map_batches` instantiates once per actor.

Models load in `__init__` (once per actor); `__call__` maps a batch of rows to a batch of rows. A row
between the stages is one source: `key` (its staging name) and `payload` (a pickled
curation.process.SourceResult). Heavy frame arrays never leave stage 1 except the few sampled frames per
clip that open_clip needs, and stage 2 drops those.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import pickle
import time

import numpy as np

from curation.config import CurateConfig
from curation.inputs import InputItem
from curation.process import CLIP_SIMILARITY, SourceResult, error_result, process_source

log = logging.getLogger(__name__)


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

    The stage-1 pool fills the cluster with one actor per `process_cpus`, so every core is already busy:
    FFmpeg's and x264's automatic thread counts (about 1.5 per core of the machine) only add switching and
    frame-threading overhead there (measured: ~15% more CPU per decode, ~25% more per encode). Explicit
    non-zero settings are kept.
    """
    decode, encode = cfg.decode, cfg.encode
    if decode.decoder_threads == 0:
        decode = dataclasses.replace(decode, decoder_threads=cpus)
    if encode.threads == 0:
        encode = dataclasses.replace(encode, threads=cpus)
    return dataclasses.replace(cfg, decode=decode, encode=encode)


class ProcessSources:
    """Stage 1 (CPU): read -> probe -> decode once -> shots -> clips -> cheap scores -> encode."""

    def __init__(self, cfg: CurateConfig):
        import cv2

        # One actor = job.process_cpus cores: OpenCV's own thread pool would oversubscribe them.
        cpus = max(1, int(cfg.job.process_cpus))
        cv2.setNumThreads(cpus)
        self.cfg = _size_threads(cfg, cpus)
        self.second_opinion = _make_second_opinion(cfg)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def _guarded(self, item: InputItem) -> SourceResult:
        """process_source with a wall-clock bound: a hung decoder becomes status=error, the actor goes on."""
        future = self._pool.submit(process_source, item, self.cfg, self.second_opinion)
        try:
            return future.result(timeout=self.cfg.job.source_timeout_s)
        except concurrent.futures.TimeoutError:
            # The stuck thread cannot be killed; abandon it (its decoder has its own timeout) and go on
            # with a fresh worker thread so the next source is not queued behind it.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            return error_result(item, f"timed out after {self.cfg.job.source_timeout_s:g} s (job.source_timeout_s)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys, payloads = [], []
        for row in _rows(batch):
            item = item_from_row(row)
            result = self._guarded(item)
            keys.append(item.key)
            payloads.append(encode_payload(result))
        return {"key": keys, "payload": payloads}


class ScoreClips:
    """Stage 2 (GPU when available): open_clip similarity of each clip's sampled frames and its caption.

    With random weights (model tiny-random) the scores are recorded but flagged, and the driver does not
    filter on them.
    """

    def __init__(self, cfg: CurateConfig):
        import torch

        # imported here, not at module level: stage-1 actors have no use for open_clip
        from curation.clip_score import ClipScorer, clip_similarity

        self._clip_similarity = clip_similarity
        self.cfg = cfg
        # A model without a checkpoint is randomly initialised: seed it so every actor (and a resumed run)
        # builds the same one and records the same scores. Real weights do not depend on this.
        torch.manual_seed(0)
        self.scorer = ClipScorer(cfg.scores.clip)
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys, payloads = [], []
        for row in _rows(batch):
            result = decode_payload(row["payload"])
            try:
                self.score(result)
            except Exception as exc:  # a scoring failure rejects this source's clips (score_error), nothing more
                result.clip_frames = []
                msg = f"clip scoring failed: {type(exc).__name__}: {exc}"[:500]
                for clip_row in result.clip_rows:
                    clip_row["score_error"] = msg
            keys.append(str(row["key"]))
            payloads.append(encode_payload(result))
        return {"key": keys, "payload": payloads}
