"""Evaluation inside a training run: `python -m training.train` (tiny-base, 2 steps, evaluation.every_steps=1)
on shards built in code (tests.train_shards) scores the export at steps 1 and 2 with training.evaluate's
Evaluator and logs `eval/...` metrics at those steps, tags and the grid into the training run itself; a
tiny-refine run with evaluation.base_checkpoint scores the cascade (`eval/...` and `eval/base/...`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from train_support import TINY_BASE, run

from tests.train_shards import video_sample, write_tar
from training.eval_metrics import NO_VIT_H

TINY_REFINE = "configs/train/tiny-refine.yaml"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_training_evaluates_its_exports_into_its_own_run(tmp_path: Path):
    shards = write_tar(tmp_path / "data" / "shards" / "video-000000.tar",
                       [video_sample(f"clip{i}", num_frames=24, offset=4 * i) for i in range(3)])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    records = run(["--config", TINY_BASE, f"data.shards=[{shards}]", "data.image_fraction=0.0", "data.num_workers=0",
                   "max_steps=2", "optim.warmup_steps=1", "checkpoint.every_steps=2", "sampling.num_samples=1", "sampling.steps=2",
                   "evaluation.every_steps=1", f"tracking.tracking_uri={store}", "tracking.system_metrics=false"],
                  out)
    evals = [r for r in records if r.get("event") == "evaluation"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["clip"] == "tiny-random" and r["clip_real"] is False for r in evals)
    for step in (1, 2):
        result = json.loads((out / "eval" / f"step-{step:08d}" / "eval.json").read_text())
        assert result["checkpoint"] == str((out / "export").resolve()) and result["clip"]["note"] == NO_VIT_H
        assert result["means"]["motion"] is not None and result["means"]["text_alignment"] is not None
        assert evals[step - 1]["means"] == result["means"]

    client = MlflowClient(store)
    (training_run,) = client.search_runs([client.get_experiment_by_name("i2vgen-xl-base").experiment_id])
    assert training_run.info.status == "FINISHED" and training_run.data.tags["eval.clip_note"] == NO_VIT_H
    history = client.get_metric_history(training_run.info.run_id, "eval/fidelity_mean")
    assert [m.step for m in history] == [1, 2]
    assert "train/loss" in training_run.data.metrics  # the same run as the training metrics
    artifacts = {a.path for a in client.list_artifacts(training_run.info.run_id, "eval/step-00000002")}
    assert artifacts == {"eval/step-00000002/grid.mp4", "eval/step-00000002/eval.json"}


def test_refine_training_evaluates_the_cascade_after_its_base_export(tmp_path: Path):
    """tiny-refine, 1 step, evaluation at the end with evaluation.base_checkpoint = a tiny random base export
    (built in code): the refine export is scored as the cascade, base and refined videos, into its own run."""
    from model.generate import write_tiny_checkpoints

    base, _ = write_tiny_checkpoints(tmp_path / "exports")
    shards = write_tar(tmp_path / "data" / "shards" / "video-000000.tar",
                       [video_sample(f"clip{i}", num_frames=24, offset=4 * i) for i in range(2)])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    records = run(["--config", TINY_REFINE, f"data.shards=[{shards}]", "data.num_workers=0", "max_steps=1",
                   "optim.warmup_steps=0", "checkpoint.every_steps=1", "sampling.num_samples=1", "sampling.steps=2",
                   "evaluation.every_steps=0", f"evaluation.base_checkpoint={base}", f"tracking.tracking_uri={store}",
                   "tracking.system_metrics=false"], out)
    (record,) = [r for r in records if r.get("event") == "evaluation"]
    result = json.loads((out / "eval" / "step-00000001" / "eval.json").read_text())
    assert result["checkpoint"] == str((out / "export").resolve()) and result["base_checkpoint"] == str(base.resolve())
    assert record["step"] == 1 and record["means"] == result["means"]
    assert result["means"]["motion"] is not None and result["means"]["base/motion"] is not None
    (prompt,) = result["prompts"]
    assert (out / "eval" / "step-00000001" / prompt["video"]).is_file()
    assert (out / "eval" / "step-00000001" / prompt["base_video"]).is_file()

    client = MlflowClient(store)
    (training_run,) = client.search_runs([client.get_experiment_by_name("i2vgen-xl-refine").experiment_id])
    assert "train/loss" in training_run.data.metrics
    for name in ("eval/fidelity_mean", "eval/base/fidelity_mean"):
        assert [m.step for m in client.get_metric_history(training_run.info.run_id, name)] == [1], name
    assert training_run.data.tags["eval.base_checkpoint"] == str(base.resolve())
