"""The training objective (pure torch): per-sample randomness, CFG dropout, timesteps, noise, target, loss.

Every random draw of a sample comes from its own `torch.Generator` seeded by (run seed, sample_id), in a
fixed order: VAE posterior noise (in `FrozenEncoders.latents`), timestep, noise + offset noise, the
CFG-dropout uniform. So a sample's contribution to the loss is the same whichever rank, micro-batch or
resumed run processes it, and the loss of a global batch does not depend on how it is split over ranks.

Timesteps are uniform in `timestep_range` [lo, hi). The base stage trains on [0, 1000). The refiner trains
on [0, 600): at inference it only ever runs from t = 599 down (SDEdit of the upsampled base video, model/
cascade.py), so timesteps above 599 would spend capacity on noise levels it never sees; I2VGen-XL's
refiner (MS-Vid2Vid-XL, total_noise_levels=600) is specialised the same way.

CFG dropout: one uniform u per sample picks at most one event, with probabilities p_text (caption ->
empty prompt), p_image (global CLIP image embedding -> zeros), p_both (both). Dropped inputs become exactly
what inference's unconditional branch feeds (`model.samplers.null_conditioning`): image_latents (local
image + concat path) and fps stay, as they do there. A UNet without a global image path (the refiner)
has no image to drop, so p_image is a no-op and p_both drops the caption only.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from model.config import UNetConfig
from model.diffusion import GaussianDiffusion
from model.samplers import null_conditioning
from model.unet import build_image_latents
from training.subconfigs import ObjectiveConfig


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit seed for one sample, from (run seed, sample id); stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(sample_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generators(seed: int, sample_ids: torch.Tensor, device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample on `device`, seeded by `sample_seed(seed, id)`."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i))) for i in sample_ids.tolist()]


def dropout_events(u: torch.Tensor, cfg: ObjectiveConfig, has_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image) bool (B,) from per-sample uniforms u (B,) (module docstring)."""
    text = u < cfg.p_text
    image = (u >= cfg.p_text) & (u < cfg.p_text + cfg.p_image)
    both = (u >= cfg.p_text + cfg.p_image) & (u < cfg.p_text + cfg.p_image + cfg.p_both)
    if not has_image:
        return text | both, torch.zeros_like(text)
    return text | both, image | both


def _mix(keep: torch.Tensor, drop: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Rows of `drop` where `dropped` (B,) is True, rows of `keep` elsewhere."""
    mask = dropped.to(keep.device).view(-1, *([1] * (keep.ndim - 1)))
    return torch.where(mask, drop.to(keep), keep)


class Objective:
    """Builds UNet inputs + target for a batch and scores the prediction (v or eps per the diffusion config)."""

    def __init__(self, cfg: ObjectiveConfig, diffusion: GaussianDiffusion, unet_cfg: UNetConfig, seed: int):
        lo, hi = cfg.timestep_range
        if hi > diffusion.num_timesteps:
            raise ValueError(f"objective.timestep_range {cfg.timestep_range} exceeds the schedule's "
                             f"{diffusion.num_timesteps} timesteps")
        self.cfg, self.diffusion, self.unet_cfg, self.seed = cfg, diffusion, unet_cfg, int(seed)

    def inputs(self, batch: Any, encoders: Any) -> tuple[dict[str, Any], torch.Tensor]:
        """(UNet kwargs incl. sample/timestep, target) for a `training.data.Batch` via `FrozenEncoders`."""
        device = encoders.device
        gens = sample_generators(self.seed, batch.sample_ids, device)
        x0 = encoders.latents(batch.pixels, gens)  # draws the posterior noise first
        b, _, f = x0.shape[:3]
        lo, hi = self.cfg.timestep_range
        t = torch.cat([torch.randint(lo, hi, (1,), generator=g, device=device) for g in gens])
        noise = torch.cat([self.diffusion.sample_noise((1, *x0.shape[1:]), generator=g, device=device)
                           for g in gens])
        u = torch.cat([torch.rand(1, generator=g, device=device) for g in gens])
        ucfg = self.unet_cfg
        cond: dict[str, Any] = {}
        null_text = None
        if ucfg.use_text:
            cond["encoder_hidden_states"] = encoders.text(batch.captions)
            null_text = encoders.null_text()
        if ucfg.use_image_global:
            cond["image_embeddings"] = encoders.image_embeds(batch.pixels[:, :, 0])
        if ucfg.use_image_local or ucfg.use_image_concat:
            cond["image_latents"] = build_image_latents(x0[:, :, 0], f)
        if ucfg.use_fps:
            cond["fps"] = batch.fps.to(device=device, dtype=torch.long)
        drop_text, drop_image = dropout_events(u, self.cfg, has_image=ucfg.use_image_global)
        uncond = null_conditioning(cond, null_text)
        if "encoder_hidden_states" in cond:
            cond["encoder_hidden_states"] = _mix(cond["encoder_hidden_states"], uncond["encoder_hidden_states"],
                                                 drop_text)
        if "image_embeddings" in cond:
            cond["image_embeddings"] = _mix(cond["image_embeddings"], uncond["image_embeddings"], drop_image)
        kwargs = {"sample": self.diffusion.add_noise(x0, noise, t), "timestep": t, **cond}
        return kwargs, self.diffusion.target(x0, noise, t)

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE in float32, mean over every element of the micro-batch (equal-size samples: mean of per-sample means)."""
        return (pred.float() - target.float()).square().mean()
