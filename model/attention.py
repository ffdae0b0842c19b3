"""Attention (SDPA), GEGLU feed-forward, and the spatial / temporal transformers of the 3D UNet.

Shapes:
    tokens      (N, L, D)           N sequences of L tokens of width D
    spatial     x (B*F, C, H, W), context (B, Lc, Dc) -> (B*F, C, H, W); tokens = the H*W pixels of a frame
    temporal    x (B*F, C, H, W)                      -> (B*F, C, H, W); tokens = the F frames of a pixel
Heads: inner width = heads * head_dim; q/k/v have no bias, the output projection has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.recompute import RecomputeMixin


# On CPU, SDPA's flash kernel has a large fixed cost per (sequence, head) block: for the temporal attentions
# (sequences of F frames, one per pixel, thousands of them) plain batched matmuls are faster (bench/model.py).
SHORT_SEQUENCE_MAX = 32


def short_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for short sequences as batched matmuls; (..., L, d) -> (..., L, d).
    Keeps only the (L x L) probabilities (besides q/k/v) for backward, less than SDPA's saved output."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(-1), v)


class Attention(nn.Module):
    """Multi-head attention via `F.scaled_dot_product_attention` (flash / memory-efficient kernels), or
    `short_sequence_attention` on CPU when both sequences are at most SHORT_SEQUENCE_MAX tokens long.

    `context=None` is self-attention. A cross-attention context may have fewer sequences than the
    queries (one per clip instead of one per frame): k/v are projected once per clip, and the queries of
    the clip's frames are attended as one long sequence against it (identical result: softmax is per
    query), which is cheaper than projecting or copying a per-frame context.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        # (N, L, heads*hd) -> (N, heads, L, hd) view
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        n, length, _ = x.shape
        if context is None:  # self-attention: one GEMM for q, k and v (same weights, fewer passes over x)
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            qkv = F.linear(x, w)
            if x.device.type == "cpu" and length <= SHORT_SEQUENCE_MAX:
                # (N, L, 3*heads*hd) -> (3, N, heads, L, hd): one copy gives the matmuls dense operands
                qkv = qkv.view(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
                out = short_sequence_attention(*qkv.unbind(0))
                return self.to_out(out.transpose(1, 2).flatten(2))
            q, k, v = (self._split(t) for t in qkv.chunk(3, dim=-1))
            out = F.scaled_dot_product_attention(q, k, v)
            return self.to_out(out.transpose(1, 2).flatten(2))
        k, v = self._split(self.to_k(context)), self._split(self.to_v(context))
        nk = k.shape[0]
        # one context per clip, queries per frame: (N, L) queries -> (N/nk clips, frames*L) query sequences
        q = self._split(self.to_q(x).reshape(nk, (n // nk) * length, -1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, length, -1))


class _GEGLUProjOut(torch.autograd.Function):
    """proj_out(value * gelu(gate)) keeping only h = [value | gate] (and the weight) for backward:
    the gelu(gate) and product tensors (each tokens x inner) are recomputed there instead of stored."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        value, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(value * F.gelu(gate), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        value, gate = h.chunk(2, dim=-1)
        act = F.gelu(gate)
        grad_flat = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_flat.t() @ (value * act).reshape(-1, value.shape[-1])
        grad_b = grad_flat.sum(0) if ctx.has_bias else None
        grad_p = grad @ weight
        grad_gate = torch.ops.aten.gelu_backward(grad_p * value, gate)
        return torch.cat([grad_p * act, grad_gate], dim=-1), grad_w, grad_b


class GEGLUFeedForward(RecomputeMixin, nn.Module):
    """Linear(D, 2*inner) -> value * gelu(gate) -> Linear(inner, D)  (inner = 4*D).
    With selective recomputation only the first Linear's output is kept for backward."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if self.recompute_cheap and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            return _GEGLUProjOut.apply(h, self.proj_out.weight, self.proj_out.bias)
        value, gate = h.chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attn1 (self) -> attn2 (cross, or a second self-attention) -> GEGLU FF."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(RecomputeMixin, nn.Module):
    """GroupNorm -> Linear proj_in -> TransformerBlock (self + cross-attention) -> Linear proj_out, residual.
    Depth 1, heads = channels // head_dim, operating on the pixels of each frame."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.block = TransformerBlock(channels, heads, head_dim, context_dim)
        self.proj_out = nn.Linear(channels, channels)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        # (B*F, C, H, W) -> (B*F, H*W, C); free for channels-last storage
        bf, c, h, w = x.shape
        return self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        bf, c, h, w = x.shape
        tokens = self.proj_out(self.block(self.proj_in(self.cheap(self._tokens, x)), context))
        return x + tokens.view(bf, h, w, c).permute(0, 3, 1, 2)


class TemporalTransformer(RecomputeMixin, nn.Module):
    """GroupNorm (over the whole clip) -> Linear proj_in -> TransformerBlock with two self-attentions
    over frames -> Linear proj_out (zero-init: a fresh module is the identity), residual.
    No positional encoding: frame order is only seen through the temporal convs."""

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.block = TransformerBlock(inner, heads, head_dim, context_dim=None)
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _tokens(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # (B*F, C, H, W) -> (B, C, F, H*W) view for the clip-wide GroupNorm -> (B*H*W, F, C) tokens
        bf, c, h, w = x.shape
        b = bf // num_frames
        clip = x.reshape(b, num_frames, c, h * w).transpose(1, 2)
        return self.norm(clip).permute(0, 3, 2, 1).reshape(b * h * w, num_frames, c)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = bf // num_frames
        tokens = self.proj_out(self.block(self.proj_in(self.cheap(self._tokens, x, num_frames))))
        # (B*H*W, F, C) -> (B, H, W, F, C) -> (B, F, C, H, W), added to the residual
        out = tokens.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + out
