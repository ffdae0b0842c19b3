"""Diffusion process outside the UNet: noise schedules, forward noising, offset noise, v/eps targets.

Shape legend
    x0, xt, noise, v : (B, C, F, H, W) video latents (any tensor with batch first works)
    t                : (B,) integer timesteps in [0, num_timesteps)
    alphas_cumprod   : (T,) float64, a_t = prod_{s<=t} (1 - beta_s); signal scale sqrt(a_t), noise scale sqrt(1 - a_t)

Schedules (registry `SCHEDULES`, each returns alphas_cumprod in float64):
    cosine               Nichol & Dhariwal cosine with s=0.008, betas capped at 0.999, then (zero_terminal_snr)
                         the Lin et al. 2023 rescale of sqrt(a_t) so a_{T-1} == 0. I2VGen-XL release
                         (VGen configs/i2vgen_xl_train.yaml: schedule cosine, cosine_s 0.008,
                         zero_terminal_snr True, mean_type v, noise_strength 0.1); equals diffusers'
                         DDIMScheduler(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True).
    linear_sd            SD v1 "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), T)^2
                         (VGen schedules.py linear_sd; ModelScope v1 base).
    logsnr_cosine_interp ModelScope v1 refiner (MS-Vid2Vid-XL, modelscope/models/multi_modal/video_to_video/
                         utils/schedules_sdedit.py): logSNR of a cosine schedule clipped to [-15, 15],
                         shifted by -2 log(scale), linearly interpolated from scale 2 (t=0) to scale 4 (t=T-1);
                         sigma_t = sqrt(sigmoid(-logSNR_t)); zero_terminal_snr rescales sigma linearly so that
                         sigma_{T-1} == 1 (that file's own post-processing, not the beta rescale).

Prediction targets: v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022), or eps.
    x0  = sqrt(a) xt - sqrt(1-a) v
    eps = sqrt(1-a) xt + sqrt(a) v        (no division, so a == 0 at the zero-SNR end is fine)
Offset noise (VGen DiffusionDDIM.sample_loss): noise = randn(B,C,F,H,W) + strength * randn(B,C,F,1,1).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from model.config import DiffusionConfig


# --------------------------------------------------------------------------------------------- schedules
def _rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift/scale sqrt(a_t) so the last value is 0 and the first is unchanged."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def cosine_alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """Per-step cosine betas min(1 - f(t+1)/f(t), 0.999), f(u) = cos((u + s)/(1 + s) * pi/2)^2."""
    n, s = cfg.num_timesteps, cfg.cosine_s
    u = torch.arange(n + 1, dtype=torch.float64) / n
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return _rescale_zero_terminal_snr(alphas_cumprod) if cfg.zero_terminal_snr else alphas_cumprod


def linear_sd_alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """SD v1 scaled_linear betas: linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return _rescale_zero_terminal_snr(alphas_cumprod) if cfg.zero_terminal_snr else alphas_cumprod


def logsnr_cosine_interp_alphas_cumprod(cfg: DiffusionConfig, logsnr_min: float = -15.0,
                                        logsnr_max: float = 15.0) -> torch.Tensor:
    """ModelScope v1 refiner schedule (see module docstring); a_t = 1 - sigma_t^2."""
    n = cfg.num_timesteps
    ramp = torch.linspace(1, 0, n, dtype=torch.float64)  # 1 at t=0 (clean end), 0 at t=T-1
    t_min = math.atan(math.exp(-0.5 * logsnr_min))
    t_max = math.atan(math.exp(-0.5 * logsnr_max))
    logsnr = -2 * torch.log(torch.tan(t_min + ramp * (t_max - t_min)))  # +15 at t=0 .. -15 at t=T-1
    shifted_min = logsnr + 2 * math.log(1 / cfg.logsnr_scale_min)
    shifted_max = logsnr + 2 * math.log(1 / cfg.logsnr_scale_max)
    logsnr = ramp * shifted_min + (1 - ramp) * shifted_max
    sigmas = torch.sigmoid(-logsnr).sqrt()
    if cfg.zero_terminal_snr:
        lo, hi = sigmas.min(), sigmas.max()
        sigmas = lo + (1.0 - lo) / (hi - lo) * (sigmas - lo)
    return 1 - sigmas**2


