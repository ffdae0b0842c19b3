"""DDIM, timestep spacing, classifier-free guidance and its rescale (model/samplers.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.guiders.guider_utils import rescale_noise_cfg

from model.diffusion import DiffusionConfig, GaussianDiffusion
from model.samplers import (
    DDIMSampler,
    SamplerConfig,
    apply_guidance,
    ddim_timesteps,
    guided_denoiser,
    null_conditioning,
)


def oracle_v(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """Denoiser returning the exact v for clean sample x0 at (x_t, t)."""
    def denoise(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = diffusion.alphas_cumprod[t].view(-1, *[1] * (xt.ndim - 1))
        x0d, xtd = x0.double(), xt.double()
        eps = torch.where(a < 1, (xtd - a.sqrt() * x0d) / (1 - a).clamp(min=1e-300).sqrt(), torch.zeros_like(xtd))
        return (a.sqrt() * eps - (1 - a).sqrt() * x0d).to(xt.dtype)
    return denoise


@pytest.mark.parametrize("schedule,eta,spacing", [
    ("cosine", 0.0, "leading"), ("cosine", 1.0, "leading"), ("linear_sd", 0.0, "trailing"),
    ("logsnr_cosine_interp", 0.0, "linspace"),
])
def test_ddim_with_oracle_reproduces_x0(schedule, eta, spacing):
    d = GaussianDiffusion(DiffusionConfig(schedule=schedule))
    sampler = DDIMSampler(d, SamplerConfig(steps=20, eta=eta, spacing=spacing))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=torch.float64)
    out = sampler.sample(oracle_v(d, x0), x_t, generator=g)
    assert (out - x0).abs().max().item() < 1e-5
    assert (x_t - x0).abs().max().item() > 1  # the start really was noise


@pytest.mark.parametrize("steps", [1, 7, 20, 50, 999])
def test_leading_timesteps_equal_diffusers(steps):
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(steps)
    assert torch.equal(ddim_timesteps(1000, steps, "leading", steps_offset=1), ref.timesteps)
    ref0 = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ref0.set_timesteps(steps)
    assert torch.equal(ddim_timesteps(1000, steps, "trailing"), ref0.timesteps)


def test_sdedit_timesteps_start_at_t_start():
    ts = ddim_timesteps(1000, 30, "trailing", t_start=599)
    assert ts[0].item() == 599 and len(ts) == 30 and torch.all(ts[1:] < ts[:-1])
    assert ddim_timesteps(1000, 30, "leading", t_start=599)[0].item() <= 599
    with pytest.raises(ValueError, match="t_start"):
        ddim_timesteps(1000, 10, t_start=1000)
    with pytest.raises(ValueError, match="valid"):
        ddim_timesteps(1000, 10, "karras")


def test_ddim_trajectory_equals_diffusers_v_prediction():
    """Same model, same start, release schedule: our DDIM == diffusers' DDIMScheduler step by step."""
    d = GaussianDiffusion(DiffusionConfig(schedule="cosine", zero_terminal_snr=True, prediction="v"))
    ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, prediction_type="v_prediction",
                        timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(25)
    sampler = DDIMSampler(d, SamplerConfig(steps=25))

    def model(x, t):  # a smooth, t-dependent fake prediction
        return 0.3 * x + 0.1 * torch.sin(t.view(-1, 1, 1, 1, 1).float() / 100)

    x = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    ours = sampler.sample(model, x.clone())
    y = x.clone()
    for t in ref.timesteps:
        y = ref.step(model(y, t.view(1)), t, y).prev_sample
    assert torch.equal(sampler.timesteps(), ref.timesteps)
    assert (ours - y).abs().max().item() < 1e-4


def test_guidance_one_is_conditional_with_a_single_call():
    calls = []

    def model(x, t, **kw):
        calls.append(x.shape[0])
        return x * kw["fps"].view(-1, 1, 1, 1, 1)

    cond = {"fps": torch.tensor([2.0])}
    den = guided_denoiser(model, cond, {"fps": torch.tensor([5.0])}, guidance=1.0)
    x = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(den(x, torch.tensor([10])), 2 * x) and calls == [1]
    den = guided_denoiser(model, cond, {"fps": torch.tensor([5.0])}, guidance=3.0)
    # u + 3 (c - u) = 5x + 3 (2x - 5x) = -4x, from one batched call of 2B
    assert torch.allclose(den(x, torch.tensor([10])), -4 * x) and calls[-1] == 2


def test_guidance_rescale_matches_lin_et_al_and_diffusers():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 4, 3, 5, 5, generator=g), 3 * torch.randn(2, 4, 3, 5, 5, generator=g)
    plain = apply_guidance(c, u, 7.5)
    assert torch.allclose(plain, u + 7.5 * (c - u))
    full = apply_guidance(c, u, 7.5, rescale=1.0)
    dims = (1, 2, 3, 4)
    assert torch.allclose(full.std(dim=dims), c.std(dim=dims), rtol=1e-5)  # phi=1: std of the cond output
    for phi in (0.2, 0.7):
        assert torch.allclose(apply_guidance(c, u, 7.5, phi), rescale_noise_cfg(plain, c, phi), atol=1e-5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        apply_guidance(c, u, 2.0, rescale=1.5)


def test_unconditional_branch_keeps_image_latents_and_fps():
    """Recording fake UNet: the uncond half gets null text + zero image embedding, same latents and fps."""
    seen = {}

    def model(x, t, **kw):
        seen.update(kw)
        return torch.zeros_like(x)

    b = 2
    cond = {
        "encoder_hidden_states": torch.randn(b, 77, 8),
        "image_embeddings": torch.randn(b, 6),
        "image_latents": torch.randn(b, 4, 3, 4, 4),
        "fps": torch.tensor([8, 8]),
    }
    null_text = torch.randn(1, 77, 8)
    uncond = null_conditioning(cond, null_text)
    guided_denoiser(model, cond, uncond, guidance=9.0)(torch.randn(b, 4, 3, 4, 4), torch.tensor([5, 5]))
    c_half, u_half = (lambda k: seen[k][:b]), (lambda k: seen[k][b:])
    assert torch.equal(c_half("encoder_hidden_states"), cond["encoder_hidden_states"])
    assert torch.equal(u_half("encoder_hidden_states"), null_text.expand(b, 77, 8))
    assert torch.equal(c_half("image_embeddings"), cond["image_embeddings"])
    assert torch.equal(u_half("image_embeddings"), torch.zeros(b, 6))
    assert torch.equal(u_half("image_latents"), cond["image_latents"])
    assert torch.equal(u_half("fps"), cond["fps"])
    with pytest.raises(ValueError, match="null_text"):
        null_conditioning(cond, None)
