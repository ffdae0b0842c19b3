"""Resuming the curation job on an existing OUT: what is already done, and whether it may be reused.

OUT/config.yaml holds the resolved config of the run that staged OUT/staging. A re-run on the same OUT
skips every source with a staging file, but only when the settings that shape results (RESULT_SECTIONS)
are unchanged: otherwise staged rows would mix two configs, and the job refuses before any work. The
`job` and `output` sections only change how the job runs, so they may differ between a run and its resume.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from common.atomic import write_text
from common.configtree import ConfigError
from curation import config as config_mod
from curation.config import CurateConfig
from curation.inputs import InputItem
from pipeline import staging

RESULT_SECTIONS = ("decode", "shots", "scores", "filter", "encode")
"""Config sections whose change makes staged results stale."""


def check_previous_config(out: Path, cfg: CurateConfig) -> None:
    """Refuse to resume over staged results made with different decode/shot/score/filter/encode settings."""
    path = out / "config.yaml"
    if not path.is_file() or not staging.folder_of(out).is_dir():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = yaml.safe_load(config_mod.to_yaml(cfg))
    changed = [s for s in RESULT_SECTIONS if old.get(s) != new.get(s)]
    if changed:
        raise ConfigError(
            f"{out} holds a run made with different {', '.join(changed)} settings (see {path}); staged results "
            "would mix two configs. Use a new --output, or delete its staging/ folder to start over"
        )


def pending(out: Path, items: list[InputItem]) -> list[InputItem]:
    """The items without a complete staging file (read only: nothing in OUT changes)."""
    finished = staging.finished_keys(staging.folder_of(out))
    return [it for it in items if it.key not in finished]


def start_output(out: Path, cfg: CurateConfig) -> None:
    """Make OUT, publish the resolved config as OUT/config.yaml, and delete the temp files of killed writes."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", config_mod.to_yaml(cfg))
    staging.clean_temp_files(staging.folder_of(out))
