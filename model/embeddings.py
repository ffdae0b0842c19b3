"""Timestep and fps embeddings: sinusoidal features -> 2-layer SiLU MLP.

Shapes:
    t, fps          (B,)            integer or float values (timestep in [0, 1000), frames per second)
    sinusoidal      (B, dim)        [cos | sin] halves (flip_sin_to_cos, shift 0, as released)
    TimestepMLP     (B, dim) -> (B, out_dim)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.weight_init import zero_module


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of `values` (B,), cos half first, always float32.

    Frequencies are `max_period ** (-i / half)` for i in [0, half); odd `dim` is zero-padded by one.
    """
    if values.ndim != 1:
        raise ValueError(f"sinusoidal_embedding expects a 1-D tensor of values, got shape {tuple(values.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    angles = values.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear; `zero_init_last` makes a fresh module output exactly zero.

    The fps embedding is zero-initialised so adding it to the time embedding starts as a no-op
    (fine-tuning from a checkpoint without fps conditioning is not disturbed).
    """

    def __init__(self, in_dim: int, out_dim: int, zero_init_last: bool = False):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)
        if zero_init_last:
            zero_module(self.linear_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def as_batch_vector(value, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """Scalar / 0-d / (1,) / (B,) -> (B,) tensor on `device`; ValueError on any other shape."""
    t = value if torch.is_tensor(value) else torch.tensor(value, device=device)
    t = t.to(device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a scalar or shape ({batch},), got shape {tuple(t.shape)}")
    return t.expand(batch)
