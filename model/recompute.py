"""Selective recomputation of cheap, memory-heavy pieces (norms, activations, dropout, reshapes).

Shapes: x (N, C, ...) any trailing dims, normalised per sample over groups of C/G channels; output = x's shape.

Full activation checkpointing (`I2VGenUNet.enable_gradient_checkpointing`) stores only each block's input
and recomputes the whole block (convs and matmuls included) in backward: large memory saving, ~30% more
time. Selective recomputation instead drops only tensors that are big but cost almost nothing to rebuild:

- `group_norm_silu_dropout`: GroupNorm -> SiLU (-> Dropout) as ONE autograd node that keeps its input,
  the per-group mean / rstd and (with dropout) a 1-byte mask. The normalised tensor that SiLU's backward
  would need is rebuilt in backward with one fused multiply-add from the saved statistics (no second
  statistics pass, no torch.utils.checkpoint bookkeeping). The consumer (a conv) still keeps the output.
- the GEGLU feed-forward does the same with its own backward (model/fused_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RecomputeMixin:
    """Modules with a `recompute_cheap` switch (set by `I2VGenUNet.enable_selective_recompute`)."""

    recompute_cheap: bool = False


def set_recompute_cheap(model: nn.Module, enabled: bool) -> int:
    """Switch selective recomputation on every RecomputeMixin inside `model`; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, RecomputeMixin):
            m.recompute_cheap = enabled
            n += 1
    return n


def _affine_stats(x: torch.Tensor, mean, rstd, weight, bias, groups: int):
    """Per (sample, channel) scale a and shift s with GroupNorm(x) = x * a + s, shaped to broadcast on x."""
    n, c = x.shape[:2]
    a = rstd.view(n, groups, 1) * weight.view(1, groups, c // groups)  # (N, G, C/G)
    s = bias.view(1, groups, c // groups) - mean.view(n, groups, 1) * a
    extra = (1,) * (x.ndim - 2)
    return a.reshape(n, c, *extra), s.reshape(n, c, *extra)


class _GroupNormSiLUDropout(torch.autograd.Function):
    """silu(group_norm(x)) * mask / (1 - p) keeping only x, the group statistics and the bool mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, p: float):
        n, c = x.shape[:2]
        xc = x.contiguous()  # group norm needs (N, C, *) contiguous; a view is re-copied in backward if needed
        y, mean, rstd = torch.native_group_norm(xc, weight, bias, n, c, xc.numel() // (n * c), groups, eps)
        del xc
        out = F.silu(y, inplace=True)
        dropped = None
        if p > 0:
            # same distribution as nn.Dropout: zero with probability p, scale the rest by 1 / (1 - p). Only the
            # 1-byte mask is kept; uniform < p draws it ~1.6x faster on CPU than bernoulli_ into a bool tensor
            # (neither parallelises; measured on the bench-cpu shapes), for a transient float tensor. float32
            # whatever the activations' dtype: a bf16 uniform would put p on a 2^-11 grid near 0.1
            dropped = torch.rand_like(out, dtype=torch.float32) < p
            out.masked_fill_(dropped, 0.0).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(x, weight, bias, mean, rstd, dropped)
        ctx.groups, ctx.p = groups, p
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd, dropped = ctx.saved_tensors
        n, c = x.shape[:2]
        if dropped is not None:
            grad = grad.masked_fill(dropped, 0.0).mul_(1.0 / (1.0 - ctx.p))
        a, s = _affine_stats(x, mean, rstd, weight, bias, ctx.groups)
        y = torch.addcmul(s, x, a)  # the normalised input of SiLU, rebuilt from the saved statistics
        grad_y = torch.ops.aten.silu_backward.grad_input(grad, y, grad_input=y)  # in place: one buffer less
        xc = x.contiguous()
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad_y.contiguous(), xc, mean, rstd, weight, n, c, xc.numel() // (n * c), ctx.groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        return grad_x, grad_w, grad_b, None, None, None


def group_norm_silu_dropout(x: torch.Tensor, norm: nn.GroupNorm, dropout: nn.Module | None = None,
                            recompute: bool = True) -> torch.Tensor:
    """dropout(SiLU(norm(x))); `dropout` is an nn.Dropout (active in its training mode), nn.Identity or None.
    With `recompute` under autograd it runs as one node that stores no normalised / activated intermediate
    (see the module docstring)."""
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if recompute and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        return _GroupNormSiLUDropout.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, p)
    return F.dropout(F.silu(norm(x)), p) if p > 0 else F.silu(norm(x))
