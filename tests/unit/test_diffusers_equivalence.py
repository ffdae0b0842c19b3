"""Our I2VGenUNet vs diffusers' I2VGenXLUNet: same weights (via model.convert) -> same outputs and grads.

Every parameter of the diffusers model is randomised, including the layers it zero-initialises
(temporal conv outputs, fps embedding...), so the comparison also covers them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import I2VGenXLUNet

from model.config import get_flavor
from model.convert import (
    config_to_diffusers,
    load_checkpoint,
    load_diffusers_unet_folder,
    load_unet,
    main as convert_main,
    save_checkpoint,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
)
from model.unet import I2VGenUNet, build_image_latents

TOL = 1e-5


def _randomise(model: torch.nn.Module) -> None:
    """Default (non-zero) init for every layer, then jitter the norm affines away from 1 / 0."""
    with torch.no_grad():
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = get_flavor("tiny")
    dcfg = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    theirs = I2VGenXLUNet(**dcfg).eval()
    _randomise(theirs)
    ours = I2VGenUNet(cfg).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict()), strict=True)
    return cfg, theirs, ours


def _inputs(cfg, b=2, f=3, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = cfg.cross_attention_dim
    return dict(
        sample=torch.randn(b, cfg.in_channels, f, h, w, generator=g),
        timestep=torch.tensor([10, 500][:b]),
        fps=torch.tensor([8, 16][:b]),
        image_latents=build_image_latents(torch.randn(b, 4, h, w, generator=g), f),
        image_embeddings=torch.randn(b, cfg.image_embed_dim, generator=g),
        encoder_hidden_states=torch.randn(b, 7, d, generator=g),
    )


def _theirs(model, inp):
    return model(**inp, return_dict=False)[0]


def test_no_zero_parameters_left(pair):
    _, theirs, _ = pair
    zero = [n for n, p in theirs.named_parameters() if p.abs().max() == 0]
    assert zero == [], f"zero-initialised layers would make the comparison blind to them: {zero}"


@pytest.mark.parametrize("f,h,w", [(3, 8, 8), (1, 8, 8), (2, 6, 10)], ids=["F3", "F1-image", "F2-odd-size"])
def test_forward_matches_diffusers(pair, f, h, w):
    cfg, theirs, ours = pair
    inp = _inputs(cfg, f=f, h=h, w=w)
    with torch.no_grad():
        ref, out = _theirs(theirs, inp), ours(**inp)
    assert out.shape == ref.shape == (2, cfg.out_channels, f, h, w)
    assert ref.std() > 0.1  # a real signal, not a vanishing output
    assert (out - ref).abs().max().item() <= TOL


def test_gradients_match_diffusers(pair):
    cfg, theirs, ours = pair
    inp = _inputs(cfg, f=2)
    for m in (theirs, ours):
        m.zero_grad()
    _theirs(theirs, inp).square().mean().backward()
    ours(**inp).square().mean().backward()
    ref = state_dict_from_diffusers({n: p.grad for n, p in theirs.named_parameters()})
    worst = max((p.grad - ref[n]).abs().max().item() for n, p in ours.named_parameters())
    assert worst <= TOL
    # at an 8x8 latent the mid block is 1x1: its spatial self-attention has one key, softmax over it is the
    # constant 1, so q/k get exactly zero gradient (diffusers' flash kernel leaves only rounding noise)
    single_key = {f"mid_block.spatial.block.attn1.to_{n}.weight" for n in "qk"}
    assert all(ref[n].abs().max() <= TOL for n in single_key)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if n not in single_key)


def test_comparison_is_sensitive(pair):
    """Perturbing any conditioning path or zero-init-by-default layer must show up in the output
    (otherwise the equality above could pass vacuously)."""
    cfg, theirs, ours = pair
    inp = _inputs(cfg)
    params = dict(ours.named_parameters())
    names = ["down_blocks.0.res.0.temporal.stages.3.conv.weight", "transformer_in.proj_out.weight",
             "fps_embed.linear_2.weight", "image_global.linear_2.weight", "image_local.conv3.weight",
             "image_concat.mixer.ff_out.weight"]
    with torch.no_grad():
        ref = _theirs(theirs, inp)
        for name in names:
            p = params[name]
            old = p.detach().clone()
            p.add_(0.05 * torch.randn_like(p))
            diff = (ours(**inp) - ref).abs().max().item()
            p.copy_(old)
            assert diff > 10 * TOL, f"{name} does not affect the output"


def test_release_key_mapping_is_complete_and_reversible():
    with torch.device("meta"):
        theirs, ours = I2VGenXLUNet(), I2VGenUNet(get_flavor("i2vgen-xl"))
    dsd, osd = theirs.state_dict(), ours.state_dict()
    mapped = state_dict_from_diffusers(dsd)
    assert set(mapped) == set(osd)
    assert all(mapped[k].shape == osd[k].shape for k in osd)
    assert set(state_dict_to_diffusers(osd)) == set(dsd)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 1_420_469_224


def test_round_trip_files_ours_diffusers_ours(pair, tmp_path):
    cfg, theirs, ours = pair
    sd = ours.state_dict()
    save_checkpoint(tmp_path / "ours", cfg, sd)
    convert_main(["--to-diffusers", str(tmp_path / "ours"), "--out", str(tmp_path / "diffusers")])
    reloaded = I2VGenXLUNet.from_pretrained(tmp_path / "diffusers").eval()  # diffusers itself reads our export
    inp = _inputs(cfg, f=2)
    with torch.no_grad():
        assert (_theirs(reloaded, inp) - ours(**inp)).abs().max().item() <= TOL
    convert_main(["--from-diffusers", str(tmp_path / "diffusers"), "--out", str(tmp_path / "back")])
    cfg_back, sd_back = load_checkpoint(tmp_path / "back")
    assert cfg_back == dataclasses.replace(cfg, num_frames_default=16)  # diffusers has no frame-count field
    assert set(sd_back) == set(sd) and all(torch.equal(sd_back[k], sd[k]) for k in sd)
    # a folder written by diffusers' own save_pretrained loads straight into ours
    theirs.save_pretrained(tmp_path / "saved_by_diffusers", safe_serialization=True)
    unet = load_unet(tmp_path / "saved_by_diffusers").eval()
    with torch.no_grad():
        assert (unet(**inp) - ours(**inp)).abs().max().item() <= TOL
    cfg2, _ = load_diffusers_unet_folder(tmp_path / "saved_by_diffusers")
    assert cfg2 == dataclasses.replace(cfg, num_frames_default=16)


def test_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "I2VGenXLUNet"}')
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        load_diffusers_unet_folder(folder)


def test_diffusers_cannot_express_refine_flavour():
    with pytest.raises(ValueError, match="always has fps"):
        config_to_diffusers(get_flavor("refine-1280x720"))
