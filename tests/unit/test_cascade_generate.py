"""Cascade (base conditioning, SDEdit refinement) and the generate CLI on CPU with tiny weights."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model.cascade import RefineStage, StageConfig, refine_stage_defaults, sdedit
from model.config import get_flavor
from model.diffusion import DiffusionConfig, GaussianDiffusion
from model.encoders import ClipConfig, FrozenOpenCLIP
from model.generate import load_pipeline, main, write_tiny_checkpoints
from model.samplers import DDIMSampler, SamplerConfig
from model.vae import VAEConfig, VideoVAE


class OracleUNet(nn.Module):
    """Test double for the refine UNet: returns the exact v for a known clean latent, records its inputs."""

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__()
        self.cfg = get_flavor("tiny", use_fps=False, use_image_global=False, use_image_local=False,
                              use_image_concat=False)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.diffusion, self.x0, self.calls = diffusion, None, []

    def forward(self, sample, timestep, **kwargs):
        self.calls.append((int(timestep[0]), sorted(kwargs)))
        a = self.diffusion.alphas_cumprod[timestep].view(-1, 1, 1, 1, 1).double()
        x0 = self.x0.double().repeat(sample.shape[0] // self.x0.shape[0], 1, 1, 1, 1)
        eps = (sample.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(sample.dtype)


def test_sdedit_noises_to_599_and_oracle_returns_clean():
    d = GaussianDiffusion(DiffusionConfig())
    sampler = DDIMSampler(d, SamplerConfig(steps=30, spacing="trailing"))
    unet = OracleUNet(d)
    unet.x0 = torch.randn(1, 4, 3, 6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sdedit(sampler, lambda x, t: unet(x, t), unet.x0, t_start=599, generator=torch.Generator().manual_seed(1))
    assert unet.calls[0][0] == 599 and len(unet.calls) == 30
    assert (out - unet.x0).abs().max().item() < 1e-5


def test_refine_stage_with_oracle_returns_the_clean_upsampled_video():
    d = GaussianDiffusion(DiffusionConfig())
    unet = OracleUNet(d)
    clip = FrozenOpenCLIP(ClipConfig(kind="tiny-random", text_dim=64, image_dim=64), towers="text")
    vae = VideoVAE(VAEConfig(kind="tiny-random", sample_posterior=False))
    cfg = refine_stage_defaults()
    cfg.width, cfg.height, cfg.sampler.steps = 48, 32, 6
    stage = RefineStage(unet, clip, vae, cfg)
    low = torch.rand(1, 3, 3, 16, 24) * 2 - 1
    up = torch.nn.functional.interpolate(low[0].permute(1, 0, 2, 3), size=(32, 48), mode="bilinear")
    unet.x0 = vae.encode(up.permute(1, 0, 2, 3)[None])
    out = stage.refine(low, ["a cat"], generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 3, 32, 48)
    assert torch.allclose(out, vae.decode(unet.x0), atol=1e-4)
    # text-only guidance: the UNet only ever saw encoder_hidden_states, starting at t=599
    assert unet.calls[0] == (599, ["encoder_hidden_states"])
    assert all(kw == ["encoder_hidden_states"] for _, kw in unet.calls)


def test_base_conditioning_builds_image_latents_and_null_branch(tmp_path):
    base_dir, _ = write_tiny_checkpoints(tmp_path / "ckpt")
    base = load_pipeline(base_dir, "cpu", torch.float32)
    image = torch.rand(2, 3, 50, 70) * 2 - 1
    cond, uncond = base.conditioning(image, ["a", "b"], num_frames=5, fps=8)
    lat = cond["image_latents"]
    assert lat.shape == (2, 4, 5, base.cfg.height // 8, base.cfg.width // 8)
    for k in range(1, 5):  # position ramp k / (F - 1)
        assert torch.all(lat[:, :, k] == k / 4)
    assert torch.equal(uncond["image_latents"], lat) and torch.equal(uncond["fps"], cond["fps"])
    assert torch.all(uncond["image_embeddings"] == 0) and cond["image_embeddings"].abs().sum() > 0
    assert not torch.equal(uncond["encoder_hidden_states"], cond["encoder_hidden_states"])


def _decode_mp4(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def test_cpu_generation_writes_playable_mp4(tmp_path, capsys):
    base_dir, refine_dir = write_tiny_checkpoints(tmp_path / "ckpt")
    img = np.zeros((60, 90, 3), np.uint8)
    img[:, :45] = (255, 40, 0)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "video" / "out.mp4"
    assert main(["--image", str(tmp_path / "in.png"), "--prompt", "a red wall", "--out", str(out),
                 "--base", str(base_dir), "--refine", str(refine_dir), "--steps", "2", "--refine-steps", "2",
                 "--frames", "5", "--seed", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frames = _decode_mp4(out)
    assert frames.shape == (5, 64, 96, 3)  # refine stage size of the tiny checkpoint (96x64)
    pngs = sorted((tmp_path / "video" / "out_frames").glob("*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (96, 64)
    assert summary["shape"] == [1, 3, 5, 64, 96]
    # base only (no --refine): the base checkpoint's size, 1 step
    main(["--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "a.mp4"), "--base", str(base_dir),
          "--steps", "1", "--frames", "3", "--quiet"])
    assert _decode_mp4(tmp_path / "a.mp4").shape == (3, 64, 64, 3)


def test_generate_rejects_wrong_stage_and_missing_inputs(tmp_path):
    base_dir, refine_dir = write_tiny_checkpoints(tmp_path / "ckpt")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
    with pytest.raises(ValueError, match="expected 'base'"):
        main(["--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.mp4"), "--base", str(refine_dir),
              "--quiet"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        main(["--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.mp4"), "--base", str(base_dir),
              "--quiet"])
    with pytest.raises(FileNotFoundError, match="stage.yaml"):
        load_pipeline(tmp_path, "cpu", torch.float32)
    with pytest.raises(SystemExit):
        main(["--image", str(tmp_path / "in.png")])
    with pytest.raises(ValueError, match="multiples of 8"):
        StageConfig(width=100)
    stage_yaml = base_dir / "stage.yaml"
    stage_yaml.write_text(stage_yaml.read_text().replace("text_dim: 64", "text_dim: 32"))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        load_pipeline(base_dir, "cpu", torch.float32)
