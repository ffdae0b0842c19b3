"""The whole config tree of the curation job (`CurateConfig`), composed of the stage configs.

Load it with `load_config(path, overrides)` (YAML file + `a.b=c` overrides, every key and type checked by
common.configtree); the job writes it back as OUT/config.yaml. Sections:

    decode   curation.decode_types.DecodeConfig  one decode pass per source (small + work frames)
    shots    curation.shots.ShotConfig           shot detection, clip lengths, trims
    scores   clip / text / motion / quality      per-clip scores
    filter   curation.filters.FilterConfig       thresholds (None = off) and the global near-duplicate pass;
                                                 applied late, after all scores
    encode   curation.encode.EncodeConfig        H.264 clip + JPEG first frame written to the shards
    job      JobConfig                           Ray Data parallelism, per-source limits
    output   OutputConfig                        shard size
    tracking CurationTrackingConfig              MLflow run of the job (off by default; pipeline.tracking)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common import configtree
from common.configtree import ConfigError
from common.tracking_store import TrackingConfig
from curation.clip_score import TINY_MODEL, ClipScoreConfig, validate_clip_config
from curation.decode_types import DecodeConfig
from curation.encode import EncodeConfig
from curation.filters import FilterConfig, validate_filter_config
from curation.motion import MotionConfig
from curation.quality import QualityConfig
from curation.shots import ShotConfig
from curation.text_rules import TextRuleConfig

ClipPlacement = Literal["auto", "actors", "stage1"]
"""Where open_clip scores the clips (job.clip_placement)."""


@dataclass
class ScoresConfig:
    """Per-clip score settings (`scores.*`)."""

    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    text: TextRuleConfig = field(default_factory=TextRuleConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


@dataclass
class JobConfig:
    """How the Ray job runs (`job.*`). Scales with the cluster: raise the actor counts, nothing else."""

    process_actors: int | None = None
    """CPU actors that read, probe, decode, split, score and encode sources (stage 1); None = as many as
    the cluster's CPUs hold (CPUs left after the open_clip actors' reservation, / process_cpus)."""
    process_cpus: float = 1.0
    """CPUs per source in flight in stage 1 (a stage-1 actor reserves this times sources_per_actor)."""
    sources_per_actor: int = 1
    """Sources one stage-1 actor works on at once, each in its own thread with its own decoder process;
    the threads share one copy of the models (TransNetV2, and open_clip when it runs in stage 1). More than 1
    saves CPU (one actor start and one model load less) but not time: the threads' Python parts wait for
    each other's GIL (README, Speed). Raise it to
    hold fewer copies of a large open_clip model (clip_placement 'stage1'). Capped at what one node's CPUs
    hold."""
    clip_placement: ClipPlacement = "auto"
    """Where open_clip scores the clips: 'actors' (stage 2, its own clip_actors, on a GPU when there is
    one), 'stage1' (inside every stage-1 actor, on its CPUs: no extra process, and the scoring spreads
    over all cores) or 'auto' = 'actors' when the cluster has a GPU, else 'stage1'. With a large model on a
    CPU-only cluster, 'stage1' holds one copy of it per stage-1 actor (ViT-H-14: ~4 GB each)."""
    clip_actors: int = 1
    """Actors running open_clip (stage 2, clip_placement 'actors')."""
    clip_num_gpus: float | None = None
    """GPUs per open_clip actor; None = 1 when the cluster has a GPU, else 0 (CPU)."""
    clip_cpus: float | None = None
    """CPUs reserved per open_clip actor; None = 1 when it runs on a GPU, else 0: on a CPU-only cluster it
    shares the stage-1 actors' CPUs (a reservation would idle a whole stage-1 actor for a model that is
    busy a few percent of the time)."""
    clip_sources_per_batch: int = 4
    """Sources whose sampled frames go through open_clip together."""
    clip_frame_side: int = 224
    """Frames sent to open_clip are shrunk to this shortest side first (less data between actors)."""
    source_timeout_s: float = 900.0
    """Wall-clock limit for one source in stage 1 (a hung decoder becomes status=error, the job goes on)."""
    max_source_bytes: int = 4 * 1024**3
    """Larger inputs are rejected unread (status=error)."""
    object_store_memory_mb: int | None = None
    """Object store size when the job starts its own local Ray (None = Ray's default)."""


@dataclass
class OutputConfig:
    """What is written under OUT (`output.*`)."""

    shard_max_bytes: int = 512 * 1024**2
    """Upper bound of one WebDataset tar (a single larger sample gets a shard of its own)."""
    keep_staging: bool = True
    """Keep OUT/staging (the resume checkpoint) after the job; False deletes it at the end."""


@dataclass
class CurationTrackingConfig(TrackingConfig):
    """MLflow tracking of a curation job (`tracking.*`): off unless enabled. A tracked job is one MLflow run
    in the experiment "i2vgen-xl-curation" (`tracking.experiment`): the resolved config as params, the
    funnel, reject reasons and times of OUT/stats.json as metrics, and report.html, stats.json and
    config.yaml as artifacts (pipeline.tracking). An unusable store stops the job before any work."""

    enabled: bool = False
    """Track this job in MLflow (store: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else
    sqlite:///<repo root>/mlflow.db, the store the training runs use by default)."""
    system_metrics: bool = False
    """Log the driver machine's CPU, memory, disk, network utilisation while the job runs."""


@dataclass
class CurateConfig:
    """Everything the curation job reads; OUT/config.yaml is this tree after overrides."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shots: ShotConfig = field(default_factory=ShotConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    job: JobConfig = field(default_factory=JobConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: CurationTrackingConfig = field(default_factory=CurationTrackingConfig)


# Numeric settings of the sections this module composes and the values that make sense for any input
# (decode.* and shots.* are checked by their own modules). A None value means "automatic" and is skipped.
AT_LEAST: dict[str, float] = {
    "scores.motion.max_pairs": 1, "scores.motion.width": 8, "scores.motion.pyr_levels": 1,
    "scores.motion.win_size": 3, "scores.motion.seed_min_response": 0,
    "scores.quality.frames_per_clip": 1, "scores.quality.analysis_width": 8, "scores.quality.blank_std": 0,
    "scores.text.min_words": 0, "scores.text.max_repeat_run": 2,
    "encode.max_side": 2, "encode.crf": 0, "encode.jpeg_quality": 1, "encode.threads": 0,
    "job.process_actors": 1, "job.sources_per_actor": 1, "job.clip_actors": 1, "job.clip_num_gpus": 0,
    "job.clip_cpus": 0, "job.clip_sources_per_batch": 1, "job.clip_frame_side": 1, "job.max_source_bytes": 1,
    "job.object_store_memory_mb": 1, "output.shard_max_bytes": 1,
}
AT_MOST: dict[str, float] = {
    "scores.motion.seed_min_response": 1, "scores.text.max_repeat_fraction": 1, "encode.crf": 51,
    "encode.jpeg_quality": 100,
}
ABOVE_ZERO = ("scores.text.max_repeat_fraction", "encode.max_fps", "encode.keyframe_interval_s", "job.process_cpus",
              "job.source_timeout_s")


def _get(cfg: CurateConfig, dotted: str):
    return functools.reduce(getattr, dotted.split("."), cfg)


def check_ranges(cfg: CurateConfig) -> None:
    """ConfigError naming the first numeric setting outside AT_LEAST / AT_MOST / ABOVE_ZERO."""
    for name, low in AT_LEAST.items():
        if (v := _get(cfg, name)) is not None and v < low:
            raise ConfigError(f"{name} must be >= {low:g}, got {v!r}")
    for name, high in AT_MOST.items():
        if (v := _get(cfg, name)) is not None and v > high:
            raise ConfigError(f"{name} must be <= {high:g}, got {v!r}")
    for name in ABOVE_ZERO:
        if (v := _get(cfg, name)) is not None and v <= 0:
            raise ConfigError(f"{name} must be > 0, got {v!r}")


def validate(cfg: CurateConfig) -> None:
    """Checks that must fail before any work starts (ConfigError names the field and the fix).

    Choice fields are `Literal`s, checked while loading (common.configtree). What depends on the cluster
    (scores.clip.device=cuda needs a GPU for open_clip) is checked by pipeline.cluster before any work.
    """
    clip = cfg.scores.clip
    validate_clip_config(clip)
    head = cfg.scores.quality.aesthetic_head
    if head is not None and not Path(head).expanduser().is_file():
        raise ConfigError(f"scores.quality.aesthetic_head: file not found: {head!r} (a local aesthetic head)")
    check_ranges(cfg)
    text = cfg.scores.text
    if text.max_words < text.min_words:
        raise ConfigError(f"scores.text.max_words ({text.max_words}) is below scores.text.min_words ({text.min_words})")
    for i, pattern in enumerate(text.boilerplate):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"scores.text.boilerplate[{i}]: {pattern!r} is not a regular expression: {exc}") from None
    if cfg.decode.work_max_side < cfg.encode.max_side:
        raise ConfigError(
            f"decode.work_max_side={cfg.decode.work_max_side} is below encode.max_side={cfg.encode.max_side}: "
            "the shards would hold smaller clips than asked for; set decode.work_max_side to encode.max_side"
        )
    validate_filter_config(
        cfg.filter,
        clip_random_weights=clip.model == TINY_MODEL and clip.checkpoint is None,
        has_aesthetic=bool(cfg.scores.quality.aesthetic_head),
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CurateConfig:
    """Defaults <- YAML file `path` <- `a.b=c` overrides, validated."""
    cfg = configtree.load(CurateConfig, path, overrides)
    validate(cfg)
    return cfg


def to_yaml(cfg: CurateConfig) -> str:
    """The resolved tree as YAML (written as OUT/config.yaml)."""
    return configtree.to_yaml(cfg)
