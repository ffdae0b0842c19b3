"""Training data: the shard check and the position-exact loader over ranks x workers (their `data` config,
`DataConfig`, lives in training.subconfigs so that the job validates it before importing torch).

The order of samples is training.data_order's (seeded by seed, kind and epoch; ranks take interleaved
positions of one global stream). A rank's stream is cut into chunks of one micro-batch; worker processes
load chunks (any idle worker takes the next one: results do not depend on which) and return the usable
samples of each chunk plus what they skipped; the loader fills every micro-batch from the chunks in
order, so a skipped sample is replaced by the next one of the rank's stream and batches are always full.
Skips are counted at every visit (a bad sample is counted again in each epoch) and logged. A segfault or
abort inside decord/FFmpeg on a sample kills only the worker process reading it: the pool restarts it and
that sample is skipped as `decoder_crash` (training.loader_workers). With num_workers = 0 chunks load in
the training process, where such a crash ends the run.

Position per kind = (chunk index, usable samples already taken from that chunk); `state_dict` holds it with
the micro-step counter, so a resumed loader (same seed, world size and batch sizes) continues with exactly
the next unseen sample. The kind of micro-step m (image or video) is a seeded function of (seed, m), the
same on every rank. Every random choice of a sample is seeded by (seed, kind, epoch, index).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Literal, Mapping

import numpy as np
import torch

from training.data_order import KINDS, RankStream, micro_step_kind, sample_index
from training.frames import unit_range
from training.loader_workers import WorkerPool
from training.shard_dataset import (
    ChunkResult, DataError, SampleSpec, ShardDataset, describe_items, find_shards,
)
from training.subconfigs import DataConfig

log = logging.getLogger(__name__)

STATE_FORMAT = 1


def check_shards(cfg: DataConfig) -> dict[str, list[str]]:
    """{"video": [...], "image": [...]} shard paths of cfg.shards (find_shards), checking that every kind the
    image:video mix needs has shards. Call before building models; raises DataError naming the paths."""
    shards = find_shards(cfg.shards)
    for kind in KINDS:
        if cfg.needs(kind) and not shards[kind]:
            why = "image_fraction > 0" if kind == "image" else "image_fraction < 1"
            raise DataError(f"data.shards: no {kind}-*.tar shards in {cfg.shards} but data.{why}")
    return shards


@dataclass
class Batch:
    """One micro-step's samples."""

    kind: Literal["video", "image"]
    pixels: torch.Tensor
    """(B, 3, F, H, W) float32 in [-1, 1]; F = 1 for image steps; pixels[:, :, 0] is the conditioning frame."""
    fps: torch.Tensor
    """(B,) int64, the fps condition."""
    captions: list[str]
    """Caption of each sample."""
    sample_ids: torch.Tensor
    """(B,) int64, unique per (kind, epoch, dataset index) (data_order.sample_id); seeds per-sample noise."""
    keys: list[str]
    """WebDataset key of each sample."""


def _load_task(datasets: dict[str, ShardDataset], spec: SampleSpec, payload: tuple[str, list],
               crashed: Mapping[int, str], progress: Callable[[int], None] | None) -> ChunkResult:
    """Load the chunk `payload` = (kind, items): a worker task (see WorkerPool for crashed and progress), and
    what the loader runs itself with num_workers = 0."""
    kind, items = payload
    return datasets[kind].load_chunk(items, spec, crashed, progress)


