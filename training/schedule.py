"""Learning-rate schedule: linear warmup, then cosine decay to a floor (a torch LambdaLR).

    factor(s) = (s + 1) / warmup_steps                                   for s < warmup_steps
    factor(s) = m + (1 - m) * (1 + cos(pi * p)) / 2,  p = (s - w) / (max_steps - w) clipped to [0, 1]
    with m = min_lr / lr

`s` counts optimizer steps already taken (DeepSpeed steps the scheduler once per optimizer step), so the
first update uses lr / warmup_steps instead of 0 and the last one (s = max_steps - 1) ends just above
min_lr.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (see the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `optimizer` (whose param groups hold the peak `lr`) following `lr_factor`."""
    if lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {lr}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"optim.min_lr must lie in [0, optim.lr={lr}], got {min_lr}")
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
    fn = partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, min_ratio=min_lr / lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
