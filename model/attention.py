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

from model.fused_ops import geglu_proj_out, geglu_proj_out_folded
from model.recompute import RecomputeMixin
from model.weight_init import zero_module


# On CPU, SDPA's flash kernel has a large fixed cost per (sequence, head) block: for the temporal attentions
# (sequences of F frames, one per pixel, thousands of them) plain batched matmuls are faster (bench/model.py).
SHORT_SEQUENCE_MAX = 32


class _ShortSoftmax(torch.autograd.Function):
    """Softmax over a short last dim. ATen's CPU kernel vectorises along that dim and is ~5x slower than
    these few whole-tensor passes when it holds only F (e.g. 8) values."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        probs = (scores - scores.amax(-1, keepdim=True)).exp_()
        probs.div_(probs.sum(-1, keepdim=True))
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        gp = grad * probs
        return gp.sub_(probs * gp.sum(-1, keepdim=True))  # p * (g - sum(g * p))


def short_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for short sequences as batched matmuls; (..., L, d) -> (..., L, d).
    Keeps only the (L x L) probabilities (besides q/k/v) for backward, less than SDPA's saved output."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(_ShortSoftmax.apply(scores), v)


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


class GEGLUFeedForward(RecomputeMixin, nn.Module):
    """Linear(D, 2*inner) -> value * gelu(gate) -> Linear(inner, D)  (inner = 4*D).
    With selective recomputation only value and gate are kept for backward (model/fused_ops.py)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2)
        self.proj_out = nn.Linear(inner, dim)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the fused (recomputing) path runs for this input."""
        return self.recompute_cheap and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)

    def value_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """proj_in(x) as two dense halves (value, gate): two GEMMs on the weight's row halves, same FLOPs
        as one, but no strided half views for GELU (see model/fused_ops.py)."""
        w, b = self.proj_in.weight, self.proj_in.bias
        inner = w.shape[0] // 2
        return F.linear(x, w[:inner], b[:inner]), F.linear(x, w[inner:], b[inner:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused(x):
            return geglu_proj_out(*self.value_gate(x), self.proj_out.weight, self.proj_out.bias)
        value, gate = self.value_gate(x)
        return self.proj_out(F.gelu(gate).mul_(value) if not torch.is_grad_enabled() else value * F.gelu(gate))


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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                out_proj: nn.Linear | None = None) -> torch.Tensor:
        """(N, L, D) -> (N, L, D), or out_proj of it (N, L, C) when the caller's projection is passed in."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        ff = self.ff
        if out_proj is not None and out_proj.out_features < x.shape[-1] and ff.fused(x):
            # C < D: fold ff.proj_out into out_proj (model/fused_ops.py), fewer FLOPs and one T x D tensor less kept
            return geglu_proj_out_folded(x, *ff.value_gate(self.norm3(x)), ff.proj_out.weight, ff.proj_out.bias,
                                         out_proj.weight, out_proj.bias)
        x = x + self.ff(self.norm3(x))
        return x if out_proj is None else out_proj(x)


class SpatialTransformer(nn.Module):
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
        tokens = self.proj_out(self.block(self.proj_in(self._tokens(x)), context))
        return x + tokens.view(bf, h, w, c).permute(0, 3, 1, 2)


class TemporalTransformer(nn.Module):
    """GroupNorm (over the whole clip) -> Linear proj_in -> TransformerBlock with two self-attentions
    over frames -> Linear proj_out (zero-init: a fresh module is the identity), residual.
    No positional encoding: frame order is only seen through the temporal convs."""

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.block = TransformerBlock(inner, heads, head_dim, context_dim=None)
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def _tokens(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # (B*F, C, H, W) -> (B, C, F, H*W) view for the clip-wide GroupNorm -> (B*H*W, F, C) tokens
        bf, c, h, w = x.shape
        b = bf // num_frames
        clip = x.reshape(b, num_frames, c, h * w).transpose(1, 2)
        return self.norm(clip).permute(0, 3, 2, 1).reshape(b * h * w, num_frames, c)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = bf // num_frames
        tokens = self.block(self.proj_in(self._tokens(x, num_frames)), out_proj=self.proj_out)
        # (B*H*W, F, C) -> (B, H, W, F, C) -> (B, F, C, H, W), added to the residual
        out = tokens.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + out
