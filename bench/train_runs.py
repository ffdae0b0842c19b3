"""The default run of `python -m bench.train` outside the step worker: the shards, the loader, the trainer jobs.

- `ensure_shards`: the curation OUT folder (out/curate-sample is curated from the bundled sample when missing,
  as the Makefile does).
- `measure_loader`: training.data.TrainLoader at a recipe's data settings, timed after its warm-up.
- `zero_memory`: the real trainer under torchrun (`python -m training.train`, 2 processes, a few steps) and
  the `"event": "memory"` record it writes to OUTPUT/metrics.jsonl, plus the peak RSS of its largest process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARDS = "out/curate-sample"
# ZeRO-3 as a large model has it: every parameter sharded (the tiny UNet's tensors are all below DeepSpeed's
# persistence threshold, which would keep them gathered on every rank) and no reuse-distance bookkeeping
# (seconds of pure Python on the second step); the same settings as tests/integration/train_support.py ZERO3
ZERO3 = ["deepspeed.param_persistence_threshold=0", "deepspeed.max_reuse_distance=0"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def bench_env() -> dict[str, str]:
    """Environment of the bench's subprocesses: this checkout first on PYTHONPATH, no inherited rank
    variables (a worker or job sets up its own process group)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def ensure_shards(path: str | None) -> Path:
    """The curation OUT folder to read: `path` as given (must exist), or out/curate-sample, curated from
    tests/assets/sample first when it holds no video shard."""
    if path:
        out = Path(path).resolve()
        if not out.exists():
            raise SystemExit(f"--shards {path}: no such folder or file")
        return out
    out = REPO / DEFAULT_SHARDS
    if not list(out.glob("shards/video-*.tar")):
        print(f"curating {DEFAULT_SHARDS} from tests/assets/sample (python -m pipeline.curate) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pipeline.curate", "--input", "tests/assets/sample", "--output",
                        DEFAULT_SHARDS], cwd=REPO, env=bench_env(), check=True)
    return out


def measure_loader(recipe: str, overrides: list[str], shards: Path, *, warmup: int, batches: int,
                   seed_offset: int = 0) -> dict[str, Any]:
    """TrainLoader at the recipe's data settings on `shards` (rank 0 of 1, the recipe's seed + `seed_offset`):
    `warmup` micro-batches untimed (worker start, first chunks), then the time of the next `batches`, with
    each one's kind and size."""
    from training.config import load_config
    from training.data import TrainLoader

    cfg = load_config(recipe, [*overrides, f"data.shards=[{shards}]"])
    loader = TrainLoader(cfg.data, seed=cfg.seed + seed_offset)
    try:
        stream = iter(loader)
        for _ in range(warmup):
            next(stream)
        kinds, sizes = [], []
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(stream)
            kinds.append(batch.kind)
            sizes.append(len(batch.keys))
        elapsed = time.perf_counter() - t0
        skipped = loader.skipped()
    finally:
        loader.close()
    return {"time_s": elapsed, "kinds": kinds, "sizes": sizes, "samples": sum(sizes), "skipped": skipped,
            "num_workers": cfg.data.num_workers, "image_fraction": cfg.data.image_fraction}


def run_job(cmd: list[str], log: Path, timeout_s: float = 900) -> int:
    """Run a job to its end in its own process group (output to `log`); the peak RSS in bytes of its largest
    process (wait4's rusage covers the job and every descendant it waited for). A failure or a job past
    `timeout_s` (then killed, whole group) raises with the log's tail."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=bench_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise RuntimeError(f"job ran past {timeout_s} s and was killed: {' '.join(cmd)}; log {log}")
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"job failed (rc {proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024


def zero_memory(recipe: str, overrides: list[str], shards: Path, *, stage: int, steps: int, device: str,
                workdir: Path) -> dict[str, Any]:
    """`torchrun --standalone --nproc_per_node 2 -m training.train` on the recipe with ZeRO `stage` for
    `steps` optimizer steps (MLflow off, one 1-step validation sample at the end, as short as the trainer
    allows); every rank's parameter / optimizer / total bytes from its memory record, and the peak RSS of
    the job's largest process."""
    out = workdir / f"zero{stage}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "training.train", "--config", recipe, "--resume", "none", *overrides, f"data.shards=[{shards}]",
           f"output_dir={out}", f"max_steps={steps}", "optim.warmup_steps=0", f"checkpoint.every_steps={steps}",
           "tracking.enabled=false", "sampling.num_samples=1", "sampling.steps=1", f"device={device}",
           f"deepspeed.zero_stage={stage}", *(ZERO3 if stage == 3 else [])]
    rss = run_job(cmd, workdir / f"zero{stage}.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = [r for r in records if r.get("event") == "memory"]
    if not memory:
        raise RuntimeError(f"no memory record in {out / 'metrics.jsonl'}")
    return {**{k: memory[-1][k] for k in ("param_optim_bytes", "param_bytes", "optim_bytes")}, "peak_rss_bytes": rss}
