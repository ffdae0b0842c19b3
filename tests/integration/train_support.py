"""Shared helpers of the training integration tests (test-only; nothing here is imported by the product).

- `curated_shards`: the real curation job (`python -m pipeline.curate`, its own local Ray) run once per
  pytest session on the bundled sample; its OUT folder is reused by every training test of the session.
- `launch` / `finish`: `python -m training.train` as 1 process or under `torchrun` (2 processes), in its
  own process group so a test can SIGKILL the whole group and nothing outlives the test.
- `reference_run`: a named training run done once per session and shared by the test modules.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
TINY_BASE = "configs/train/tiny-base.yaml"

# A short tiny-base run: 6 optimizer steps, a checkpoint every 2, EMA decay 0.5 (so the EMA differs
# clearly from the weights after 6 steps), one 2-step validation sample, MLflow off unless a test turns it on.
COMMON = ["max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "optim.warmup_steps=2",
          "ema.decay=0.5", "tracking.enabled=false", "sampling.num_samples=1", "sampling.steps=2",
          "data.num_workers=1"]


def train_env() -> dict[str, str]:
    """The environment of a trainer process: this repo importable, the venv's tools first on PATH (as Ray's
    workers have them: DeepSpeed's JIT extension build records the ninja it ran with, and another one on a
    later run would rebuild it), no launcher variables inherited."""
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def curated_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT folder of `python -m pipeline.curate` on tests/assets/sample, made once per session."""
    out = tmp_path_factory.getbasetemp() / "curate-sample"
    if not (out / "stats.json").is_file():
        subprocess.run([PYTHON, "-m", "pipeline.curate", "--input", str(REPO / "tests/assets/sample"),
                        "--output", str(out)], cwd=REPO, env=train_env(), check=True, timeout=300,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert list((out / "shards").glob("video-*.tar")) and list((out / "shards").glob("image-*.tar"))
    return out


def command(args: list[str], nproc: int = 1, module: list[str] | None = None, launcher: str = "torchrun") -> list[str]:
    """The training command line: `python -m training.train ...`, or with nproc processes torchrun or the
    `deepspeed` launcher (which adds --local_rank to each process's arguments)."""
    entry = module or ["-m", "training.train"]
    if nproc == 1:
        return [PYTHON, *entry, *args]
    if launcher == "deepspeed":
        assert entry[0] == "-m", entry
        from pipeline.local_cluster import free_port

        return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", entry[1],
                *entry[2:], *args]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--no-python", PYTHON, *entry, *args]


def launch(args: list[str], nproc: int = 1, module: list[str] | None = None,
           log: Path | None = None, launcher: str = "torchrun") -> subprocess.Popen:
    """Start a training job in a new process group (stdout+stderr to `log`)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(command(args, nproc, module, launcher), cwd=REPO, env=train_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def job_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process below it (torchrun starts each rank in its own session)."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_job(proc: subprocess.Popen, known: list[psutil.Process] = ()) -> None:
    """SIGKILL the whole job at once (launcher, ranks, loader workers, each one's process group) and reap it;
    `known`: processes seen earlier (orphans of a dead launcher are no longer its children)."""
    for p in {*job_processes(proc), *known}:
        if not p.is_running():
            continue
        for kill in (lambda: os.killpg(p.pid, signal.SIGKILL), p.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: float = 400) -> int:
    """Wait for the job; on timeout kill it and fail. Never leaves a process behind."""
    seen: set[psutil.Process] = set()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            seen.update(job_processes(proc))
            if time.monotonic() > deadline:
                pytest.fail(f"training job did not finish within {timeout} s")
            time.sleep(0.5)
        return proc.returncode
    finally:
        kill_job(proc, list(seen))  # whatever is left: a timed-out job, stray workers of a crashed rank


def run(args: list[str], out: Path, nproc: int = 1, timeout: float = 400,
        module: list[str] | None = None, launcher: str = "torchrun") -> list[dict]:
    """Run a job to the end (must exit 0); returns OUTPUT/metrics.jsonl records."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    rc = finish(launch([*args, f"output_dir={out}"], nproc, module, log=log, launcher=launcher), timeout)
    assert rc == 0, f"training exited {rc}; log tail:\n{log.read_text()[-4000:]}"
    return metrics(out)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def steps(records: list[dict]) -> dict[int, dict]:
    """{step: record} of the per-step records (the last one wins when a resumed run repeats a step)."""
    return {r["step"]: r for r in records if "event" not in r}


def reference_run(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str], nproc: int,
                  module: list[str] | None = None, launcher: str = "torchrun") -> Path:
    """A run shared by the test modules of a session: done once, its OUTPUT reused."""
    out = tmp_path_factory.getbasetemp() / "train-runs" / name
    if not (out / "DONE").is_file():
        if out.exists():
            import shutil

            shutil.rmtree(out)
        run(args, out, nproc, module=module, launcher=launcher)
        (out / "DONE").write_text(str(time.time()))
    return out


def base_args(shards: Path) -> list[str]:
    """--config tiny-base + the shared short-run overrides (UNet dropout 0: runs compare step by step)."""
    return ["--config", TINY_BASE, f"data.shards=[{shards}]", "model.overrides.dropout=0.0", *COMMON]


# ZeRO-3 as a big model has it: every parameter sharded (the tiny UNet's tensors are all below DeepSpeed's
# persistence threshold, which would keep them gathered), and no reuse-distance bookkeeping (it walks the
# module trace for every submodule on the second step: ~20 s of pure Python for this model on 2 busy cores).
ZERO3 = ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0", "deepspeed.max_reuse_distance=0"]


def one_process_zero3(tmp_path_factory, shards: Path) -> Path:
    """Reference A: 1 process, ZeRO-3, micro-batch 2 (global batch 2)."""
    return reference_run(tmp_path_factory, "p1-zero3", [*base_args(shards), "data.batch_size=2", *ZERO3], nproc=1)


def two_process_zero2(tmp_path_factory, shards: Path, launcher: str = "torchrun") -> Path:
    """Reference B: 2 processes, ZeRO-2, micro-batch 1 each (global batch 2), started by torchrun or by the
    `deepspeed` launcher."""
    name = "p2-zero2" if launcher == "torchrun" else f"p2-zero2-{launcher}"
    return reference_run(tmp_path_factory, name, [*base_args(shards), "data.batch_size=1",
                                                  "deepspeed.zero_stage=2"], nproc=2, launcher=launcher)
