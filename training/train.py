"""Train one I2VGen-XL stage with DeepSpeed ZeRO from curated shards.

    python -m training.train --config configs/train/tiny-base.yaml [key.sub=value ...] [--resume auto|none|PATH]
    torchrun --standalone --nproc_per_node 2 -m training.train --config ...      (or `deepspeed --num_gpus N`)

One process without a launcher runs as world size 1; under a launcher every process runs this same code.
This module is the command line only: it loads and validates the config tree (`training.config`) before
importing anything heavy, so a bad key or value exits with status 2 naming the field before torch,
DeepSpeed, open_clip or a video decoder is imported. Then `training.trainer.run` does the job: the
checks before any model is built (model files, shards, MLflow store, the checkpoint to resume), the
model, the loop, checkpoints, exports and samples (see that module, which also holds `build_unet`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from common.configtree import ConfigError
from training.config import load_config, validate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/train/tiny-base.yaml")
    p.add_argument("--resume", default="auto",
                   help="auto: newest complete checkpoint under output_dir (default); none: start fresh; "
                        "or a checkpoint folder OUTPUT/checkpoints/step-XXXXXXXX")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher
    return p.parse_args(argv)


def load_checked(args: argparse.Namespace, prog: str = "training.train"):
    """The validated TrainConfig of parsed arguments, or None after printing `PROG: config error: ...`."""
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return None
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_checked(args)
    if cfg is None:
        return 2
    from training.trainer import run  # torch, DeepSpeed, open_clip, decoders: only for a valid config

    return run(cfg, args.resume)


if __name__ == "__main__":
    sys.exit(main())