SCHEDULES: dict[str, Callable[[DiffusionConfig], torch.Tensor]] = {
    "cosine": cosine_alphas_cumprod,
    "linear_sd": linear_sd_alphas_cumprod,
    "logsnr_cosine_interp": logsnr_cosine_interp_alphas_cumprod,
}


def make_alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """alphas_cumprod (T,) float64 of the schedule named in `cfg.schedule`."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"diffusion.schedule={cfg.schedule!r} is unknown; valid: {sorted(SCHEDULES)}")
    if cfg.num_timesteps < 2:
        raise ValueError(f"diffusion.num_timesteps must be >= 2, got {cfg.num_timesteps}")
    return SCHEDULES[cfg.schedule](cfg)


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to (B, 1, 1, ...) to broadcast against `like`, in like's dtype/device."""
    t = torch.as_tensor(t, device=values.device).long().reshape(-1)
    out = values[t].to(device=like.device, dtype=like.dtype)
    if out.numel() == 1 and like.shape[0] != 1:
        out = out.expand(like.shape[0])
    return out.reshape(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------------------------- process
class GaussianDiffusion:
    """Variance-preserving forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) plus its targets.

    Holds float64 tables on the CPU; every method casts the gathered coefficients to the input's dtype and
    device, so the object is shared freely between devices and precisions.
    """

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg or DiffusionConfig()
        if self.cfg.prediction not in ("v", "eps"):
            raise ValueError(f"diffusion.prediction={self.cfg.prediction!r}; valid: ['eps', 'v']")
        self.alphas_cumprod = make_alphas_cumprod(self.cfg)
        self.sqrt_alpha = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alpha = (1 - self.alphas_cumprod).clamp(min=0).sqrt()

    @property
    def num_timesteps(self) -> int:
        return self.cfg.num_timesteps

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t) at timesteps t (float64; inf where a_t == 1)."""
        a = self.alphas_cumprod[torch.as_tensor(t).long()]
        return a / (1 - a)

    # -- noise -------------------------------------------------------------------------------------------
    def sample_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                     offset_noise: float | None = None) -> torch.Tensor:
        """Gaussian noise of `shape` (B,C,F,H,W) plus offset noise strength * randn(B,C,F,1,1).

        `offset_noise=None` uses the config strength; pass 0.0 for plain noise (sampling starts from it).
        """
        strength = self.cfg.offset_noise if offset_noise is None else offset_noise
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if strength > 0:
            if len(shape) < 3:
                raise ValueError(f"offset noise needs (B, C, ..., H, W) shapes, got {tuple(shape)}")
            offset_shape = tuple(shape[:-2]) + (1, 1)
            noise = noise + strength * torch.randn(offset_shape, generator=generator, device=device, dtype=dtype)
        return noise

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform training timesteps (B,) in [0, T)."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    # -- forward process ------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        return _per_sample(self.sqrt_alpha, t, x0) * x0 + _per_sample(self.sqrt_one_minus_alpha, t, x0) * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        return _per_sample(self.sqrt_alpha, t, x0) * noise - _per_sample(self.sqrt_one_minus_alpha, t, x0) * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output at (x_t, t): v or eps per `cfg.prediction`."""
        return self.v_target(x0, noise, t) if self.cfg.prediction == "v" else noise

    # -- inverse algebra ------------------------------------------------------------------------------
    def x0_eps_from_v(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a v prediction: x0 = sqrt(a) xt - sqrt(1-a) v, eps = sqrt(1-a) xt + sqrt(a) v."""
        sa, so = _per_sample(self.sqrt_alpha, t, xt), _per_sample(self.sqrt_one_minus_alpha, t, xt)
        return sa * xt - so * v, so * xt + sa * v

    def x0_eps_from_eps(self, xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from an eps prediction; undefined where a_t == 0 (use v-prediction with zero-SNR)."""
        sa, so = _per_sample(self.sqrt_alpha, t, xt), _per_sample(self.sqrt_one_minus_alpha, t, xt)
        return (xt - so * eps) / sa, eps

    def x0_eps(self, xt: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the model output under `cfg.prediction`."""
        if self.cfg.prediction == "v":
            return self.x0_eps_from_v(xt, model_out, t)
        return self.x0_eps_from_eps(xt, model_out, t)
