"""A loopback Ray head, and worker nodes joining it, that this process starts and stops itself (integration
tests, benchmarks).

`ray start --head --block` runs in the foreground in its own process group; `stop()` interrupts it (it
then stops the processes it started) and kills whatever is left of that process group. Never `ray stop`:
it would stop every Ray on the machine, other users' included.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster import RAY_ENV

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(**extra: str) -> dict[str, str]:
    """This environment with loopback-only, telemetry-free Ray and this venv first on PATH; RAY_ADDRESS only
    when given in `extra`."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # only an explicit extra RAY_ADDRESS=... points a driver at a cluster
    env.update(RAY_ENV, PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


@dataclass
class LocalHead:
    """A running head: `address` (GCS, for RAY_ADDRESS), `dashboard` (http URL, for `ray job submit`)."""

    address: str
    dashboard: str | None
    env: dict[str, str]
    proc: subprocess.Popen = field(repr=False)
    temp_dir: str = ""

    def stop(self) -> None:
        _stop_ray_start(self.proc)


def _stop_ray_start(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` process and everything in its process group (nothing else)."""
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


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start_head(num_cpus: int = 2, dashboard: bool = False, env: dict[str, str] | None = None,
               cwd: str | Path | None = None, timeout: float = 120, object_store_mb: int | None = None) -> LocalHead:
    """Start a head on 127.0.0.1 with `num_cpus` CPUs and no GPU; returns once it accepts connections."""
    env = env if env is not None else ray_env()
    port = free_port()
    dash_port = free_port() if dashboard else None
    # short temp dir: Ray's unix socket paths must stay under ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # no fixed port at all (Ray client server, dashboard agent included): a head started the README's way
    # (`ray start --head`, its defaults 6379 / 8265 / 10001 / 52365) can run beside this one
    agent_port = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port",
           str(agent_port), "--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats",
           "--temp-dir", temp_dir]
    if object_store_mb:
        cmd += ["--object-store-memory", str(object_store_mb * 2**20)]
    if dashboard:
        cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port)]
    else:
        cmd += ["--include-dashboard", "false"]
    with open(Path(temp_dir) / "ray_start.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = LocalHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}" if dashboard else None, env, proc,
                     temp_dir)
    try:
        _wait_port(port, proc, timeout)
        if dashboard:
            # the head's dashboard agent runs submitted jobs: `ray job submit` fails ("No available agent")
            # until it listens, which can take seconds after the dashboard itself is up on a busy machine
            for extra in (dash_port, agent_port):
                _wait_port(extra, proc, timeout)
    except BaseException:
        head.stop()
        raise
    return head


def _raylet_pid(proc: subprocess.Popen) -> int | None:
    """PID of the raylet among the children of a `ray start --block` process (None while it has none)."""
    import psutil

    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
    except psutil.NoSuchProcess:
        pass
    return None


@dataclass
class LocalNode:
    """A worker node joined to a LocalHead from its own loopback address (`ip`, e.g. 127.0.0.2)."""

    ip: str
    proc: subprocess.Popen = field(repr=False)

    def raylet_pid(self) -> int | None:
        return _raylet_pid(self.proc)

    def stop(self) -> None:
        _stop_ray_start(self.proc)


def start_node(head: LocalHead, ip: str = "127.0.0.2", num_cpus: int = 1, env: dict[str, str] | None = None,
               timeout: float = 120, object_store_mb: int | None = None) -> LocalNode:
    """Join a worker node with `num_cpus` CPUs on loopback address `ip` to `head`; returns once its raylet
    runs (ray.nodes() lists it as alive a moment later).

    Ray rewrites a head address of 127.0.0.1 to this machine's own non-loopback address when a node joins
    from another IP, and that address must never be contacted (only 127.0.0.0/8). The head address is
    therefore given as the IPv4-mapped IPv6 literal [::ffff:127.0.0.1], which Ray accepts only with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (for this one process; the head and the drivers keep 0)."""
    env = dict(env if env is not None else head.env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    port = head.address.rsplit(":", 1)[1]
    # its own temp dir, as a separate machine has: with the head's, both nodes' runtime-env agents unpack a
    # job's working_dir into the same folder at once, under the job's driver (which then crashed on loading
    # libtorch: "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", or a segfault)
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    cmd = [str(VENV_BIN / "ray"), "start", "--block", "--address", f"[::ffff:127.0.0.1]:{port}",
           "--node-ip-address", ip, "--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats",
           "--temp-dir", temp_dir]
    if object_store_mb:
        cmd += ["--object-store-memory", str(object_store_mb * 2**20)]
    with open(Path(temp_dir) / "ray_start.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node = LocalNode(ip, proc)
    deadline = time.monotonic() + timeout
    while node.raylet_pid() is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"worker node {ip} did not start (see {temp_dir}/ray_start.log)")
        time.sleep(0.2)
    return node
