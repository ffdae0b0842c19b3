"""Image -> video with the I2VGen-XL cascade: `python -m model.generate --image IMG --out OUT.mp4 --base CKPT`.

Checkpoint layout (one folder per stage):

    CKPT/
      stage.yaml                         model.cascade.StageConfig: stage (base|refine), diffusion schedule,
                                         sampler defaults, clip + vae (local paths or tiny-random), size,
                                         frames, fps, negative prompt, SDEdit t_start
      unet/config.json + model.safetensors   UNet in model.convert's format (save_checkpoint), or a
                                         diffusers I2VGenXLUNet folder (config.json + safetensors), e.g.
                                         the released I2VGen-XL `unet/` (safetensors only; nothing unpickled)

`python -m model.generate --write-tiny-checkpoints DIR` writes DIR/base and DIR/refine with tiny random
UNets and tiny-random encoders/VAE (a CPU demo in seconds). A real checkpoint names the OpenCLIP file
(clip.checkpoint) and the SD 2.1 VAE folder (vae.path) in stage.yaml; missing files raise
FileNotFoundError naming the file and the key.

Outputs: OUT.mp4 (PyAV libx264, yuv420p, --fps) and OUT_frames/frame_0000.png ... beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from common.configtree import ConfigError, from_dict, to_yaml
from common.dtypes import ALIASES, DTYPES, resolve_dtype
from model.cascade import (
    BaseStage,
    Progress,
    RefineStage,
    StageConfig,
    base_stage_defaults,
    refine_stage_defaults,
)
from model.config import get_flavor
from model.convert import load_unet as convert_load_unet
from model.convert import save_checkpoint
from model.encoders import FrozenOpenCLIP
from model.samplers import SamplerConfig
from model.unet import I2VGenUNet
from model.vae import VideoVAE

STAGE_FILE = "stage.yaml"
UNET_DIR = "unet"


# ------------------------------------------------------------------------------------- checkpoint I/O
def save_stage(folder: str | Path, unet: I2VGenUNet, stage: StageConfig) -> Path:
    """Write a stage checkpoint folder (layout in the module docstring); the UNet via model.convert."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGE_FILE).write_text(to_yaml(stage))
    save_checkpoint(folder / UNET_DIR, unet.cfg, unet.state_dict())
    return folder


def load_stage_config(folder: str | Path) -> StageConfig:
    """stage.yaml of a checkpoint folder as a StageConfig."""
    path = Path(folder) / STAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"stage config not found: {path} (a checkpoint folder holds {STAGE_FILE} and "
                                f"{UNET_DIR}/ with config.json + safetensors)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return from_dict(StageConfig, data)


