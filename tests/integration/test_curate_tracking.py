"""The curation job tracked in MLflow (`tracking.enabled=true`, pipeline.tracking), on the session's real local
Ray cluster and a real SQLite MLflow store in tmp_path: one FINISHED run in "i2vgen-xl-curation" whose
metrics are OUT/stats.json's numbers, whose params are the resolved config and whose artifacts are the
job's own report.html and stats.json (byte for byte); and an unusable store stops the job before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "assets" / "sample"


def _curate(out: Path, uri: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.curate", "--input", str(SAMPLE), "--output", str(out),
                           "tracking.enabled=true", f"tracking.tracking_uri={uri}"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_tracked_job_is_one_run_with_the_stats_as_metrics_and_the_report_as_artifact(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    res = _curate(out, uri, {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("i2vgen-xl-curation")
    assert experiment is not None
    assert experiment.artifact_location == (tmp_path / "mlruns" / "i2vgen-xl-curation").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "curation" and run.data.tags["mlflow.source.name"] == "pipeline.curate"
    assert run.data.tags["output"] == str(out.resolve())
    params = run.data.params
    assert params["filter.min_motion"] == "0.5" and params["tracking.enabled"] == "True"
    stats = json.loads((out / "stats.json").read_text())
    metrics = run.data.metrics
    assert metrics["clips/kept"] == stats["clips"]["kept"]
    assert metrics["clips/candidates"] == stats["clips"]["candidates"]
    assert metrics["sources/error"] == stats["sources"]["error"] == 1  # the sample's broken upload
    for kind, counts in stats["funnel"].items():
        for stage, value in counts.items():
            assert metrics[f"funnel/{kind}/{stage}"] == value, (kind, stage)
    assert metrics["time/total_s"] == stats["durations_s"]["total_s"]
    artifacts = Path(client.download_artifacts(run.info.run_id, "report", str(tmp_path / "artifacts")))
    assert (artifacts / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert (artifacts / "stats.json").read_bytes() == (out / "stats.json").read_bytes()


def test_unusable_tracking_store_stops_the_job_before_any_work(tmp_path):
    uri = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}"
    out = tmp_path / "out"
    res = _curate(out, uri, {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"MLflow store {uri}" in res.stderr and "does not exist" in res.stderr, res.stderr[-3000:]
    assert not out.exists()  # nothing written, no Ray started
