"""training.tracking against a real MLflow SQLite store in tmp_path (no mocks): what a run holds, resume
after a SIGKILL, an unreachable server at start, a failing store mid-run, inactive ranks."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from common.configtree import ConfigError, from_dict
from common.tracking_store import (
    TrackingConfig,
    TrackingError,
    artifact_location,
    default_tracking_uri,
    resolve_tracking_uri,
)
from training.tracking import CUT_MARK, MAX_PARAM_VALUE, Tracker

REPO = Path(__file__).resolve().parents[2]


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def params_tree() -> dict:
    """A nested config with >100 leaves (two log_batch chunks), a list and an over-long value."""
    return {"model": {f"p{i:03d}": i for i in range(150)},
            "data": {"shards": ["out/a", "out/b"], "caption_list": "x" * 7000, "height": 64},
            "seed": 0}


def run_of(uri: str, run_id: str):
    client = MlflowClient(uri)
    return client, client.get_run(run_id)


def test_run_holds_params_config_tags_metrics_artifacts(tmp_path):
    uri = store(tmp_path)
    cfg = TrackingConfig(tracking_uri=uri, system_metrics=False, run_name="tiny")
    tracker = Tracker(cfg, stage="base", is_main=True, log_every=2)
    tracker.check()
    run_id = tracker.start(params_tree(), "seed: 0\n", {"world_size": "2", "zero_stage": "3", "device": "cpu"})
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step, "lr": 1e-4, "data/skipped": 0}, step)
    tracker.log_metrics({"memory/bytes": 3.0}, 5)  # a second call for held-back step 5 adds to it
    samples = tmp_path / "render"
    samples.mkdir()
    (samples / "00-clip.mp4").write_bytes(b"not really a video")
    tracker.log_artifacts(samples, "samples/step-00000005")
    tracker.end()

    client, run = run_of(uri, run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert len(params) == 150 + 3 + 1
    assert params["model.p149"] == "149" and params["data.shards"] == '["out/a", "out/b"]'
    assert len(params["data.caption_list"]) == MAX_PARAM_VALUE and params["data.caption_list"].endswith(CUT_MARK)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    tags = run.data.tags
    assert tags["git_commit"] == head.strip() == tags["mlflow.source.git.commit"]
    assert (tags["world_size"], tags["zero_stage"], tags["device"], tags["stage"]) == ("2", "3", "cpu", "base")
    # log_every=2: steps 2 and 4 logged as they come, the last step (5) by end()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 5]
    assert client.get_metric_history(run_id, "train/loss")[-1].value == pytest.approx(0.2)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "memory/bytes")] == [(5, 3.0)]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "i2vgen-xl-base"
    assert experiment.artifact_location == (tmp_path / "mlruns" / "i2vgen-xl-base").as_uri()
    on_disk = tmp_path / "mlruns" / "i2vgen-xl-base" / run_id / "artifacts"
    assert (on_disk / "config.yaml").read_text() == "seed: 0\n"
    assert (on_disk / "samples" / "step-00000005" / "00-clip.mp4").read_bytes() == b"not really a video"
    assert [f.path for f in client.list_artifacts(run_id, "samples/step-00000005")] == [
        "samples/step-00000005/00-clip.mp4"]


KILLED_JOB = textwrap.dedent("""
    import os, signal, sys, time
    from mlflow import MlflowClient
    from training.tracking import Tracker
    from common.tracking_store import TrackingConfig
    uri = sys.argv[1]
    tracker = Tracker(TrackingConfig(tracking_uri=uri, system_metrics_interval_s=0.3), stage="refine", is_main=True)
    tracker.check()
    run_id = tracker.start({"optim": {"lr": 1e-4}, "steps": 6}, "steps: 6\\n", {"world_size": "1"})
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    client = MlflowClient(uri)
    deadline = time.time() + 30
    while time.time() < deadline and not any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
        time.sleep(0.2)
    print(run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_resume_after_sigkill_continues_the_same_run(tmp_path, caplog):
    uri = store(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED_JOB, uri], capture_output=True, text=True, env=env,
                          timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_id = proc.stdout.split()[-1]
    client = MlflowClient(uri)
    before = client.get_run(run_id)
    assert before.info.status == "RUNNING"  # a killed job never ended its run
    cpu = "system/cpu_utilization_percentage"
    steps_before = [m.step for m in client.get_metric_history(run_id, cpu)]
    assert steps_before and "system/system_memory_usage_megabytes" in before.data.metrics

    cfg = TrackingConfig(tracking_uri=uri, system_metrics_interval_s=0.3)
    tracker = Tracker(cfg, stage="refine", is_main=True)
    tracker.check()
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        resumed = tracker.start({"optim": {"lr": 2e-4}, "steps": 6, "ema": 0.99}, "steps: 6\nema: 0.99\n",
                                {"world_size": "2"}, run_id=run_id)
    assert resumed == run_id
    assert "changed: ['optim.lr']" in caplog.text
    for step in (4, 5, 6):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    deadline = time.time() + 30
    while time.time() < deadline and len(client.get_metric_history(run_id, cpu)) <= len(steps_before):
        time.sleep(0.2)
    tracker.end()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert run.data.params["optim.lr"] == "0.0001" and run.data.params["ema"] == "0.99"  # first value kept
    assert run.data.tags["resume_count"] == "1" and run.data.tags["world_size"] == "2"
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "config.resume-1.yaml"} <= names
    steps_after = [m.step for m in client.get_metric_history(run_id, cpu)]
    # system metrics continue after the last step the killed job logged (no step logged twice)
    assert len(steps_after) > len(steps_before) and len(set(steps_after)) == len(steps_after)
    assert min(steps_after[len(steps_before):]) > max(steps_before)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_an_error_at_start_naming_the_uri(monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)  # restored after the test: check() sets them
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(TrackingConfig(), stage="base", is_main=True)
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=f"{uri}.*not usable") as info:
        tracker.check()
    elapsed = time.monotonic() - t0
    # MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) take minutes; bounded it is seconds
    assert elapsed < 30, elapsed
    assert "tracking.enabled=false" in str(info.value)
    with pytest.raises(TrackingError, match=uri):
        tracker.start({"a": 1}, "a: 1\n", {})


