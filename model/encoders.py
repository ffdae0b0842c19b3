"""Frozen OpenCLIP encoders: penultimate-layer text tokens and the global image embedding.

Shape legend
    prompts      : list[str] of length B
    text tokens  : (B, 77, D_text)  D_text = 1024 for ViT-H/14 (= UNet cross_attention_dim)
    images       : (B, 3, H, W) float in [-1, 1] (any size; center square crop + resize inside)
    image embeds : (B, D_embed)    D_embed = 1024 for ViT-H/14 (unnormalised visual projection output)

Text follows VGen's FrozenOpenCLIPEmbedder(layer="penultimate"): token + positional embedding, all
transformer blocks but the last, then ln_final; every one of the 77 positions is returned (the UNet
cross-attends to them). diffusers' I2VGenXLPipeline gets the same with clip_skip=1 (hidden_states[-2] +
final_layer_norm). The image embedding is `model.encode_image` without L2 normalisation, as in VGen
(`self.model.visual(image)`) and diffusers (`CLIPVisionModelWithProjection(...).image_embeds`).

Weights never come from the network: `kind="openclip"` builds the architecture with pretrained=None and
loads a local checkpoint (open_clip's loader, weights_only=True for .bin/.pt; safetensors preferred);
`kind="tiny-random"` builds a tiny randomly initialised CLIP (seeded, so identical in every process)
whose output widths come from the config, for tests and CPU demos.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a model hub

import open_clip  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402

from model.config import ClipConfig  # noqa: E402


def _tiny_clip_cfg(cfg: ClipConfig) -> dict:
    return {
        "embed_dim": cfg.image_dim,
        "vision_cfg": {"image_size": cfg.image_size, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": 8},
        # the real BPE vocabulary (shipped in open_clip) so real prompts tokenize; tiny width/depth
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": cfg.text_dim,
                     "heads": 2, "layers": 2},
    }


def _build_clip(cfg: ClipConfig, config_key: str) -> tuple[nn.Module, str]:
    """(open_clip CLIP model in eval mode, tokenizer arch name)."""
    if cfg.kind == "tiny-random":
        if cfg.text_dim < 8 or cfg.text_dim % 2 or cfg.image_dim < 1:
            raise ValueError(f"{config_key}: tiny text_dim={cfg.text_dim} must be even and >= 8, "
                             f"image_dim={cfg.image_dim} >= 1")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.model.CLIP(**_tiny_clip_cfg(cfg))
        return model.eval(), "ViT-H-14"
    if cfg.kind != "openclip":
        raise ValueError(f"{config_key}.kind={cfg.kind!r}; valid: ['openclip', 'tiny-random']")
    path = Path(cfg.checkpoint) if cfg.checkpoint else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"OpenCLIP checkpoint not found: {str(path) if path else '(empty)'} (config key "
            f"{config_key}.checkpoint). Put the {cfg.arch} weights (e.g. laion2b_s32b_b79k "
            "open_clip_pytorch_model.bin or a .safetensors export) there; nothing is downloaded.")
    arch_cfg = open_clip.get_model_config(cfg.arch)
    if arch_cfg is None:
        raise ValueError(f"{config_key}.arch={cfg.arch!r} is not an open_clip architecture; "
                         f"valid: {open_clip.list_models()[:8]}...")
    model = open_clip.create_model(cfg.arch, pretrained=None, load_weights=False, pretrained_text=False)
    open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    return model.eval(), cfg.arch


class FrozenOpenCLIP(nn.Module):
    """Frozen OpenCLIP text + image encoder; all parameters have requires_grad=False.

    `towers` drops the unused half ("text" for the refiner, which has no image path).
    """

    def __init__(self, cfg: ClipConfig, towers: Literal["both", "text", "image"] = "both",
                 config_key: str = "clip"):
        super().__init__()
        self.cfg = cfg
        model, tok_arch = _build_clip(cfg, config_key)
        if cfg.layer not in ("penultimate", "last"):
            raise ValueError(f"{config_key}.layer={cfg.layer!r}; valid: ['last', 'penultimate']")
        if towers == "text":
            model.visual = None
        elif towers == "image":
            model.transformer = None
        self.model = model.requires_grad_(False)
        self.towers = towers
        self.tokenizer = open_clip.get_tokenizer(tok_arch)
        visual_size = getattr(getattr(model, "visual", None), "image_size", 224)
        self.image_size = int(visual_size[0] if isinstance(visual_size, (tuple, list)) else visual_size)
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenOpenCLIP":  # frozen: always eval (no dropout)
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def text_dim(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def image_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, D_text) tokens of the `cfg.layer` block, after ln_final."""
        if self.model.transformer is None:
            raise RuntimeError("this FrozenOpenCLIP was built without its text tower (towers='image')")
        tokens = self.tokenizer(list(prompts)).to(self.device)
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding.to(m.token_embedding.weight.dtype)
        blocks = m.transformer.resblocks
        keep = len(blocks) - (1 if self.cfg.layer == "penultimate" else 0)
        attn_mask = m.attn_mask.to(x.dtype) if m.attn_mask is not None else None
        for block in blocks[:keep]:  # open_clip text transformers run batch-first (N, L, D)
            x = block(x, attn_mask=attn_mask)
        return m.ln_final(x)

    def preprocess_image(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B,3,H,W) -> CLIP input: center square crop, bilinear resize, CLIP mean/std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        _, _, h, w = images.shape
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = images[:, :, top:top + side, left:left + side].float()
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=side > self.image_size)
        x = (x.clamp(-1, 1) + 1) / 2
        return (x.to(self.device) - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D_embed) unnormalised image embedding of [-1, 1] images."""
        if self.model.visual is None:
            raise RuntimeError("this FrozenOpenCLIP was built without its image tower (towers='text')")
        pixels = self.preprocess_image(images).to(next(self.model.visual.parameters()).dtype)
        return self.model.encode_image(pixels, normalize=False)
