"""UNet configuration for the I2VGen-XL 3D latent UNet, and the registry of named flavours.

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


__all__ = ["UNetConfig", "FLAVORS", "get_flavor"]
