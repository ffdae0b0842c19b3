"""MLflow tracking of a training run: one experiment per stage, one run per training job (resumes continue it).

Store (common.tracking_store: the `tracking` config section, URIs and UI links): `tracking.tracking_uri`,
else $MLFLOW_TRACKING_URI, else `sqlite:///<repo root>/mlflow.db` beside `<repo root>/mlruns/`. For any SQLite store
the experiment's artifact location is set explicitly beside the database file (MLflow's own default would
be `./mlruns` of whatever directory the job was started from). A server (`http://...`) decides itself.

What a run holds: the resolved config as flattened params (chunks of 100, values cut to MLflow's 6000
characters) and as the `config.yaml` artifact; tags (git commit, stage, and what the trainer passes: world
size, ZeRO stage, device); the trainer's metrics every `log_every` steps; MLflow's system metrics (CPU,
memory, disk, network; GPU when `nvidia-ml-py` is installed); the artifacts the trainer hands over (sample
mp4s, the exported checkpoint).

Failure policy: `check()` runs before any model is built; an unreachable or unusable store is a
`TrackingError` naming the URI, within seconds (MLflow's HTTP retries and timeouts are bounded by
`http_retries` / `http_timeout_s`). After that, a failing MLflow call is a logged warning and training goes
on. Only the main process (rank 0) talks to MLflow; on every other rank each method is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from common.tracking_store import (
    EXPERIMENT_KIND_TAG,
    TrackingConfig,
    TrackingError,
    artifact_location,
    repo_root,
    resolve_tracking_uri,
    sqlite_path,
    ui_link,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("training.tracking")

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
CUT_MARK = "...[cut]"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


def git_commit(root: Path | None = None) -> tuple[str, bool | None]:
    """(HEAD commit, tracked files modified?) of the repo; ("unknown", None) outside a git checkout."""
    root = root or repo_root()
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return head, bool(dirty)


# ------------------------------------------------------------------------------------------ params
def param_value(value: Any) -> str:
    """A config value as an MLflow param string (lists/dicts as JSON), cut to MLflow's 6000 characters."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) or value is None else str(value)
    if len(text) > MAX_PARAM_VALUE:
        text = text[:MAX_PARAM_VALUE - len(CUT_MARK)] + CUT_MARK
    return text


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values through param_value()."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = param_value(value)
    return out


