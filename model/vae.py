"""Frozen SD 2.1 KL-f8 VAE (diffusers AutoencoderKL) for video frames, chunked over frames.

Shape legend
    video   : (B, 3, F, H, W) float in [-1, 1], H and W divisible by 8
    latents : (B, 4, F, H/8, W/8) already multiplied by the scaling factor 0.18215
    image   : (B, 3, H, W) -> (B, 4, H/8, W/8) (single frame helpers)

Frames are folded into the batch ((B*F), 3, H, W) and run `chunk_size` at a time: memory is bounded by the
chunk, and results do not depend on it (the posterior noise is drawn once for the whole video).
Weights load from a local diffusers folder holding config.json + diffusion_pytorch_model.safetensors
(safetensors only: no pickle is ever unpickled), or a tiny random config is built in code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from model.config import VAEConfig

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"


def tiny_vae_config() -> dict:
    """A 4-level (factor 8) AutoencoderKL with 16-channel blocks: same interface as SD's, ~0.2M params."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
        "sample_size": 64, "scaling_factor": 0.18215,
    }


def build_autoencoder(cfg: VAEConfig, config_key: str = "vae") -> nn.Module:
    """diffusers AutoencoderKL from a local folder or the tiny random config."""
    from diffusers import AutoencoderKL

    if cfg.kind == "tiny-random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return AutoencoderKL(**tiny_vae_config())
    if cfg.kind != "diffusers":
        raise ValueError(f"{config_key}.kind={cfg.kind!r}; valid: ['diffusers', 'tiny-random']")
    folder = Path(cfg.path) if cfg.path else None
    for name in ("config.json", SAFETENSORS_NAME):
        if folder is None or not (folder / name).is_file():
            where = folder / name if folder is not None else f"(empty)/{name}"
            raise FileNotFoundError(
                f"VAE file not found: {where} (config key {config_key}.path). Point it at a local diffusers "
                f"AutoencoderKL folder (SD 2.1 `vae/`: config.json + {SAFETENSORS_NAME}); nothing is downloaded.")
    json.loads((folder / "config.json").read_text())  # fail early on a broken config
    return AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)


class VideoVAE(nn.Module):
    """Frozen AutoencoderKL applied frame-wise to (B, 3, F, H, W) videos."""

    def __init__(self, cfg: VAEConfig, config_key: str = "vae"):
        super().__init__()
        if cfg.chunk_size < 1:
            raise ValueError(f"{config_key}.chunk_size must be >= 1, got {cfg.chunk_size}")
        self.cfg = cfg
        self.vae = build_autoencoder(cfg, config_key).eval().requires_grad_(False)
        self.scaling_factor = cfg.scaling_factor

    def train(self, mode: bool = True) -> "VideoVAE":  # frozen
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, H/8, W/8)."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (N, 3, H, W), got {tuple(frames.shape)}")
        if frames.shape[-1] % 8 or frames.shape[-2] % 8:
            raise ValueError(f"frame size {tuple(frames.shape[-2:])} must be divisible by 8")
        sample = self.cfg.sample_posterior if sample is None else sample
        x = frames.to(self.device, self.dtype)
        means, stds = [], []
        for chunk in x.split(self.cfg.chunk_size):
            dist = self.vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        mean = torch.cat(means)
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.cat(stds) * eps
        return mean * self.scaling_factor

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, 4, h, w) -> frames (N, 3, 8h, 8w), float32, clamped to [-1, 1]."""
        z = (latents / self.scaling_factor).to(self.device, self.dtype)
        out = [self.vae.decode(chunk).sample for chunk in z.split(self.cfg.chunk_size)]
        return torch.cat(out).float().clamp(-1, 1)

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool | None = None) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> (B, 4, F, H/8, W/8)."""
        if video.ndim != 5:
            raise ValueError(f"video must be (B, 3, F, H, W), got {tuple(video.shape)}")
        b, c, f, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        z = self.encode_frames(frames, generator, sample)
        return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, F, h, w) -> (B, 3, F, 8h, 8w) in [-1, 1]."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, 4, F, h, w), got {tuple(latents.shape)}")
        b, c, f, h, w = latents.shape
        frames = self.decode_frames(latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
