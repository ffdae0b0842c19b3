"""Convert I2VGen-XL UNet weights between diffusers' layout and ours (safetensors only, never unpickles).

    python -m model.convert --from-diffusers DIFFUSERS_UNET_DIR --out OUR_DIR
    python -m model.convert --to-diffusers OUR_DIR --out DIFFUSERS_UNET_DIR

A diffusers UNet folder holds `config.json` + `diffusion_pytorch_model[.variant].safetensors` (or shards
with a `.safetensors.index.json`). Ours holds `config.json` ({"format": ..., "unet": UNetConfig fields})
+ `model.safetensors`. Key names map 1:1 (same tensors, same shapes); see `_FROM_DIFFUSERS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file, save_file

from common.dtypes import ALIASES, DTYPES, dtype_of
from model.config import UNetConfig

FORMAT = "i2vgen-recipe-unet"
OUR_WEIGHTS, OUR_CONFIG = "model.safetensors", "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# (diffusers pattern, ours); applied in order to every key. `_TO_DIFFUSERS` swaps the sides and keeps the
# order, so every specific rule precedes the generic one it would otherwise collide with in both directions.
_FROM_DIFFUSERS = [
    (r"^conv_norm_out\.", "norm_out."),
    (r"^time_embedding\.", "time_embed."),
    (r"^fps_embedding\.0\.", "fps_embed.linear_1."),
    (r"^fps_embedding\.2\.", "fps_embed.linear_2."),
    (r"^context_embedding\.0\.", "image_global.linear_1."),
    (r"^context_embedding\.2\.", "image_global.linear_2."),
    (r"^image_latents_context_embedding\.0\.", "image_local.conv1."),
    (r"^image_latents_context_embedding\.3\.", "image_local.conv2."),
    (r"^image_latents_context_embedding\.5\.", "image_local.conv3."),
    (r"^image_latents_proj_in\.0\.", "image_concat.conv1."),
    (r"^image_latents_proj_in\.2\.", "image_concat.conv2."),
    (r"^image_latents_proj_in\.4\.", "image_concat.conv3."),
    (r"^image_latents_temporal_encoder\.norm1\.", "image_concat.mixer.norm."),
    (r"^image_latents_temporal_encoder\.attn1\.", "image_concat.mixer.attn."),
    (r"^image_latents_temporal_encoder\.ff\.net\.0\.proj\.", "image_concat.mixer.ff_in."),
    (r"^image_latents_temporal_encoder\.ff\.net\.2\.", "image_concat.mixer.ff_out."),
    # temporal conv block: diffusers conv1 = [GN, SiLU, Conv], conv2..4 = [GN, SiLU, Dropout, Conv]
    (r"\.temp_convs\.(\d+)\.conv1\.0\.", r".res.\1.temporal.stages.0.norm."),
    (r"\.temp_convs\.(\d+)\.conv1\.2\.", r".res.\1.temporal.stages.0.conv."),
    (r"\.temp_convs\.(\d+)\.conv2\.0\.", r".res.\1.temporal.stages.1.norm."),
    (r"\.temp_convs\.(\d+)\.conv2\.3\.", r".res.\1.temporal.stages.1.conv."),
    (r"\.temp_convs\.(\d+)\.conv3\.0\.", r".res.\1.temporal.stages.2.norm."),
    (r"\.temp_convs\.(\d+)\.conv3\.3\.", r".res.\1.temporal.stages.2.conv."),
    (r"\.temp_convs\.(\d+)\.conv4\.0\.", r".res.\1.temporal.stages.3.norm."),
    (r"\.temp_convs\.(\d+)\.conv4\.3\.", r".res.\1.temporal.stages.3.conv."),
    (r"\.resnets\.(\d+)\.time_emb_proj\.", r".res.\1.time_proj."),
    (r"\.resnets\.(\d+)\.conv_shortcut\.", r".res.\1.skip."),
    (r"\.resnets\.", ".res."),
    (r"\.transformer_blocks\.0\.", ".block."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"^mid_block\.attentions\.0\.", "mid_block.spatial."),
    (r"^mid_block\.temp_attentions\.0\.", "mid_block.temporal."),
    (r"\.attentions\.", ".spatial."),
    (r"\.temp_attentions\.", ".temporal."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
]


def _invert(pattern: str, replacement: str) -> tuple[str, str]:
    """Swap a rule's sides: literal parts are escaped, `(\\d+)` / `\\1` groups carried across."""
    plain = pattern.lstrip("^").replace("\\.", ".").replace(r"(\d+)", "\x00")
    anchor = "^" if pattern.startswith("^") else ""
    new_pattern = anchor + re.escape(replacement.replace(r"\1", "\x00")).replace("\x00", r"(\d+)")
    return new_pattern, plain.replace("\x00", r"\1")