class TrainLoader:
    """Endless iterator of micro-batches for one rank; see the module docstring for the order."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1):
        if seed < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"TrainLoader needs seed >= 0 and 0 <= rank < world_size, got {seed}, {rank}, {world_size}")
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        shards = check_shards(cfg)
        self._spec = SampleSpec(cfg.num_frames, tuple(cfg.fps_choices), cfg.height, cfg.width, cfg.reader, seed)
        self._kinds = [k for k in KINDS if cfg.needs(k)]
        self._data = {k: ShardDataset(k, shards[k]) for k in self._kinds}
        self._skipped: Counter[str] = Counter()
        for kind, ds in self._data.items():
            for path, problem in ds.unreadable:
                log.warning("rank %d: skipped %s shard %s: unreadable_shard: %s", rank, kind, path, problem)
                self._skipped["unreadable_shard"] += 1
            if len(ds) == 0:
                raise DataError(f"data.shards: the {kind} shards hold no samples: {shards[kind]}")
        self._streams = {
            k: RankStream(k, len(ds), seed=seed, rank=rank, world_size=world_size, batch_size=cfg.kind_batch_size(k))
            for k, ds in self._data.items()
        }
        self._pos = {k: [0, 0] for k in self._kinds}
        self._step = 0
        self._bad: dict[str, set[int]] = {k: set() for k in self._kinds}
        self._results: dict[str, dict[int, ChunkResult]] = {k: {} for k in self._kinds}
        self._requested = {k: 0 for k in self._kinds}
        self._pool: WorkerPool | None = None
        self._started = self._closed = False

    # -- position ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of this rank: micro-step counter, (chunk, taken) per kind, skip counts."""
        positions = {}
        for kind, (chunk, taken) in self._pos.items():
            positions[kind] = {"chunk": chunk, "taken": taken, "epoch": self._streams[kind].chunk_epoch(chunk)}
        return {
            "format": STATE_FORMAT, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "micro_step": self._step, "positions": positions,
            "dataset_sizes": {k: len(ds) for k, ds in self._data.items()},
            "batch_sizes": {k: s.batch_size for k, s in self._streams.items()},
            "skipped": dict(self._skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (this rank's state_dict of an earlier run); call before iterating."""
        if self._started:
            raise RuntimeError("TrainLoader.load_state_dict must come before iterating")
        expected = {k: v for k, v in self.state_dict().items() if k not in ("micro_step", "positions", "skipped")}
        got = {k: state.get(k) for k in expected}
        if got != expected:
            diff = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
            raise DataError(
                f"data position does not fit this run (saved, now): {diff}; an exact resume needs the same seed, "
                "rank, world size, batch sizes and shards (of the kinds image_fraction uses)"
            )
        self._step = int(state["micro_step"])
        for kind, pos in state["positions"].items():
            self._pos[kind] = [int(pos["chunk"]), int(pos["taken"])]
        self._requested = {k: self._pos[k][0] for k in self._kinds}
        self._skipped = Counter(state["skipped"])

    def worker_pids(self) -> list[int]:
        """Process ids of this rank's loader workers (empty before iterating or with num_workers 0)."""
        return self._pool.pids if self._pool is not None else []

    def skipped(self) -> dict[str, int]:
        """Cumulative skipped samples on this rank by reason (unreadable_shard counts shards)."""
        return dict(self._skipped)

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if self._closed or self._started:
            raise RuntimeError("a TrainLoader is iterated once (its iterator is endless); make a new one")
        self._started = True
        if self.cfg.num_workers > 0:
            self._pool = WorkerPool(
                self.cfg.num_workers, partial(_load_task, self._data, self._spec),
                timeout_s=self.cfg.timeout_s, describe=self._describe,
            )
            for kind in self._kinds:
                self._fill(kind, self._pos[kind][0])
        return self._batches()

    def _batches(self) -> Iterator[Batch]:
        while True:
            kind = micro_step_kind(self.seed, self._step, self.cfg.image_fraction)
            batch = self._next_batch(kind)
            self._step += 1
            yield batch

    def _describe(self, task: tuple[str, int]) -> str:
        kind, chunk = task
        items = self._streams[kind].chunk(chunk)
        return f"rank {self.rank} {kind} chunk {chunk} {describe_items(self._data[kind], items)}"

    def _fill(self, kind: str, first: int) -> None:
        """Keep chunks first .. first + window - 1 of `kind` requested from the workers."""
        window = self.cfg.prefetch * self.cfg.num_workers
        nxt = max(self._requested[kind], first)
        while nxt < first + window:
            self._pool.submit((kind, nxt), (kind, self._streams[kind].chunk(nxt)))
            nxt += 1
        self._requested[kind] = nxt

    def _chunk(self, kind: str, c: int) -> ChunkResult:
        """Chunk c's result, kept until the loader moves past it."""
        results = self._results[kind]
        if self._pool is None:
            if c not in results:
                results[c] = _load_task(self._data, self._spec, (kind, self._streams[kind].chunk(c)), {}, None)
            return results[c]
        self._fill(kind, c)
        while c not in results:
            (k, cc), result = self._pool.next_result()
            self._results[k][cc] = result
        return results[c]

    def _record(self, kind: str, c: int, result: ChunkResult) -> None:
        """Log and count what chunk c skipped (once per chunk); stop when every sample proved unusable."""
        for key, shard, reason, detail, skipped in result.events:
            if skipped:
                self._skipped[reason] += 1
                log.warning("rank %d: skipped %s sample %s (%s): %s: %s", self.rank, kind, key, shard, reason, detail)
            else:
                log.info("rank %d: %s sample %s (%s): %s", self.rank, kind, key, shard, detail)
        good = {sample_index(sid) for sid in result.sample_ids}
        bad = self._bad[kind]
        bad.update(i for _, i in self._streams[kind].chunk(c) if i not in good)
        if len(bad) >= len(self._data[kind]):
            raise DataError(
                f"no usable {kind} sample: all {len(bad)} in {self._data[kind].shard_paths} were skipped "
                f"(rank {self.rank} skips so far: {dict(self._skipped)})"
            )

    def _next_batch(self, kind: str) -> Batch:
        size = self._streams[kind].batch_size
        chunk, taken = self._pos[kind]
        parts: list[tuple[ChunkResult, int, int]] = []
        got = 0
        while got < size:
            result = self._chunk(kind, chunk)
            if taken == 0:
                self._record(kind, chunk, result)
            n = min(size - got, len(result) - taken)
            if n > 0:
                parts.append((result, taken, taken + n))
                got, taken = got + n, taken + n
            if taken >= len(result):
                self._results[kind].pop(chunk, None)
                chunk, taken = chunk + 1, 0
        self._pos[kind] = [chunk, taken]
        if self._pool is not None:
            self._fill(kind, chunk)
        pixels = [r.pixels[a:b] for r, a, b in parts]  # uint8 from the workers; float32 from here on
        return Batch(
            kind=kind,
            pixels=unit_range(torch.from_numpy(pixels[0] if len(pixels) == 1 else np.concatenate(pixels))),
            fps=torch.tensor([f for r, a, b in parts for f in r.fps[a:b]], dtype=torch.int64),
            captions=[c for r, a, b in parts for c in r.captions[a:b]],
            sample_ids=torch.tensor([s for r, a, b in parts for s in r.sample_ids[a:b]], dtype=torch.int64),
            keys=[k for r, a, b in parts for k in r.keys[a:b]],
        )

    def close(self) -> None:
        """Stop the workers and close the shard files."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for ds in self._data.values():
            ds.close()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# fixed draws of validation items: lowest fitting fps, start at frame 0, centre crop
VALIDATION_UNIFORMS = np.array([0.0, 0.0, 0.5, 0.5])


def validation_items(cfg: DataConfig, n: int) -> list[dict[str, Any]]:
    """The first n usable video samples in sorted key order, the same in every run:
    {"key", "caption", "fps", "video" (3, F, H, W), "image" (3, H, W) = video[:, 0]} in [-1, 1].

    Fixed choices instead of the training draws: the lowest fitting fps of fps_choices, the clip's first
    frame as start, centre crop. Loaded like training chunks (in a worker process when cfg.num_workers >= 1,
    so a decoder crash skips the clip). Fewer than n items when fewer usable clips exist; none is a
    DataError."""
    shards = find_shards(cfg.shards)["video"]
    ds = ShardDataset("video", shards)
    spec = SampleSpec(cfg.num_frames, tuple(cfg.fps_choices), cfg.height, cfg.width, cfg.reader, 0)
    order = [(0, i) for i in sorted(range(len(ds)), key=ds.key)]
    chunks = [order[c : c + max(n, 1)] for c in range(0, len(order), max(n, 1))]
    pool = None
    if cfg.num_workers > 0 and n > 0 and chunks:
        pool = WorkerPool(1, partial(_load_validation, ds, spec), timeout_s=cfg.timeout_s,
                          describe=lambda c: f"validation clips {describe_items(ds, chunks[c])}")
    items: list[dict[str, Any]] = []
    try:
        for c, chunk in enumerate(chunks):
            if len(items) >= n:
                break
            if pool is None:
                result = _load_validation(ds, spec, chunk, {}, None)
            else:
                pool.submit(c, chunk)
                result = pool.next_result()[1]
            for key, shard, reason, detail, skipped in result.events:
                if skipped:
                    log.warning("validation item %s (%s) skipped: %s: %s", key, shard, reason, detail)
            for j, key in enumerate(result.keys[: n - len(items)]):
                video = unit_range(torch.from_numpy(result.pixels[j]))
                items.append({"key": key, "caption": result.captions[j], "fps": result.fps[j], "video": video,
                              "image": video[:, 0]})
    finally:
        if pool is not None:
            pool.close()
        ds.close()
    if not items and n > 0:
        raise DataError(f"no usable video sample for validation in {shards or cfg.shards}")
    return items


def _load_validation(ds: ShardDataset, spec: SampleSpec, items: list[tuple[int, int]],
                     crashed: Mapping[int, str], progress: Callable[[int], None] | None) -> ChunkResult:
    """A worker task: validation clips `items` with the fixed draws."""
    return ds.load_chunk(items, spec, crashed, progress, uniforms=VALIDATION_UNIFORMS)
