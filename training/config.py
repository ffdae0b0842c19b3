"""The training job's config tree: `TrainConfig` composes every component's sub-config.

    python -m training.train --config configs/train/tiny-base.yaml [key.sub=value ...]

`load_config(path, overrides)` = dataclass defaults, updated by the YAML file, then by the overrides;
unknown keys and badly typed values raise `common.configtree.ConfigError` naming the dotted field.
`validate(cfg)` checks what the schema cannot (combinations: flavour vs stage, widths of tiny encoders
vs the UNet, timestep range vs schedule) without touching the filesystem, so every shipped recipe can be
validated on any machine. `missing_paths(cfg)` lists the local files a run needs that are absent
(OpenCLIP checkpoint, VAE folder, init_from, the evaluation's CLIP, prompts and base export), each with its config key;
`check_paths(cfg)` raises on them before any work. Each component receives only its sub-config.

Every class of the tree lives in a module that imports neither torch nor DeepSpeed (`model.config`,
`training.subconfigs`, `common.tracking_store`), so loading and validating a tree imports no heavy package:
`python -m training.train` reports a bad key or value before it imports them. Only the init_from checks
read `model.convert`'s format constants, imported where they are used (that module imports torch).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common import configtree
from common.configtree import ConfigError
from model.config import FLAVORS, ClipConfig, DiffusionConfig, UNetConfig, VAEConfig, get_flavor
from training.subconfigs import (
    DataConfig,
    DeepSpeedConfig,
    EMAConfig,
    EvaluationConfig,
    ObjectiveConfig,
    SamplingConfig,
    TrainTrackingConfig,
)

Stage = Literal["base", "refine"]


@dataclass
class ModelConfig:
    """The UNet to train and the frozen parts around it."""

    flavor: str | None = None
    """model.config flavour to build with random weights (tiny, tiny-refine, base-448x256, refine-1280x720,
    i2vgen-xl); leave null when init_from is set."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """UNetConfig fields replaced on the flavour / init_from config, e.g. {dropout: 0.0}."""
    init_from: str | None = None
    """Fine-tuning: a UNet folder in model.convert's format (`python -m model.convert --from-diffusers
    DIFFUSERS_UNET --out DIR`); its config.json fixes the architecture."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule, prediction type (v) and offset noise the UNet is trained with (exported as is)."""
    clip: ClipConfig = field(default_factory=lambda: ClipConfig(kind="tiny-random"))
    """OpenCLIP text/image encoder (frozen): a local checkpoint, or tiny-random for CPU demos and tests."""
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(kind="tiny-random"))
    """KL-f8 VAE (frozen): a local diffusers folder, or tiny-random."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (warmup + cosine), plus gradient clipping."""

    lr: float = 1e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 0.0
    """Floor the cosine decays to at max_steps."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""


@dataclass
class CheckpointConfig:
    """When resumable checkpoints are written (always at the end too)."""

    every_steps: int = 1000
    """Write OUTPUT/checkpoints/step-XXXXXXXX every N optimizer steps."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a new one is complete."""


@dataclass
class TrainConfig:
    """Everything `python -m training.train` does; written resolved to OUTPUT/config.yaml."""

    stage: Stage = "base"
    """base: image-conditioned video from noise; refine: text-only SDEdit stage at high resolution."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrainTrackingConfig = field(default_factory=TrainTrackingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    max_steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to it)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (per rank); global batch = data.batch_size x this x world size."""
    activation_checkpointing: bool = False
    """Recompute each UNet block in backward (the UNet's own enable_gradient_checkpointing)."""
    seed: int = 0
    """Seeds the data order, every per-sample draw (noise, t, CFG dropout) and the UNet init."""
    output_dir: str = "runs/train"
    """OUTPUT: config.yaml, metrics.jsonl, checkpoints/, export/, samples/."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: a GPU per process when CUDA is visible, else CPU."""
    log_sample_keys: bool = True
    """Write each step's sample keys (all ranks) into metrics.jsonl: the data order is auditable."""


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from YAML `path` + `a.b=value` overrides (ConfigError / ValueError naming the field)."""
    return configtree.load(TrainConfig, path, overrides)


def unet_config(cfg: TrainConfig) -> UNetConfig:
    """The UNet architecture: the flavour, or init_from's config.json, with model.overrides applied."""
    m = cfg.model
    if m.init_from:
        from model.convert import FORMAT, OUR_CONFIG  # imports torch: only for init_from runs

        meta_path = Path(m.init_from) / OUR_CONFIG
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ConfigError(f"model.init_from: {meta_path} is not in model.convert's format (convert a diffusers "
                              "UNet folder with `python -m model.convert --from-diffusers DIR --out OUT`)")
        base = UNetConfig(**meta["unet"])
    else:
        base = get_flavor(m.flavor)
    try:
        return dataclasses.replace(base, **m.overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no files; ConfigError names the field."""
    m = cfg.model
    if bool(m.flavor) == bool(m.init_from):
        raise ConfigError("model: set exactly one of model.flavor (random init) and model.init_from "
                          f"(fine-tuning); got flavor={m.flavor!r}, init_from={m.init_from!r}")
    if m.flavor and m.flavor not in FLAVORS:
        raise ConfigError(f"model.flavor: {m.flavor!r} is not one of {sorted(FLAVORS)}")
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(m.overrides) - fields)
    if unknown:
        raise ConfigError(f"model.overrides: unknown UNetConfig field(s) {unknown}; valid: {sorted(fields)}")
    for name, value in (("max_steps", cfg.max_steps), ("grad_accum_steps", cfg.grad_accum_steps),
                        ("checkpoint.every_steps", cfg.checkpoint.every_steps),
                        ("checkpoint.keep_last", cfg.checkpoint.keep_last)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    o = cfg.optim
    if o.lr <= 0 or not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.lr must be > 0 and optim.min_lr in [0, lr]; got lr={o.lr}, min_lr={o.min_lr}")
    if not all(0 <= b < 1 for b in o.betas) or o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0:
        raise ConfigError(f"optim: betas in [0, 1), eps > 0, weight_decay >= 0, grad_clip >= 0; got {o}")
    if not 0 <= o.warmup_steps <= cfg.max_steps:
        raise ConfigError(f"optim.warmup_steps must lie in [0, max_steps={cfg.max_steps}], got {o.warmup_steps}")
    if cfg.objective.timestep_range[1] > m.diffusion.num_timesteps:
        raise ConfigError(f"objective.timestep_range {list(cfg.objective.timestep_range)} exceeds "
                          f"model.diffusion.num_timesteps={m.diffusion.num_timesteps}")
    if m.diffusion.prediction not in ("v", "eps"):
        raise ConfigError(f"model.diffusion.prediction: {m.diffusion.prediction!r} is not one of ['eps', 'v']")
    if m.flavor:  # init_from's architecture is only known once its file is read (check_paths)
        check_unet(cfg, unet_config(cfg))
    e = cfg.evaluation
    if cfg.stage != "base" and e.every_steps is not None and not e.base_checkpoint:
        raise ConfigError(f"evaluation.base_checkpoint: a {cfg.stage} stage has no image prompt, so with "
                          "evaluation.every_steps set it is evaluated as the cascade after a base-stage export: "
                          "set evaluation.base_checkpoint to one (e.g. runs/tiny-base/export), or "
                          "evaluation.every_steps=null")
    if cfg.stage == "base" and e.base_checkpoint:
        raise ConfigError(f"evaluation.base_checkpoint: {e.base_checkpoint!r} is for a refine stage run (the "
                          "cascade's base export); a base stage run evaluates its own export: set it to null")


def check_unet(cfg: TrainConfig, ucfg: UNetConfig) -> None:
    """The UNet fits the stage and the tiny-random encoders' widths (ConfigError naming the field)."""
    where = "model.init_from" if cfg.model.init_from else "model.flavor"
    if cfg.stage == "refine" and (ucfg.use_fps or ucfg.use_image_global or ucfg.use_image_local
                                  or ucfg.use_image_concat):
        raise ConfigError(f"{where}: a refine stage UNet has no fps / image paths (use tiny-refine or "
                          "refine-1280x720)")
    if cfg.stage == "refine" and not ucfg.use_text:
        raise ConfigError(f"{where}: the refine stage is text-conditioned (use_text must be true)")
    clip = cfg.model.clip
    if clip.kind == "tiny-random":
        if ucfg.use_text and clip.text_dim != ucfg.cross_attention_dim:
            raise ConfigError(f"model.clip.text_dim={clip.text_dim} must equal the UNet's cross_attention_dim="
                              f"{ucfg.cross_attention_dim}")
        if ucfg.use_image_global and clip.image_dim != ucfg.image_embed_dim:
            raise ConfigError(f"model.clip.image_dim={clip.image_dim} must equal the UNet's image_embed_dim="
                              f"{ucfg.image_embed_dim}")


def missing_paths(cfg: TrainConfig) -> list[tuple[str, str]]:
    """[(config key, path)] of the local model files this run needs that do not exist here."""
    m, missing = cfg.model, []
    if m.clip.kind == "openclip" and not Path(m.clip.checkpoint or "").is_file():
        missing.append(("model.clip.checkpoint", m.clip.checkpoint or "(empty)"))
    if m.vae.kind == "diffusers":
        folder = Path(m.vae.path) if m.vae.path else None
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            if folder is None or not (folder / name).is_file():
                missing.append(("model.vae.path", str(folder / name) if folder else "(empty)"))
    e = cfg.evaluation
    if e.every_steps is not None and e.clip_checkpoint and not Path(e.clip_checkpoint).is_file():
        missing.append(("evaluation.clip_checkpoint", e.clip_checkpoint))
    if e.every_steps is not None and e.images and not Path(e.images).is_dir():
        missing.append(("evaluation.images", e.images))
    if e.every_steps is not None and e.base_checkpoint and not (Path(e.base_checkpoint) / "stage.yaml").is_file():
        missing.append(("evaluation.base_checkpoint", str(Path(e.base_checkpoint) / "stage.yaml")))
    if m.init_from:
        from model.convert import OUR_CONFIG, OUR_WEIGHTS  # imports torch: only for init_from runs

        for name in (OUR_CONFIG, OUR_WEIGHTS):
            if not (Path(m.init_from) / name).is_file():
                missing.append(("model.init_from", str(Path(m.init_from) / name)))
    return missing


def check_paths(cfg: TrainConfig) -> None:
    """FileNotFoundError listing every missing model file with its config key (nothing is downloaded),
    then the init_from architecture checks."""
    missing = missing_paths(cfg)
    if missing:
        lines = "\n".join(f"  {key}: {path}" for key, path in missing)
        raise FileNotFoundError(f"model files not found (point these keys at local files; nothing is "
                                f"downloaded):\n{lines}")
    if cfg.model.init_from:
        check_unet(cfg, unet_config(cfg))


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved tree as YAML (OUTPUT/config.yaml, beside every checkpoint, MLflow artifact)."""
    return configtree.to_yaml(cfg)
