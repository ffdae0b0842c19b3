"""common.configtree: typed YAML config trees with dotted overrides and early, named errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.configtree import ConfigError, FieldError, check_fields, flatten, from_dict, load, to_yaml


@dataclass
class Inner:
    threshold: float | None = 0.5
    sizes: tuple[int, int] = (64, 36)
    mode: str = "adaptive"


@dataclass
class Outer:
    name: str = "job"
    workers: int = 2
    enabled: bool = True
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_defaults_yaml_roundtrip(tmp_path):
    cfg = Outer(workers=4, inner=Inner(threshold=None, sizes=(32, 18)), tags=["a"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load(Outer, path) == cfg


def test_overrides_are_typed():
    cfg = load(Outer, None, ["workers=8", "inner.threshold=0.25", "enabled=false", "inner.sizes=[16,8]"])
    assert cfg.workers == 8 and cfg.inner.threshold == 0.25 and cfg.enabled is False
    assert cfg.inner.sizes == (16, 8)
    assert load(Outer, None, ["inner.threshold=null"]).inner.threshold is None


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError, match=r"inner: unknown key\(s\) \['treshold'\]; valid keys: \['mode', 'sizes', 'threshold'\]"):
        load(Outer, None, ["inner.treshold=0.1"])


def test_bad_value_names_field():
    with pytest.raises(ConfigError, match="workers: expected an integer"):
        from_dict(Outer, {"workers": "many"})
    with pytest.raises(ConfigError, match="inner.sizes: expected 2 items"):
        from_dict(Outer, {"inner": {"sizes": [1, 2, 3]}})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load(Outer, tmp_path / "nope.yaml")


def test_flatten_for_tracking():
    flat = flatten(Outer())
    assert flat["inner.threshold"] == 0.5 and flat["inner.sizes"] == [64, 36] and flat["name"] == "job"


@dataclass
class WithChoice:
    mode: Literal["fast", "exact"] = "fast"
    size: int = 1


def test_literal_choices_are_validated_and_named():
    assert load(WithChoice, None, ["mode=exact"]).mode == "exact"
    with pytest.raises(ConfigError, match=r"mode: 'quick' is not one of \['fast', 'exact'\]"):
        load(WithChoice, None, ["mode=quick"])


@dataclass
class Checked:
    """A config class that checks its own fields, as curation's DecodeConfig / ShotConfig do."""

    mode: Literal["fast", "exact"] = "fast"
    device: Literal["cpu", "cuda"] | None = None
    width: int = 16

    def __post_init__(self):
        check_fields(self, ("width", self.width >= 16 and self.width % 2 == 0, "must be even and >= 16"))


@dataclass
class PlainCheck:
    ratio: float = 0.5

    def __post_init__(self):
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must lie in [0, 1], got {self.ratio}")


@dataclass
class Sections:
    checked: Checked = field(default_factory=Checked)
    plain: PlainCheck = field(default_factory=PlainCheck)


def test_a_class_check_is_a_config_error_naming_the_dotted_field():
    with pytest.raises(ConfigError, match=r"^checked.width=15: must be even and >= 16$"):
        load(Sections, None, ["checked.width=15"])
    with pytest.raises(ConfigError, match=r"^plain: ratio must lie in \[0, 1\], got 2.0$"):  # a plain ValueError
        load(Sections, None, ["plain.ratio=2"])
    with pytest.raises(ConfigError, match=r"^Checked.width=15: "):  # without a path: the class name
        from_dict(Checked, {"width": 15})


def test_built_in_code_the_same_checks_hold_literals_included():
    """Code that builds a config directly (no loader) gets the same FieldError, Literal choices checked."""
    with pytest.raises(FieldError, match=r"^Checked.width=15: must be even"):
        Checked(width=15)
    with pytest.raises(FieldError, match=r"^Checked.mode='quick': valid keys are \['fast', 'exact'\]$"):
        Checked(mode="quick")
    with pytest.raises(FieldError, match=r"^Checked.device='tpu': valid keys are \['cpu', 'cuda', None\]$"):
        Checked(device="tpu")
    assert Checked(mode="exact", device=None, width=18).device is None
    assert Checked(device="cuda").device == "cuda"