def test_store_failing_mid_run_is_a_warning_and_training_goes_on(tmp_path, caplog):
    uri = store(tmp_path)
    tracker = Tracker(TrackingConfig(tracking_uri=uri, system_metrics=False), stage="base", is_main=True)
    run_id = tracker.start({"a": 1}, "a: 1\n", {})
    tracker.log_metrics({"train/loss": 1.0}, 1)
    MlflowClient(uri).delete_run(run_id)  # a real store-side failure: the run is no longer writable
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "x.mp4").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        tracker.log_metrics({"train/loss": 0.5}, 2)
        tracker.log_artifacts(folder, "samples")
        tracker.end()
    assert tracker.failures >= 1
    assert f"could not log metrics of step 2 (store {uri})" in caplog.text
    other = Tracker(TrackingConfig(tracking_uri=uri, system_metrics=False), stage="base", is_main=True)
    other.start({}, "", {})
    with pytest.raises(ValueError):  # a non-number is a caller bug, not a store failure
        other.log_metrics({"x": "abc"}, 1)
    other.end()


def test_missing_store_folder_is_an_error_at_start(tmp_path):
    uri = f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match="does not exist"):
        Tracker(TrackingConfig(tracking_uri=uri), stage="base", is_main=True).check()


@pytest.mark.parametrize("enabled,is_main", [(True, False), (False, True)])
def test_inactive_tracker_touches_nothing(tmp_path, enabled, is_main):
    cfg = TrackingConfig(enabled=enabled, tracking_uri=store(tmp_path))
    tracker = Tracker(cfg, stage="base", is_main=is_main)
    tracker.check()
    assert tracker.start({"a": 1}, "a: 1\n", {}) is None
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.log_artifacts(tmp_path / "absent", "x")
    tracker.end()
    assert list(tmp_path.iterdir()) == []


def test_store_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{REPO / 'mlflow.db'}"
    assert resolve_tracking_uri(TrackingConfig()) == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://tracking.example:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"
    assert artifact_location("sqlite:////data/runs/mlflow.db", "e") == "file:///data/runs/mlruns/e"
    assert artifact_location("http://tracking.example:5000", "e") is None
    assert Tracker(TrackingConfig(), stage="refine", is_main=True).experiment == "i2vgen-xl-refine"


def test_config_is_validated():
    from training.subconfigs import TrainTrackingConfig

    with pytest.raises(ConfigError, match="log_every"):
        TrainTrackingConfig(log_every=0)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TrackingConfig, {"uri": "x"})
    with pytest.raises(ConfigError, match="unknown key"):  # the trainer's own key is not a curation key
        from_dict(TrackingConfig, {"log_every": "5"})
    assert (from_dict(TrainTrackingConfig, {"tracking_uri": "null", "log_every": "5"})
            == TrainTrackingConfig(log_every=5))
