"""`make train-base` then `make train-refine` on a fresh clone (clone_support, the `trained_clone` fixture of
conftest.py), checked through MLflow's default store. The targets curate the bundled sample first (a local
Ray, started and shut down by the curation job), then train the tiny recipes with DeepSpeed on CPU.

Then: `<clone>/mlflow.db`, queried with MlflowClient, holds one FINISHED run per stage with params, a
falling `train/loss`, mp4 samples and the exported checkpoint; `python -m model.generate` runs the cascade
from the two exports as MLflow stores them; with MLFLOW_TRACKING_URI at a closed port `make train-base`
stops at start naming the URI. (What a user sees of these runs in `mlflow ui` is checked in a real browser
by test_demo_browser.py, on its own clone where the README is followed.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from clone_support import all_artifacts, clone_env, free_port, make_cmd, run_group, stage_runs
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_make_train_base_then_refine_fill_mlflow_default_store(trained_clone):
    clone, uri = trained_clone["clone"], trained_clone["uri"]
    assert (clone / "mlflow.db").is_file()
    client = MlflowClient(uri)
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for stage, (experiment, run) in stage_runs(client).items():
        assert run.info.status == "FINISHED"
        # artifacts live under <clone>/mlruns, where a plain `mlflow ui` in the clone reads them
        assert experiment.artifact_location == (clone / "mlruns" / f"i2vgen-xl-{stage}").as_uri()
        params, tags = run.data.params, run.data.tags
        assert params["stage"] == stage and int(params["max_steps"]) >= 10 and len(params) > 50
        assert tags["git_commit"] == head and tags["stage"] == stage
        assert {"world_size", "zero_stage", "device"} <= set(tags)
        losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(losses) == int(params["max_steps"])
        k = max(1, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        assert last < 0.8 * first, f"{stage}: train/loss not falling: first fifth {first:.4f}, last {last:.4f}"
        for key in ("train/lr", "train/grad_norm", "train/samples_per_s", "train/step_time_s", "train/skipped"):
            assert key in run.data.metrics, key
        assert any(k.startswith("system/cpu") for k in run.data.metrics)
        assert any(k.startswith("system/system_memory") for k in run.data.metrics)
        files = all_artifacts(client, run.info.run_id)
        assert "config.yaml" in files
        mp4s = [f for f in files if f.endswith(".mp4")]
        assert len(mp4s) >= int(params["sampling.num_samples"]), files
        assert {"export/stage.yaml", "export/unet/config.json", "export/unet/model.safetensors"} <= set(files)
        local = Path(client.download_artifacts(run.info.run_id, mp4s[-1], str(clone.parent / f"dl-{stage}")))
        with av.open(str(local)) as container:
            frames = [f for f in container.decode(video=0)]
        assert len(frames) == int(params["data.num_frames"])
        assert (frames[0].height, frames[0].width) == (int(params["data.height"]), int(params["data.width"]))


def test_generate_runs_the_cascade_from_the_two_exported_checkpoints(trained_clone, tmp_path):
    clone, uri = trained_clone["clone"], trained_clone["uri"]
    client = MlflowClient(uri)
    runs = stage_runs(client)
    # the exports as MLflow holds them (the logged artifact must be complete on its own)
    exports = {stage: client.download_artifacts(run.info.run_id, "export", str(tmp_path / stage))
               for stage, (_, run) in runs.items()}
    refine_params = runs["refine"][1].data.params
    out = tmp_path / "cascade.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "model.generate", "--base", exports["base"], "--refine", exports["refine"],
         "--image", str(clone / "tests/assets/sample/tears_of_steel_frame_0040.jpg"), "--prompt",
         "a robot in a city", "--out", str(out), "--quiet"],
        cwd=clone, env={**clone_env(), "PYTHONPATH": str(clone)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    h, w = int(refine_params["data.height"]), int(refine_params["data.width"])
    assert summary["shape"][-2:] == [h, w]
    with av.open(str(out)) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == summary["shape"][2] and (frames[0].height, frames[0].width) == (h, w)


def test_unreachable_tracking_server_stops_make_train_base_at_start(trained_clone):
    """MLFLOW_TRACKING_URI pointing at a closed port: the job stops before building anything, naming the URI."""
    clone = trained_clone["clone"]
    uri = f"http://127.0.0.1:{free_port()}"
    log = clone.parent / "unreachable.log"
    t0 = time.monotonic()
    rc = run_group(make_cmd("train-base", "ARGS=output_dir=runs/unreachable"), clone, 600, log,
                   MLFLOW_TRACKING_URI=uri)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert rc != 0
    assert f"cannot start: TrackingError: MLflow tracking store {uri} is not usable" in text, text[-3000:]
    assert not (clone / "runs" / "unreachable").exists()  # stopped before any output or model
    print(f"unreachable store: make train-base stopped after {elapsed:.1f} s")


