"""`python -m training.ray_train` on the real local Ray cluster (2 CPUs): the same training job in 2 Ray Train
workers trains exactly like `torchrun` with 2 processes.

The Ray run has the arguments of train_support's reference B (tiny base, 2 ranks, ZeRO-2, micro-batch 1,
UNet dropout 0, 6 steps; shared with test_train_deepspeed.py / test_train_resume.py, so in the whole suite
only the Ray run is extra) plus MLflow on: MLFLOW_TRACKING_URI is set for the launcher only (the cluster's
processes do not have it), so the run landing in that store shows the launcher's environment reached rank 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from training import ray_train
from test_train_deepspeed import LOSS_RTOL
from train_support import (
    TINY_BASE, base_args, curated_shards, metrics, run, steps, two_process_zero2,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAUNCHER = ["-m", "training.ray_train", "--workers", "2", "--cpus-per-worker", "1"]


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    shards = curated_shards(tmp_path_factory)
    torchrun = two_process_zero2(tmp_path_factory, shards)
    out = tmp_path_factory.mktemp("ray-train") / "out"
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:  # the launcher's environment (train_env copies os.environ)
        env.setenv("RAY_ADDRESS", ray_cluster["address"])
        env.setenv("MLFLOW_TRACKING_URI", uri)
        # reference B's arguments (2 ranks, ZeRO-2, micro-batch 1) + MLflow on
        run([*base_args(shards), "data.batch_size=1", "deepspeed.zero_stage=2", "tracking.enabled=true"], out,
            module=LAUNCHER, timeout=600)  # a hang guard, not a speed limit
    return {"torchrun": torchrun, "ray": out, "uri": uri}


def test_ray_train_workers_train_like_torchrun_step_by_step(runs):
    ref, got = steps(metrics(runs["torchrun"])), steps(metrics(runs["ray"]))
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    start = next(r for r in metrics(runs["ray"]) if r.get("event") == "start")
    assert start["world_size"] == 2 and start["zero_stage"] == 2 and start["resumed_from"] is None
    for s in ref:
        # same ranks, same split: Ray Train's world rank r read exactly what torchrun's rank r read
        assert got[s]["keys"] == ref[s]["keys"] and got[s]["sample_ids"] == ref[s]["sample_ids"], s
        assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
        # T-core's tolerance (test_train_deepspeed.LOSS_RTOL, why there); the runs here do the same
        # arithmetic in the same shapes, so they agree far closer, but the claim is "as torchrun", no more
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=LOSS_RTOL), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), s
    losses = [ref[s]["loss"] for s in sorted(ref)]
    assert len(set(losses)) == len(losses)  # the comparison is not between constants


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_same_checkpoints_and_export_in_the_shared_output_dir(runs):
    ray_ckpt, ref_ckpt = runs["ray"] / "checkpoints", runs["torchrun"] / "checkpoints"
    assert _files(ray_ckpt) == _files(ref_ckpt)  # every rank wrote its ZeRO shard + trainer state
    assert (ray_ckpt / "latest").read_text() == (ref_ckpt / "latest").read_text()
    for step in (2, 4, 6):
        assert (ray_ckpt / f"step-{step:08d}" / "COMPLETE").is_file()
    exported, reference = (load_file(out / "export" / "unet" / "model.safetensors")
                           for out in (runs["ray"], runs["torchrun"]))
    assert set(exported) == set(reference)
    for name in reference:  # T-core's bound for EMAs of runs whose losses agree to LOSS_RTOL
        torch.testing.assert_close(exported[name], reference[name], rtol=0, atol=2e-4, msg=name)
    # Ray Train's own run folder sits in the output dir: it checked that every worker sees that folder
    assert (runs["ray"] / "ray-train" / ".validate_storage_marker").is_file()


def test_one_mlflow_run_logged_by_rank_zero_in_the_launchers_store(runs):
    client = MlflowClient(runs["uri"])
    experiment = client.get_experiment_by_name("i2vgen-xl-base")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1
    run_info = found[0]
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["world_size"] == "2" and run_info.data.tags["zero_stage"] == "2"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_info.info.run_id, "train/loss"))
    by_step = steps(metrics(runs["ray"]))
    assert history == [(s, pytest.approx(by_step[s]["loss"], rel=1e-6)) for s in sorted(by_step)]


def test_bad_arguments_stop_before_ray_starts(capsys):
    """A config error exits 2 naming the field, a bad launcher option exits 2, and neither reaches Ray."""
    assert ray_train.main(["--workers", "2", "--config", TINY_BASE, "data.no_such_field=1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "no_such_field" in err, err
    with pytest.raises(SystemExit) as exit_info:
        ray_train.main(["--workers", "0", "--config", TINY_BASE])
    assert exit_info.value.code == 2 and "--workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # training.train's own parser: --config is required
        ray_train.main(["--workers", "2"])
    # a restart after a failure runs the same arguments: a fixed --resume would not continue the run
    with pytest.raises(SystemExit) as exit_info:
        ray_train.main(["--workers", "2", "--config", TINY_BASE, "--resume", "none"])
    assert exit_info.value.code == 2 and "--max-failures" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        ray_train.main(["--workers", "2", "--max-failures", "-2", "--config", TINY_BASE])
    assert exit_info.value.code == 2
    assert not ray.is_initialized()