# ------------------------------------------------------------------------------------------ tracker
class Tracker:
    """MLflow client of one training job (see the module docstring); no-op unless main and enabled. The
    curation job uses it too (pipeline.tracking: stage "curation", source "pipeline.curate")."""

    def __init__(self, cfg: TrackingConfig, *, stage: str, is_main: bool, source: str = "training.train",
                 log_every: int = 1):
        self.cfg = cfg
        self.log_every = log_every  # the trainer's tracking.log_every; jobs that log once keep 1
        self.stage = stage
        self.source = source  # the command the run comes from (MLflow's source name tag)
        self.active = bool(cfg.enabled and is_main)
        self.uri = resolve_tracking_uri(cfg) if self.active else None
        self.experiment = cfg.experiment or f"i2vgen-xl-{stage}"
        self.run_id: str | None = None
        self.failures = 0
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._monitor = None
        self._pending: tuple[dict[str, float], int] | None = None

    # ---- start ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Store reachable and experiment usable? Else TrackingError naming the URI. Call before any model
        is built; idempotent."""
        if not self.active or self._client is not None:
            return
        self._bound_http()
        from mlflow import MlflowClient

        db = sqlite_path(self.uri)
        if db is not None and not db.parent.is_dir():
            raise TrackingError(f"MLflow store {self.uri}: folder {db.parent} does not exist (create it, or set "
                                "tracking.tracking_uri / MLFLOW_TRACKING_URI to another store)")
        client = MlflowClient(self.uri)
        try:
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                exp_id = self._create_experiment(client)
            elif experiment.lifecycle_stage != "active":
                raise TrackingError(f"MLflow store {self.uri}: experiment '{self.experiment}' is deleted "
                                    "(restore it in the UI or choose another tracking.experiment)")
            else:
                exp_id = experiment.experiment_id
                if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version or by hand
                    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        except TrackingError:
            raise
        except Exception as exc:  # any failure to reach or use the store is the same user-facing error
            raise TrackingError(
                f"MLflow tracking store {self.uri} is not usable: {_short(exc)}. Start the server or fix "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI, or run without tracking (tracking.enabled=false)."
            ) from exc
        self._client, self._experiment_id = client, exp_id
        log.info("MLflow: store %s, experiment '%s' (id %s)", self.uri, self.experiment, exp_id)

    def _bound_http(self) -> None:
        if self.uri.startswith(("http://", "https://")):
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.cfg.http_timeout_s)
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.cfg.http_retries)
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"

    def _create_experiment(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        try:
            # the kind tag makes MLflow 3's UI open the experiment on its training runs, not on the GenAI
            # (traces) view it shows an experiment of unknown kind
            return client.create_experiment(self.experiment,
                                            artifact_location=artifact_location(self.uri, self.experiment),
                                            tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException as exc:  # another job created it between our lookup and create
            existing = client.get_experiment_by_name(self.experiment)
            if existing is None:
                raise
            log.debug("experiment created concurrently: %s", exc)
            return existing.experiment_id

    def start(self, params: dict[str, Any], config_yaml: str, tags: dict[str, str],
              run_id: str | None = None) -> str | None:
        """Open (or with `run_id`, resume) the run; log params, config.yaml and tags; start system metrics.

        params: the resolved config tree as a (nested) dict; tags: world_size, zero_stage, device, ...
        (git commit and stage are added here). Returns the run id to store in the checkpoint (None when
        inactive). A run that cannot be created is a TrackingError; later failures are warnings.
        """
        if not self.active:
            return None
        self.check()
        flat = flatten_params(params)
        resumed = self._guard("resume the run", lambda: self._resume(run_id)) if run_id else None
        if not resumed:
            try:
                self.run_id = self._create_run(tags, run_id)
            except Exception as exc:  # still at start: no run means no tracking, so stop here
                raise TrackingError(f"MLflow store {self.uri}: could not create a run in experiment "
                                    f"'{self.experiment}': {_short(exc)}") from exc
            self._guard("log params", lambda: self._log_params(flat))
            self._guard("log config.yaml", lambda: self._client.log_text(self.run_id, config_yaml, "config.yaml"))
        else:
            self._guard("log resumed params", lambda: self._log_resumed_params(flat, config_yaml, tags))
        if self.cfg.system_metrics:
            self._guard("start system metrics", lambda: self._start_monitor(resume=bool(resumed)))
        log.info("MLflow: %s run %s in experiment '%s' (%s); in the UI: %s", "resumed" if resumed else "started",
                 self.run_id, self.experiment, self.uri, ui_link(self.uri, self._experiment_id, self.run_id))
        return self.run_id

    def _run_tags(self, tags: dict[str, str]) -> dict[str, str]:
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME

        commit, dirty = git_commit()
        own = {"stage": self.stage, "git_commit": commit, MLFLOW_GIT_COMMIT: commit,
               MLFLOW_SOURCE_NAME: self.source}
        if dirty is not None:
            own["git_dirty"] = str(dirty).lower()
        merged = resolve_tags({**own, **{k: str(v) for k, v in tags.items()}})
        return {k: str(v)[:MAX_TAG_VALUE] for k, v in merged.items()}

    def _create_run(self, tags: dict[str, str], previous: str | None) -> str:
        all_tags = self._run_tags(tags)
        if previous:
            all_tags["resumed_from_run_id"] = previous
        run = self._client.create_run(self._experiment_id, run_name=self.cfg.run_name, tags=all_tags)
        return run.info.run_id

    def _resume(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            log.warning("MLflow: run %s of the checkpoint is not in %s (%s); starting a new run tagged "
                        "resumed_from_run_id", run_id, self.uri, _short(exc))
            return None
        if run.info.lifecycle_stage != "active":
            log.warning("MLflow: run %s of the checkpoint is deleted; starting a new run", run_id)
            return None
        self.run_id = run_id
        self._client.update_run(run_id, status="RUNNING")
        return run_id

    def _log_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_BATCH])

    def _log_resumed_params(self, flat: dict[str, str], config_yaml: str, tags: dict[str, str]) -> None:
        """Params are immutable in MLflow: log only new keys; a changed value is a warning and the resumed
        config goes beside the first one as config.resume-<n>.yaml."""
        run = self._client.get_run(self.run_id)
        old = run.data.params
        count = int(run.data.tags.get("resume_count", "0")) + 1
        changed = sorted(k for k in flat if k in old and old[k] != flat[k])
        added = {k: v for k, v in flat.items() if k not in old}
        if added:
            self._log_params(added)
        if changed or added:
            log.warning("MLflow: resumed with a different config (changed: %s; new: %s); params keep the "
                        "first values, the resumed config is logged as config.resume-%d.yaml",
                        changed, sorted(added), count)
            self._client.log_text(self.run_id, config_yaml, f"config.resume-{count}.yaml")
        self._client.set_tag(self.run_id, "resume_count", str(count))
        for key, value in tags.items():  # world size / device may differ on resume: newest wins
            self._client.set_tag(self.run_id, key, str(value)[:MAX_TAG_VALUE])

    def _start_monitor(self, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        _warn_if_gpu_unmonitored()
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                       samples_before_logging=1, resume_logging=resume, tracking_uri=self.uri)
        monitor.start()
        self._monitor = monitor

    # ---- during the run ---------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalars at optimizer step `step` when step % log_every == 0 (else kept for end())."""
        if not self.active or self.run_id is None:
            return
        values = {str(k): float(v) for k, v in metrics.items()}  # a non-number is a caller bug: fails here
        if step % self.log_every:
            if self._pending is not None and self._pending[1] == step:  # several calls for one step
                values = {**self._pending[0], **values}
            self._pending = (values, step)
            return
        self._pending = None
        self._log_values(values, step)

    def _log_values(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in values.items()]
        self._guard(f"log metrics of step {step}", lambda: self._client.log_batch(self.run_id, metrics=batch))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        """Copy the files under `local_dir` into the run's artifacts at `artifact_path`."""
        if not self.active or self.run_id is None:
            return
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"artifact folder not found: {local_dir}")
        self._guard(f"log artifacts {local_dir} -> {artifact_path}",
                    lambda: self._client.log_artifacts(self.run_id, str(local_dir), artifact_path))

    def log_file(self, path: str | Path, artifact_path: str) -> None:
        """Copy one file into the run's artifacts under `artifact_path`."""
        if not self.active or self.run_id is None:
            return
        if not Path(path).is_file():
            raise FileNotFoundError(f"artifact file not found: {path}")
        self._guard(f"log artifact {path} -> {artifact_path}",
                    lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) tags of the run; values cut to MLflow's limit."""
        if not self.active or self.run_id is None:
            return
        for key, value in tags.items():
            self._guard(f"set tag {key}", lambda k=key, v=value: self._client.set_tag(self.run_id, k,
                                                                                       str(v)[:MAX_TAG_VALUE]))

    def attach(self, run_id: str) -> str:
        """Log into the existing run `run_id` without touching its status, params or config (e.g. an
        evaluation of a finished training run); `end()` is then not called. TrackingError when the store
        has no such active run."""
        if not self.active:
            raise TrackingError("attach: tracking is disabled")
        self.check()
        try:
            run = self._client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - unknown id or unusable store: same user-facing error
            raise TrackingError(f"MLflow store {self.uri}: no run {run_id!r}: {_short(exc)}") from exc
        if run.info.lifecycle_stage != "active":
            raise TrackingError(f"MLflow store {self.uri}: run {run_id} is deleted")
        self.run_id = run_id
        return run_id

    def end(self, status: RunStatus = "FINISHED") -> None:
        """Log the last held-back metrics, stop system metrics, mark the run FINISHED / FAILED / KILLED."""
        if not self.active or self.run_id is None:
            return
        if self._pending is not None:
            values, step = self._pending
            self._pending = None
            self._log_values(values, step)
        if self._monitor is not None:
            self._guard("stop system metrics", self._monitor.finish)
            self._monitor = None
        self._guard(f"end the run ({status})", lambda: self._client.set_terminated(self.run_id, status))
        self.run_id = None

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run an MLflow call; a failure mid-run is a warning (training goes on), returns None."""
        try:
            return call()
        except Exception as exc:  # MLflow, SQLAlchemy, requests, OS errors: none may stop training
            self.failures += 1
            log.warning("MLflow: could not %s (store %s): %s; training goes on", what, self.uri, _short(exc))
            return None


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _warn_if_gpu_unmonitored() -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("pynvml") is None:
        log.warning("MLflow: GPU system metrics need nvidia-ml-py (pip install nvidia-ml-py); logging CPU, "
                    "memory, disk and network only")
