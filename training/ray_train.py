"""Launch the training job on a Ray cluster: `training.train` unchanged, one Ray Train worker per rank.

    python -m training.ray_train --config configs/train/tiny-base.yaml --workers 2 [key.sub=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m training.ray_train --config configs/train/base-448x256.yaml --workers 16 \\
            --cpus-per-worker 8 --gpus-per-worker 1 output_dir=/shared/runs/base data.shards=[/shared/curated]

A thin launcher, not a second trainer: Ray Train's `TorchTrainer` places N workers (CPUs/GPUs each) and
makes their torch.distributed process group (gloo on CPU, NCCL on GPUs, RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR set); each worker then runs `training.train.main` with the same arguments, which finds the
group already made and goes on exactly as under torchrun or `deepspeed`: the same config tree,
checkpoints, `--resume`, metrics.jsonl and MLflow run (rank 0 logs). When a rank fails or a node is lost,
Ray Train stops every rank and starts the group again (--max-failures times; it waits until the cluster
has room for all of them), and each rank resumes from the newest complete checkpoint in the output dir,
so a failure costs the steps since that checkpoint, not the run. Every argument but --workers,
--cpus-per-worker, --gpus-per-worker and --max-failures is training.train's; both parsers and the config tree are checked
here, before Ray (or torch) is imported.

Ray: RAY_ADDRESS when set (`ray job submit` sets it; `auto` = the cluster `ray start` made on this machine),
else a local Ray started on 127.0.0.1 and shut down at the end. Paths: each worker runs in this
command's working directory (it must exist on every node: the same checkout, or the job's --working-dir),
and the output dir and the shards must be reachable by every worker: on several nodes, absolute paths on
a shared file system (Ray Train checks that OUTPUT/ray-train, its own run folder, is visible from every
worker). MLFLOW_TRACKING_URI, MLFLOW_DISABLE_TELEMETRY and TORCH_EXTENSIONS_DIR of this command are passed
to the workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.local_cluster import RAY_ENV, free_port
from training import train

# Environment of the launching shell that the workers get as well (they may run on other nodes).
PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "TORCH_EXTENSIONS_DIR")
RAY_RUN_DIR = "ray-train"

log = logging.getLogger("training.ray_train")


def build_parser() -> argparse.ArgumentParser:
    """The launcher's own options; every other argument goes to `python -m training.train`."""
    p = argparse.ArgumentParser(
        prog="python -m training.ray_train", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --workers N [--cpus-per-worker C] [--gpus-per-worker G] --config FILE "
              "[--resume auto|none|PATH] [key.sub=value ...]",
        allow_abbrev=False,  # a mistyped option must reach training.train's parser and fail there, not match ours
        description=__doc__.split("\n")[0],
        epilog="All other arguments are training.train's: --config FILE (required), --resume, key.sub=value.\n"
               "Every worker must reach the paths: it runs in this command's working directory (the same\n"
               "checkout on every node, or `ray job submit --working-dir`), and on several nodes the output\n"
               "dir, the shards and the model files must be absolute paths on a shared file system.")
    p.add_argument("--workers", type=int, required=True, help="Ray Train workers = training ranks (world size)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs Ray reserves per worker (default 1; on real runs 1 + data.num_workers)")
    p.add_argument("--gpus-per-worker", type=int, choices=(0, 1), default=0,
                   help="0: CPU ranks, gloo (default); 1: one GPU per rank, NCCL (data parallel: never shared)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="worker-group failures (a rank's error, a lost node) Ray Train recovers from by "
                        "restarting every rank, which resumes from the newest complete checkpoint in the "
                        "output dir (--resume auto); -1: no limit, 0: fail at the first (default 3)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(launcher options, training.train's argv); both parsers run here, so bad arguments stop the job
    before Ray starts (status 2, as argparse does)."""
    parser = build_parser()
    args, train_argv = parser.parse_known_args(argv)
    if args.workers < 1 or args.cpus_per_worker <= 0 or args.max_failures < -1:
        parser.error("--workers must be >= 1, --cpus-per-worker > 0 and --max-failures >= -1")
    ns = train.parse_args(train_argv)
    if args.max_failures != 0 and ns.resume != "auto":
        # a restarted worker group runs the same arguments again: it must continue, not start over or
        # go back to a fixed checkpoint
        parser.error(f"--resume {ns.resume} with --max-failures {args.max_failures}: a restart after a failure "
                     "would not continue from the newest checkpoint; use --resume auto or --max-failures 0")
    return args, train_argv


def train_worker(job: dict[str, Any]) -> None:
    """Body of every Ray Train worker: the launcher's environment and working directory, then
    `training.train.main`; a failed start or a non-zero status becomes an error Ray Train reports."""
    os.environ.update(job["env"])
    if not os.path.isdir(job["workdir"]):
        raise RuntimeError(f"working directory {job['workdir']} of the launch does not exist on this node; "
                           "run from the same checkout on every node or submit with --working-dir")
    os.chdir(job["workdir"])  # Ray Train moves workers into its own run folder; the config's paths are ours
    try:
        status = train.main(job["argv"])
    except SystemExit as exc:  # a failed preflight (missing shards, model files, MLflow store)
        raise RuntimeError(str(exc.code)) from None
    if status:
        raise RuntimeError(f"training.train exited with status {status}")


def init_ray() -> None:
    """Connect to RAY_ADDRESS, else start a local Ray on 127.0.0.1 (ray.shutdown() at the end stops it)."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A local Ray on a known GCS port, with RAY_ADDRESS in the environment its processes inherit and a
    # dashboard: Ray Train's placement-group cleaner queries the State API of "its" cluster, which it
    # cannot find otherwise (no dashboard, or several Ray instances on this machine).
    port = free_port()
    os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=free_port())


def main(argv: list[str] | None = None) -> int:
    args, train_argv = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = train.load_checked(train.parse_args(train_argv), "training.ray_train")
    if cfg is None:
        return 2
    init_ray()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    job = {"argv": train_argv, "workdir": os.getcwd(),
           "env": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    resources = {"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RAY_RUN_DIR, storage_path=str(Path(cfg.output_dir).resolve()),
                             failure_config=FailureConfig(max_failures=args.max_failures)))
    log.info("training.train on %d Ray Train workers (%s each), output %s", args.workers, resources, cfg.output_dir)
    try:
        trainer.fit()
    except TrainingFailedError as exc:  # a worker's error (with its traceback) or the worker group's
        print(f"training.ray_train: training failed: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