_TO_DIFFUSERS = [_invert(p, r) for p, r in _FROM_DIFFUSERS]


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers I2VGenXLUNet state dict -> ours (same tensors, renamed keys)."""
    return {_rename(k, _FROM_DIFFUSERS): v for k, v in sd.items()}


def state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our I2VGenUNet state dict -> diffusers I2VGenXLUNet layout."""
    return {_rename(k, _TO_DIFFUSERS): v for k, v in sd.items()}


def config_from_diffusers(dc: dict) -> UNetConfig:
    """diffusers I2VGenXLUNet config.json dict -> UNetConfig (all conditioning paths on, as diffusers has)."""
    down = list(dc.get("down_block_types") or ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"])
    up = list(dc.get("up_block_types") or [])
    unknown = sorted(set(down) - {"CrossAttnDownBlock3D", "DownBlock3D"})
    if unknown:
        raise ValueError(f"down_block_types {unknown} are not I2VGen-XL blocks (CrossAttnDownBlock3D / DownBlock3D)")
    levels = tuple(t == "CrossAttnDownBlock3D" for t in down)
    expected_up = ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(levels)]
    if up and up != expected_up:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down} (expected {expected_up})")
    head_dim = dc.get("attention_head_dim", 64)
    if isinstance(head_dim, (list, tuple)):
        if len(set(head_dim)) != 1:
            raise ValueError(f"per-level attention_head_dim {head_dim} is not supported; use one value")
        head_dim = head_dim[0]
    in_ch, cross = dc.get("in_channels", 4), dc.get("cross_attention_dim", 1024)
    sample = dc.get("sample_size") or (32, 56)
    sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return UNetConfig(
        in_channels=in_ch,
        out_channels=dc.get("out_channels", 4),
        block_out_channels=tuple(dc.get("block_out_channels", (320, 640, 1280, 1280))),
        layers_per_block=dc.get("layers_per_block", 2),
        attention_levels=levels,
        attention_head_dim=head_dim,
        transformer_in_heads=8,
        cross_attention_dim=cross,
        norm_num_groups=dc.get("norm_num_groups", 32) or 32,
        image_embed_dim=cross,
        num_global_image_tokens=in_ch,
        local_pool_size=32,
        sample_size=sample,
    )


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNetConfig -> diffusers I2VGenXLUNet config dict; ValueError when diffusers cannot express `cfg`."""
    problems = []
    if not (cfg.use_fps and cfg.use_image_global and cfg.use_image_local and cfg.use_image_concat and cfg.use_text):
        problems.append("diffusers' I2VGenXLUNet always has fps, text and all three image paths")
    fixed = {"transformer_in_heads": 8, "image_embed_dim": cfg.cross_attention_dim, "num_global_image_tokens": cfg.in_channels,
             "local_pool_size": 32, "image_latent_channels": 4, "norm_eps": 1e-5, "resnet_dropout": 0.0}
    problems += [f"{k}={getattr(cfg, k)} (diffusers fixes it to {v})" for k, v in fixed.items() if getattr(cfg, k) != v]
    if problems:
        raise ValueError("config not expressible as a diffusers I2VGenXLUNet: " + "; ".join(problems))
    return {
        "_class_name": "I2VGenXLUNet",
        "sample_size": list(cfg.sample_size),
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in cfg.attention_levels],
        "up_block_types": ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(cfg.attention_levels)],
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "cross_attention_dim": cfg.cross_attention_dim,
        "attention_head_dim": cfg.attention_head_dim,
        "num_attention_heads": None,
    }


# ---- files ---------------------------------------------------------------------------------------------
def _refuse_pickles(folder: Path) -> NoReturn:
    """Always raises: no safetensors here; name any pickle files we will not load."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    raise FileNotFoundError(
        f"no .safetensors weights in {folder}"
        + (f"; found pickle files {pickles}, which are never loaded (unpickling runs arbitrary code): "
           "re-save them as safetensors with a trusted tool first" if pickles else "")
    )


