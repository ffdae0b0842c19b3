"""The curation config tree (curation.config): choices are Literals, every setting is checked on load,
before any work, with an error naming the field."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from common.configtree import ConfigError
from curation.config import CurateConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEFAULT_YAML = REPO / "configs" / "curate_default.yaml"

# Fields of the curation config that hold free text (a path, a model name, patterns), not a choice.
FREE_TEXT = {"scores.clip.model", "scores.clip.checkpoint", "scores.quality.aesthetic_head", "scores.text.boilerplate",
             "decode.scratch_dir", "shots.transnet_weights", "tracking.tracking_uri", "tracking.experiment",
             "tracking.run_name"}


def _string_fields(cls, prefix: str = "") -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(_string_fields(tp, f"{name}."))
        elif str in (tp, *typing.get_args(tp)) or list[str] == tp:
            out[name] = tp
    return out


def test_curation_choice_fields_are_literals():
    """Every string setting of the curation config is either free text or a Literal (validated on load)."""
    plain = set(_string_fields(CurateConfig))
    assert plain <= FREE_TEXT, sorted(plain - FREE_TEXT)
    assert {"job.clip_placement", "scores.clip.device", "scores.clip.precision", "encode.preset",
            "filter.dedup_priority"}.isdisjoint(plain)


@pytest.mark.parametrize("override, message", [
    ("job.clip_placement=gpu", "job.clip_placement: 'gpu' is not one of"),
    ("scores.clip.device=cuda:1", "scores.clip.device: 'cuda:1' is not one of"),
    ("scores.clip.precision=half", "scores.clip.precision: 'half' is not one of"),
    ("encode.preset=quick", "encode.preset: 'quick' is not one of"),
    ("filter.dedup_priority=flicker", "filter.dedup_priority: 'flicker' is not one of"),
    ("scores.clip.model=ViT-H-13", "scores.clip.model: 'ViT-H-13' is not an open_clip architecture"),
    ("scores.quality.aesthetic_head=/nowhere/head.pth", "scores.quality.aesthetic_head: file not found"),
    ("scores.text.boilerplate=['(unclosed']", "scores.text.boilerplate[0]: '(unclosed' is not a regular expression"),
    ("scores.text.max_words=1", "scores.text.max_words (1) is below scores.text.min_words"),
    ("encode.crf=60", "encode.crf must be <= 51"),
    ("encode.max_fps=0", "encode.max_fps must be > 0"),
    ("scores.motion.max_pairs=0", "scores.motion.max_pairs must be >= 1"),
    ("job.clip_num_gpus=-1", "job.clip_num_gpus must be >= 0"),
    ("output.shard_max_bytes=0", "output.shard_max_bytes must be >= 1"),
])
def test_bad_settings_are_refused_on_load_naming_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_YAML, [override])
    assert message in str(err.value)


def test_the_shipped_configs_load():
    cfg = load_config(DEFAULT_YAML)
    assert (cfg.scores.clip.model, cfg.job.clip_placement, cfg.scores.clip.precision) == ("tiny-random", "auto", "auto")
    with pytest.raises(ConfigError, match="scores.clip.checkpoint"):  # built-in defaults: ViT-H-14, real weights
        load_config(None)
    assert load_config(None, ["scores.clip.model=tiny-random"]) == dataclasses.replace(
        CurateConfig(), scores=dataclasses.replace(CurateConfig().scores, clip=cfg.scores.clip))


def test_loading_the_config_imports_neither_torch_nor_open_clip():
    """The driver checks every setting (open_clip model names included) without importing torch or open_clip
    (seconds of start-up per job); the driver module itself does not import them either."""
    import subprocess
    import sys

    code = ("import sys; import pipeline.curate; from curation.config import load_config; "
            f"load_config({str(DEFAULT_YAML)!r}, ['scores.clip.model=ViT-H-14', 'scores.clip.checkpoint={__file__}']); "
            "print(sorted(m for m in ('torch', 'open_clip', 'webdataset') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
