"""ResBlock with its temporal conv block, and the 2x down/up samplers.

Shapes (frames folded into the batch, the layout every block in the UNet passes around):
    x       (B*F, C, H, W)      NCHW, or channels-last (physically (B, F, H, W, C)) after set_channels_last
    temb    (B*F, T)            time (+fps) embedding, repeated per frame
    inside TemporalConvBlock the view is (B, C, F, H*W): with channels-last storage that view needs no copy,
    and the Conv3d k=(3,1,1) runs as the identical Conv2d k=(3,1) over (F, H*W) (several times faster on
    CPU than PyTorch's Conv3d path; the parameter stays a Conv3d weight for checkpoint compatibility).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.recompute import RecomputeMixin, group_norm_silu_dropout
from model.weight_init import zero_module


def frames_to_clip(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H*W); a view when x is channels-last or the frames are contiguous."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h * w).transpose(1, 2)


def clip_to_frames(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, C, F, H*W) -> (B*F, C, H, W); a view for channels-last storage."""
    b, c, f, _ = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


class TemporalConvStage(RecomputeMixin, nn.Module):
    """GroupNorm -> SiLU -> Dropout -> Conv3d k=(3,1,1) over a clip (B, C, F, H*W)."""

    def __init__(self, channels: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = group_norm_silu_dropout(x, self.norm, self.dropout, self.recompute_cheap)
        return F.conv2d(h, self.conv.weight.squeeze(-1), self.conv.bias, padding=(1, 0))


class TemporalConvBlock(nn.Module):
    """4 stages of [GroupNorm, SiLU, Dropout, Conv3d (3,1,1)] with a residual; the last conv is zero-init,
    so a fresh block is the identity (a pretrained image UNet is undisturbed). Stage 1 has no dropout,
    as in the released weights' code (ModelScope / VGen `TemporalConvBlock_v2`)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-5, dropout: float = 0.1):
        super().__init__()
        self.stages = nn.ModuleList(
            [TemporalConvStage(channels, groups, eps, 0.0 if i == 0 else dropout) for i in range(4)]
        )
        zero_module(self.stages[-1].conv)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x: (B*F, C, H, W) -> (B, C, F, H*W); GroupNorm statistics span all frames of a clip. One dense copy
        # here instead of re-copying the strided view for GroupNorm in forward and again in backward.
        identity = frames_to_clip(x, num_frames).contiguous()
        h = identity
        for stage in self.stages:
            h = stage(h)
        return clip_to_frames(h.add_(identity), x.shape[2], x.shape[3])


class ResBlock(RecomputeMixin, nn.Module):
    """Spatial ResBlock (GroupNorm-SiLU-Conv, + time embedding, GroupNorm-SiLU-Dropout-Conv, skip) followed
    by a TemporalConvBlock. Output = temporal(skip(x) + convs(x))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float = 1e-5,
        dropout: float = 0.0,
        temporal_dropout: float = 0.1,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.temporal = TemporalConvBlock(out_channels, groups, eps, temporal_dropout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.conv1(group_norm_silu_dropout(x, self.norm1, recompute=self.recompute_cheap))
        # in-place adds on conv outputs (no conv backward needs its own output): two fewer full-size buffers
        h += self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(group_norm_silu_dropout(h, self.norm2, self.dropout, self.recompute_cheap))
        return self.temporal(h.add_(self.skip(x)), num_frames)


class Downsample(nn.Module):
    """3x3 conv with stride 2 (padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# For output row 2i + a of "nearest 2x, then 3x3 conv", the three kernel rows read source rows
# (i-1, i, i) when a = 0 and (i, i, i+1) when a = 1: per phase a 2-tap kernel over source rows, whose taps
# sum the 3x3 taps that read the same source pixel. Same for columns. _PHASE_TAPS[a, t, k] = 1 when kernel
# row k lands on tap t (t = 0: upper source row, t = 1: lower) of phase a.
_PHASE_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


class Upsample(nn.Module):
    """Nearest-neighbour resize to `size` (the matching skip's H, W) + 3x3 conv.

    For an exact 2x resize it runs sub-pixel: one conv with 2x2 kernels and 4x the output channels (one set
    per output phase) on the padded low-res input, then the phases are interleaved. Identical result (up to
    float rounding of the summed taps), 16 instead of 36 multiply-adds per output pixel and channel pair,
    and backward keeps the low-res input instead of the 4x larger resized one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def phase_kernels(self) -> torch.Tensor:
        """(4*O, I, 2, 2): the 2x2 kernel of output phase (a, b) at rows [(2a + b)*O, (2a + b + 1)*O)."""
        w = self.conv.weight
        taps = w.new_tensor(_PHASE_TAPS)  # (phase, tap, k)
        return torch.einsum("atk,bul,oikl->aboitu", taps, taps, w).flatten(0, 2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        n, _, h, w = x.shape
        if tuple(size) != (2 * h, 2 * w):
            return self.conv(F.interpolate(x, size=size, mode="nearest"))
        # phase (a, b) output (i, j) reads padded rows i+a, i+a+1 and cols j+b, j+b+1: a 2x2 window at (i+a, j+b)
        out = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.phase_kernels(), self.conv.bias.repeat(4))
        out = out.unflatten(1, (2, 2, -1))  # (N, a, b, O, h+1, w+1)
        rows = [torch.stack([out[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], dim=-1) for a in (0, 1)]
        return torch.stack(rows, dim=3).reshape(n, -1, 2 * h, 2 * w)  # (N, O, h, a, w, b) -> (N, O, 2h, 2w)