def load_unet(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
              ) -> I2VGenUNet:
    """Frozen UNet from CKPT/unet/: our model.convert format or a diffusers I2VGenXLUNet folder."""
    unet_dir = Path(folder) / UNET_DIR
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"UNet file not found: {unet_dir / 'config.json'}")
    unet = convert_load_unet(unet_dir, device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


def load_pipeline(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> BaseStage | RefineStage:
    """A ready BaseStage or RefineStage from a checkpoint folder."""
    cfg = load_stage_config(folder)
    unet = load_unet(folder, device, dtype)
    need_text = unet.cfg.use_text
    need_image = cfg.stage == "base" and unet.cfg.use_image_global
    clip = None
    if need_text or need_image:
        towers = "both" if need_text and need_image else ("text" if need_text else "image")
        clip = FrozenOpenCLIP(cfg.clip, towers=towers, config_key=f"{Path(folder) / STAGE_FILE}: clip").to(device)
        if need_text and clip.text_dim != unet.cfg.cross_attention_dim:
            raise ValueError(f"{folder}: clip text width {clip.text_dim} != unet cross_attention_dim "
                             f"{unet.cfg.cross_attention_dim} (fix clip in {STAGE_FILE} or the UNet)")
        if need_image and clip.image_dim != unet.cfg.image_embed_dim:
            raise ValueError(f"{folder}: clip image embedding {clip.image_dim} != unet image_embed_dim "
                             f"{unet.cfg.image_embed_dim} (fix clip in {STAGE_FILE} or the UNet)")
    vae = VideoVAE(cfg.vae, config_key=f"{Path(folder) / STAGE_FILE}: vae").to(device)
    if cfg.stage == "base":
        return BaseStage(unet, clip, vae, cfg)
    if clip is None:
        raise ValueError(f"{folder}: a refine stage needs text conditioning (use_text=True)")
    return RefineStage(unet, clip, vae, cfg)


def write_tiny_checkpoints(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """root/base and root/refine: tiny random UNets + tiny-random CLIP/VAE sized to match (CPU demos, tests)."""
    root = Path(root)
    base_unet_cfg = get_flavor("tiny")
    refine_unet_cfg = get_flavor("tiny-refine")
    out = []
    for name, ucfg, stage in (("base", base_unet_cfg, base_stage_defaults()),
                              ("refine", refine_unet_cfg, refine_stage_defaults())):
        stage.clip = dataclasses.replace(stage.clip, kind="tiny-random", text_dim=ucfg.cross_attention_dim,
                                         image_dim=ucfg.image_embed_dim, seed=seed)
        stage.vae = dataclasses.replace(stage.vae, kind="tiny-random", seed=seed)
        stage.width, stage.height = (64, 64) if name == "base" else (96, 64)
        stage.num_frames, stage.fps = 4, 8
        stage.sampler = dataclasses.replace(stage.sampler, steps=4)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + (0 if name == "base" else 1))
            unet = I2VGenUNet(ucfg)
        out.append(save_stage(root / name, unet, stage))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------- media I/O
def load_image(path: str | Path) -> torch.Tensor:
    """RGB image file -> (1, 3, H, W) float in [-1, 1]."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {path}")
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_video(frames: np.ndarray, out: str | Path, fps: int) -> tuple[Path, Path]:
    """Write frames (F, H, W, 3) uint8 as H.264 yuv420p mp4 plus PNGs in OUT_frames/; returns both paths."""
    import av
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {w}x{h}")
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frame_dir = out.with_name(out.stem + "_frames")
    frame_dir.mkdir(exist_ok=True)
    for i, arr in enumerate(frames):
        Image.fromarray(arr).save(frame_dir / f"frame_{i:04d}.png")
    return out, frame_dir


# --------------------------------------------------------------------------------------------- cascade
def load_cascade(base_folder: str | Path, refine_folder: str | Path | None, device: torch.device | str,
                 dtype: torch.dtype) -> tuple[BaseStage, RefineStage | None]:
    """The base stage and (with `refine_folder`) the refinement stage of the cascade; a checkpoint of the
    other stage is a ValueError naming the flag (--base / --refine) and the stage it holds."""
    base = load_pipeline(base_folder, device, dtype)
    if not isinstance(base, BaseStage):
        raise ValueError(f"--base {base_folder} holds a '{base.cfg.stage}' stage, expected 'base'")
    refine = load_pipeline(refine_folder, device, dtype) if refine_folder else None
    if refine is not None and not isinstance(refine, RefineStage):
        raise ValueError(f"--refine {refine_folder} holds a '{refine.cfg.stage}' stage, expected 'refine'")
    return base, refine


def run_cascade(base: BaseStage, refine: RefineStage | None, image: torch.Tensor, prompts: list[str], *,
                base_sampler: SamplerConfig | None = None, refine_sampler: SamplerConfig | None = None,
                num_frames: int | None = None, fps: int | None = None, generator: torch.Generator | None = None,
                progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image (B, 3, H0, W0) in [-1, 1] -> (base video (B, 3, F, H, W), refined video (B, 3, F, H', W') or None
    without `refine`), both in [-1, 1]: the base stage samples and decodes, then the refiner SDEdits the
    decoded video, drawing from the same `generator`. Samplers, frames and fps default to stage.yaml's."""
    latents = base.sample(image, prompts, base_sampler, num_frames, fps, generator, progress)
    video = base.vae.decode(latents)
    refined = refine.refine(video, prompts, refine_sampler, None, generator, progress) if refine is not None else None
    return video, refined


# ------------------------------------------------------------------------------------------------- CLI
def _dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype as a torch dtype (common.dtypes); auto = bfloat16 on a GPU, float32 on a CPU."""
    return resolve_dtype(name, torch.bfloat16 if device.type == "cuda" else torch.float32)


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the cascade for parsed CLI args; returns a summary dict (paths, shape, fps)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype, device)
    base, refine = load_cascade(args.base, args.refine, device, dtype)
    if refine is not None and args.refine_size:
        w, h = (int(v) for v in args.refine_size.lower().split("x"))
        refine.cfg = dataclasses.replace(refine.cfg, width=w, height=h)

    image = load_image(args.image).to(device)
    prompts = [args.prompt]
    frames = args.frames or base.cfg.num_frames
    fps = args.fps or base.cfg.fps
    base_sampler = dataclasses.replace(base.cfg.sampler, **_sampler_overrides(args))
    refine_sampler = None
    if refine is not None:
        refine_sampler = dataclasses.replace(refine.cfg.sampler, **_sampler_overrides(args, refine=True))
    generator = torch.Generator(device=device).manual_seed(args.seed)

    total = cascade_steps(base_sampler, refine, refine_sampler)
    with tqdm(total=total, desc="denoising", unit="step", disable=args.quiet) as bar:
        base_video, refined = run_cascade(base, refine, image, prompts, base_sampler=base_sampler,
                                          refine_sampler=refine_sampler, num_frames=frames, fps=fps,
                                          generator=generator, progress=bar.update)
    video = base_video if refined is None else refined
    out, frame_dir = write_video(to_uint8_frames(video[0]), args.out, fps)
    return {"out": str(out), "frames_dir": str(frame_dir), "shape": list(video.shape), "fps": fps}


def _sampler_overrides(args: argparse.Namespace, refine: bool = False) -> dict[str, Any]:
    over: dict[str, Any] = {}
    steps = args.refine_steps if refine else args.steps
    guidance = args.refine_guidance if refine else args.guidance
    if steps:
        over["steps"] = steps
    if guidance is not None:
        over["guidance"] = guidance
    return over


def cascade_steps(base_sampler: SamplerConfig, refine: RefineStage | None = None,
                  refine_sampler: SamplerConfig | None = None) -> int:
    """Denoising steps one run_cascade makes (what its `progress` is called with, in total): the base
    sampler's steps, plus the refiner's SDEdit steps below its t_start (refine_sampler: stage.yaml's by default)."""
    if refine is None:
        return base_sampler.steps
    from model.samplers import ddim_timesteps

    sampler_cfg = refine_sampler or refine.cfg.sampler
    return base_sampler.steps + len(ddim_timesteps(refine.cfg.diffusion.num_timesteps, sampler_cfg.steps,
                                                   sampler_cfg.spacing, sampler_cfg.steps_offset, refine.cfg.t_start))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n")[0])
    p.add_argument("--image", help="conditioning image (first frame)")
    p.add_argument("--prompt", default="", help="text prompt (optional)")
    p.add_argument("--out", help="output .mp4 path; PNG frames go to OUT_frames/ beside it")
    p.add_argument("--base", help="base stage checkpoint folder")
    p.add_argument("--refine", help="refinement stage checkpoint folder (optional)")
    p.add_argument("--steps", type=int, help="base DDIM steps (default: stage.yaml)")
    p.add_argument("--guidance", type=float, help="base CFG scale (default: stage.yaml)")
    p.add_argument("--refine-steps", type=int, help="refinement DDIM steps (default: stage.yaml)")
    p.add_argument("--refine-guidance", type=float, help="refinement CFG scale (default: stage.yaml)")
    p.add_argument("--refine-size", help="refinement WxH, e.g. 1280x720 (default: stage.yaml)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, help="number of frames (default: stage.yaml)")
    p.add_argument("--fps", type=int, help="fps condition and mp4 rate (default: stage.yaml)")
    p.add_argument("--device", help="cpu / cuda / cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES, *ALIASES])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--write-tiny-checkpoints", metavar="DIR",
                   help="write DIR/base and DIR/refine tiny random checkpoints and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.write_tiny_checkpoints:
        base, refine = write_tiny_checkpoints(args.write_tiny_checkpoints, seed=args.seed)
        print(json.dumps({"base": str(base), "refine": str(refine)}))
        return 0
    missing = [f"--{n}" for n in ("image", "out", "base") if not getattr(args, n)]
    if missing:
        build_parser().error(f"missing {', '.join(missing)}")
    print(json.dumps(generate(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
