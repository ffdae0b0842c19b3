"""training.objective + training.frozen: per-sample randomness, CFG dropout, timesteps, target, loss.

Tiny random VAE/CLIP/UNet configs built in code (no weights are downloaded).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.config import get_flavor
from model.diffusion import DiffusionConfig, GaussianDiffusion
from model.encoders import ClipConfig
from model.unet import build_image_latents
from model.vae import VAEConfig
from training.frozen import FrozenEncoders
from training.objective import Objective, ObjectiveConfig, dropout_events, sample_seed

F, H, W = 3, 16, 16


@pytest.fixture(scope="module")
def base_encoders():
    ucfg = get_flavor("tiny")
    return ucfg, FrozenEncoders(ucfg, ClipConfig(kind="tiny-random"), VAEConfig(kind="tiny-random"))


def _batch(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    return SimpleNamespace(
        pixels=torch.rand(n, 3, F, H, W, generator=g) * 2 - 1,
        fps=torch.full((n,), 8, dtype=torch.long),
        captions=[f"caption number {i}" for i in ids],
        sample_ids=torch.tensor(ids, dtype=torch.int64),
    )


def _select(batch, idx):
    return SimpleNamespace(pixels=batch.pixels[idx], fps=batch.fps[idx],
                           captions=[batch.captions[i] for i in idx], sample_ids=batch.sample_ids[idx])


def test_a_sample_gets_the_same_inputs_whatever_batch_it_is_in(base_encoders):
    ucfg, enc = base_encoders
    obj = Objective(ObjectiveConfig(p_text=0.3, p_image=0.3, p_both=0.3), GaussianDiffusion(), ucfg, seed=5)
    batch = _batch([11, 12, 13, 14])
    together, target = obj.inputs(batch, enc)
    for part in ([0, 2], [3], [1]):
        alone, t_alone = obj.inputs(_select(batch, part), enc)
        for key, value in alone.items():
            torch.testing.assert_close(value, together[key][part], rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(t_alone, target[part], rtol=1e-5, atol=1e-5)
    # another run seed or another sample id changes the draws
    other, _ = Objective(ObjectiveConfig(), GaussianDiffusion(), ucfg, seed=6).inputs(batch, enc)
    assert not torch.equal(other["sample"], together["sample"])
    assert sample_seed(0, 1) != sample_seed(0, 2) != sample_seed(1, 1)


def test_inputs_follow_the_diffusion_and_conditioning_contract(base_encoders):
    ucfg, enc = base_encoders
    diffusion = GaussianDiffusion(DiffusionConfig(offset_noise=0.0))
    obj = Objective(ObjectiveConfig(p_text=0.0, p_image=0.0, p_both=0.0), diffusion, ucfg, seed=0)
    batch = _batch([1, 2])
    kw, target = obj.inputs(batch, enc)
    assert set(kw) == {"sample", "timestep", "encoder_hidden_states", "image_embeddings", "image_latents", "fps"}
    assert kw["sample"].shape == (2, 4, F, H // 8, W // 8) and kw["sample"].dtype == torch.float32
    # reconstruct x0 and noise from (x_t, v) and check x_t = sqrt(a) x0 + sqrt(1-a) noise exactly as model.diffusion
    x0, eps = diffusion.x0_eps_from_v(kw["sample"], target, kw["timestep"])
    torch.testing.assert_close(diffusion.add_noise(x0, eps, kw["timestep"]), kw["sample"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kw["image_latents"], build_image_latents(x0[:, :, 0], F), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kw["encoder_hidden_states"], enc.text(batch.captions))
    torch.testing.assert_close(kw["image_embeddings"], enc.image_embeds(batch.pixels[:, :, 0]))
    assert kw["fps"].tolist() == [8, 8]
    # the UNet accepts them
    unet_out = __import__("model.unet", fromlist=["I2VGenUNet"]).I2VGenUNet(ucfg)(**kw)
    assert unet_out.shape == target.shape
    assert Objective.loss(unet_out, target).dtype == torch.float32


def test_timesteps_stay_in_the_configured_range(base_encoders):
    ucfg, enc = base_encoders
    obj = Objective(ObjectiveConfig(timestep_range=(0, 600)), GaussianDiffusion(), ucfg, seed=1)
    ts = obj.inputs(_batch(list(range(64))), enc)[0]["timestep"]
    assert ts.min() >= 0 and ts.max() < 600 and ts.max() > 400  # spread over the range, none above 599
    with pytest.raises(ValueError, match="timestep_range"):
        Objective(ObjectiveConfig(timestep_range=(0, 1200)), GaussianDiffusion(), ucfg, seed=1)
    with pytest.raises(ValueError, match="timestep_range"):
        ObjectiveConfig(timestep_range=(500, 500))


def test_dropout_events_are_exclusive_with_the_configured_probabilities():
    cfg = ObjectiveConfig(p_text=0.2, p_image=0.1, p_both=0.3)
    u = (torch.arange(10000) + 0.5) / 10000
    text, image = dropout_events(u, cfg, has_image=True)
    only_text, only_image, both = text & ~image, image & ~text, text & image
    assert only_text.float().mean().item() == pytest.approx(0.2, abs=1e-3)
    assert only_image.float().mean().item() == pytest.approx(0.1, abs=1e-3)
    assert both.float().mean().item() == pytest.approx(0.3, abs=1e-3)
    text_r, image_r = dropout_events(u, cfg, has_image=False)  # refiner: both drops the caption only
    assert not image_r.any() and text_r.float().mean().item() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="<= 1"):
        ObjectiveConfig(p_text=0.5, p_image=0.4, p_both=0.2)


def test_dropped_conditions_are_the_inference_null_branch(base_encoders):
    ucfg, enc = base_encoders
    batch = _batch(list(range(40)))
    keep, _ = Objective(ObjectiveConfig(p_text=0, p_image=0, p_both=0), GaussianDiffusion(), ucfg, 3).inputs(
        batch, enc)
    drop, _ = Objective(ObjectiveConfig(p_text=0.3, p_image=0.3, p_both=0.3), GaussianDiffusion(), ucfg, 3).inputs(
        batch, enc)
    null = enc.null_text()[0]
    text_dropped = torch.tensor([torch.equal(drop["encoder_hidden_states"][i], null) for i in range(40)])
    image_dropped = (drop["image_embeddings"] == 0).all(dim=1)
    assert 0 < text_dropped.sum() < 40 and 0 < image_dropped.sum() < 40
    assert (text_dropped & image_dropped).any()  # the 'both' event happens
    kept = ~text_dropped
    torch.testing.assert_close(drop["encoder_hidden_states"][kept], keep["encoder_hidden_states"][kept])
    # the local image path and fps are never dropped (inference keeps them in the null branch)
    torch.testing.assert_close(drop["image_latents"], keep["image_latents"])
    torch.testing.assert_close(drop["sample"], keep["sample"])


def test_refine_unet_gets_text_only():
    ucfg = get_flavor("tiny-refine")
    enc = FrozenEncoders(ucfg, ClipConfig(kind="tiny-random"), VAEConfig(kind="tiny-random"))
    assert enc.clip.model.visual is None  # no image tower built for the refiner
    kw, _ = Objective(ObjectiveConfig(timestep_range=(0, 600)), GaussianDiffusion(), ucfg, 0).inputs(_batch([1]), enc)
    assert set(kw) == {"sample", "timestep", "encoder_hidden_states"}


def test_encoder_width_mismatch_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="model.clip"):
        FrozenEncoders(get_flavor("tiny"), ClipConfig(kind="tiny-random", text_dim=32), VAEConfig(kind="tiny-random"))
