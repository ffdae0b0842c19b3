"""`make train-base` then `make train-refine` on a fresh clone, checked through MLflow's default store.

The clone is simulated faithfully: the repository's tracked and untracked-not-ignored files
(`git ls-files -co --exclude-standard`) copied into a temporary folder and committed there as a new git
repo (a clone has a HEAD, which the runs record), `.venv` and `.cache` symlinked (they stand in for the
clone's `make setup` and its DeepSpeed extension build), MLFLOW_TRACKING_URI unset. `make` runs with
`-o .venv/.installed`, so it never re-runs pip in the shared venv (that would repoint its editable install
at the temporary copy), and with BIN=<repo>/.venv/bin: DeepSpeed's JIT-built shm_comm extension embeds the
python path it was built from in its build commands, so through <clone>/.venv it would be rebuilt (~35 s
idle, minutes under load) into the shared cache on every run. The targets curate the bundled sample first
(a local Ray, started and shut down by the curation job), then train the tiny recipes with DeepSpeed on CPU.

Then: `<clone>/mlflow.db`, queried with MlflowClient, holds one FINISHED run per stage with params, a
falling `train/loss`, mp4 samples and the exported checkpoint; `python -m model.generate` runs the cascade
from the two exports as MLflow stores them; with MLFLOW_TRACKING_URI at a closed port `make train-base`
stops at start naming the URI; and, when chromium is installed (/usr/bin/chromium), a plain `mlflow ui`
started in the clone lists both runs and the artifacts in a headless browser.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
MAKE_TIMEOUT_S = 900

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# ------------------------------------------------------------------------------------------ the clone
def cache_dir() -> Path:
    """The repo's .cache (torch extensions built once), or where TORCH_EXTENSIONS_DIR points."""
    if (REPO / ".cache").is_dir():
        return (REPO / ".cache").resolve()
    ext = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(ext).resolve().parent if ext else REPO / ".cache"


def fresh_clone(dst: Path) -> Path:
    """Copy what a clone of the current working tree holds into dst, commit it, link .venv and .cache."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / ".venv").symlink_to((REPO / ".venv").resolve())
    (dst / ".cache").symlink_to(cache_dir())
    git = ["git", "-C", str(dst), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "fresh clone"], check=True)
    return dst


def clone_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING") and k != "PYTHONPATH"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cmd(target: str, *args: str) -> list[str]:
    return ["make", "-o", ".venv/.installed", f"BIN={REPO / '.venv' / 'bin'}", target, *args]


def run_group(cmd: list[str], cwd: Path, timeout: float, log: Path, **env: str) -> int:
    """Run cmd in its own process group; whatever it leaves behind (Ray daemons ...) is ended with it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**clone_env(), **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if not group_alive(proc):
            return
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc):
            time.sleep(0.2)


def group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, else its zombie keeps the group alive
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def trained_clone(tmp_path_factory) -> dict:
    """The clone after `make train-base` and `make train-refine` (each must exit 0)."""
    clone = fresh_clone(tmp_path_factory.mktemp("clone"))
    logs = {}
    for target in ("train-base", "train-refine"):
        log = clone.parent / f"{target}.log"
        t0 = time.monotonic()
        rc = run_group(make_cmd(target), clone, MAKE_TIMEOUT_S, log)
        logs[target] = time.monotonic() - t0
        assert rc == 0, f"make {target} exited {rc}:\n{log.read_text()[-6000:]}"
    print(f"make wall times (s): {json.dumps({k: round(v, 1) for k, v in logs.items()})}")
    return {"clone": clone, "uri": f"sqlite:///{clone / 'mlflow.db'}"}


# ------------------------------------------------------------------------------------------ the store
def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def stage_runs(client: MlflowClient) -> dict:
    runs = {}
    for stage in ("base", "refine"):
        experiment = client.get_experiment_by_name(f"i2vgen-xl-{stage}")
        assert experiment is not None, f"no experiment i2vgen-xl-{stage} in the default store"
        found = client.search_runs([experiment.experiment_id])
        assert len(found) == 1, f"{stage}: expected one run, got {len(found)}"
        runs[stage] = (experiment, found[0])
    return runs


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


# ------------------------------------------------------------------------------------------ the UI
def dump_dom(url: str, profile: Path, log: Path) -> str:
    """The page's DOM after its scripts ran, from headless chromium (no driver needed)."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url]
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            stop_group(proc, grace_s=5)
    return out.decode(errors="replace")


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="chromium not installed (apt-get install -y chromium)")
def test_plain_mlflow_ui_in_the_clone_lists_both_runs_and_their_artifacts(trained_clone, tmp_path):
    clone = trained_clone["clone"]
    runs = stage_runs(MlflowClient(trained_clone["uri"]))
    port = free_port()
    # no store flags: the UI must find <clone>/mlflow.db and the artifacts by itself; one worker instead of
    # four only because four importing MLflow at once take ~50 s on 2 loaded cores
    ui_log = open(tmp_path / "ui.log", "w")
    ui = subprocess.Popen([str(REPO / ".venv/bin/mlflow"), "ui", "--port", str(port), "--workers", "1"],
                          cwd=clone, env=clone_env(), stdout=ui_log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
                time.sleep(1)
        for stage, (experiment, run) in runs.items():
            page = dump_dom(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs",
                            tmp_path / "chromium", tmp_path / "chromium.log")
            assert run.info.run_name in page, f"{stage}: run {run.info.run_name} not listed"
        base_run = runs["base"][1]
        page = dump_dom(f"http://127.0.0.1:{port}/#/experiments/{runs['base'][0].experiment_id}/runs/"
                        f"{base_run.info.run_id}/artifacts", tmp_path / "chromium", tmp_path / "chromium.log")
        for name in ("config.yaml", "export", "samples"):  # the artifact tree's top-level nodes
            assert f'artifact-name="{name}"' in page, f"artifact {name} not shown"
    finally:
        stop_group(ui)
        ui_log.close()
