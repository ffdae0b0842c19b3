"""training.config: every shipped recipe loads and validates; bad keys / values / combinations are errors
naming the field; missing model files are listed with their config keys; the CLI stops before any work,
and before importing torch, DeepSpeed or anything else heavy.

How recipe paths are checked on a machine without the weights: `validate` (schema + combinations) never
touches the filesystem and must pass for every recipe; `missing_paths` then lists the local files a recipe
needs that are absent here. The tiny recipes need none; the real ones must name exactly their weight
files (OpenCLIP checkpoint, VAE folder, init_from), and `check_paths` turns that list into the error the
job stops with. Pointing the keys at files that exist makes the same recipes pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.configtree import ConfigError
from model.config import get_flavor
from model.convert import save_checkpoint
from model.unet import I2VGenUNet
from training.config import check_paths, load_config, missing_paths, to_yaml, unet_config, validate

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "train").glob("*.yaml"))


def test_the_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"tiny-base", "tiny-refine", "base-448x256", "refine-1280x720", "finetune-i2vgen-xl"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_validates_and_round_trips(recipe, tmp_path):
    cfg = load_config(recipe)
    validate(cfg)
    if cfg.model.flavor:
        ucfg = unet_config(cfg)
        assert (cfg.stage == "refine") == (not ucfg.use_image_global and not ucfg.use_fps)
    # the resolved tree written to OUTPUT/config.yaml loads back to the same tree
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg


WEIGHT_KEYS = {
    "tiny-base": set(), "tiny-refine": set(),
    "base-448x256": {"model.clip.checkpoint", "model.vae.path"},
    "refine-1280x720": {"model.clip.checkpoint", "model.vae.path"},
    "finetune-i2vgen-xl": {"model.clip.checkpoint", "model.vae.path", "model.init_from"},
}


@pytest.mark.parametrize("name", sorted(WEIGHT_KEYS))
def test_recipes_name_their_missing_weight_files_with_keys(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipe paths are relative to the launch directory: nothing exists here
    cfg = load_config(REPO / "configs" / "train" / f"{name}.yaml")
    missing = missing_paths(cfg)
    assert {key for key, _ in missing} == WEIGHT_KEYS[name]
    if missing:
        with pytest.raises(FileNotFoundError) as err:
            check_paths(cfg)
        for key, path in missing:
            assert key in str(err.value) and path in str(err.value)
    else:
        check_paths(cfg)


def _fake_weights(root: Path) -> list[str]:
    """Empty files where the real recipes expect weights + a tiny converted UNet for init_from."""
    (root / "clip.bin").write_bytes(b"")
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text("{}")
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return [f"model.clip.checkpoint={root / 'clip.bin'}", f"model.vae.path={root / 'vae'}"]


def test_real_recipes_pass_once_the_files_exist(tmp_path):
    over = _fake_weights(tmp_path)
    ucfg = get_flavor("tiny")
    save_checkpoint(tmp_path / "unet", ucfg, I2VGenUNet(ucfg).state_dict())
    for name in ("base-448x256", "refine-1280x720"):
        check_paths(load_config(REPO / "configs" / "train" / f"{name}.yaml", over))
    cfg = load_config(REPO / "configs" / "train" / "finetune-i2vgen-xl.yaml",
                      [*over, f"model.init_from={tmp_path / 'unet'}"])
    validate(cfg)
    check_paths(cfg)
    assert unet_config(cfg) == ucfg  # the architecture comes from init_from's config.json
    cfg = load_config(REPO / "configs" / "train" / "finetune-i2vgen-xl.yaml",
                      [*over, f"model.init_from={tmp_path / 'unet'}", "model.overrides.dropout=0.0"])
    assert unet_config(cfg).dropout == 0.0
    refine = load_config(REPO / "configs" / "train" / "finetune-i2vgen-xl.yaml",
                         [*over, f"model.init_from={tmp_path / 'unet'}", "stage=refine"])
    with pytest.raises(ConfigError, match="model.init_from"):  # a base UNet cannot train the refine stage
        check_paths(refine)
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"format": "diffusers?"}))
    with pytest.raises(ConfigError, match="model.convert"):
        check_paths(cfg)


TINY = REPO / "configs" / "train" / "tiny-base.yaml"


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim"),                    # unknown key
    ("bogus=1", "bogus"),                        # unknown top-level key
    ("deepspeed.zero_stage=1", "deepspeed.zero_stage"),
    ("deepspeed.precision=fp8", "deepspeed.precision"),
    ("max_steps=ten", "max_steps"),
    ("objective.p_text=2", "objective.p_text"),
    ("objective.timestep_range=[600,100]", "objective.timestep_range"),
    ("ema.decay=1.5", "ema.decay"),
    ("data.height=60", "data.height"),
    ("deepspeed.offload_param=true", "deepspeed.offload_param"),  # needs ZeRO-3
])
def test_bad_keys_and_values_are_errors_naming_the_field(override, field):
    with pytest.raises((ConfigError, ValueError)) as err:
        validate(load_config(TINY, [override]))
    assert field in str(err.value)


@pytest.mark.parametrize("overrides, field", [
    (["model.init_from=/somewhere"], "model.init_from"),          # flavor and init_from both set
    (["model.flavor=null"], "model.flavor"),                       # neither
    (["model.flavor=huge"], "model.flavor"),
    (["model.overrides.dropuot=0.0"], "model.overrides"),
    (["model.clip.text_dim=32"], "model.clip.text_dim"),
    (["stage=refine"], "model.flavor"),                            # an image-conditioned UNet as refiner
    (["objective.timestep_range=[0,2000]"], "objective.timestep_range"),
    (["optim.min_lr=1.0"], "optim.min_lr"),
    (["checkpoint.every_steps=0"], "checkpoint.every_steps"),
    (["optim.warmup_steps=1000"], "optim.warmup_steps"),
])
def test_bad_combinations_are_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        validate(load_config(TINY, overrides))
    assert field in str(err.value)


def test_cli_stops_on_a_bad_config_before_any_work(tmp_path, capsys):
    from training.train import main

    out = tmp_path / "out"
    assert main(["--config", str(TINY), f"output_dir={out}", "optim.betas=[0.9,1.5]"]) == 2
    assert "optim" in capsys.readouterr().err and not out.exists()
    assert main(["--config", str(TINY), f"output_dir={out}", "data.batch_sise=2"]) == 2
    assert "batch_sise" in capsys.readouterr().err and not out.exists()


# What a config error must not wait for: each takes seconds to import on a busy machine (torch alone ~2-8 s)
HEAVY = ("torch", "deepspeed", "open_clip", "numpy", "safetensors", "diffusers", "decord", "av", "cv2", "PIL",
         "mlflow", "webdataset", "ray", "tqdm")


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level names of the modules a `python -X importtime` run imported."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and not line.rstrip().endswith("imported package"):
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("override, field", [("bad.key=1", "bad"), ("data.batch_size=0", "data.batch_size"),
                                             ("deepspeed.zero_stage=1", "deepspeed.zero_stage")])
def test_cli_reports_a_config_error_before_importing_anything_heavy(override, field):
    proc = _python("-m", "training.train", "--config", str(TINY), override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = [line for line in proc.stderr.splitlines() if line.startswith("training.train: config error")]
    assert len(message) == 1 and field in message[0]
    imported = _imported(proc.stderr)
    assert {"training", "yaml"} <= imported  # the import log is read correctly
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_every_recipe_loads_and_validates_without_heavy_imports():
    code = ("import sys; from training.config import load_config, validate; "
            "[validate(load_config(p)) for p in sys.argv[1:]]")
    proc = _python("-c", code, *map(str, RECIPES))
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert {"training", "model", "yaml"} <= imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_init_from_builds_the_unet_with_the_converted_weights(tmp_path):
    from training.trainer import build_unet  # imports DeepSpeed: only here

    over = _fake_weights(tmp_path)
    ucfg = get_flavor("tiny")
    torch.manual_seed(123)
    source = I2VGenUNet(ucfg)
    save_checkpoint(tmp_path / "unet", ucfg, {k: v.half() for k, v in source.state_dict().items()})
    cfg = load_config(REPO / "configs" / "train" / "finetune-i2vgen-xl.yaml",
                      [*over, f"model.init_from={tmp_path / 'unet'}", "model.overrides.dropout=0.0",
                       "activation_checkpointing=true"])
    unet = build_unet(cfg)
    assert unet.cfg.dropout == 0.0 and unet.gradient_checkpointing and unet.training
    for name, value in unet.state_dict().items():
        assert value.dtype == torch.float32  # trained in fp32 master weights whatever the file's dtype
        assert torch.equal(value, source.state_dict()[name].half().float()), name
    # a random init is seeded: identical on every rank, different per seed
    tiny = load_config(TINY)
    a, b = build_unet(tiny).state_dict(), build_unet(tiny).state_dict()
    c = build_unet(load_config(TINY, ["seed=1"])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
