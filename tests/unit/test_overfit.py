"""The tiny I2VGen-XL UNet overfits one clip: v-loss falls by >= 80% within 300 CPU steps.

Training is the real recipe at toy size: release schedule (cosine + zero terminal SNR), v-prediction target,
offset noise 0.1, a fresh uniformly random timestep and fresh noise every sample (seeded), every
conditioning path on, AdamW. Progress is measured on a fixed evaluation set (32 (t, noise) pairs spread
over t = 0..999, model in eval mode), so the number does not depend on which timesteps a step happened to
draw. Training stops as soon as that loss is <= 20% of its start value; the test fails if 300 steps
are not enough.
"""

from __future__ import annotations

import time

import pytest
import torch

from model.config import get_flavor
from model.diffusion import DiffusionConfig, GaussianDiffusion
from model.unet import I2VGenUNet, build_image_latents

FRAMES, H, W = 4, 8, 8
MAX_STEPS, BATCH, EVAL_EVERY, TARGET_DROP = 300, 4, 10, 0.80


def _clip() -> torch.Tensor:
    """(1, 4, F, 8, 8) synthetic latent clip: a blob moving left to right plus static patterns, unit std."""
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    frames = []
    for f in range(FRAMES):
        blob = torch.exp(-((xx - 1.5 - 1.5 * f) ** 2 + (yy - 3.5) ** 2) / 4)
        frames.append(torch.stack([blob, 1 - blob, 0.5 * torch.sin(xx / 2 + f), torch.cos(yy / 2) * blob]))
    x0 = torch.stack(frames, dim=1)[None]
    return (x0 - x0.mean()) / x0.std()


@pytest.mark.slow
def test_tiny_unet_overfits_one_clip():
    torch.manual_seed(0)
    unet = I2VGenUNet(get_flavor("tiny"))
    diffusion = GaussianDiffusion(DiffusionConfig())  # cosine, zero-terminal SNR, v, offset noise 0.1
    g = torch.Generator().manual_seed(0)
    x0 = _clip()
    cond = {
        "fps": torch.tensor([8]),
        "image_latents": build_image_latents(x0[:, :, 0], FRAMES),
        "image_embeddings": torch.randn(1, unet.cfg.image_embed_dim, generator=g),
        "encoder_hidden_states": torch.randn(1, 77, unet.cfg.cross_attention_dim, generator=g),
    }

    def batch(kwargs: dict, n: int) -> dict:
        return {k: v.expand(n, *v.shape[1:]) for k, v in kwargs.items()}

    eval_t = torch.linspace(0, 999, 32).round().long()
    eval_noise = diffusion.sample_noise((32, 4, FRAMES, H, W), generator=g)

    def v_loss(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = x0.expand(len(t), -1, -1, -1, -1)
        pred = unet(diffusion.add_noise(x, noise, t), t, **batch(cond, len(t)))
        return (pred - diffusion.v_target(x, noise, t)).square().mean()

    def evaluate() -> float:
        unet.eval()
        with torch.no_grad():
            loss = v_loss(eval_t, eval_noise).item()
        unet.train()
        return loss

    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    start = evaluate()
    curve, t0 = [(0, start)], time.perf_counter()
    for step in range(1, MAX_STEPS + 1):
        t = diffusion.sample_timesteps(BATCH, generator=g)
        noise = diffusion.sample_noise((BATCH, 4, FRAMES, H, W), generator=g)
        loss = v_loss(t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            curve.append((step, evaluate()))
            if curve[-1][1] <= (1 - TARGET_DROP) * start:
                break
    seconds = time.perf_counter() - t0
    end = curve[-1][1]
    drop = 1 - end / start
    print(f"\noverfit: v-loss {start:.4f} -> {end:.4f} ({100 * drop:.1f}% drop) in {curve[-1][0]} steps, "
          f"{seconds:.1f} s; curve {[(s, round(v, 4)) for s, v in curve]}")
    assert start > 0.5  # the untrained model is really wrong (v has unit variance here)
    assert drop >= TARGET_DROP, f"v-loss fell only {100 * drop:.1f}% in {MAX_STEPS} steps: {curve}"

