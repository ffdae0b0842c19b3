"""The training job on one rank (`python -m training.train` runs it once its config is valid).

`run(cfg, resume)`: distributed setup (world size 1 without a launcher), then before any model is built
every rank checks the model files and the shards and rank 0 the MLflow store (`preflight`); then `Run`:
OUTPUT/config.yaml, the checkpoint to resume (default: the newest complete one under OUTPUT) checked
against this run (world size, data position, EMA), the UNet (`build_unet`: random init or init_from;
under ZeRO-3 partitioned while it is built), frozen VAE + CLIP and the objective (`build_step_inputs`),
AdamW + warmup/cosine into `deepspeed.initialize` (`build_optimizer`, `build_engine`), the loader, the EMA,
and everything else restored from the checkpoint. Any of these failures stops all ranks together with its
message. An optimizer step is `grad_accum_steps` calls of `micro_step`; bench.train times the same
functions (one path for the job and its benchmark).

Per optimizer step rank 0 appends a JSON line to OUTPUT/metrics.jsonl (step, loss = mean over the global
batch, lr, grad_norm, samples_per_s, step_time_s, skipped (+ by reason), with log_sample_keys every rank's
sample keys and ids)
and logs the numbers to MLflow. Each start of the job also writes an `"event": "start"` line (with every
rank's parameter bytes right after the UNet was built) and, after its first optimizer step, an
`"event": "memory"` line with every rank's parameter + optimizer bytes. Checkpoints every
`checkpoint.every_steps` and at the end (training.checkpoint); the EMA export + validation mp4s every
`sampling.every_steps` and at the end (training.samples); the export's evaluation every
`evaluation.every_steps` (training.evaluate: OUTPUT/eval/step-N/, metrics `eval/...`, an `"event":
"evaluation"` line; a refine run evaluates the cascade after `evaluation.base_checkpoint`). Only rank 0
logs, exports and shows the progress bar.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from common.configtree import to_dict
from model.convert import OUR_WEIGHTS, load_checkpoint
from model.diffusion import GaussianDiffusion
from model.generate import load_pipeline
from model.unet import I2VGenUNet
from training import checkpoint as ckpt
from training import engine as ds
from training.config import TrainConfig, check_paths, to_yaml, unet_config
from training.data import TrainLoader, check_shards
from training.ema import EMA
from training.frozen import FrozenEncoders
from training.objective import Objective
from training.samples import export_stage, render_samples, sampling_items, stage_config
from training.schedule import build_scheduler
from training.tracking import Tracker

METRICS = "metrics.jsonl"


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


def build_unet(cfg: TrainConfig, ds_config: dict[str, Any] | None = None) -> I2VGenUNet:
    """The UNet to train: random init from cfg.seed (identical on every rank) or init_from's weights.
    With a ZeRO-3 `ds_config` it is built under `ds.model_init_context`: each parameter is partitioned over
    the ranks as soon as its module exists (no rank holds the whole model), with the values of a full
    build, in the training dtype; init_from's tensors are then read one at a time and loaded one submodule
    at a time (`ds.load_partitioned`). Otherwise (ZeRO-2; no config: benches, tests) every rank builds the
    full model in float32, for init_from on the meta device with the converted weights assigned (no random
    init first)."""
    ucfg = unet_config(cfg)
    if cfg.model.init_from and not ds.zero3(ds_config):
        _, state = load_checkpoint(cfg.model.init_from)
        with torch.device("meta"):
            unet = I2VGenUNet(ucfg)
        unet.load_state_dict(state, strict=True, assign=True)
        unet.float()
    else:
        with torch.random.fork_rng(devices=[]), ds.model_init_context(ds_config):
            torch.manual_seed(cfg.seed)
            unet = I2VGenUNet(ucfg)
        if cfg.model.init_from:  # ZeRO-3: the random init above is overwritten, one submodule at a time
            path = Path(cfg.model.init_from) / OUR_WEIGHTS
            with safe_open(str(path), framework="pt") as weights:
                shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
                try:
                    ds.load_partitioned(unet, weights.get_tensor, shapes)
                except ValueError as exc:
                    raise ValueError(f"model.init_from: {path}: {exc}") from None
    if cfg.activation_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def engine_config(cfg: TrainConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The run's DeepSpeed config dict (`training.engine.ds_config` of cfg.deepspeed, the micro-batch,
    gradient accumulation and clipping); `build_unet` takes it for ZeRO-3's partitioned build."""
    return ds.ds_config(cfg.deepspeed, micro_batch=cfg.data.batch_size, grad_accum=cfg.grad_accum_steps,
                        grad_clip=cfg.optim.grad_clip, dtype=dtype)


