"""Session fixtures of the integration tests: a real local Ray cluster started and stopped by this session
only (pipeline.local_cluster starts `ray start --head --block` in its own process group and stops exactly
that, never `ray stop`, which would kill every Ray on the machine), a fresh clone after `make
train-base` + `make train-refine` (clone_support) for test_train_make.py, and the fresh clone where the
README is followed (`demo`: its first command, `make demo`, run twice) that test_demo_browser.py and
test_readme_commands.py share, so the suite pays for the demo once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from clone_support import MAKE_TIMEOUT_S, fresh_clone, make_cmd, run_group
from readme_support import readme_commands

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


def two_commands() -> list[str]:
    """The commands of the README's "Two commands" block, in order."""
    return [c.text for c in readme_commands() if c.heading == "Two commands"]


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """A fresh clone where the README's first command runs as written, twice (the second run resumes):
    {"clone", "uri", "first"/"again": {"seconds", "log"}}. test_readme_commands.py then follows the rest
    of the README in this same clone."""
    commands = two_commands()
    assert commands == ["make demo", "make test"], commands  # `make test` is the suite running this test
    clone = fresh_clone(tmp_path_factory.mktemp("readme-clone"))
    runs = {}
    for attempt in ("first", "again"):
        log = clone.parent / f"demo-{attempt}.log"
        t0 = time.monotonic()
        rc = run_group(make_cmd(commands[0].split()[1]), clone, MAKE_TIMEOUT_S, log)
        runs[attempt] = {"seconds": time.monotonic() - t0, "log": log.read_text()}
        assert rc == 0, f"make demo ({attempt}) exited {rc}:\n{runs[attempt]['log'][-6000:]}"
    print(f"make demo in a fresh clone (venv in place): {runs['first']['seconds']:.0f} s; "
          f"again: {runs['again']['seconds']:.0f} s")
    return {"clone": clone, "uri": f"sqlite:///{clone / 'mlflow.db'}", **runs}
