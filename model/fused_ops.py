"""Hand-written backward passes for the GEGLU feed-forward: less stored, fewer passes, fewer FLOPs.

Shapes (T tokens, D block width, I = 4*D feed-forward width, C output channels of a transformer):
    h           (..., 2*I)      output of ff.proj_in = [value | gate]
    x           (..., D)        the block's residual stream before the feed-forward
    ff weight   (D, I)          ff.proj_out;  out weight (C, D): the transformer's own proj_out
    result      (..., D) for geglu_proj_out, (..., C) for geglu_proj_out_folded

Both keep only h (not gelu(gate) nor value * gelu(gate), each T x I) for backward and rebuild the product
there. `geglu_proj_out_folded` also uses associativity when a transformer maps its width D back to fewer
channels C < D (the UNet's first temporal transformer: C0 = 320 channels, D = 8 heads x 64 = 512):
    proj_out(x + ff.proj_out(p)) = x Wo^T + p (Wo Wf)^T + (Wo bf + bo)
so the T x I x D feed-forward product becomes T x I x C, in forward and in both backward products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _geglu_input_grad(h: torch.Tensor, act: torch.Tensor, grad_p: torch.Tensor) -> torch.Tensor:
    """dL/dh for p = value * gelu(gate), given dL/dp (overwritten); both halves written into one buffer."""
    value, gate = h.chunk(2, dim=-1)
    grad_h = torch.empty_like(h)
    grad_value, grad_gate = grad_h.chunk(2, dim=-1)
    torch.mul(grad_p, act, out=grad_value)
    torch.ops.aten.gelu_backward.grad_input(grad_p.mul_(value), gate, grad_input=grad_gate)
    return grad_h


class _GEGLUProjOut(torch.autograd.Function):
    """proj_out(value * gelu(gate)) keeping only h (and the weight) for backward."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        value, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(gate).mul_(value), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        value, gate = h.chunk(2, dim=-1)
        act = F.gelu(gate)
        grad_flat = _flat(grad)
        grad_w = grad_flat.t() @ _flat(value * act)
        grad_b = grad_flat.sum(0) if ctx.has_bias else None
        return _geglu_input_grad(h, act, grad @ weight), grad_w, grad_b


class _GEGLUProjOutFolded(torch.autograd.Function):
    """out_proj(x + ff_proj(value * gelu(gate))) with the two projections folded (see module docstring)."""

    @staticmethod
    def forward(ctx, x, h, ff_w, ff_b, out_w, out_b):
        value, gate = h.chunk(2, dim=-1)
        folded_w = out_w @ ff_w  # (C, I)
        folded_b = out_w @ ff_b + out_b
        out = F.linear(F.gelu(gate).mul_(value), folded_w, folded_b)
        out += F.linear(x, out_w)
        ctx.save_for_backward(x, h, ff_w, ff_b, out_w, folded_w)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, ff_w, ff_b, out_w, folded_w = ctx.saved_tensors
        value, gate = h.chunk(2, dim=-1)
        act = F.gelu(gate)
        grad_flat = _flat(grad)
        grad_folded = grad_flat.t() @ _flat(value * act)  # (C, I) = dL/d(Wo Wf)
        grad_out_b = grad_flat.sum(0)
        grad_ff_w = out_w.t() @ grad_folded
        grad_ff_b = out_w.t() @ grad_out_b
        grad_out_w = grad_folded @ ff_w.t() + grad_flat.t() @ _flat(x) + torch.outer(grad_out_b, ff_b)
        grad_x = grad @ out_w
        grad_h = _geglu_input_grad(h, act, grad @ folded_w)
        return grad_x, grad_h, grad_ff_w, grad_ff_b, grad_out_w, grad_out_b


def geglu_proj_out(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(value * gelu(gate), weight, bias) for h = [value | gate], storing only h for backward."""
    return _GEGLUProjOut.apply(h, weight, bias)


def geglu_proj_out_folded(x, h, ff_w, ff_b, out_w, out_b) -> torch.Tensor:
    """F.linear(x + F.linear(value * gelu(gate), ff_w, ff_b), out_w, out_b), folded: use when out_w has
    fewer rows than columns (C < D); stores x and h only."""
    return _GEGLUProjOutFolded.apply(x, h, ff_w, ff_b, out_w, out_b)