def build_optimizer(cfg: TrainConfig, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW of cfg.optim over `params` + the warmup/cosine schedule: what `build_engine` hands DeepSpeed,
    and the plain-torch baseline of `bench.train` (same settings). fused=True (CPU and CUDA kernels): one
    pass over each tensor, where torch's default on CPU loops over the tensors in Python with a temporary
    per operation; under ZeRO DeepSpeed hands it one flat fp32 partition per parameter group."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  fused=True)
    scheduler = build_scheduler(optimizer, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
                                max_steps=cfg.max_steps)
    return optimizer, scheduler


def build_engine(cfg: TrainConfig, unet: torch.nn.Module, dtype: torch.dtype):
    """`unet` (from `build_unet`) in a DeepSpeed engine: `deepspeed.initialize` with `engine_config` and
    `build_optimizer`'s AdamW + schedule. The engine owns forward, backward, step and checkpoints."""
    optimizer, scheduler = build_optimizer(cfg, unet.parameters())
    return ds.initialize(unet, optimizer, scheduler, engine_config(cfg, dtype))


def build_step_inputs(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[FrozenEncoders, Objective]:
    """The frozen VAE + CLIP (in the training dtype, on `device`) and the objective that turns a batch into
    UNet inputs and a target through them."""
    ucfg = unet_config(cfg)
    encoders = FrozenEncoders(ucfg, cfg.model.clip, cfg.model.vae, device=device, dtype=dtype)
    return encoders, Objective(cfg.objective, GaussianDiffusion(cfg.model.diffusion), ucfg, cfg.seed)


def micro_step(engine, objective: Objective, encoders: FrozenEncoders, batch) -> torch.Tensor:
    """One micro-step of `batch` (a `training.data.Batch`): inputs and target through the frozen encoders,
    engine forward, fp32 loss, engine backward + step (DeepSpeed applies the optimizer at the accumulation
    boundary). Returns the detached loss tensor: reading it is the caller's (one device sync per read)."""
    kwargs, target = objective.inputs(batch, encoders)
    loss = objective.loss(engine(**kwargs), target)
    engine.backward(loss)
    engine.step()
    return loss.detach()


class Run:
    """One training job on this rank: engine, loader, EMA, tracker and the output folder."""

    def __init__(self, cfg: TrainConfig, dist_info: ds.DistInfo, tracker: Tracker, resume: str):
        self.cfg, self.dist, self.tracker = cfg, dist_info, tracker
        self.out = Path(cfg.output_dir)
        self.config_yaml = to_yaml(cfg)
        self.resume_from = self.find_resume(resume)
        self.ucfg = unet_config(cfg)
        self.dtype = ds.resolve_precision(cfg.deepspeed.precision, dist_info.device)
        self.loader = TrainLoader(cfg.data, seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size)
        state = self.resume_state() if self.resume_from else None  # a rejected resume leaves OUTPUT as it was
        if dist_info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / ckpt.CONFIG_NAME).write_text(self.config_yaml)
        unet = build_unet(cfg, engine_config(cfg, self.dtype))
        self.built_bytes = ds.all_gather_object(ds.module_param_bytes(unet))
        self.encoders, self.objective = build_step_inputs(cfg, dist_info.device, self.dtype)
        self.engine = build_engine(cfg, unet, self.dtype)
        torch.manual_seed(cfg.seed * 1000 + dist_info.rank)  # dropout masks differ per rank
        self.ema = EMA(cfg.ema, ds.local_param_shards(self.engine)[1]) if cfg.ema.enabled else None
        self.step, run_id, self.resume_rng = 0, None, None
        if state is not None:
            ds.load_engine(self.engine, self.resume_from)
            self.step, run_id = int(state["step"]), state.get("mlflow_run_id")
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.resume_rng = state["rng"]
        tags = {"world_size": str(dist_info.world_size), "zero_stage": str(cfg.deepspeed.zero_stage),
                "device": str(dist_info.device), "precision": str(self.dtype).replace("torch.", "")}
        self.run_id = tracker.start(to_dict(cfg), self.config_yaml, tags, run_id=run_id)
        self.items = sampling_items(cfg.sampling, cfg.stage, cfg.data) if dist_info.is_main else []
        self.evaluator = None
        if cfg.evaluation.every_steps is not None and dist_info.is_main:
            # here, not at the top: scoring (OpenCV, PyAV, the CLIP scorer) only where evaluation is on
            from training.eval_cascade import check_base_export
            from training.eval_media import prompt_files
            from training.evaluate import Evaluator

            prompt_files(cfg.evaluation.images)  # a bad prompt folder fails now, not after training
            if cfg.evaluation.base_checkpoint:  # a refine run evaluates the cascade after this base export
                check_base_export(cfg.evaluation.base_checkpoint, "evaluation.base_checkpoint")
            self.evaluator = Evaluator(cfg.evaluation, dist_info.device, self.dtype)
        self.log_start()

    def find_resume(self, resume: str) -> str | None:
        """The checkpoint folder to resume (rank 0 looks, every rank gets it; a bad --resume stops all)."""
        found, error = None, None
        if self.dist.is_main:
            try:
                found = str(ckpt.find_resume(self.out, resume) or "") or None
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        found, error = ds.all_gather_object((found, error))[0]
        if error:
            raise SystemExit(f"training.train: cannot resume: {error}")
        return found

    def resume_state(self) -> dict[str, Any]:
        """This rank's trainer state of the checkpoint to resume, checked against this run before any model
        is built: the world size that wrote it, the data position (the loader takes it: same seed, rank,
        world size, batch sizes and shards) and the EMA it holds. A mismatch on any rank stops every rank
        with its message."""
        state, error = None, None
        try:
            state = ckpt.load_trainer_state(self.resume_from, self.dist)
            self.loader.load_state_dict(state["data"])
            if self.cfg.ema.enabled and state.get("ema") is None:
                raise ValueError("it was trained with ema.enabled=false; resume it the same way")
        except Exception as exc:  # noqa: BLE001 - reported below on every rank, then the job stops
            error = f"{type(exc).__name__}: {exc}"
        errors = [e for e in ds.all_gather_object(error) if e]
        if errors:
            raise SystemExit(f"training.train: cannot resume from {self.resume_from}: {errors[0]}")
        return state

    # ------------------------------------------------------------------------------------------ logging
    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_start(self) -> None:
        """The start line; `param_bytes_built`: every rank's parameter bytes right after the UNet was built
        (under ZeRO-3 the partitions: ~1/world of the model each)."""
        self.write_metrics({"event": "start", "step": self.step, "world_size": self.dist.world_size,
                            "zero_stage": self.cfg.deepspeed.zero_stage, "resumed_from": self.resume_from,
                            "precision": str(self.dtype).replace("torch.", ""), "device": str(self.dist.device),
                            "param_bytes_built": self.built_bytes})

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
            losses.append(micro_step(self.engine, self.objective, self.encoders, batch))
            samples += len(batch.keys)
            if self.cfg.log_sample_keys:
                keys += list(batch.keys)
                ids += batch.sample_ids.tolist()
        self.step += 1
        if self.ema is not None:
            self.ema.update(ds.local_param_shards(self.engine)[1], self.step)
        # the micro-steps' losses are read once per optimizer step (one device sync), in float64 as before
        local_loss = torch.stack(losses).double().mean().item()
        loss_mean, = ds.all_reduce_mean([local_loss], self.dist.device)
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
            sample_due = bool(cfg.sampling.every_steps) and self.step % cfg.sampling.every_steps == 0
            eval_due = self.eval_due()
            if sample_due or eval_due or self.step == cfg.max_steps:
                self.export(evaluate=eval_due)
                exported = self.step
            ckpt.set_rng_state(rng)
        bar.close()
        if saved != self.step:
            self.save(ckpt.rng_state())
        if exported != self.step:
            self.export(evaluate=self.eval_due())

    def eval_due(self) -> bool:
        """Whether this step is evaluated: evaluation.every_steps (null: never; 0: at max_steps only)."""
        every = self.cfg.evaluation.every_steps
        return every is not None and ((every > 0 and self.step % every == 0) or self.step >= self.cfg.max_steps)

    # -------------------------------------------------------------------------------- checkpoint/export
    def save(self, rng: dict[str, Any]) -> None:
        state = {"step": self.step, "data": self.loader.state_dict(), "rng": rng,
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "mlflow_run_id": self.run_id, "world_size": self.dist.world_size}
        ckpt.save(self.out, self.step, self.engine, state, self.config_yaml, self.dist, self.cfg.checkpoint.keep_last)

    def export(self, evaluate: bool = False) -> None:
        """Gather the EMA (or raw) weights to rank 0, write OUTPUT/export, render samples, log both; with
        `evaluate` also score the export (training.evaluate, OUTPUT/eval/step-N/, metrics eval/... at this step)."""
        infos, tensors = ds.local_param_shards(self.engine)
        weights = ds.gather_full(infos, self.ema.shadow if self.ema is not None else tensors,
                                 is_main=self.dist.is_main, device=self.dist.device)
        if self.dist.is_main:
            folder = export_stage(self.out / "export", self.ucfg, weights, stage_of(self.cfg))
            self.tracker.log_artifacts(folder, "export")
            samples_dir = self.out / "samples" / f"step-{self.step:08d}"
            # loaded once for the samples and the evaluation of this export (seconds at real size)
            pipe = load_pipeline(folder, self.dist.device, self.dtype)
            render_samples(folder, self.items, samples_dir, seed=self.cfg.sampling.seed, device=self.dist.device,
                           dtype=self.dtype, pipe=pipe)
            self.tracker.log_artifacts(samples_dir, f"samples/step-{self.step:08d}")
            if evaluate and self.evaluator is not None:
                from training.evaluate import log_evaluation

                eval_dir = self.out / "eval" / f"step-{self.step:08d}"
                result = self.evaluator.evaluate(folder, eval_dir, base=self.cfg.evaluation.base_checkpoint, pipe=pipe)
                log_evaluation(self.tracker, result, eval_dir, self.step, f"eval/step-{self.step:08d}")
                self.write_metrics({"event": "evaluation", "step": self.step, "means": result["means"],
                                    "clip": result["clip"]["model"], "clip_real": result["clip"]["real"]})
        ds.barrier()


def run(cfg: TrainConfig, resume: str = "auto") -> int:
    """Train with a validated config (`training.config.validate`); `resume`: auto, none or a checkpoint
    folder (training.checkpoint.find_resume). Returns 0; a failed start raises SystemExit with the reason."""
    dist_info = ds.setup_distributed(cfg.device)
    tracker = Tracker(cfg.tracking, stage=cfg.stage, is_main=dist_info.is_main, log_every=cfg.tracking.log_every)
    job = None
    try:
        preflight(cfg, dist_info, tracker)
        job = Run(cfg, dist_info, tracker, resume)
        job.fit()
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        if job is not None:
            job.loader.close()
        ds.shutdown()
    return 0
