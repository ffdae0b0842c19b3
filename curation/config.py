"""The whole config tree of the curation job (`CurateConfig`), composed of the stage configs.

Load it with `load_config(path, overrides)` (YAML file + `a.b=c` overrides, every key and type checked by
common.configtree); the job writes it back as OUT/config.yaml. Sections:

    decode   curation.decode.DecodeConfig        one decode pass per source (small + work frames)
    shots    curation.shots.ShotConfig           shot detection, clip lengths, trims
    scores   clip / text / motion / quality      per-clip scores
    filter   curation.filters.FilterConfig       thresholds (None = off) and the global near-duplicate pass;
                                                 applied late, after all scores
    encode   curation.encode.EncodeConfig        H.264 clip + JPEG first frame written to the shards
    job      JobConfig                           Ray Data parallelism, per-source limits
    output   OutputConfig                        shard size
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common import configtree
from common.configtree import ConfigError
from curation.clip_score import TINY_MODEL, ClipScoreConfig
from curation.decode import DecodeConfig
from curation.encode import EncodeConfig
from curation.filters import FilterConfig, validate_filter_config
from curation.motion import MotionConfig
from curation.quality import QualityConfig
from curation.shots import ShotConfig
from curation.text_rules import TextRuleConfig

CLIP_PLACEMENTS = ("auto", "actors", "stage1")


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
    the threads share one copy of the models (TransNetV2, and open_clip when it runs in stage 1). 2 cut the
    job's CPU by ~10% on a 2-core machine (one actor start and one model load less) but not its time: the
    threads' Python parts (PySceneDetect's per-frame loop, imports) wait for each other's GIL. Raise it to
    hold fewer copies of a large open_clip model (clip_placement 'stage1'). Capped at what one node's CPUs
    hold."""
    clip_placement: str = "auto"
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
class CurateConfig:
    """Everything the curation job reads; OUT/config.yaml is this tree after overrides."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shots: ShotConfig = field(default_factory=ShotConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    job: JobConfig = field(default_factory=JobConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def validate(cfg: CurateConfig) -> None:
    """Checks that must fail before any work starts (ConfigError names the field and the fix)."""
    clip = cfg.scores.clip
    if clip.model != TINY_MODEL:
        if clip.checkpoint is None:
            raise ConfigError(
                f"scores.clip.checkpoint: open_clip {clip.model} needs local weights; set "
                "scores.clip.checkpoint=/path/to/open_clip_model.safetensors (nothing is downloaded), "
                f"or scores.clip.model={TINY_MODEL} for a test run"
            )
        if not Path(clip.checkpoint).expanduser().is_file():
            raise ConfigError(
                f"scores.clip.checkpoint: file not found: {clip.checkpoint!r} (open_clip {clip.model} weights)"
            )
    if (cfg.job.process_actors is not None and cfg.job.process_actors < 1) or cfg.job.clip_actors < 1:
        raise ConfigError("job.process_actors (or null = fill the cluster) and job.clip_actors must be >= 1")
    if cfg.job.sources_per_actor < 1 or cfg.job.process_cpus <= 0:
        raise ConfigError("job.sources_per_actor must be >= 1 and job.process_cpus > 0")
    if cfg.job.clip_placement not in CLIP_PLACEMENTS:
        raise ConfigError(f"job.clip_placement={cfg.job.clip_placement!r}: valid keys are {list(CLIP_PLACEMENTS)}")
    if cfg.job.clip_cpus is not None and cfg.job.clip_cpus < 0:
        raise ConfigError("job.clip_cpus must be >= 0 (or null = 1 with a GPU, else 0)")
    if cfg.job.clip_sources_per_batch < 1:
        raise ConfigError("job.clip_sources_per_batch must be >= 1")
    if cfg.job.source_timeout_s <= 0:
        raise ConfigError("job.source_timeout_s must be > 0")
    if cfg.output.shard_max_bytes <= 0:
        raise ConfigError("output.shard_max_bytes must be > 0")
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
    return configtree.to_yaml(cfg)
