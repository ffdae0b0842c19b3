"""Test-only: `torchrun --nproc_per_node 2 tests/integration/zero3_build_check.py OUT.json INIT_FROM BAD_INIT_FROM
--config ... [k=v ...]`.

Builds the UNet of the given training config exactly as the trainer does under ZeRO-3
(`training.trainer.build_unet` with the run's DeepSpeed config dict: `deepspeed.zero.Init`), gathers the
partitions of every rank (`training.engine.gather_full`) and, on rank 0, compares them with the same build
without DeepSpeed. Cases:
    fp32      random init from the config's seed                     == build_unet(cfg)
    bf16      the same with deepspeed.precision=bf16                 == build_unet(cfg) cast to bf16
    init_from model.init_from=INIT_FROM (a model.convert folder)    == its tensors, as float32
    bad       model.init_from=BAD_INIT_FROM (one tensor missing)     -> ValueError on every rank
plus every rank's parameter bytes right after each build. Rank 0 writes the results to OUT.json for the
test to assert; nothing here is imported by the product.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.convert import OUR_WEIGHTS
from training import engine as ds
from training.config import load_config, unet_config, validate
from training.trainer import build_unet


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names whose values differ (bit for bit), or that one side lacks."""
    return sorted(set(got) ^ set(want)) + sorted(n for n in set(got) & set(want) if not torch.equal(got[n], want[n]))


def ds_config(cfg, info) -> dict:
    """The DeepSpeed config dict the trainer builds for `cfg` (training.trainer.Run)."""
    dtype = ds.resolve_precision(cfg.deepspeed.precision, info.device)
    config = ds.ds_config(cfg.deepspeed, micro_batch=cfg.data.batch_size, grad_accum=1, grad_clip=1.0, dtype=dtype)
    assert ds.zero3(config)
    return config


def build(cfg, info) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(full weights gathered from the partitions, on rank 0; every rank's parameter bytes after the build)."""
    unet = build_unet(cfg, ds_config(cfg, info))
    built = ds.all_gather_object(ds.module_param_bytes(unet))
    return ds.gather_full(*ds.module_param_shards(unet), is_main=info.is_main), built


def main() -> int:
    out, init_from, bad, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    config_path, overrides = argv[argv.index("--config") + 1], [a for a in argv if "=" in a]
    cfg = load_config(config_path, overrides)
    validate(cfg)
    info = ds.setup_distributed("cpu")
    full = {n: p.detach() for n, p in build_unet(cfg).named_parameters()}  # the plain build (every rank)
    results: dict = {"world_size": info.world_size, "tensors": len(full),
                     "full_bytes": sum(t.numel() * t.element_size() for t in full.values())}

    got, built = build(cfg, info)
    results["fp32"] = {"built_bytes": built, "mismatched": compare(got, full)}

    got, built = build(load_config(config_path, [*overrides, "deepspeed.precision=bf16"]), info)
    want = {n: t.bfloat16().float() for n, t in full.items()}
    results["bf16"] = {"built_bytes": built, "mismatched": compare(got, want),
                       "differs_from_fp32": bool(got) and any(not torch.equal(got[n], full[n]) for n in full)}

    cfg_from = load_config(config_path, [*overrides, "model.flavor=null", f"model.init_from={init_from}"])
    assert unet_config(cfg_from) == unet_config(cfg)
    got, built = build(cfg_from, info)
    want = {n: t.float() for n, t in load_file(str(Path(init_from) / OUR_WEIGHTS)).items()}
    results["init_from"] = {"built_bytes": built, "mismatched": compare(got, want),
                            "differs_from_random": any(not torch.equal(want[n], full[n]) for n in full)}

    error = None
    try:
        cfg_bad = load_config(config_path, [*overrides, "model.flavor=null", f"model.init_from={bad}"])
        build_unet(cfg_bad, ds_config(cfg_bad, info))
    except ValueError as exc:
        error = str(exc)
    results["bad"] = ds.all_gather_object(error)  # every rank raises (same check, no collective left waiting)

    if info.is_main:  # gather_full fills the weights on rank 0 only: its comparisons are the results
        out.write_text(json.dumps(results))
    ds.barrier()
    ds.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
