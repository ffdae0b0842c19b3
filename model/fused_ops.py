"""Hand-written backward passes for the GEGLU feed-forward: less stored, fewer passes, fewer FLOPs.

Shapes (T tokens, D block width, I = 4*D feed-forward width, C output channels of a transformer):
    value, gate (..., I)        the two halves of ff.proj_in's output, each computed as its own dense GEMM
    x           (..., D)        the block's residual stream before the feed-forward
    ff weight   (D, I)          ff.proj_out;  out weight (C, D): the transformer's own proj_out
    result      (..., D) for geglu_proj_out, (..., C) for geglu_proj_out_folded

Both keep only value and gate (not gelu(gate) nor value * gelu(gate), each T x I) for backward and rebuild
the product there. value and gate are separate dense tensors, not the two halves of one (T, 2I) output:
ATen's CPU GELU (forward and backward) only vectorises dense inputs and is ~5x slower on a half view.

Both also run token chunk by token chunk (CHUNK_ELEMENTS per temporary): the T x I temporaries (gelu(gate),
the product, dL/dp) exist for one chunk at a time and are reused from the allocator's cache, instead of
several full-size tensors that (above glibc's mmap threshold) are mapped, page-faulted and unmapped on every
call. The outputs are written in place into their full-size buffers; the weight gradient accumulates. `geglu_proj_out_folded` also uses associativity when a transformer maps its width D back to fewer
channels C < D (the UNet's first temporal transformer: C0 = 320 channels, D = 8 heads x 64 = 512):
    proj_out(x + ff.proj_out(p)) = x Wo^T + p (Wo Wf)^T + (Wo bf + bo)
so the T x I x D feed-forward product becomes T x I x C, in forward and in both backward products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# elements of one T x I temporary (512K floats = 2 MiB): small enough to stay in the allocator's free lists
CHUNK_ELEMENTS = 1 << 19


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _row_chunks(rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _geglu_forward(value, gate, weight, bias, out_rows: int):
    """F.linear(value * gelu(gate), weight, bias) chunk by chunk; value/gate flattened (T, I)."""
    v, g = _flat(value), _flat(gate)
    out = torch.empty(v.shape[0], out_rows, dtype=v.dtype, device=v.device)
    for r in _row_chunks(v.shape[0], v.shape[1]):
        p = F.gelu(g[r]).mul_(v[r])
        if bias is None:
            torch.mm(p, weight.t(), out=out[r])
        else:
            torch.addmm(bias, p, weight.t(), out=out[r])
    return out


def _geglu_backward(value, gate, grad, weight):
    """For p = value * gelu(gate) and y = p @ weight^T: (dL/dvalue, dL/dgate, dL/dweight), chunk by chunk.
    grad: (T, C) dense; weight: (C, I)."""
    v, g = _flat(value), _flat(gate)
    grad_value, grad_gate = torch.empty_like(v), torch.empty_like(g)
    grad_w = torch.zeros_like(weight)
    for r in _row_chunks(v.shape[0], v.shape[1]):
        act = F.gelu(g[r])
        grad_p = grad[r] @ weight
        torch.mul(grad_p, act, out=grad_value[r])
        grad_w.addmm_(grad[r].t(), act.mul_(v[r]))  # act now holds p
        torch.ops.aten.gelu_backward.grad_input(grad_p.mul_(v[r]), g[r], grad_input=grad_gate[r])
    return grad_value.view_as(value), grad_gate.view_as(gate), grad_w


class _GEGLUProjOut(torch.autograd.Function):
    """proj_out(value * gelu(gate)) keeping only value and gate (and the weight) for backward."""

    @staticmethod
    def forward(ctx, value, gate, weight, bias):
        ctx.save_for_backward(value, gate, weight)
        ctx.has_bias = bias is not None
        return _geglu_forward(value, gate, weight, bias, weight.shape[0]).view(*value.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        value, gate, weight = ctx.saved_tensors
        grad_flat = _flat(grad.contiguous())  # may arrive permuted; dense so every product is one plain GEMM
        grad_value, grad_gate, grad_w = _geglu_backward(value, gate, grad_flat, weight)
        grad_b = grad_flat.sum(0) if ctx.has_bias else None
        return grad_value, grad_gate, grad_w, grad_b


class _GEGLUProjOutFolded(torch.autograd.Function):
    """out_proj(x + ff_proj(value * gelu(gate))) with the two projections folded (see module docstring)."""

    @staticmethod
    def forward(ctx, x, value, gate, ff_w, ff_b, out_w, out_b):
        folded_w = out_w @ ff_w  # (C, I)
        folded_b = out_w @ ff_b + out_b
        out = _geglu_forward(value, gate, folded_w, folded_b, folded_w.shape[0])
        out.addmm_(_flat(x), out_w.t())
        ctx.save_for_backward(x, value, gate, ff_w, ff_b, out_w, folded_w)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, value, gate, ff_w, ff_b, out_w, folded_w = ctx.saved_tensors
        grad_flat = _flat(grad.contiguous())  # arrives permuted from the (B, F, C, H, W) output
        grad_value, grad_gate, grad_folded = _geglu_backward(value, gate, grad_flat, folded_w)  # (C, I) = dL/d(Wo Wf)
        grad_out_b = grad_flat.sum(0)
        grad_ff_w = out_w.t() @ grad_folded
        grad_ff_b = out_w.t() @ grad_out_b
        grad_out_w = grad_folded @ ff_w.t() + grad_flat.t() @ _flat(x) + torch.outer(grad_out_b, ff_b)
        grad_x = (grad_flat @ out_w).view_as(x)
        return grad_x, grad_value, grad_gate, grad_ff_w, grad_ff_b, grad_out_w, grad_out_b


def geglu_proj_out(value: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(value * gelu(gate), weight, bias), storing only value and gate for backward."""
    return _GEGLUProjOut.apply(value, gate, weight, bias)


def geglu_proj_out_folded(x, value, gate, ff_w, ff_b, out_w, out_b) -> torch.Tensor:
    """F.linear(x + F.linear(value * gelu(gate), ff_w, ff_b), out_w, out_b), folded: use when out_w has
    fewer rows than columns (C < D); stores x, value and gate only."""
    return _GEGLUProjOutFolded.apply(x, value, gate, ff_w, ff_b, out_w, out_b)
