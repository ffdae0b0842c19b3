"""Generation checkpoints and validation videos of a training run.

`export_stage` writes OUTPUT/export/ in model/'s checkpoint format (stage.yaml + unet/ safetensors, via
`model.generate.save_stage`), so `python -m model.generate --base OUTPUT/export` loads it unchanged.
`render_samples` loads that export with `model.generate.load_pipeline` (so every render also proves the
export loads) and writes one mp4 (+ PNG frames beside it) per validation item:

    base    conditioning image + caption -> video at the stage size, num_frames, fps of stage.yaml
    refine  the validation clip downscaled by 2 (bilinear, antialiased), refined back to the stage size
            (SDEdit from stage.yaml's t_start), i.e. the job the refiner does after the base stage

Samples use the sampler of stage.yaml (its steps/guidance come from `SamplingConfig`), so the videos
logged to MLflow are what `python -m model.generate` gives with the same seed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from common.configtree import ConfigError
from model.cascade import (
    BaseStage,
    Progress,
    RefineStage,
    StageConfig,
    base_stage_defaults,
    refine_stage_defaults,
    resize_center_crop,
)
from model.config import UNetConfig
from model.diffusion import DiffusionConfig
from model.encoders import ClipConfig
from model.generate import load_image, load_pipeline, save_stage, to_uint8_frames, write_video
from model.unet import I2VGenUNet
from model.vae import VAEConfig
from training.data import DataConfig, validation_items
from training.subconfigs import SamplingConfig

Stage = Literal["base", "refine"]


# --------------------------------------------------------------------------------------------- export
def stage_config(stage: Stage, *, diffusion: DiffusionConfig, clip: ClipConfig, vae: VAEConfig, width: int,
                 height: int, num_frames: int, fps: int, sampling: SamplingConfig, t_start: int = 599,
                 negative_prompt: str = "") -> StageConfig:
    """The stage.yaml of an export, filled from the training config: the stage's release sampler with
    steps/guidance from `sampling`, and the schedule, encoders, size and frames the UNet trained with."""
    defaults = base_stage_defaults() if stage == "base" else refine_stage_defaults()
    over = {k: v for k, v in (("steps", sampling.steps), ("guidance", sampling.guidance)) if v is not None}
    return StageConfig(stage=stage, diffusion=dataclasses.replace(diffusion),
                       sampler=dataclasses.replace(defaults.sampler, **over), clip=dataclasses.replace(clip),
                       vae=dataclasses.replace(vae), width=width, height=height, num_frames=num_frames, fps=fps,
                       negative_prompt=negative_prompt, t_start=t_start)


def export_stage(folder: str | Path, unet_cfg: UNetConfig, state_dict: dict[str, torch.Tensor],
                 stage_cfg: StageConfig) -> Path:
    """Write `folder` (stage.yaml + unet/) from a full UNet state dict (e.g. the gathered EMA weights).

    Every key of the UNet must be present (strict load). The new export is written beside the old one and
    swapped in by renames, so a crash mid-write leaves the previous export (or export.old) intact. Whether
    the UNet fits the stage and encoders is training.config.check_unet's job before training starts, and
    load_pipeline's at every render.
    """
    folder = Path(folder)
    with torch.device("meta"):
        unet = I2VGenUNet(unet_cfg)
    unet.load_state_dict({k: v.detach() for k, v in state_dict.items()}, strict=True, assign=True)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_stage(tmp, unet, stage_cfg)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- items
def image_items(cfg: SamplingConfig, height: int, width: int) -> list[dict[str, Any]]:
    """Items {"key", "image" (3, H, W) in [-1, 1], "caption"} from `cfg.images` (base stage samples)."""
    items = []
    for i, path in enumerate(cfg.images):
        image = resize_center_crop(load_image(path), height, width)[0]
        caption = cfg.captions[i] if i < len(cfg.captions) else ""
        items.append({"key": Path(path).stem, "image": image, "caption": caption})
    return items


def sampling_items(cfg: SamplingConfig, stage: Stage, data_cfg: DataConfig) -> list[dict[str, Any]]:
    """The fixed inputs of the samples: `cfg.images` (base only), else the first `num_samples` validation
    clips of the training data (`training.data.validation_items`). Build them once at the start of a run
    (a bad setting fails there) and hand the same items to every render_samples call."""
    if cfg.images:
        if stage != "base":
            raise ConfigError("sampling.images applies to the base stage; the refine stage samples validation clips")
        return image_items(cfg, data_cfg.height, data_cfg.width)
    return validation_items(data_cfg, cfg.num_samples)


# --------------------------------------------------------------------------------------------- render
def render_samples(export_folder: str | Path, items: list[dict[str, Any]], out_dir: str | Path, *, seed: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   progress: Progress | None = None, pipe: BaseStage | RefineStage | None = None) -> list[Path]:
    """Load the export with model.generate.load_pipeline (or use `pipe`, this export already loaded) and
    write OUT_DIR/NN-KEY.mp4 (+ _frames/) per item.

    Base items need "image" (3, H, W) and "caption"; refine items "video" (3, F, H, W) and "caption", all in
    [-1, 1]. Sample i uses seed + i. Returns the mp4 paths in item order. `progress(1)` after every
    denoising step (a progress bar's update).
    """
    device = torch.device(device)
    pipe = pipe if pipe is not None else load_pipeline(export_folder, device, dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(items):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        prompts = [str(item.get("caption", ""))]
        if isinstance(pipe, BaseStage):
            latents = pipe.sample(item["image"][None].to(device), prompts, generator=generator, progress=progress)
            video = pipe.vae.decode(latents)
        else:
            video = refine_from_half(pipe, item["video"].to(device), prompts, generator, progress)
        out, _ = write_video(to_uint8_frames(video[0]), out_dir / f"{i:02d}-{file_key(item['key'])}.mp4", pipe.cfg.fps)
        paths.append(out)
    return paths


def refine_from_half(pipe: RefineStage, video: torch.Tensor, prompts: list[str],
                     generator: torch.Generator, progress: Progress | None = None) -> torch.Tensor:
    """(3, F, H, W) clip -> half-size clip -> refined (1, 3, F, stage H, stage W)."""
    frames = video.permute(1, 0, 2, 3).float()  # (F, 3, H, W)
    h, w = frames.shape[-2:]
    half = F.interpolate(frames, size=(max(8, h // 2), max(8, w // 2)), mode="bilinear", align_corners=False,
                         antialias=True)
    return pipe.refine(half.permute(1, 0, 2, 3)[None], prompts, generator=generator, progress=progress)


def file_key(key: Any) -> str:
    """`key` as a safe file name part (other characters become _; at most 80 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key))[:80] or "item"
