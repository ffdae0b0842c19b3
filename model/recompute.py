"""Selective recomputation of cheap, memory-heavy pieces (norms, activations, dropout, reshapes).

Shapes: any; these helpers wrap a function of tensors and return what it returns.

Full activation checkpointing (`I2VGenUNet.enable_gradient_checkpointing`) stores only each block's input
and recomputes the whole block (convs and matmuls included) in backward: large memory saving, ~30% more
time. Selective recomputation instead wraps only regions such as GroupNorm -> SiLU -> Dropout whose
outputs are big but cost almost nothing to recompute: the consumer (a conv / linear) still saves the
region's output, but the intermediate tensors inside the region (the norm output, the dropout mask) are
not kept. Dropout masks are replayed exactly (the RNG state is restored), so gradients are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class RecomputeMixin:
    """Modules with a `recompute_cheap` switch (set by `I2VGenUNet.enable_selective_recompute`)."""

    recompute_cheap: bool = False

    def cheap(self, fn, *args):
        """Run `fn(*args)`; under autograd with the switch on, keep only its inputs and recompute it."""
        if self.recompute_cheap and torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def set_recompute_cheap(model: nn.Module, enabled: bool) -> int:
    """Switch selective recomputation on every RecomputeMixin inside `model`; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, RecomputeMixin):
            m.recompute_cheap = enabled
            n += 1
    return n
