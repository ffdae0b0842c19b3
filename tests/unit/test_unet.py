"""I2VGenUNet behaviour: shapes, F=1, input checks, zero-init temporal parts, activation checkpointing,
flavour sizes (built on the meta device)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import I2VGenXLUNet

from model.attention import TemporalTransformer
from model.config import FLAVORS, get_flavor
from model.resnet import TemporalConvBlock
from model.summary import RELEASE_PARAMS, build_meta, count_blocks, count_params, main as summary_main
from model.unet import I2VGenUNet, build_image_latents


def _inputs(cfg, b=2, f=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    inp = dict(sample=torch.randn(b, cfg.in_channels, f, h, w, generator=g), timestep=torch.tensor([3, 700][:b]))
    if cfg.use_fps:
        inp["fps"] = torch.tensor([8, 16][:b])
    if cfg.use_image_local or cfg.use_image_concat:
        inp["image_latents"] = build_image_latents(torch.randn(b, 4, h, w, generator=g), f)
    if cfg.use_image_global:
        inp["image_embeddings"] = torch.randn(b, cfg.image_embed_dim, generator=g)
    if cfg.use_text:
        inp["encoder_hidden_states"] = torch.randn(b, 5, cfg.cross_attention_dim, generator=g)
    return inp


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return I2VGenUNet(get_flavor("tiny")).eval()


@pytest.mark.parametrize("f", [1, 4])
def test_forward_shapes_including_single_frame(tiny, f):
    with torch.no_grad():
        out = tiny(**_inputs(tiny.cfg, f=f))
    assert out.shape == (2, 4, f, 8, 8)
    assert torch.isfinite(out).all()


def test_scalar_timestep_and_fps_broadcast(tiny):
    inp = _inputs(tiny.cfg)
    with torch.no_grad():
        ref = tiny(**{**inp, "timestep": torch.tensor([5, 5]), "fps": torch.tensor([8, 8])})
        out = tiny(**{**inp, "timestep": 5, "fps": 8})
    assert torch.equal(out, ref)


def test_build_image_latents_matches_the_pipeline_ramp():
    first = torch.randn(2, 4, 3, 5)
    lat = build_image_latents(first, 5)
    assert lat.shape == (2, 4, 5, 3, 5)
    assert torch.equal(lat[:, :, 0], first)
    for k in range(1, 5):
        assert torch.all(lat[:, :, k] == k / 4)
    assert torch.equal(build_image_latents(first, 1)[:, :, 0], first)


def test_missing_and_forbidden_inputs_raise(tiny):
    inp = _inputs(tiny.cfg)
    with pytest.raises(ValueError, match="image_embeddings is required"):
        tiny(**{k: v for k, v in inp.items() if k != "image_embeddings"})
    refine_cfg = get_flavor("tiny", use_fps=False, use_image_global=False, use_image_local=False, use_image_concat=False)
    refine = I2VGenUNet(refine_cfg).eval()
    assert refine.conv_in.in_channels == 4
    with pytest.raises(ValueError, match="use_image_global=False"):
        refine(**_inputs(refine_cfg), image_embeddings=inp["image_embeddings"])
    with pytest.raises(ValueError, match="image_latents must be"):
        tiny(**{**inp, "image_latents": inp["image_latents"][:, :, :1]})
    with torch.no_grad():
        assert refine(**_inputs(refine_cfg)).shape == (2, 4, 3, 8, 8)


def test_fresh_temporal_parts_are_identity():
    x = torch.randn(6, 16, 4, 4)
    assert torch.equal(TemporalConvBlock(16, 8)(x, num_frames=3), x)
    assert torch.equal(TemporalTransformer(16, 2, 8, 8)(x, num_frames=3), x)


def test_fresh_model_treats_identical_frames_like_an_image(tiny):
    """Zero-init temporal convs / transformers (and no positional encoding): a clip of F identical frames
    with identical image latents gives F identical frames, equal to the F=1 output."""
    one = _inputs(tiny.cfg, f=1)
    clip = dict(one)
    clip["sample"] = one["sample"].expand(-1, -1, 4, -1, -1).contiguous()
    clip["image_latents"] = one["image_latents"].expand(-1, -1, 4, -1, -1).contiguous()
    with torch.no_grad():
        out1, out4 = tiny(**one), tiny(**clip)
    assert (out4 - out1.expand_as(out4)).abs().max().item() < 1e-5
    # and a trained-looking temporal conv breaks that symmetry (the check above is not vacuous)
    with torch.no_grad():
        conv = tiny.down_blocks[0].res[0].temporal.stages[3].conv
        old = conv.weight.clone()
        conv.weight.normal_(0, 0.1)
        clip["sample"][:, :, 1] += 1.0
        moved = tiny(**clip)
        conv.weight.copy_(old)
    assert (moved[:, :, 0] - moved[:, :, 3]).abs().max() > 1e-3


def outputs_and_grads_in_two_modes(set_mode):
    """Output and every parameter's grad of one tiny train-mode UNet (no dropout, no zero-init layer: every
    path must carry gradient) with `set_mode(model, False)`, then `set_mode(model, True)`."""
    torch.manual_seed(0)
    cfg = get_flavor("tiny", dropout=0.0)
    model = I2VGenUNet(cfg).train()
    for p in model.parameters():
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    # 16x16: the mid block then sees 2x2 pixels; at 1x1 its spatial self-attention has a single key and
    # q/k would get exactly zero gradient
    inp = _inputs(cfg, f=2, h=16, w=16)
    results = []
    for mode in (False, True):
        set_mode(model, mode)
        model.zero_grad()
        out = model(**inp)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


def test_gradient_checkpointing_same_output_and_grads():
    (o0, g0), (o1, g1) = outputs_and_grads_in_two_modes(I2VGenUNet.enable_gradient_checkpointing)
    assert torch.allclose(o0, o1, atol=1e-6)
    assert max((g0[n] - g1[n]).abs().max().item() for n in g0) < 1e-6
    assert all(g.abs().sum() > 0 for g in g0.values())


def test_channels_last_gives_the_same_output(tiny):
    inp = _inputs(tiny.cfg)
    with torch.no_grad():
        ref = tiny(**inp)
        tiny.set_channels_last(True)
        try:
            out = tiny(**inp)
        finally:
            tiny.set_channels_last(False)
    assert (out - ref).abs().max().item() < 1e-5


def test_flavour_sizes_on_meta():
    counts = {name: count_params(build_meta(cfg)) for name, cfg in FLAVORS.items()}
    assert counts["tiny"] < 5_000_000
    assert abs(counts["i2vgen-xl"] - RELEASE_PARAMS) / RELEASE_PARAMS < 1e-3
    assert counts["base-448x256"] == counts["i2vgen-xl"]
    with torch.device("meta"):
        assert counts["i2vgen-xl"] == sum(p.numel() for p in I2VGenXLUNet().parameters())
    refine = build_meta(get_flavor("refine-1280x720"))
    assert refine.conv_in.in_channels == 4 and refine.fps_embed is None and refine.image_global is None
    for name in FLAVORS:  # every flavour keeps the full block structure
        model = build_meta(get_flavor(name))
        assert count_blocks(model) == {"resblocks": 22, "spatial_transformers": 16, "temporal_transformers": 17}
        assert all(p.is_meta for p in model.parameters())


def test_unknown_flavour_lists_valid_names():
    with pytest.raises(ValueError, match="i2vgen-xl"):
        get_flavor("huge")


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="attention_levels"):
        dataclasses.replace(get_flavor("tiny"), attention_levels=(True, False))


def test_summary_cli(capsys):
    summary_main(["i2vgen-xl"])
    out = capsys.readouterr().out
    assert "total parameters: 1,420,469,224" in out
    assert "22 ResBlocks, 16 spatial transformers, 17 temporal transformers" in out


def test_fused_group_norm_silu_dropout_matches_autograd():
    from model.recompute import group_norm_silu_dropout

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    x = torch.randn(2, 8, 3, 5).transpose(2, 3).requires_grad_()  # a strided view, as inside the UNet
    g = torch.randn(2, 8, 5, 3)
    for p in (0.0, 0.3):
        out = group_norm_silu_dropout(x, norm, torch.nn.Dropout(p).train(), recompute=True)
        grads = torch.autograd.grad(out, (x, norm.weight, norm.bias), g)
        keep = (out != 0).float() / (1 - p)  # the mask the fused op drew (silu output is never exactly 0 here)
        ref = torch.nn.functional.silu(norm(x)) * keep
        ref_grads = torch.autograd.grad(ref, (x, norm.weight, norm.bias), g)
        assert torch.allclose(out, ref, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))
        if p:
            assert 0.5 < (out != 0).float().mean() < 0.9  # about 1 - p kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dropout_rate_is_p(dtype):
    """The fused node drops a fraction p of the activations (the mask is drawn in float32 whatever the dtype)
    and scales the rest by 1 / (1 - p)."""
    from model.recompute import group_norm_silu_dropout

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 64).to(dtype)
    x = torch.randn(2, 64, 4, 4096, dtype=dtype, requires_grad=True)  # 2M activations: binomial sd 2e-4
    out = group_norm_silu_dropout(x, norm, torch.nn.Dropout(0.1).train(), recompute=True)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 0.1) < 2e-3
    with torch.no_grad():
        ref = torch.nn.functional.silu(norm(x)).float() / 0.9
    kept = out != 0
    assert torch.allclose(out.float()[kept], ref[kept], rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
