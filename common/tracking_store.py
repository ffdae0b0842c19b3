"""Where training and curation runs are tracked: the `tracking` config section and the MLflow store's locations.

Store: `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else the default store of the repository,
`sqlite:///<repo root>/mlflow.db`, whose artifacts go to `<repo root>/mlruns/<experiment>/`, so a plain
`mlflow ui` started in the repo root (no flags) shows the runs and their artifacts (`ui_link` gives the
address of an experiment or run there). Imports no MLflow: the config tree and the demo's summary load it
without the tracking client (training.tracking.Tracker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.configtree import ConfigError

class TrackingError(RuntimeError):
    """The MLflow store cannot be used at start; the message names the URI and the fixes."""


@dataclass
class TrackingConfig:
    """Where and how a job (training, evaluation, curation) is tracked in MLflow."""

    enabled: bool = True
    """Track the run in MLflow (false: no MLflow call at all)."""
    tracking_uri: str | None = None
    """Store URI; None: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db with artifacts under
    <repo root>/mlruns (what a plain `mlflow ui` in the repo root shows)."""
    experiment: str | None = None
    """Experiment name; None: "i2vgen-xl-<stage>" (one experiment per stage)."""
    run_name: str | None = None
    """Run name shown in the UI; None: MLflow picks one."""
    system_metrics: bool = True
    """Log CPU, memory, disk, network (+GPU with nvidia-ml-py) utilisation with MLflow's system metrics."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metrics samples."""
    http_timeout_s: int = 10
    """Timeout of one HTTP request to a tracking server (sets MLFLOW_HTTP_REQUEST_TIMEOUT; MLflow's
    default 120 s would stall training for minutes when the server goes away)."""
    http_retries: int = 2
    """Retries of a failed HTTP request (sets MLFLOW_HTTP_REQUEST_MAX_RETRIES, backoff factor 1 s:
    an unreachable server is reported after ~3 s instead of MLflow's default ~4 minutes)."""

    def __post_init__(self) -> None:
        if self.system_metrics_interval_s <= 0:
            raise ConfigError(f"tracking.system_metrics_interval_s={self.system_metrics_interval_s}: must be > 0")
        if self.http_timeout_s < 1 or self.http_retries < 0:
            raise ConfigError(f"tracking.http_timeout_s={self.http_timeout_s} must be >= 1 and "
                              f"tracking.http_retries={self.http_retries} >= 0")
        if self.experiment is not None and not self.experiment.strip():
            raise ConfigError("tracking.experiment: empty name (use null for the default 'i2vgen-xl-<stage>')")


# ------------------------------------------------------------------------------------------ locations
def repo_root() -> Path:
    """The repository this package runs from (holds pyproject.toml); the working directory otherwise."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd().resolve()


def default_tracking_uri() -> str:
    """sqlite:///<repo root>/mlflow.db, the database a plain `mlflow ui` in the repo root reads."""
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else default_tracking_uri()."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """Database file of a `sqlite:///...` URI (None for other stores and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""Experiment tag MLflow 3's UI reads to pick an experiment's view (custom_model_development: runs)."""


LOCAL_UI = "http://127.0.0.1:5000"  # where a plain `mlflow ui` serves a local store


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI address of an experiment (or one of its runs) in the store `uri`: the server itself for
    http(s) stores, a plain `mlflow ui` (LOCAL_UI) for local ones. `workflowType=machine_learning` opens it
    on the training runs: MLflow 3's UI otherwise starts every browser in its GenAI view (traces), whatever
    the experiment holds."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    path = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}{path}?workflowType=machine_learning"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact root of a new experiment: <database dir>/mlruns/<experiment> for SQLite, else None (the
    store's default: a server's artifact proxy, a file store's own folder)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlruns" / experiment).as_uri()


