"""pipeline.resume: what a re-run on an existing OUT reuses, and when it refuses to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.configtree import ConfigError
from curation.config import load_config
from curation.inputs import InputItem
from pipeline import resume, staging

REPO = Path(__file__).resolve().parents[2]
DEFAULT_YAML = REPO / "configs" / "curate_default.yaml"


def _items(*names: str) -> list[InputItem]:
    return [InputItem(n, f"/in/{n}", "video") for n in names]


def test_start_output_publishes_the_config_and_drops_killed_writes(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(DEFAULT_YAML)
    staging.write_source(staging.folder_of(out), _items("a.mp4")[0].key, {"source": "a.mp4"}, [], [])
    (staging.folder_of(out) / "b.parquet.tmp-99-abcd").write_bytes(b"half")  # a write killed mid-way
    resume.start_output(out, cfg)
    assert yaml.safe_load((out / "config.yaml").read_text())["scores"]["clip"]["model"] == "tiny-random"
    assert sorted(p.name for p in staging.folder_of(out).iterdir()) == [f"{_items('a.mp4')[0].key}.parquet"]
    assert [p.name for p in out.iterdir() if "tmp" in p.name] == []


def test_pending_skips_staged_sources_only(tmp_path):
    out = tmp_path / "out"
    items = _items("a.mp4", "b.mp4", "c.mp4")
    assert resume.pending(out, items) == items  # nothing staged, no OUT yet: read only
    assert not out.exists()
    staging.write_source(staging.folder_of(out), items[1].key, {"source": "b.mp4"}, [], [])
    assert resume.pending(out, items) == [items[0], items[2]]


def test_resume_refuses_other_result_settings_but_not_other_job_settings(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(DEFAULT_YAML)
    resume.check_previous_config(out, cfg)  # a new OUT: nothing to compare
    resume.start_output(out, cfg)
    staging.folder_of(out).mkdir()
    resume.check_previous_config(out, load_config(DEFAULT_YAML, ["job.sources_per_actor=2",
                                                                  "output.shard_max_bytes=1000"]))
    with pytest.raises(ConfigError, match="different filter, encode settings"):
        resume.check_previous_config(out, load_config(DEFAULT_YAML, ["encode.crf=30", "filter.min_motion=1.0"]))
    with pytest.raises(ConfigError, match="different scores settings"):
        resume.check_previous_config(out, load_config(DEFAULT_YAML, ["scores.clip.frames_per_clip=5"]))
