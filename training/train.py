"""Train one I2VGen-XL stage with DeepSpeed ZeRO from curated shards.

    python -m training.train --config configs/train/tiny-base.yaml [key.sub=value ...] [--resume auto|none|PATH]
    torchrun --standalone --nproc_per_node 2 -m training.train --config ...      (or `deepspeed --num_gpus N`)

One process without a launcher runs as world size 1; under a launcher every process runs this same code.
Before any model is built: the config tree is loaded and validated (a bad key or value exits with status
2 naming the field), then every rank checks the model files and the shards and rank 0 checks the MLflow
store; any failure stops all ranks with its message. Then: OUTPUT/config.yaml, UNet (random init or
init_from), frozen VAE + CLIP, AdamW + warmup/cosine into `deepspeed.initialize`, the loader, the EMA; with
a checkpoint to resume (default: the newest complete one under OUTPUT) everything is restored from it.

Per optimizer step rank 0 appends a JSON line to OUTPUT/metrics.jsonl (step, loss = mean over the global
batch, lr, grad_norm, samples_per_s, step_time_s, skipped (+ by reason), every rank's sample keys and ids)
and logs the numbers to MLflow. Each start of the job also writes an `"event": "start"` line and, after its
first optimizer step, an `"event": "memory"` line with every rank's parameter + optimizer bytes. Checkpoints
every `checkpoint.every_steps` and at the end (training.checkpoint); the EMA export + validation mp4s every
`sampling.every_steps` and at the end (training.samples). Only rank 0 logs, exports and shows the progress
bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common.configtree import ConfigError, to_dict
from model.convert import load_checkpoint
from model.diffusion import GaussianDiffusion
from model.unet import I2VGenUNet
from training import checkpoint as ckpt
from training import engine as ds
from training.config import TrainConfig, check_paths, load_config, to_yaml, unet_config, validate
from training.data import TrainLoader, check_shards
from training.ema import EMA
from training.frozen import FrozenEncoders
from training.objective import Objective
from training.samples import export_stage, render_samples, sampling_items, stage_config
from training.schedule import build_scheduler
from training.tracking import Tracker

METRICS = "metrics.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/train/tiny-base.yaml")
    p.add_argument("--resume", default="auto",
                   help="auto: newest complete checkpoint under output_dir (default); none: start fresh; "
                        "or a checkpoint folder OUTPUT/checkpoints/step-XXXXXXXX")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher
    return p.parse_args(argv)


def stage_of(cfg: TrainConfig):
    """The export's stage.yaml: schedule, encoders, size, frames and fps the UNet trained with."""
    return stage_config(cfg.stage, diffusion=cfg.model.diffusion, clip=cfg.model.clip, vae=cfg.model.vae,
                        width=cfg.data.width, height=cfg.data.height, num_frames=cfg.data.num_frames,
                        fps=cfg.data.fps_choices[0], sampling=cfg.sampling)


def preflight(cfg: TrainConfig, dist_info: ds.DistInfo, tracker: Tracker) -> None:
    """Files, shards and (rank 0) the MLflow store, before any model is built; all ranks stop together."""
    error = None
    try:
        check_paths(cfg)
        check_shards(cfg.data)
        tracker.check()
    except Exception as exc:  # noqa: BLE001 - reported below on every rank, then the job stops
        error = f"{type(exc).__name__}: {exc}"
    errors = [e for e in ds.all_gather_object(error) if e]
    if errors:
        raise SystemExit(f"training.train: cannot start: {errors[0]}")


def build_unet(cfg: TrainConfig) -> I2VGenUNet:
    """Random init from the seed (identical on every rank), or the init_from weights (built on the meta
    device and assigned: no random init of a model that is overwritten anyway), in float32."""
    ucfg = unet_config(cfg)
    if cfg.model.init_from:
        _, state = load_checkpoint(cfg.model.init_from)
        with torch.device("meta"):
            unet = I2VGenUNet(ucfg)
        unet.load_state_dict(state, strict=True, assign=True)
        unet.float()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            unet = I2VGenUNet(ucfg)
    if cfg.activation_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


