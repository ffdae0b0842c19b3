"""MLflow tracking of a curation job (`tracking.enabled=true`): one run per job in "i2vgen-xl-curation".

The run is opened when the job starts (its system metrics, when enabled, cover the whole job) and holds:
- params: the resolved config tree (flattened, as the training runs log theirs) and config.yaml;
- tags: stage=curation, git commit, the input and output paths;
- metrics at step 0, from OUT/stats.json (the numbers the report shows): `funnel/<kind>/<stage>`,
  `clips/candidates`, `clips/kept`, `rejected/<reason>`, `sources/<count>`, `time/<phase>_s`,
  `throughput/<rate>`;
- artifacts: `report/report.html` (the curation report), `report/stats.json`.
It ends FINISHED with the job, FAILED when the job stops. The store is the training runs'
(common.tracking_store: `sqlite:///<repo root>/mlflow.db` unless tracking.tracking_uri or
$MLFLOW_TRACKING_URI says otherwise); an unusable store stops the job before any work (TrackingError), a
failure later is a warning: curated data never depends on MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.configtree import to_dict, to_yaml
from curation.config import CurateConfig
from training.tracking import Tracker

SOURCE = "pipeline.curate"
ARTIFACTS = "report"


def open_tracker(cfg: CurateConfig) -> Tracker:
    """The job's Tracker, its store checked (TrackingError when unusable); inactive when tracking is off."""
    tracker = Tracker(cfg.tracking, stage="curation", is_main=True, source=SOURCE)
    tracker.check()  # a no-op when tracking is off
    return tracker


def start_run(tracker: Tracker, cfg: CurateConfig, input_path: str, out: Path) -> None:
    """Open the job's run (no-op when tracking is off)."""
    tracker.start(to_dict(cfg), to_yaml(cfg), tags={"input": str(input_path), "output": str(Path(out).resolve())})


def stats_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The numbers of OUT/stats.json that the report shows, as flat MLflow metric names."""
    metrics: dict[str, float] = {}
    for kind, counts in stats.get("funnel", {}).items():
        for stage, value in counts.items():
            metrics[f"funnel/{kind}/{stage}"] = float(value)
    clips = stats.get("clips", {})
    for key in ("candidates", "kept"):
        if key in clips:
            metrics[f"clips/{key}"] = float(clips[key])
    for reason, count in clips.get("rejected_by_reason", {}).items():
        metrics[f"rejected/{reason}"] = float(count)
    for key, value in stats.get("sources", {}).items():  # total, ok, error, resumed_from_staging, ...
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"sources/{key}"] = float(value)
    for phase, seconds in stats.get("durations_s", {}).items():
        metrics[f"time/{phase}"] = float(seconds)
    for rate, value in stats.get("throughput", {}).items():
        metrics[f"throughput/{rate}"] = float(value)
    return metrics


def finish_run(tracker: Tracker, stats: dict[str, Any], out: Path, report: Path) -> None:
    """Log the job's numbers and its report into the run and end it FINISHED (no-op when tracking is off)."""
    tracker.log_metrics(stats_metrics(stats), step=0)
    tracker.log_file(report, ARTIFACTS)
    tracker.log_file(Path(out) / "stats.json", ARTIFACTS)
    tracker.end("FINISHED")
