"""training.samples: export in model/'s format, validation videos rendered from that export, and the
generate CLI on the exports. Tiny random UNets and tiny-random CLIP/VAE built in code (no weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from common.configtree import ConfigError
from model.config import get_flavor
from model.diffusion import DiffusionConfig
from model.encoders import ClipConfig
from model.generate import load_stage_config, load_unet
from model.unet import I2VGenUNet
from model.vae import VAEConfig
from tests.train_shards import video_sample, write_tar
from training.data import DataConfig
from training.samples import (
    SamplingConfig,
    export_stage,
    image_items,
    render_samples,
    sampling_items,
    stage_config,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "assets" / "sample"
FRAMES = 4
SIZES = {"base": (64, 64), "refine": (64, 96)}  # (height, width), as model.generate.write_tiny_checkpoints


def unet_cfg(stage: str):
    return get_flavor("tiny" if stage == "base" else "tiny-refine")


def tiny_stage(stage: str, sampling: SamplingConfig):
    ucfg = unet_cfg(stage)
    h, w = SIZES[stage]
    clip = ClipConfig(kind="tiny-random", text_dim=ucfg.cross_attention_dim, image_dim=ucfg.image_embed_dim)
    return stage_config(stage, diffusion=DiffusionConfig(), clip=clip, vae=VAEConfig(kind="tiny-random"),
                        width=w, height=h, num_frames=FRAMES, fps=8, sampling=sampling)


def random_weights(stage: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return I2VGenUNet(unet_cfg(stage)).state_dict()


def clip_items(n: int, height: int, width: int) -> list[dict]:
    """Validation-like items from the bundled sample clip: F frames 6 apart, resized + cropped, [-1, 1]."""
    from model.cascade import resize_center_crop

    with av.open(str(SAMPLE / "clip_01_tears_of_steel.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(6 * FRAMES * n), container.decode(video=0))]
    items = []
    for i in range(n):
        picked = np.stack(frames[i * 6 * FRAMES:(i + 1) * 6 * FRAMES:6])
        x = torch.from_numpy(picked).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, H0, W0)
        video = resize_center_crop(x, height, width).permute(1, 0, 2, 3).contiguous()  # (3, F, H, W)
        items.append({"key": f"clip_01/{i:06d}", "image": video[:, 0], "caption": "a robot in a city",
                      "video": video})
    return items


def decoded(path: Path) -> tuple[int, int, int]:
    """(frames actually decoded, width, height)."""
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames), frames[0].width, frames[0].height


def png_frames(mp4: Path) -> list[bytes]:
    """Pixels of the lossless PNG frames write_video puts beside an mp4."""
    from PIL import Image

    return [np.asarray(Image.open(p)).tobytes() for p in sorted((mp4.parent / f"{mp4.stem}_frames").glob("*.png"))]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    sampling = SamplingConfig(steps=2, seed=3)
    out = {}
    for i, stage in enumerate(("base", "refine")):
        weights = random_weights(stage, seed=i)
        out[stage] = (export_stage(root / stage / "export", unet_cfg(stage), weights, tiny_stage(stage, sampling)),
                      weights)
    return out


def test_export_is_model_format_with_the_given_weights(exports):
    for stage, (folder, weights) in exports.items():
        assert sorted(p.name for p in folder.iterdir()) == ["stage.yaml", "unet"]
        cfg = load_stage_config(folder)
        assert (cfg.stage, cfg.num_frames, cfg.sampler.steps, (cfg.height, cfg.width)) == (
            stage, FRAMES, 2, SIZES[stage])
        loaded = load_unet(folder).state_dict()
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert load_stage_config(exports["refine"][0]).sampler.spacing == "trailing"  # refine release sampler


def test_render_base_and_refine_samples_from_the_exports(exports, tmp_path):
    base_items = clip_items(2, *SIZES["base"])
    paths = render_samples(exports["base"][0], base_items, tmp_path / "base", seed=3)
    assert [p.name for p in paths] == ["00-clip_01_000000.mp4", "01-clip_01_000001.mp4"]
    for p in paths:
        assert decoded(p) == (FRAMES, 64, 64)
        assert len(list((p.parent / f"{p.stem}_frames").glob("*.png"))) == FRAMES
    refine_items = clip_items(1, *SIZES["refine"])
    (refined,) = render_samples(exports["refine"][0], refine_items, tmp_path / "refine", seed=3)
    assert decoded(refined) == (FRAMES, 96, 64)  # half-size input refined back to the stage size
    # the same seed renders the same video (samples are comparable across steps and runs); compared on
    # the lossless PNG frames: libx264's bitstream is not byte-reproducible run to run
    again = render_samples(exports["refine"][0], refine_items, tmp_path / "again", seed=3)[0]
    assert png_frames(refined) == png_frames(again)
    other_seed = render_samples(exports["refine"][0], refine_items, tmp_path / "other", seed=4)[0]
    assert png_frames(other_seed) != png_frames(refined)


def test_generate_cli_runs_the_cascade_on_the_exports(exports, tmp_path):
    out = tmp_path / "cascade.mp4"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "model.generate", "--base", str(exports["base"][0]), "--refine",
                           str(exports["refine"][0]), "--image", str(SAMPLE / "tears_of_steel_frame_0040.jpg"),
                           "--prompt", "a robot", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["shape"] == [1, 3, FRAMES, 64, 96]
    assert decoded(out) == (FRAMES, 96, 64)


def test_export_needs_every_weight_and_keeps_the_previous_one(tmp_path):
    stage = tiny_stage("base", SamplingConfig(steps=2))
    first = random_weights("base", 0)
    folder = export_stage(tmp_path / "export", unet_cfg("base"), first, stage)
    second = random_weights("base", 1)
    partial = dict(second)
    partial.pop(next(iter(partial)))
    with pytest.raises(RuntimeError, match="Missing key"):
        export_stage(folder, unet_cfg("base"), partial, stage)
    assert torch.equal(load_unet(folder).state_dict()["conv_in.weight"], first["conv_in.weight"])
    export_stage(folder, unet_cfg("base"), second, stage)  # replaces the old export
    assert torch.equal(load_unet(folder).state_dict()["conv_in.weight"], second["conv_in.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .tmp / .old left behind


def test_stage_config_takes_release_sampler_with_sampling_overrides():
    base = tiny_stage("base", SamplingConfig())
    assert (base.sampler.steps, base.sampler.guidance, base.t_start) == (50, 9.0, 599)  # release defaults
    refine = tiny_stage("refine", SamplingConfig(steps=3, guidance=5.0))
    assert (refine.sampler.steps, refine.sampler.guidance, refine.sampler.guidance_rescale) == (3, 5.0, 0.2)
    assert (refine.stage, refine.height, refine.width, refine.num_frames) == ("refine", 64, 96, FRAMES)


def test_sampling_config_and_image_items():
    with pytest.raises(ConfigError, match="num_samples"):
        SamplingConfig(num_samples=0)
    with pytest.raises(ConfigError, match="steps"):
        SamplingConfig(steps=0)
    with pytest.raises(ConfigError, match="captions"):
        SamplingConfig(images=[], captions=["x"])
    cfg = SamplingConfig(images=[str(SAMPLE / "tears_of_steel_frame_0040.jpg")], captions=["a robot"])
    (item,) = image_items(cfg, 64, 96)
    assert item["image"].shape == (3, 64, 96) and item["caption"] == "a robot"
    assert -1.0 <= item["image"].min() < item["image"].max() <= 1.0

    data = DataConfig(shards=["/nonexistent"], height=64, width=96)  # images need no shards
    assert sampling_items(cfg, "base", data)[0]["key"] == "tears_of_steel_frame_0040"
    with pytest.raises(ConfigError, match="base stage"):
        sampling_items(cfg, "refine", data)
    with pytest.raises(FileNotFoundError):
        image_items(SamplingConfig(images=["/no/such.jpg"]), 64, 64)


def test_trainer_path_validation_clips_from_shards_rendered_by_the_refine_export(exports, tmp_path):
    """What the trainer does: sampling_items over curated shards (training.data.validation_items), then
    render_samples from the export."""
    write_tar(tmp_path / "out" / "shards" / "video-000000.tar",
              [video_sample(f"clip{i}", num_frames=12, caption=f"shot {i}", offset=3 * i) for i in (2, 0, 1)])
    data = DataConfig(shards=[str(tmp_path / "out")], num_frames=FRAMES, height=64, width=96, num_workers=0)
    items = sampling_items(SamplingConfig(num_samples=2), "refine", data)
    assert [(it["key"], it["caption"], tuple(it["video"].shape)) for it in items] == [
        ("clip0", "shot 0", (3, FRAMES, 64, 96)), ("clip1", "shot 1", (3, FRAMES, 64, 96))]
    paths = render_samples(exports["refine"][0], items, tmp_path / "samples")
    assert [p.name for p in paths] == ["00-clip0.mp4", "01-clip1.mp4"]
    assert all(decoded(p) == (FRAMES, 96, 64) for p in paths)