class Run:
    """One training job on this rank: engine, loader, EMA, tracker and the output folder."""

    def __init__(self, cfg: TrainConfig, dist_info: ds.DistInfo, tracker: Tracker, resume: str):
        self.cfg, self.dist, self.tracker = cfg, dist_info, tracker
        self.out = Path(cfg.output_dir)
        self.config_yaml = to_yaml(cfg)
        if dist_info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / ckpt.CONFIG_NAME).write_text(self.config_yaml)
        self.resume_from = ds.all_gather_object(
            str(ckpt.find_resume(self.out, resume) or "") if dist_info.is_main else None)[0] or None
        self.ucfg = unet_config(cfg)
        self.dtype = ds.resolve_precision(cfg.deepspeed.precision, dist_info.device)
        unet = build_unet(cfg)
        self.encoders = FrozenEncoders(self.ucfg, cfg.model.clip, cfg.model.vae, device=dist_info.device,
                                       dtype=self.dtype)
        self.objective = Objective(cfg.objective, GaussianDiffusion(cfg.model.diffusion), self.ucfg, cfg.seed)
        o = cfg.optim
        optimizer = torch.optim.AdamW(unet.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay)
        scheduler = build_scheduler(optimizer, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
                                    max_steps=cfg.max_steps)
        config = ds.ds_config(cfg.deepspeed, micro_batch=cfg.data.batch_size, grad_accum=cfg.grad_accum_steps,
                              grad_clip=o.grad_clip, dtype=self.dtype)
        self.engine = ds.initialize(unet, optimizer, scheduler, config)
        torch.manual_seed(cfg.seed * 1000 + dist_info.rank)  # dropout masks differ per rank
        self.loader = TrainLoader(cfg.data, seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size)
        self.ema = EMA(cfg.ema, ds.local_param_shards(self.engine)[1]) if cfg.ema.enabled else None
        self.step, run_id, self.resume_rng = 0, None, None
        if self.resume_from:
            state = ckpt.load(self.resume_from, self.engine, dist_info)
            self.step, run_id = int(state["step"]), state.get("mlflow_run_id")
            self.loader.load_state_dict(state["data"])
            if self.ema is not None:
                if state.get("ema") is None:
                    raise ValueError(f"{self.resume_from} was trained with ema.enabled=false; resume it the same way")
                self.ema.load_state_dict(state["ema"])
            self.resume_rng = state["rng"]
        tags = {"world_size": str(dist_info.world_size), "zero_stage": str(cfg.deepspeed.zero_stage),
                "device": str(dist_info.device), "precision": str(self.dtype).replace("torch.", "")}
        self.run_id = tracker.start(to_dict(cfg), self.config_yaml, tags, run_id=run_id)
        self.items = sampling_items(cfg.sampling, cfg.stage, cfg.data) if dist_info.is_main else []
        self.log_start()

    # ------------------------------------------------------------------------------------------ logging
    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_start(self) -> None:
        self.write_metrics({"event": "start", "step": self.step, "world_size": self.dist.world_size,
                            "zero_stage": self.cfg.deepspeed.zero_stage, "resumed_from": self.resume_from,
                            "precision": str(self.dtype).replace("torch.", ""), "device": str(self.dist.device)})

    def log_memory(self) -> None:
        """Every rank's parameter + optimizer bytes, measured after this process's first optimizer step
        (torch creates the Adam moments lazily, at the first step)."""
        mem = ds.all_gather_object(ds.param_optim_bytes(self.engine))
        self.write_metrics({"event": "memory", "step": self.step,
                            "param_optim_bytes": [m["total_bytes"] for m in mem],
                            "param_bytes": [m["param_bytes"] for m in mem],
                            "optim_bytes": [m["optim_bytes"] for m in mem]})
        self.tracker.log_metrics({"memory/param_optim_bytes_rank0": float(mem[0]["total_bytes"])}, self.step)

    # -------------------------------------------------------------------------------------------- loop
    def train_step(self, batches) -> dict[str, Any]:
        """One optimizer step = grad_accum_steps micro-steps; returns this step's metrics record."""
        t0 = time.perf_counter()
        losses, samples, keys, ids = [], 0, [], []
        lr = float(self.engine.get_lr()[0])
        for _ in range(self.cfg.grad_accum_steps):
            batch = next(batches)
            kwargs, target = self.objective.inputs(batch, self.encoders)
            loss = self.objective.loss(self.engine(**kwargs), target)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
            samples += len(batch.keys)
            keys += list(batch.keys)
            ids += batch.sample_ids.tolist()
        self.step += 1
        if self.ema is not None:
            self.ema.update(ds.local_param_shards(self.engine)[1], self.step)
        loss_mean, = ds.all_reduce_mean([sum(losses) / len(losses)], self.dist.device)
        ranks = ds.all_gather_object((samples, self.loader.skipped(), keys, ids))
        skipped: dict[str, int] = {}
        for _, rank_skipped, _, _ in ranks:
            for reason, n in rank_skipped.items():
                skipped[reason] = skipped.get(reason, 0) + int(n)
        grad_norm = self.engine.get_global_grad_norm()
        dt = time.perf_counter() - t0
        record = {"step": self.step, "loss": loss_mean, "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "samples_per_s": sum(r[0] for r in ranks) / dt, "step_time_s": dt,
                  "skipped": sum(skipped.values()), "skipped_by_reason": skipped}
        if self.cfg.log_sample_keys:
            record["keys"], record["sample_ids"] = [r[2] for r in ranks], [r[3] for r in ranks]
        return record

    def fit(self) -> None:
        cfg = self.cfg
        batches = iter(self.loader)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.stage}", unit="step",
                   disable=not self.dist.is_main, dynamic_ncols=True)
        saved, exported = (self.step if self.resume_from else -1), -1  # the final export is always (re)done
        logged_memory = False
        if self.resume_rng is not None:
            ckpt.set_rng_state(self.resume_rng)
        while self.step < cfg.max_steps:
            record = self.train_step(batches)
            self.write_metrics(record)
            if not logged_memory:
                self.log_memory()
                logged_memory = True
            self.tracker.log_metrics({f"train/{k}": float(v) for k, v in record.items()
                                      if isinstance(v, (int, float)) and k != "step"}, self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            # the RNG state a checkpoint holds is the one training continues with, here and after a resume,
            # whatever saving or rendering samples draws from the global generators
            rng = ckpt.rng_state()
            if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.max_steps:
                self.save(rng)
                saved = self.step
            if (cfg.sampling.every_steps and self.step % cfg.sampling.every_steps == 0) or self.step == cfg.max_steps:
                self.export()
                exported = self.step
            ckpt.set_rng_state(rng)
        bar.close()
        if saved != self.step:
            self.save(ckpt.rng_state())
        if exported != self.step:
            self.export()

    # -------------------------------------------------------------------------------- checkpoint/export
    def save(self, rng: dict[str, Any]) -> None:
        state = {"step": self.step, "data": self.loader.state_dict(), "rng": rng,
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "mlflow_run_id": self.run_id, "world_size": self.dist.world_size}
        ckpt.save(self.out, self.step, self.engine, state, self.config_yaml, self.dist, self.cfg.checkpoint.keep_last)

    def export(self) -> None:
        """Gather the EMA (or raw) weights to rank 0, write OUTPUT/export, render samples, log both."""
        infos, tensors = ds.local_param_shards(self.engine)
        weights = ds.gather_full(infos, self.ema.shadow if self.ema is not None else tensors,
                                 is_main=self.dist.is_main, device=self.dist.device)
        if self.dist.is_main:
            folder = export_stage(self.out / "export", self.ucfg, weights, stage_of(self.cfg))
            self.tracker.log_artifacts(folder, "export")
            samples_dir = self.out / "samples" / f"step-{self.step:08d}"
            render_samples(folder, self.items, samples_dir, seed=self.cfg.sampling.seed, device=self.dist.device,
                           dtype=self.dtype)
            self.tracker.log_artifacts(samples_dir, f"samples/step-{self.step:08d}")
        ds.barrier()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"training.train: config error: {exc}", file=sys.stderr)
        return 2
    dist_info = ds.setup_distributed(cfg.device)
    tracker = Tracker(cfg.tracking, stage=cfg.stage, is_main=dist_info.is_main)
    run = None
    try:
        preflight(cfg, dist_info, tracker)
        run = Run(cfg, dist_info, tracker, args.resume)
        run.fit()
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        if run is not None:
            run.loader.close()
        ds.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
