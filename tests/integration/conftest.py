"""Session fixtures of the integration tests: a real local Ray cluster started and stopped by this session
only (pipeline.local_cluster starts `ray start --head --block` in its own process group and stops exactly
that, never `ray stop`, which would kill every Ray on the machine), and a fresh clone after `make
train-base` + `make train-refine` (clone_support) for test_train_make.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from clone_support import MAKE_TIMEOUT_S, fresh_clone, make_cmd, run_group

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


@pytest.fixture(scope="session")
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