def _read_safetensors_folder(folder: Path, single: str) -> dict[str, torch.Tensor]:
    """Weights from `single`, or from shards named by `single + '.index.json'`, or the only
    *.safetensors in `folder` (e.g. an fp16 variant)."""
    if (folder / single).is_file():
        return load_file(folder / single)
    index = folder / (single + ".index.json")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(folder / shard))
        return sd
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return load_file(candidates[0])
    if candidates:
        raise ValueError(f"{folder} has several weight files {[c.name for c in candidates]}; expected {single}")
    _refuse_pickles(folder)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (a UNet folder needs config.json beside its weights)")
    return json.loads(path.read_text())


def load_diffusers_unet_folder(folder: str | Path) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """Read a diffusers I2VGenXLUNet folder (config.json + safetensors) -> (our config, our state dict)."""
    folder = Path(folder)
    cfg = config_from_diffusers(_read_json(folder / "config.json"))
    return cfg, state_dict_from_diffusers(_read_safetensors_folder(folder, DIFFUSERS_WEIGHTS))


def save_checkpoint(folder: str | Path, cfg: UNetConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write our format: config.json + model.safetensors (contiguous tensors, no pickle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUR_CONFIG).write_text(json.dumps({"format": FORMAT, "unet": dataclasses.asdict(cfg)}, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(folder / OUR_WEIGHTS))
    return folder


def load_checkpoint(folder: str | Path) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """Read our format -> (UNetConfig, state dict)."""
    folder = Path(folder)
    meta = _read_json(folder / OUR_CONFIG)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / OUR_CONFIG} is not an {FORMAT} checkpoint (format={meta.get('format')!r}); "
                         "for a diffusers folder use load_diffusers_unet_folder or `python -m model.convert`")
    cfg = UNetConfig(**meta["unet"])
    if not (folder / OUR_WEIGHTS).is_file():
        _refuse_pickles(folder)
    return cfg, load_file(folder / OUR_WEIGHTS)


def load_unet(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build an I2VGenUNet from our checkpoint folder or a diffusers UNet folder (detected by config.json)."""
    from model.unet import I2VGenUNet

    folder = Path(folder)
    meta = _read_json(folder / "config.json")
    cfg, sd = load_checkpoint(folder) if meta.get("format") == FORMAT else load_diffusers_unet_folder(folder)
    with torch.device("meta"):
        unet = I2VGenUNet(cfg)
    unet.load_state_dict(sd, strict=True, assign=True)
    return unet.to(device=device, dtype=dtype) if dtype is not None else unet.to(device)


def save_diffusers_folder(folder: str | Path, cfg: UNetConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a diffusers-loadable I2VGenXLUNet folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    config = config_to_diffusers(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sd = state_dict_to_diffusers(state_dict)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(folder / DIFFUSERS_WEIGHTS))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-diffusers", type=Path, metavar="DIR", help="diffusers I2VGenXLUNet folder -> ours")
    src.add_argument("--to-diffusers", type=Path, metavar="DIR", help="our checkpoint folder -> diffusers")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--dtype", choices=["keep", *ALIASES, *DTYPES], default="keep")
    args = parser.parse_args(argv)
    try:
        if args.from_diffusers:
            cfg, sd = load_diffusers_unet_folder(args.from_diffusers)
        else:
            cfg, sd = load_checkpoint(args.to_diffusers)
        if args.dtype != "keep":
            dt = dtype_of(args.dtype)
            sd = {k: v.to(dt) for k, v in sd.items()}
        out = save_checkpoint(args.out, cfg, sd) if args.from_diffusers else save_diffusers_folder(args.out, cfg, sd)
    except (FileNotFoundError, ValueError) as exc:  # bad input folder: a clear message, no traceback
        raise SystemExit(f"model.convert: error: {exc}") from None
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {out} ({len(sd)} tensors, {n:,} parameters)")


if __name__ == "__main__":
    main()
