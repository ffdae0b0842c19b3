"""Hierarchical image conditioning of I2VGen-XL: global CLIP tokens, local detail tokens, concat features.

Shapes:
    first_frame_latent  (B, 4, H, W)        VAE latent of the conditioning image (already x 0.18215)
    image_latents       (B, 4, F, H, W)     frame 0 = that latent, frames 1.. = position ramp (see below)
    image_embeddings    (B, E)              OpenCLIP ViT-H/14 image embedding (E = 1024)
    global tokens       (B, G, D)           G = 4
    local tokens        (B, (P/4)^2, D)     P = pool size 32 -> 64 tokens
    concat features     (B, C_in, F, H, W)  concatenated to the noisy latent's channels before conv_in
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention


def build_image_latents(first_frame_latent: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, 4, H, W) first-frame latent -> (B, 4, F, H, W) image latents, exactly as diffusers'
    `I2VGenXLPipeline.prepare_image_latents` builds them: frame 0 is the latent itself and frame k >= 1 is
    a constant map equal to k / (F - 1) in every channel and pixel (a position ramp 1/(F-1) ... 1).
    With F = 1 it is just the latent."""
    if first_frame_latent.ndim != 4:
        raise ValueError(f"first_frame_latent must be (B, C, H, W), got {tuple(first_frame_latent.shape)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    frames = [first_frame_latent]
    for k in range(1, num_frames):
        frames.append(torch.full_like(first_frame_latent, k / (num_frames - 1)))
    return torch.stack(frames, dim=2)


class GlobalImageTokens(nn.Module):
    """CLIP image embedding (B, E) -> Linear -> SiLU -> Linear -> (B, num_tokens, D) context tokens."""

    def __init__(self, embed_dim: int, hidden_dim: int, num_tokens: int, context_dim: int):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.linear_1 = nn.Linear(embed_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, num_tokens * context_dim)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.linear_2(F.silu(self.linear_1(image_embeddings)))
        return h.view(-1, self.num_tokens, self.context_dim)


class LocalImageTokens(nn.Module):
    """Local detail encoder on the first-frame latent: conv -> SiLU -> adaptive avg-pool to P x P ->
    stride-2 conv -> SiLU -> stride-2 conv to the context width -> (B, (P/4)^2, D) tokens (row-major)."""

    def __init__(self, latent_channels: int, width: int, pool_size: int, context_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.conv2 = nn.Conv2d(width, width * 2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width * 2, context_dim, 3, stride=2, padding=1)

    def forward(self, first_frame_latent: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.silu(self.conv1(first_frame_latent)))
        h = self.conv3(F.silu(self.conv2(h)))
        return h.flatten(2).transpose(1, 2)


class FrameMixer(nn.Module):
    """Per-pixel temporal mixing of the concat features: LayerNorm -> self-attention over frames,
    residual; then a GELU MLP, residual (no norm before the MLP, as released)."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim=dim)
        self.ff_in = nn.Linear(dim, dim * 4)
        self.ff_out = nn.Linear(dim * 4, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm(tokens))
        return tokens + self.ff_out(F.gelu(self.ff_in(tokens)))


class ConcatImageEncoder(nn.Module):
    """Concat path: image latents (B, 4, F, H, W) -> 3 convs per frame -> FrameMixer over frames ->
    (B, C, F, H, W) features for the channel concat with the noisy latent.

    VGen's UNetSD_I2VGen adds these features twice (its own comment calls it a bug); diffusers'
    I2VGenXLUNet (whose behaviour the released diffusers weights were validated with) adds them once by
    concatenation. We follow diffusers."""

    def __init__(self, latent_channels: int, out_channels: int):
        super().__init__()
        width = out_channels * 4
        self.conv1 = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, out_channels, 3, padding=1)
        self.mixer = FrameMixer(out_channels)

    def forward(self, image_latents: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = image_latents.shape
        x = image_latents.transpose(1, 2).reshape(b * f, c, h, w)
        x = self.conv3(F.silu(self.conv2(F.silu(self.conv1(x)))))
        co = x.shape[1]
        # (B*F, C, H, W) -> (B*H*W, F, C) tokens: attention runs over the frames of each pixel
        tokens = x.view(b, f, co, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, f, co)
        tokens = self.mixer(tokens)
        return tokens.view(b, h, w, f, co).permute(0, 4, 3, 1, 2)
