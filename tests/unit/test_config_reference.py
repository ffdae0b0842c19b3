"""docs/configuration.md is what common.config_reference writes now; the generator reads attribute docstrings
with ast, spells out Literal choices, shows the defaults of a freshly built tree, and refuses undocumented
fields."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from common import config_reference as ref
from common import configtree
from curation.config import CurateConfig
from training.config import TrainConfig


@dataclass
class Leaf:
    """A small section."""

    mode: Literal["fast", "slow"] = "fast"
    """How it runs."""
    size: int | None = None
    """Size in pixels;
    None = automatic."""
    tags: list[str] = field(default_factory=lambda: ["a"])
    """Tags, as a list."""


@dataclass
class Root:
    """A small tree."""

    leaf: Leaf = field(default_factory=lambda: Leaf(size=7))
    """The leaf, built with its own size."""
    steps: int = 3
    """Steps."""


@dataclass
class NoDoc:
    flag: bool = False
    """A documented field in a class without a docstring."""


@dataclass
class Undocumented:
    """Like Leaf, plus a field that forgot its docstring."""

    mode: Literal["fast", "slow"] = "fast"
    """How it runs."""
    extra: float = 0.5
    nodoc: NoDoc = field(default_factory=NoDoc)


@dataclass
class RootWithGap:
    """A tree holding an undocumented field and an undocumented section."""

    part: Undocumented = field(default_factory=Undocumented)
    other: Any = None
    """Anything."""


def test_committed_reference_is_current(capsys):
    text, counts = ref.render()
    assert ref.DEFAULT_OUT.read_text() == text, "docs/configuration.md is stale: run python -m common.config_reference"
    assert ref.main(["--check"]) == 0
    assert "is current" in capsys.readouterr().out
    # every command-line key of both trees (configtree.flatten; + model.overrides, an empty mapping)
    assert counts == {"curation.config": len(configtree.flatten(CurateConfig())),
                      "training.config": len(configtree.flatten(TrainConfig())) + 1}


@pytest.mark.parametrize("root", [CurateConfig, TrainConfig])
def test_every_key_is_a_command_line_key(root):
    """The reference's keys are the dotted paths configtree takes (flatten drops an empty-dict field's key)."""
    sections, missing = ref.walk(root)
    keys = [row.key for s in sections for row in s.rows]
    assert missing == [] and len(keys) == len(set(keys))
    flat = set(configtree.flatten(root()))
    assert flat <= set(keys)
    assert set(keys) - flat == {"model.overrides"} if root is TrainConfig else set(keys) == flat
    defaults = configtree.to_dict(root())
    for row in (r for s in sections for r in s.rows):  # the default column, given back as an override, loads
        value = row.default.split(" (")[0] if row.default.endswith("iB)") else row.default
        loaded = configtree.to_dict(configtree.load(root, None, [f"{row.key}={value}"]))
        assert loaded == defaults, row


def test_reference_rows_of_known_fields():
    text = ref.DEFAULT_OUT.read_text()
    assert "| `encode.max_side` | int | `512` | Longest side of the stored clip" in text
    assert '| `job.clip_placement` | one of "auto", "actors", "stage1" | `auto` |' in text
    assert "| `data.batch_size` | int | `1` | Per-rank micro-batch of video steps. |" in text
    # the instance default, not ClipConfig's class default: ModelConfig builds it with kind="tiny-random"
    assert '| `model.clip.kind` | one of "openclip", "tiny-random" | `tiny-random` |' in text
    assert "| `output.shard_max_bytes` | int | `536870912 (512 MiB)` |" in text
    assert "OUT/config.yaml" in text and "OUTPUT/checkpoints/step-XXXXXXXX/config.yaml" in text


def test_extraction_from_a_small_tree():
    sections, missing = ref.walk(Root)
    assert missing == []
    assert [(s.prefix, s.doc) for s in sections] == [("", "A small tree."),
                                                     ("leaf", "The leaf, built with its own size.")]
    rows = {r.key: r for s in sections for r in s.rows}
    assert list(rows) == ["steps", "leaf.mode", "leaf.size", "leaf.tags"]
    assert (rows["leaf.mode"].type, rows["leaf.mode"].default) == ('one of "fast", "slow"', "fast")
    assert (rows["leaf.size"].type, rows["leaf.size"].default) == ("int | null", "7")
    assert rows["leaf.size"].description == "Size in pixels;\nNone = automatic."
    assert (rows["leaf.tags"].type, rows["leaf.tags"].default) == ("list[str]", '["a"]')
    job = ref.Job("Small", __name__, "Root", "intro")
    text, counts = ref.render((job,))
    assert counts == {__name__: 4}
    assert "| `leaf.size` | int \\| null | `7` | Size in pixels; None = automatic. |" in text


def test_missing_docstrings_are_named():
    _, missing = ref.walk(RootWithGap)
    assert missing == ["part.extra (Undocumented.extra)", "part.nodoc (section NoDoc: no class or field docstring)"]
    with pytest.raises(ref.MissingDocstrings, match=r"part\.extra \(Undocumented\.extra\)"):
        ref.render((ref.Job("Gap", __name__, "RootWithGap", "intro"),))


def test_a_field_added_without_docstring_fails_main(tmp_path, monkeypatch, capsys):
    """A real config class grown by one undocumented field: inherited docstrings are still found, the new
    field is named, and main exits 1 without writing."""
    (tmp_path / "grown_config.py").write_text(
        "from dataclasses import dataclass\n"
        "from training.subconfigs import EMAConfig\n\n\n"
        "@dataclass\nclass GrownEMA(EMAConfig):\n"
        '    """EMA with one knob more."""\n\n'
        "    warmup: int = 0\n\n\n"
        "@dataclass\nclass GrownRoot:\n"
        '    """Root."""\n\n'
        "    ema: GrownEMA = None\n\n"
        "    def __post_init__(self):\n"
        "        self.ema = self.ema or GrownEMA()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sections, missing = ref.walk(__import__("grown_config").GrownRoot)
    assert missing == ["ema.warmup (GrownEMA.warmup)"]
    keys = [r.key for r in sections[0].rows]
    assert keys == ["ema.enabled", "ema.decay", "ema.start_step", "ema.every", "ema.warmup"]
    assert sections[0].rows[1].description == "Weight of the old shadow per update, in [0, 1)."
    monkeypatch.setattr(ref, "JOBS", (ref.Job("Grown", "grown_config", "GrownRoot", "intro"),))
    out = tmp_path / "configuration.md"
    assert ref.main(["--out", str(out)]) == 1 and not out.exists()
    assert "ema.warmup (GrownEMA.warmup)" in capsys.readouterr().err
    assert ref.main(["--check", "--out", str(out)]) == 1


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(ref.DEFAULT_OUT.read_text().replace("Longest side of the stored clip", "Longest side"))
    assert ref.main(["--check", "--out", str(stale)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of date at line" in err[0] and ref.REGENERATE in err[0]
    assert ref.main(["--check", "--out", str(tmp_path / "absent.md")]) == 1
    assert ref.main(["--out", str(stale)]) == 0 and ref.main(["--check", "--out", str(stale)]) == 0


def test_generator_imports_no_torch():
    code = ("import sys; from common import config_reference as r; r.render(); "
            "heavy = [m for m in ('torch', 'deepspeed', 'open_clip') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
