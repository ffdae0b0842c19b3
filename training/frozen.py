"""Frozen encoders held by the trainer (not by the UNet, not by the DeepSpeed engine).

`FrozenEncoders` owns the KL VAE (video -> scaled latents) and OpenCLIP (penultimate text tokens; image
embedding of the conditioning frame, base stage only), built from `model.vae.VAEConfig` and
`model.encoders.ClipConfig` exactly as generation builds them, so a trained UNet sees at inference the
features it saw in training. Only the towers the UNet uses are built (the refiner has no image path).
Everything runs under no_grad in the encoders' dtype; outputs come back as float32 for the diffusion math.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import UNetConfig
from model.encoders import ClipConfig, FrozenOpenCLIP
from model.vae import VAEConfig, VideoVAE


class FrozenEncoders(nn.Module):
    """VAE + OpenCLIP for one stage; widths are checked against the UNet config at construction."""

    def __init__(self, unet_cfg: UNetConfig, clip_cfg: ClipConfig, vae_cfg: VAEConfig, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 config_key: str = "model"):
        super().__init__()
        self.unet_cfg = unet_cfg
        need_text, need_image = unet_cfg.use_text, unet_cfg.use_image_global
        self.clip: FrozenOpenCLIP | None = None
        if need_text or need_image:
            towers = "both" if need_text and need_image else ("text" if need_text else "image")
            self.clip = FrozenOpenCLIP(clip_cfg, towers=towers, config_key=f"{config_key}.clip")
            if need_text and self.clip.text_dim != unet_cfg.cross_attention_dim:
                raise ValueError(f"{config_key}.clip: text width {self.clip.text_dim} != UNet cross_attention_dim "
                                 f"{unet_cfg.cross_attention_dim} (for tiny-random set text_dim to match)")
            if need_image and self.clip.image_dim != unet_cfg.image_embed_dim:
                raise ValueError(f"{config_key}.clip: image embedding width {self.clip.image_dim} != UNet "
                                 f"image_embed_dim {unet_cfg.image_embed_dim} (for tiny-random set image_dim)")
        self.vae = VideoVAE(vae_cfg, config_key=f"{config_key}.vae")
        self.to(device=device, dtype=dtype)
        self.requires_grad_(False)
        self._null_text: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "FrozenEncoders":  # frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> scaled latents (B, 4, F, H/8, W/8) float32.

        Each sample is encoded on its own with its own generator (posterior noise), so a sample's latent
        does not depend on which other samples share its batch or rank.
        """
        if len(generators) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} samples but {len(generators)} generators")
        out = [self.vae.encode(pixels[i:i + 1].to(self.device), generator=g) for i, g in enumerate(generators)]
        return torch.cat(out).float()

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        """(B, 77, D) penultimate-layer text tokens, float32."""
        return self.clip.encode_text(list(captions)).float()

    @torch.no_grad()
    def null_text(self) -> torch.Tensor:
        """(1, 77, D) tokens of the empty prompt: what a dropped caption becomes (inference's null branch)."""
        if self._null_text is None:
            self._null_text = self.text([""])
        return self._null_text

    @torch.no_grad()
    def image_embeds(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) conditioning frames in [-1, 1] -> (B, E) CLIP image embeddings, float32."""
        return self.clip.encode_image(frames.to(self.device)).float()
