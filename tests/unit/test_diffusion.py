"""Noise schedules, forward noising, offset noise and v/eps algebra (model/diffusion.py)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from model.diffusion import SCHEDULES, DiffusionConfig, GaussianDiffusion, make_alphas_cumprod


def _diff(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(**kw))


def test_linear_sd_closed_form_and_diffusers():
    d = _diff(schedule="linear_sd", zero_terminal_snr=False)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-12)
    assert d.alphas_cumprod[999].item() == pytest.approx(math.prod((1 - betas).tolist()), rel=1e-9)
    assert d.alphas_cumprod[999].item() == pytest.approx(0.0046601, abs=1e-6)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for t in (0, 1, 250, 599, 999):  # diffusers works in float32
        assert d.alphas_cumprod[t].item() == pytest.approx(ref.alphas_cumprod[t].item(), rel=2e-5, abs=1e-7)


def test_cosine_zero_terminal_snr_matches_diffusers_and_is_monotone():
    d = _diff(schedule="cosine", zero_terminal_snr=True)
    ac = d.alphas_cumprod
    assert ac[-1].item() == 0.0
    assert torch.all(ac[1:] < ac[:-1])  # strictly decreasing -> SNR strictly decreasing
    snr = d.snr(torch.arange(1000))
    assert torch.all(snr[1:] < snr[:-1]) and snr[-1].item() == 0.0
    ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    assert torch.allclose(ac, ref.alphas_cumprod.double(), atol=2e-6)
    # the rescale keeps the first value of the plain cosine schedule
    plain = _diff(schedule="cosine", zero_terminal_snr=False).alphas_cumprod
    assert ac[0].item() == pytest.approx(plain[0].item(), rel=1e-12)
    assert plain[-1].item() > 0


def test_cosine_first_value_closed_form():
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    plain = _diff(schedule="cosine", zero_terminal_snr=False).alphas_cumprod
    assert plain[0].item() == pytest.approx(f(1 / 1000) / f(0), rel=1e-12)
    assert plain[499].item() == pytest.approx(f(500 / 1000) / f(0), rel=1e-9)


def test_logsnr_cosine_interp_endpoints():
    d = _diff(schedule="logsnr_cosine_interp", zero_terminal_snr=False)
    logsnr = torch.log(d.alphas_cumprod / (1 - d.alphas_cumprod))
    # t=0: logSNR_max shifted by scale_min=2; t=T-1: logSNR_min shifted by scale_max=4
    assert logsnr[0].item() == pytest.approx(15 - 2 * math.log(2), abs=1e-6)
    assert logsnr[-1].item() == pytest.approx(-15 - 2 * math.log(4), abs=1e-6)
    assert torch.all(logsnr[1:] < logsnr[:-1])
    z = _diff(schedule="logsnr_cosine_interp", zero_terminal_snr=True).alphas_cumprod
    assert z[-1].item() == pytest.approx(0.0, abs=1e-12) and torch.all(z[1:] < z[:-1])


def test_registry_lists_valid_keys():
    assert set(SCHEDULES) == {"cosine", "linear_sd", "logsnr_cosine_interp"}
    with pytest.raises(ValueError, match="valid: .*cosine.*linear_sd"):
        make_alphas_cumprod(DiffusionConfig(schedule="quadratic"))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_v_algebra_round_trips(schedule):
    d = _diff(schedule=schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 5, 6, generator=g)
    noise = torch.randn(3, 4, 2, 5, 6, generator=g)
    t = torch.tensor([0, 599, 999])
    xt = d.add_noise(x0, noise, t)
    v = d.v_target(x0, noise, t)
    x0_hat, eps_hat = d.x0_eps_from_v(xt, v, t)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, noise, atol=1e-5)
    # closed forms: v = sqrt(a) eps - sqrt(1-a) x0; x_t at zero SNR (cosine, t=999) is pure noise
    a = d.alphas_cumprod[599].float()
    assert torch.allclose(v[1], a.sqrt() * noise[1] - (1 - a).sqrt() * x0[1], atol=1e-6)
    if d.alphas_cumprod[999] == 0:
        assert torch.allclose(xt[2], noise[2]) and torch.allclose(v[2], -x0[2])


def test_eps_prediction_target_and_inverse():
    d = _diff(schedule="linear_sd", zero_terminal_snr=False, prediction="eps")
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    t = torch.tensor([10, 900])
    assert torch.equal(d.target(x0, noise, t), noise)
    x0_hat, _ = d.x0_eps(d.add_noise(x0, noise, t), noise, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4)


def test_offset_noise_is_shared_per_frame_and_channel():
    d = _diff(offset_noise=0.1)
    g = torch.Generator().manual_seed(1)
    n = d.sample_noise((8, 4, 6, 32, 32), generator=g)
    assert n.shape == (8, 4, 6, 32, 32)
    # the offset component is constant over H, W: per-(b,c,f) spatial means vary with std ~0.1 on top of
    # the 1/32 std of the mean of 1024 iid normals; plain noise has only the latter
    means = n.mean(dim=(-1, -2))
    plain = d.sample_noise((8, 4, 6, 32, 32), generator=g, offset_noise=0.0).mean(dim=(-1, -2))
    assert means.std().item() == pytest.approx(math.sqrt(0.1**2 + 1 / 1024), rel=0.25)
    assert plain.std().item() == pytest.approx(1 / 32, rel=0.25)
    assert n.var().item() == pytest.approx(1 + 0.01, rel=0.05)
    with pytest.raises(ValueError, match="offset noise"):
        d.sample_noise((4, 4), generator=g)


def test_per_sample_timesteps_broadcast_and_dtype():
    d = _diff()
    x0 = torch.randn(2, 4, 1, 2, 2, dtype=torch.bfloat16)
    out = d.add_noise(x0, torch.zeros_like(x0), torch.tensor([0, 999]))
    assert out.dtype == torch.bfloat16
    assert torch.all(out[1] == 0)  # zero SNR: no signal left at t=999
    assert torch.allclose(out[0].float(), x0[0].float() * d.sqrt_alpha[0].float(), atol=1e-2)
