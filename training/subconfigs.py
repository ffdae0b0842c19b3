"""The sub-configs of the training job's components, in one module that imports neither torch nor DeepSpeed.

`training.config.TrainConfig` composes them (with the model's configs from `model.config`, and
`common.tracking_store.TrackingConfig`) into the job's config tree. Because none of these modules imports
torch, DeepSpeed, open_clip or a video decoder, `python -m training.train` loads and validates the whole
tree, and reports a bad key or value naming the field, before any of them is imported (seconds of start-up
on a busy machine). Each component module imports its own class from here and receives only it:

    data        DataConfig       training.data (shards, frame sampling, loader)
    objective   ObjectiveConfig  training.objective (timestep range, CFG dropout)
    ema         EMAConfig        training.ema
    deepspeed   DeepSpeedConfig  training.engine (ZeRO stage, offload, precision)
    sampling    SamplingConfig   training.samples (validation videos, export defaults)
    evaluation  EvaluationConfig training.evaluate (scores of generated videos)
    tracking    TrainTrackingConfig training.tracking (MLflow; the shared keys plus the trainer's log_every)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.configtree import ConfigError, check_fields
from common.tracking_store import TrackingConfig


@dataclass
class DataConfig:
    """Training data (`data`): which shards, how samples become pixels, and how they are loaded."""

    shards: list[str] = field(default_factory=lambda: ["out/curate-sample"])
    """Curation output folders (their shards/video-*.tar and shards/image-*.tar), folders holding such
    shards, .tar files, or globs of them; relative paths are relative to the working directory."""
    num_frames: int = 4
    """F, the frames of a video sample."""
    fps_choices: list[int] = field(default_factory=lambda: [8])
    """fps condition values: per sample one is chosen (seeded) among those the clip can give (<= its own
    fps, and F frames fit at that rate); if none is <= its fps, its own fps rounded."""
    height: int = 64
    """Sample height in pixels (the stage resolution; a multiple of 8)."""
    width: int = 64
    """Sample width in pixels (a multiple of 8)."""
    batch_size: int = 1
    """Per-rank micro-batch of video steps."""
    image_batch_size: int | None = None
    """Per-rank micro-batch of image steps (None = batch_size)."""
    image_fraction: float = 0.0
    """Probability that a micro-step is an image step (joint training: images are 1-frame videos)."""
    reader: Literal["decord", "pyav"] = "decord"
    """Frame reader: decord from memory with random access, or PyAV (random access from the clip's packet
    index, skipping the unreferenced pictures it does not need; also decord's automatic fallback). Both
    give the same frames."""
    num_workers: int = 2
    """Loader worker processes per rank (0 = load in the training process). Crash isolation needs >= 1: a
    segfault or abort inside decord/FFmpeg on a sample kills only its worker, and the sample is skipped as
    `decoder_crash`; with 0 it kills the training process."""
    prefetch: int = 2
    """Micro-batches prefetched per worker and kind."""
    timeout_s: float = 120.0
    """Waiting this long for any worker result is an error naming the shards being read."""

    def __post_init__(self) -> None:
        checks = [
            (len(self.shards) > 0, "shards", "must list at least one folder, .tar file or glob"),
            (self.num_frames >= 1, "num_frames", "must be >= 1"),
            (len(self.fps_choices) > 0 and all(f >= 1 for f in self.fps_choices), "fps_choices",
             "must be a non-empty list of fps >= 1"),
            (self.height >= 8 and self.height % 8 == 0, "height", "must be a positive multiple of 8"),
            (self.width >= 8 and self.width % 8 == 0, "width", "must be a positive multiple of 8"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.image_batch_size is None or self.image_batch_size >= 1, "image_batch_size",
             "must be >= 1 or null"),
            (0.0 <= self.image_fraction <= 1.0, "image_fraction", "must lie in [0, 1]"),
            (self.num_workers >= 0, "num_workers", "must be >= 0"),
            (self.prefetch >= 1, "prefetch", "must be >= 1"),
            (self.timeout_s > 0, "timeout_s", "must be > 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} {why}")

    def kind_batch_size(self, kind: str) -> int:
        """Micro-batch size of `kind` steps."""
        return (self.image_batch_size or self.batch_size) if kind == "image" else self.batch_size

    def needs(self, kind: str) -> bool:
        """Whether `kind` steps can happen under image_fraction."""
        return self.image_fraction > 0 if kind == "image" else self.image_fraction < 1


@dataclass
class ObjectiveConfig:
    """What the UNet is trained on besides the data: timestep range and CFG dropout."""

    timestep_range: tuple[int, int] = (0, 1000)
    """Timesteps t are drawn uniformly from [lo, hi): base [0, 1000), refine [0, 600) (why: see
    training.objective's module docstring)."""
    p_text: float = 0.1
    """Probability that a sample's caption is replaced by the empty prompt (CFG on text)."""
    p_image: float = 0.05
    """Probability that a sample's global CLIP image embedding is zeroed (base stage only)."""
    p_both: float = 0.05
    """Probability that both are dropped (the fully unconditional branch of CFG)."""

    def __post_init__(self) -> None:
        for name in ("p_text", "p_image", "p_both"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"objective.{name} must lie in [0, 1], got {p}")
        if self.p_text + self.p_image + self.p_both > 1.0 + 1e-9:
            raise ValueError("objective.p_text + p_image + p_both must be <= 1 (the events exclude each other)")
        lo, hi = (int(v) for v in self.timestep_range)
        if not 0 <= lo < hi:
            raise ValueError(f"objective.timestep_range must satisfy 0 <= lo < hi, got {self.timestep_range}")
        self.timestep_range = (lo, hi)


@dataclass
class EMAConfig:
    """EMA of the trained weights; the export and the validation samples use it when enabled."""

    enabled: bool = True
    """Keep an EMA; when off, exports hold the raw trained weights."""
    decay: float = 0.9999
    """Weight of the old shadow per update, in [0, 1)."""
    start_step: int = 0
    """Optimizer step from which the EMA averages; before it the shadow copies the weights."""
    every: int = 1
    """Update every N optimizer steps (cheaper on huge models; the decay applies per update)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1), got {self.decay}")
        if self.start_step < 0:
            raise ValueError(f"ema.start_step must be >= 0, got {self.start_step}")
        if self.every < 1:
            raise ValueError(f"ema.every must be >= 1, got {self.every}")


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed shards and runs the UNet."""

    zero_stage: Literal[2, 3] = 2
    """ZeRO stage: 2 shards optimizer state + gradients; 3 also shards the parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) in CPU memory (ZeRO-Offload); for GPUs short of memory."""
    offload_param: bool = False
    """ZeRO-3 only: keep parameter partitions in CPU memory between uses."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision: auto = bf16 on a GPU that supports it, fp32 otherwise (CPU)."""
    param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters of at most this many elements stay gathered on every rank (fewer collectives;
    DeepSpeed's default). 0 shards every parameter (what a tiny model needs to show ZeRO-3's memory split)."""
    max_reuse_distance: int = 1_000_000_000
    """ZeRO-3: keep a gathered parameter if it is used again within this many parameter elements
    (DeepSpeed's default). Its bookkeeping walks the whole module trace once per submodule on the second
    step (seconds on a model of ~1500 tensors); 0 releases every parameter right after use."""

    def __post_init__(self) -> None:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        if self.param_persistence_threshold < 0 or self.max_reuse_distance < 0:
            raise ValueError("deepspeed.param_persistence_threshold and deepspeed.max_reuse_distance must be >= 0")


@dataclass
class SamplingConfig:
    """Validation videos rendered from the exported checkpoint during and at the end of training."""

    every_steps: int = 0
    """Export + render samples every N optimizer steps (0: only at the end of training)."""
    num_samples: int = 2
    """Validation items rendered each time (the first ones of `training.data.validation_items`)."""
    steps: int | None = None
    """DDIM steps of the samples, also written as the export's default; None: the stage's release default
    (base 50, refine 30)."""
    guidance: float | None = None
    """Classifier-free guidance scale of the samples and the export; None: release default (9 / 7.5)."""
    seed: int = 0
    """Seed of sample i is seed + i: the same noise at every step of the run and across runs."""
    images: list[str] = field(default_factory=list)
    """Base stage only: conditioning image files to sample from instead of the validation clips."""
    captions: list[str] = field(default_factory=list)
    """Captions of `images`, by position (missing ones: empty prompt)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.num_samples < 1:
            raise ConfigError(f"sampling.every_steps={self.every_steps} must be >= 0 and "
                              f"sampling.num_samples={self.num_samples} >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"sampling.steps={self.steps}: must be >= 1 (or null for the stage default)")
        if self.guidance is not None and self.guidance < 1.0:
            raise ConfigError(f"sampling.guidance={self.guidance}: must be >= 1 (1 = no guidance)")
        if len(self.captions) > len(self.images):
            raise ConfigError(f"sampling.captions has {len(self.captions)} entries for {len(self.images)} images")


@dataclass
class EvaluationConfig:
    """Evaluation of an exported stage (`training.evaluate`): generate from held-out image (+caption) prompts
    and score fidelity to the image, text alignment, frame consistency and motion; a refine stage is scored
    as the cascade after a base-stage export (`base_checkpoint`). The same config drives
    `python -m training.evaluate` (its flags) and the evaluations of a training run."""

    every_steps: int | None = None
    """Training: null = never; 0 = once, at the end of training; N = every N optimizer steps and at the end
    (each evaluation comes with an export, like the samples). A refine run also needs `base_checkpoint`."""
    base_checkpoint: str | None = None
    """Refine runs only: the base-stage export (folder with stage.yaml + unet/, e.g. runs/tiny-base/export)
    whose videos the refine export refines when it is evaluated (the cascade, as `python -m training.evaluate
    --checkpoint REFINE --base BASE`). Required when a refine run has evaluation on; must exist before the
    run starts. null for a base run."""
    images: str | None = None
    """Folder of held-out prompts: NAME.jpg / NAME.jpeg / NAME.png, each with an optional caption NAME.txt;
    null: the bundled image-text pair(s) in tests/assets/sample."""
    clip_model: str = "ViT-H-14"
    """open_clip architecture of `clip_checkpoint` (I2VGen-XL's own CLIP is ViT-H-14)."""
    clip_checkpoint: str | None = None
    """Local open_clip weights of the scoring CLIP. null: the stage's own CLIP when it is a local open_clip
    checkpoint (stage.yaml clip.kind=openclip), else the tiny random CLIP built in code, and every output
    (eval.json, the log, the MLflow tag eval.clip) says that the scores are not meaningful."""
    seed: int = 0
    """Prompt i is generated with seed + i (the same noise at every evaluation of a run)."""

    def __post_init__(self) -> None:
        check_fields(self, ("every_steps", self.every_steps is None or self.every_steps >= 0,
                            "must be null (off), 0 (at the end of training) or >= 1"),
                     ("clip_model", bool(self.clip_model.strip()), "must name an open_clip architecture (ViT-H-14)"))


@dataclass
class TrainTrackingConfig(TrackingConfig):
    """MLflow tracking of a training run (`tracking.*`): the keys every job shares (common.tracking_store)
    and the trainer's own logging interval."""

    log_every: int = 1
    """Log the trainer's metrics every N optimizer steps (the last step is always logged, by end())."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.log_every < 1:
            raise ConfigError(f"tracking.log_every={self.log_every}: must be >= 1")
