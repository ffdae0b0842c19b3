"""Test-only helpers for the fresh-clone tests (test_train_make.py, test_demo_browser.py, test_readme_commands.py).

A fresh clone is simulated faithfully: the repository's tracked and untracked-not-ignored files
(`git ls-files -co --exclude-standard`) copied into a temporary folder and committed there as a new git
repo (a clone has a HEAD, which the runs record), `.venv` and `.cache` symlinked (they stand in for the
clone's `make setup` and its DeepSpeed extension build), MLFLOW_TRACKING_URI unset. `make` runs with
`-o .venv/.installed`, so it never re-runs pip in the shared venv (that would repoint its editable install
at the temporary copy), and with BIN=<repo>/.venv/bin: DeepSpeed's JIT-built shm_comm extension embeds the
python path it was built from in its build commands, so through <clone>/.venv it would be rebuilt (~35 s
idle, minutes under load) into the shared cache on every run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from mlflow import MlflowClient

from pipeline.local_cluster import free_port  # noqa: F401  (re-exported for the clone tests)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
MAKE_TIMEOUT_S = 900


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
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)  # on a clean checkout no training has made it yet
    (dst / ".cache").symlink_to(cache)
    git = ["git", "-C", str(dst), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "fresh clone"], check=True)
    return dst


def clone_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING") and k != "PYTHONPATH"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    return env


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
