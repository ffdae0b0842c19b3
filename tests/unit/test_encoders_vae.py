"""Frozen OpenCLIP encoders and the chunked video VAE with tiny random weights (model/encoders.py, vae.py)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from model.encoders import ClipConfig, FrozenOpenCLIP, _tiny_clip_cfg
from model.vae import VAEConfig, VideoVAE, tiny_vae_config


@pytest.fixture(scope="module")
def tiny_clip() -> FrozenOpenCLIP:
    return FrozenOpenCLIP(ClipConfig(kind="tiny-random", text_dim=32, image_dim=48))


def test_tiny_clip_shapes_from_config_and_frozen(tiny_clip):
    tokens = tiny_clip.encode_text(["a red car driving", ""])
    assert tokens.shape == (2, 77, 32)
    emb = tiny_clip.encode_image(torch.rand(3, 3, 40, 72) * 2 - 1)  # any size: square crop + resize inside
    assert emb.shape == (3, 48)
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    assert not tiny_clip.train().training
    # seeded: a second build gives identical outputs (generation reuses the same random encoder)
    again = FrozenOpenCLIP(ClipConfig(kind="tiny-random", text_dim=32, image_dim=48))
    assert torch.equal(again.encode_text(["a red car driving", ""]), tokens)
    assert not torch.equal(tokens[0], tokens[1])


def test_text_tokens_are_penultimate_layer_after_ln_final(tiny_clip):
    m = tiny_clip.model
    ids = tiny_clip.tokenizer(["a dog running on the beach"])
    x = m.token_embedding(ids) + m.positional_embedding
    depth = len(m.transformer.resblocks)
    _, inter = m.transformer.forward_intermediates(x, attn_mask=m.attn_mask, indices=[depth - 2])
    expected = m.ln_final(inter[0])
    assert torch.allclose(tiny_clip.encode_text(["a dog running on the beach"]), expected, atol=1e-5)
    # "last" reproduces open_clip's own text forward (pooled at EOT, projected)
    last = FrozenOpenCLIP(ClipConfig(kind="tiny-random", text_dim=32, image_dim=48, layer="last"))
    tok = last.encode_text(["a dog running on the beach"])
    pooled = tok[torch.arange(1), ids.argmax(dim=-1)] @ last.model.text_projection
    assert torch.allclose(pooled, last.model.encode_text(ids), atol=1e-5)
    assert not torch.allclose(tok, expected, atol=1e-3)


def test_openclip_kind_loads_local_checkpoint(tmp_path, tiny_clip):
    """The real loading path (architecture by name, pretrained=None, local safetensors) on a tiny arch."""
    cfg = ClipConfig(kind="tiny-random", text_dim=32, image_dim=48)
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(_tiny_clip_cfg(cfg)))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(ckpt))
    loaded = FrozenOpenCLIP(ClipConfig(kind="openclip", arch="tiny-test-clip", checkpoint=str(ckpt)))
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded.encode_text(["hello"]), tiny_clip.encode_text(["hello"]), atol=1e-6)
    assert torch.allclose(loaded.encode_image(img), tiny_clip.encode_image(img), atol=1e-6)
    text_only = FrozenOpenCLIP(ClipConfig(kind="openclip", arch="tiny-test-clip", checkpoint=str(ckpt)),
                               towers="text")
    assert text_only.model.visual is None
    with pytest.raises(RuntimeError, match="image tower"):
        text_only.encode_image(img)


def test_missing_clip_checkpoint_names_path_and_key(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match=r"open_clip_pytorch_model\.bin.*base\.clip\.checkpoint"):
        FrozenOpenCLIP(ClipConfig(kind="openclip", checkpoint=str(missing)), config_key="base.clip")
    with pytest.raises(FileNotFoundError, match=r"clip\.checkpoint"):
        FrozenOpenCLIP(ClipConfig(kind="openclip", checkpoint=""))
    with pytest.raises(ValueError, match="valid"):
        FrozenOpenCLIP(ClipConfig(kind="hub"))


@pytest.fixture(scope="module")
def tiny_vae() -> VideoVAE:
    return VideoVAE(VAEConfig(kind="tiny-random", chunk_size=3))


def test_vae_shapes_and_range(tiny_vae):
    video = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    z = tiny_vae.encode(video, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 5, 4, 6)
    out = tiny_vae.decode(z)
    assert out.shape == (2, 3, 5, 32, 48) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_vae.encode(torch.zeros(1, 3, 2, 30, 48))


def test_chunked_vae_equals_unchunked(tiny_vae):
    video = torch.rand(1, 3, 7, 32, 32) * 2 - 1
    chunked = VideoVAE(VAEConfig(kind="tiny-random", chunk_size=2))
    whole = VideoVAE(VAEConfig(kind="tiny-random", chunk_size=64))
    z_c = chunked.encode(video, generator=torch.Generator().manual_seed(1))
    z_w = whole.encode(video, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z_c, z_w, atol=1e-5)
    assert torch.allclose(chunked.decode(z_c), whole.decode(z_c), atol=1e-5)
    # frame f of the video maps to latent frame f (no mixing across frames or batch)
    single = whole.encode(video[:, :, 3:4], sample=False)
    assert torch.allclose(whole.encode(video, sample=False)[:, :, 3:4], single, atol=1e-5)
    # the latent scale is applied: encode == scaling_factor * posterior mean
    frames = video[0].permute(1, 0, 2, 3)
    mean = whole.vae.encode(frames).latent_dist.mean
    assert torch.allclose(whole.encode(video, sample=False)[0].permute(1, 0, 2, 3), 0.18215 * mean, atol=1e-5)


def test_vae_loads_local_diffusers_folder_safetensors_only(tmp_path, tiny_vae):
    folder = tmp_path / "vae"
    tiny_vae.vae.save_pretrained(folder, safe_serialization=True)
    loaded = VideoVAE(VAEConfig(kind="diffusers", path=str(folder)))
    z = torch.randn(1, 4, 2, 4, 4)
    assert torch.allclose(loaded.decode(z), tiny_vae.decode(z), atol=1e-6)
    # a pickle-only folder is refused, naming the missing safetensors file and the config key
    pickled = tmp_path / "vae_bin"
    AutoencoderKL(**tiny_vae_config()).save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(FileNotFoundError, match=r"vae_bin/diffusion_pytorch_model\.safetensors.*refine\.vae\.path"):
        VideoVAE(VAEConfig(kind="diffusers", path=str(pickled)), config_key="refine.vae")
    with pytest.raises(FileNotFoundError, match=r"nowhere/config\.json"):
        VideoVAE(VAEConfig(kind="diffusers", path=str(tmp_path / "nowhere")))
