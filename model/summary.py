"""Module-tree summary and parameter count of a UNet flavour, built on the meta device (no real memory).

    python -m model.summary i2vgen-xl        # or tiny, base-448x256, refine-1280x720

Shapes: none (only parameter counts); the model is never run.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from model.attention import SpatialTransformer, TemporalTransformer
from model.config import FLAVORS, UNetConfig, get_flavor
from model.resnet import ResBlock
from model.unet import I2VGenUNet

RELEASE_PARAMS = 1_420_469_224  # diffusers I2VGenXLUNet() default config, counted exactly


def build_meta(cfg: UNetConfig) -> I2VGenUNet:
    """The UNet with every parameter on the meta device: shapes only, no storage."""
    with torch.device("meta"):
        return I2VGenUNet(cfg)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of `module` (works on meta tensors)."""
    return sum(p.numel() for p in module.parameters())


def count_blocks(model: nn.Module) -> dict[str, int]:
    """How many ResBlocks (each with its temporal conv block), spatial and temporal transformers."""
    kinds = {"resblocks": ResBlock, "spatial_transformers": SpatialTransformer, "temporal_transformers": TemporalTransformer}
    return {name: sum(isinstance(m, cls) for m in model.modules()) for name, cls in kinds.items()}


def summarize(name: str) -> str:
    """Human-readable summary of flavour `name`: config, top-level children, per-level blocks, totals."""
    cfg = get_flavor(name)
    model = build_meta(cfg)
    total = count_params(model)
    lines = [f"I2VGenUNet flavour {name!r}", f"  widths {cfg.block_out_channels}, {cfg.layers_per_block} ResBlocks/level, "
             f"attention levels {cfg.attention_levels}, head dim {cfg.attention_head_dim}, context dim {cfg.cross_attention_dim}",
             f"  paths: fps={cfg.use_fps} text={cfg.use_text} image global={cfg.use_image_global} "
             f"local={cfg.use_image_local} concat={cfg.use_image_concat}; conv_in channels {cfg.conv_in_channels}", ""]
    for child_name, child in model.named_children():
        lines.append(f"  {child_name:<16} {type(child).__name__:<22} {count_params(child):>15,}")
        if isinstance(child, nn.ModuleList):
            for i, level in enumerate(child):
                counts = count_blocks(level)
                sampler = "down" if getattr(level, "downsample", None) else "up" if getattr(level, "upsample", None) else "-"
                lines.append(
                    f"    [{i}] {counts['resblocks']} ResBlock, {counts['spatial_transformers']} spatial, "
                    f"{counts['temporal_transformers']} temporal, resample {sampler:<4} {count_params(level):>15,}"
                )
    counts = count_blocks(model)
    lines += ["", f"  blocks: {counts['resblocks']} ResBlocks, {counts['spatial_transformers']} spatial transformers, "
                  f"{counts['temporal_transformers']} temporal transformers",
              f"  total parameters: {total:,}"]
    if name in ("i2vgen-xl", "base-448x256"):
        lines.append(f"  vs released I2VGen-XL {RELEASE_PARAMS:,}: {100 * (total - RELEASE_PARAMS) / RELEASE_PARAMS:+.4f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.summary", description="UNet module summary on the meta device")
    parser.add_argument("flavor", choices=sorted(FLAVORS), help="UNet flavour")
    print(summarize(parser.parse_args(argv).flavor))


if __name__ == "__main__":
    main()
