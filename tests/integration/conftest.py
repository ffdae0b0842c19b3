"""A real local Ray cluster for the integration tests, started and stopped by this session only.

`ray start --head --block` runs in the foreground in its own process group; teardown interrupts it (it then
stops the processes it started) and, if anything is left, kills that process group. Never `ray stop`: it
would kill every Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def cluster_env() -> dict[str, str]:
    """Environment of the cluster and of drivers: the repo importable, the venv's python first on PATH."""
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(REPO),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="session")
def ray_cluster():
    """{"address": "127.0.0.1:PORT", "dashboard": "http://127.0.0.1:PORT", "env": {...}} of a 2-CPU head node."""
    port, dash = free_port(), free_port()
    # short temp dir: Ray's unix socket paths must stay under ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = cluster_env()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
        "--disable-usage-stats", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--temp-dir", temp_dir,
    ]
    log = open(Path(temp_dir) / "ray_start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(port, proc, 90)
        _wait_port(dash, proc, 90)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # --block: stops the processes it started
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of OUR process group (ray start ran in its own session)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
