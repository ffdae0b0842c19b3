"""DDIM sampling with classifier-free guidance (CFG) and guidance rescale.

Shape legend
    xt, x0, out : (B, C, F, H, W) latents / model outputs
    t           : python int or (B,) long; timesteps are descending, e.g. [951, 901, ..., 1] (leading, offset 1)

Unconditional branch. Both released pipelines keep the *local* image (first-frame latent + position ramp,
`image_latents`) and `fps` in the unconditional pass and only swap the semantic conditions:
    - diffusers I2VGenXLPipeline: text -> encoding of the negative prompt ("" by default);
      image_embeddings -> torch.zeros_like(image_embeddings); image_latents and fps are duplicated unchanged.
    - VGen inference_i2vgen_entrance.py: {'y': negative-prompt tokens, 'image': zeros (use_zero_infer),
      'local_image': same, 'fps': same}.
`null_conditioning` does exactly that. Guidance rescale (Lin et al. 2023, Sec. 3.4) with factor phi:
    out_cfg = u + w (c - u);  out = phi * out_cfg * std(c)/std(out_cfg) + (1 - phi) * out_cfg
with std over all non-batch dims (diffusers rescale_noise_cfg; ModelScope GaussianDiffusion_SDEdit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from model.diffusion import GaussianDiffusion

Spacing = Literal["leading", "trailing", "linspace"]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (xt, t(B,)) -> model output


@dataclass
class SamplerConfig:
    """DDIM sampling settings."""

    steps: int = 50
    """Number of denoising steps."""
    eta: float = 0.0
    """DDIM stochasticity (0 = deterministic ODE, 1 = DDPM-like)."""
    guidance: float = 9.0
    """Classifier-free guidance scale w (1.0 = conditional only, one model call per step)."""
    guidance_rescale: float = 0.0
    """Lin et al. 2023 rescale factor phi in [0, 1] (0 = off)."""
    spacing: Spacing = "leading"
    """How `steps` timesteps are picked from [0, t_start]: leading (release, VGen/diffusers), trailing, linspace."""
    steps_offset: int = 1
    """Added to leading timesteps; VGen uses 1 + arange(0, T, T // steps)."""
    final_alpha_one: bool = True
    """The last step jumps to a_prev = 1 (returns the x0 prediction), as diffusers' set_alpha_to_one."""


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing = "leading", steps_offset: int = 1,
                   t_start: int | None = None) -> torch.Tensor:
    """Descending sampling timesteps (steps,) long, following diffusers' DDIMScheduler conventions.

    `t_start` restricts the range to [0, t_start] (SDEdit); leading/linspace/trailing are then applied
    to a virtual schedule of t_start + 1 timesteps (trailing starts exactly at t_start).
    """
    if steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {steps}")
    span = num_train_timesteps if t_start is None else t_start + 1
    if not 1 <= span <= num_train_timesteps:
        raise ValueError(f"t_start={t_start} must lie in [0, {num_train_timesteps - 1}]")
    if steps > span:
        raise ValueError(f"sampler.steps={steps} exceeds the {span} available timesteps")
    if spacing == "leading":
        ratio = span // steps
        ts = torch.arange(steps, dtype=torch.float64) * ratio + steps_offset
    elif spacing == "trailing":
        ts = torch.round(torch.arange(span, 0, -span / steps, dtype=torch.float64)) - 1
        ts = ts.flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, span - 1, steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"sampler.spacing={spacing!r}; valid: ['leading', 'linspace', 'trailing']")
    return ts.clamp(0, span - 1).long().flip(0)


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """u + w (c - u), then (if rescale > 0) match the per-sample std of the conditional output (Lin et al.)."""
    out = uncond + scale * (cond - uncond)
    if rescale > 0:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"sampler.guidance_rescale must be in [0, 1], got {rescale}")
        dims = list(range(1, cond.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp(min=1e-12)
        out = rescale * (out * ratio) + (1 - rescale) * out
    return out


def null_conditioning(cond: dict[str, Any], null_text: torch.Tensor | None) -> dict[str, Any]:
    """Unconditional UNet kwargs: text -> `null_text` (negative/empty prompt tokens), global image embedding ->
    zeros; `image_latents` (local image + position ramp) and `fps` are kept, as in diffusers and VGen."""
    uncond = dict(cond)
    if cond.get("encoder_hidden_states") is not None:
        if null_text is None:
            raise ValueError("CFG with text conditioning needs the null/negative prompt tokens (null_text)")
        uncond["encoder_hidden_states"] = null_text.to(cond["encoder_hidden_states"]).expand_as(
            cond["encoder_hidden_states"])
    if cond.get("image_embeddings") is not None:
        uncond["image_embeddings"] = torch.zeros_like(cond["image_embeddings"])
    return uncond


def guided_denoiser(model: Callable[..., torch.Tensor], cond: dict[str, Any], uncond: dict[str, Any] | None,
                    guidance: float, guidance_rescale: float = 0.0) -> Denoiser:
    """Wrap a UNet `model(sample, timestep, **kwargs)` into an (xt, t) -> guided output function.

    Conditional and unconditional passes run as one batch of 2B (like diffusers) unless guidance == 1.
    """
    if guidance == 1.0 or uncond is None:
        return lambda xt, t: model(xt, t, **cond)

    def _cat(a: Any, b: Any) -> Any:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return torch.cat([a, b])
        if a is None and b is None:
            return None
        raise ValueError(f"cond/uncond kwargs differ in kind: {type(a).__name__} vs {type(b).__name__}")

    keys = sorted(set(cond) | set(uncond))
    both = {k: _cat(cond.get(k), uncond.get(k)) for k in keys}

    def denoise(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([xt, xt]), torch.cat([t, t]), **both)
        out_cond, out_uncond = out.chunk(2)
        return apply_guidance(out_cond, out_uncond, guidance, guidance_rescale)

    return denoise


class DDIMSampler:
    """Deterministic (eta=0) or stochastic DDIM over a `GaussianDiffusion` schedule; testable alone."""

    def __init__(self, diffusion: GaussianDiffusion, cfg: SamplerConfig | None = None):
        self.diffusion = diffusion
        self.cfg = cfg or SamplerConfig()

    def timesteps(self, t_start: int | None = None) -> torch.Tensor:
        """Descending timesteps for this config; `t_start` for SDEdit (start from a partially noised x)."""
        c = self.cfg
        return ddim_timesteps(self.diffusion.num_timesteps, c.steps, c.spacing, c.steps_offset, t_start)

    def step(self, model_out: torch.Tensor, t: int, t_prev: int | None, xt: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_{t_prev}; t_prev None means the final step. Returns (x_prev, x0_pred)."""
        d = self.diffusion
        t_vec = torch.full((xt.shape[0],), t, dtype=torch.long)
        x0, eps = d.x0_eps(xt, model_out, t_vec)
        a_t = d.alphas_cumprod[t]
        if t_prev is None or t_prev < 0:
            a_prev = torch.tensor(1.0, dtype=torch.float64) if self.cfg.final_alpha_one else d.alphas_cumprod[0]
        else:
            a_prev = d.alphas_cumprod[t_prev]
        # sigma_t(eta) of DDIM eq. 16; (1 - a_t) > 0 for every t > 0 of the schedules here
        sigma = self.cfg.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        x_prev = a_prev.sqrt().to(xt) * x0 + direction.to(xt) * eps
        if self.cfg.eta > 0 and float(sigma) > 0:
            noise = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
            x_prev = x_prev + sigma.to(xt) * noise
        return x_prev, x0

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, x_start: torch.Tensor, timesteps: torch.Tensor | None = None,
               generator: torch.Generator | None = None, progress: Callable[[int], None] | None = None
               ) -> torch.Tensor:
        """Run DDIM from `x_start` (noise at timesteps[0]) down to x0. `progress(1)` is called per step."""
        ts = self.timesteps() if timesteps is None else timesteps
        ts = [int(v) for v in ts]
        x = x_start
        for i, t in enumerate(ts):
            t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            out = denoiser(x, t_vec)
            t_prev = ts[i + 1] if i + 1 < len(ts) else None
            x, _ = self.step(out, t, t_prev, x, generator)
            if progress is not None:
                progress(1)
        return x
