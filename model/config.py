"""Configs of the model package: the I2VGen-XL 3D latent UNet and its registry of named flavours, plus the
noise schedule (`DiffusionConfig`, used by model.diffusion), the OpenCLIP encoders (`ClipConfig`,
model.encoders) and the KL VAE (`VAEConfig`, model.vae). Plain dataclasses with no torch import, so a
job's config tree that holds them loads and validates before torch or open_clip is imported; each
module that uses a config imports it from here.

A flavour is a complete `UNetConfig`; `get_flavor(name)` returns a fresh copy so callers may edit it.

    tiny              every structural element of the release (4 levels, 22 ResBlocks, 16 spatial and 17
                      temporal transformers, fps, global/local/concat image paths, text) at < 5M params;
                      expressible as a diffusers I2VGenXLUNet (the equivalence test uses it).
    tiny-refine       the tiny flavour as a refiner: fps and image paths off, text-only context (what
                      `model.generate.write_tiny_checkpoints` builds for the refine stage).
    base-448x256      the paper's base stage: release architecture, 448x256 video = 56x32 latent, 16 frames.
    refine-1280x720   the refinement stage: same backbone, conv_in takes only the 4 noisy-latent channels,
                      no fps / image paths, text-only cross-attention context; 1280x720 = 160x90 latent.
    i2vgen-xl         the released model = diffusers' `I2VGenXLUNet()` default config (1,420,469,224 params).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass
class UNetConfig:
    """Architecture of `model.unet.I2VGenUNet`. Field defaults are the released I2VGen-XL."""

    in_channels: int = 4
    """Channels of the noisy latent `sample` (SD 2.1 KL-f8 VAE latents: 4)."""
    out_channels: int = 4
    """Channels predicted by the UNet (v-prediction of the latent: 4)."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    """Width of each resolution level (base 320 x multipliers [1, 2, 4, 4])."""
    layers_per_block: int = 2
    """ResBlocks per encoder level; decoder levels get one more (skip from the downsampler)."""
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    """Per level: True = each ResBlock is followed by a spatial and a temporal transformer."""
    attention_head_dim: int = 64
    """Channels per attention head; heads = level width // head dim (5/10/20/20 in the release)."""
    transformer_in_heads: int = 8
    """Heads of the temporal transformer after conv_in (each `attention_head_dim` wide)."""
    cross_attention_dim: int = 1024
    """Width of the cross-attention context tokens (OpenCLIP ViT-H/14: 1024)."""
    norm_num_groups: int = 32
    """GroupNorm groups in ResBlocks, temporal convs and transformers."""
    norm_eps: float = 1e-5
    """GroupNorm epsilon in ResBlocks and temporal convs (transformer GroupNorms use 1e-6, as released)."""
    image_latent_channels: int = 4
    """Channels of the VAE latent fed to the local and concat image paths."""
    image_embed_dim: int = 1024
    """Width of the CLIP image embedding fed to the global image path."""
    num_global_image_tokens: int = 4
    """Tokens produced by the global image MLP (diffusers ties this to in_channels = 4)."""
    local_pool_size: int = 32
    """The local detail encoder pools the first-frame features to this square size; tokens = (size/4)^2 = 64."""
    use_fps: bool = True
    """Add an fps embedding (sinusoidal -> MLP, last layer zero-init) to the timestep embedding."""
    use_image_global: bool = True
    """Global image path: CLIP image embedding -> MLP -> `num_global_image_tokens` context tokens."""
    use_image_local: bool = True
    """Local image path: small conv net on the first-frame latent -> (local_pool_size/4)^2 context tokens."""
    use_image_concat: bool = True
    """Concat path: image latents (+ position ramp) -> conv net -> per-pixel temporal mixing -> concatenated
    to the noisy latent channels, so conv_in takes 2 x in_channels."""
    use_text: bool = True
    """Text tokens (OpenCLIP-H penultimate layer, 77 x 1024) lead the cross-attention context."""
    num_frames_default: int = 16
    """Frames per clip used by this flavour's training / generation defaults (the UNet accepts any F >= 1)."""
    sample_size: tuple[int, int] = (32, 56)
    """Latent (height, width) this flavour is trained at; informational (any size divisible by 8 works,
    others are handled by resizing to the skip size in the decoder)."""
    dropout: float = 0.1
    """Dropout inside the temporal conv blocks (stages 2-4), as released."""
    resnet_dropout: float = 0.0
    """Dropout between the two convs of each spatial ResBlock (0 in the release)."""

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        self.sample_size = tuple(int(s) for s in self.sample_size)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep (+fps) embedding: 4 x base width."""
        return self.block_out_channels[0] * 4

    @property
    def conv_in_channels(self) -> int:
        """conv_in input channels: noisy latent, plus the concat-path features when enabled."""
        return self.in_channels * (2 if self.use_image_concat else 1)

    @property
    def has_context(self) -> bool:
        """True when at least one path feeds the cross-attention context."""
        return self.use_text or self.use_image_local or self.use_image_global

    @property
    def num_local_image_tokens(self) -> int:
        """Tokens from the local detail encoder (two stride-2 convs after pooling)."""
        side = (self.local_pool_size + 3) // 4
        return side * side

    def validate(self) -> None:
        """Raise ValueError naming the field when the combination cannot build."""
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels: need at least one level")
        if len(self.attention_levels) != n:
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but block_out_channels has {n}; "
                "give one bool per level"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels: {c} is not divisible by norm_num_groups={self.norm_num_groups}")
        for c, att in zip(self.block_out_channels, self.attention_levels):
            if att and c % self.attention_head_dim:
                raise ValueError(f"block_out_channels: {c} is not divisible by attention_head_dim={self.attention_head_dim}")
        if any(self.attention_levels) and not self.has_context:
            raise ValueError("attention_levels need a cross-attention context: enable use_text or an image path")
        if self.layers_per_block < 1:
            raise ValueError("layers_per_block must be >= 1")
        if self.use_image_concat and self.in_channels % 2:
            raise ValueError("in_channels must be even with use_image_concat (temporal mixer uses 2 heads)")


_TINY = UNetConfig(
    block_out_channels=(32, 32, 64, 64),
    attention_head_dim=16,
    transformer_in_heads=8,
    cross_attention_dim=64,
    image_embed_dim=64,
    norm_num_groups=8,
    num_frames_default=4,
    sample_size=(16, 16),
)

FLAVORS: dict[str, UNetConfig] = {
    "tiny": _TINY,
    "tiny-refine": dataclasses.replace(_TINY, use_fps=False, use_image_global=False, use_image_local=False,
                                       use_image_concat=False),
    "base-448x256": UNetConfig(num_frames_default=16, sample_size=(32, 56)),
    "refine-1280x720": UNetConfig(
        use_fps=False,
        use_image_global=False,
        use_image_local=False,
        use_image_concat=False,
        use_text=True,
        num_frames_default=32,
        sample_size=(90, 160),
    ),
    "i2vgen-xl": UNetConfig(num_frames_default=16, sample_size=(88, 160)),
}


def get_flavor(name: str, **overrides) -> UNetConfig:
    """A fresh copy of flavour `name`, optionally with fields replaced; ValueError lists the valid names."""
    if name not in FLAVORS:
        raise ValueError(f"unknown UNet flavour {name!r}; valid flavours: {sorted(FLAVORS)}")
    return dataclasses.replace(FLAVORS[name], **overrides)



# ------------------------------------------------------------------------- schedule, encoders, VAE
Prediction = Literal["v", "eps"]


@dataclass
class DiffusionConfig:
    """How clean latents are noised and what the UNet is trained to predict."""

    schedule: str = "cosine"
    """Key of `SCHEDULES`: cosine (release), linear_sd (v1 base), logsnr_cosine_interp (v1 refiner)."""
    num_timesteps: int = 1000
    """Number of discrete training timesteps T."""
    zero_terminal_snr: bool = True
    """Rescale so the last timestep is pure noise (SNR 0); the release trains with it."""
    prediction: Prediction = "v"
    """UNet output: "v" (release) or "eps"."""
    offset_noise: float = 0.1
    """Strength of the per-frame per-channel offset noise added at training time (0 disables)."""
    cosine_s: float = 0.008
    """Offset s of the cosine schedule."""
    beta_start: float = 0.00085
    """First beta of linear_sd."""
    beta_end: float = 0.012
    """Last beta of linear_sd."""
    logsnr_scale_min: float = 2.0
    """logsnr_cosine_interp: shift scale at t=0."""
    logsnr_scale_max: float = 4.0
    """logsnr_cosine_interp: shift scale at t=T-1."""




@dataclass
class ClipConfig:
    """Which OpenCLIP model encodes prompts and the conditioning image."""

    kind: Literal["openclip", "tiny-random"] = "openclip"
    """openclip: real architecture + local checkpoint; tiny-random: tiny seeded random model (tests, demos)."""
    checkpoint: str = ""
    """Local OpenCLIP checkpoint file (e.g. open_clip_pytorch_model.bin or .safetensors of ViT-H-14 laion2b)."""
    arch: str = "ViT-H-14"
    """open_clip architecture name of the checkpoint."""
    layer: Literal["penultimate", "last"] = "penultimate"
    """Text layer whose tokens are returned (I2VGen-XL: penultimate)."""
    text_dim: int = 64
    """tiny-random only: text token width (must equal the UNet's cross_attention_dim)."""
    image_dim: int = 64
    """tiny-random only: image embedding width (what the UNet's global image path expects)."""
    image_size: int = 32
    """tiny-random only: input resolution of the tiny vision tower."""
    seed: int = 0
    """tiny-random only: initialisation seed."""



@dataclass
class VAEConfig:
    """Which KL-f8 autoencoder maps frames to latents."""

    kind: Literal["diffusers", "tiny-random"] = "diffusers"
    """diffusers: local AutoencoderKL folder (SD 2.1 `vae/`); tiny-random: tiny seeded random VAE."""
    path: str = ""
    """Local folder with config.json and diffusion_pytorch_model.safetensors."""
    scaling_factor: float = 0.18215
    """Latent scale of SD 2.1's VAE."""
    chunk_size: int = 4
    """Frames encoded/decoded per VAE call."""
    sample_posterior: bool = True
    """Encode to a posterior sample (diffusers/VGen do) instead of its mean."""
    seed: int = 0
    """tiny-random only: initialisation seed."""


__all__ = ["UNetConfig", "FLAVORS", "get_flavor", "Prediction", "DiffusionConfig", "ClipConfig", "VAEConfig"]
