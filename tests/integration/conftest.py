"""A real local Ray cluster for the integration tests, started and stopped by this session only.

pipeline.local_cluster starts `ray start --head --block` in its own process group and stops exactly that
(never `ray stop`, which would kill every Ray on the machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.local_cluster import ray_env, start_head

REPO = Path(__file__).resolve().parents[2]


def cluster_env() -> dict[str, str]:
    """Environment of the cluster and of drivers: the repo importable, the venv's python first on PATH."""
    return ray_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def ray_cluster():
    """{"address": "127.0.0.1:PORT", "dashboard": "http://127.0.0.1:PORT", "env": {...}} of a 2-CPU head node."""
    head = start_head(num_cpus=2, dashboard=True, env=cluster_env(), cwd=REPO, timeout=90)
    try:
        yield {"address": head.address, "dashboard": head.dashboard, "env": head.env}
    finally:
        head.stop()
