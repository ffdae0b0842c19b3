"""The hand-written fast paths equal the plain PyTorch they replace: fused GEGLU (chunked, folded),
sub-pixel Upsample, and the whole UNet with selective recomputation on vs off (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.fused_ops as fused_ops
from model.resnet import Upsample
from model.unet import I2VGenUNet
from tests.unit.test_unet import outputs_and_grads_in_two_modes


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("chunk", [1 << 19, 7 * 16])  # one chunk / many chunks with a ragged last one
def test_fused_geglu_matches_autograd(monkeypatch, chunk):
    monkeypatch.setattr(fused_ops, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    t, d, inner, c = 37, 12, 16, 8
    x = torch.randn(3, t, d, requires_grad=True)
    value = torch.randn(3, t, inner, requires_grad=True)
    gate = torch.randn(3, t, inner, requires_grad=True)
    ff_w, ff_b = torch.randn(d, inner, requires_grad=True), torch.randn(d, requires_grad=True)
    out_w, out_b = torch.randn(c, d, requires_grad=True), torch.randn(c, requires_grad=True)

    # plain: proj_out(value * gelu(gate)); the upstream grad is a permuted (strided) view, as in the UNet
    ins = (value, gate, ff_w, ff_b)
    g = torch.randn(t, 3, d).transpose(0, 1)
    ref = F.linear(value * F.gelu(gate), ff_w, ff_b)
    out = fused_ops.geglu_proj_out(value, gate, ff_w, ff_b)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(_grads(out, ins, g), _grads(ref, ins, g)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)

    # folded: out_proj(x + ff(value * gelu(gate)))
    ins = (x, value, gate, ff_w, ff_b, out_w, out_b)
    g = torch.randn(t, 3, c).transpose(0, 1)
    ref = F.linear(x + F.linear(value * F.gelu(gate), ff_w, ff_b), out_w, out_b)
    out = fused_ops.geglu_proj_out_folded(*ins)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(out, ins, g), _grads(ref, ins, g)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("size", [(10, 12), (9, 12)])  # exact 2x (sub-pixel path) and a skip of odd height
def test_upsample_equals_nearest_resize_then_conv(size):
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, 5, 6, requires_grad=True)
    g = torch.randn(2, 6, *size)
    out = up(x, size)
    ref = up.conv(F.interpolate(x, size=size, mode="nearest"))
    assert out.shape == ref.shape == (2, 6, *size)
    assert torch.allclose(out, ref, atol=1e-5)
    ins = (x, up.conv.weight, up.conv.bias)
    for a, b in zip(_grads(out, ins, g), _grads(ref, ins, g)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_selective_recompute_same_output_and_grads(monkeypatch):
    monkeypatch.setattr(fused_ops, "CHUNK_ELEMENTS", 1024)  # several chunks even at tiny sizes
    (o0, g0), (o1, g1) = outputs_and_grads_in_two_modes(I2VGenUNet.enable_selective_recompute)
    assert torch.allclose(o0, o1, atol=1e-5)
    worst = max(((g0[n] - g1[n]).abs().max() / g0[n].abs().max().clamp_min(1e-12)).item() for n in g0)
    assert worst < 1e-3
    assert all(g.abs().sum() > 0 for g in g1.values())
