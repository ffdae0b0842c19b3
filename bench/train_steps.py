"""Worker side of `python -m bench.train`: training steps of one recipe, built and timed in this process.

Every variant runs one training step on the same synthetic micro-batch through the same frozen encoders
(training.frozen) and the same objective (training.objective: per-sample noise, t, CFG dropout, v target,
fp32 MSE), so the variants differ only in the UNet and the optimizer path:
  ds         ours (training.trainer.build_unet, the trainer's seeded init) in the trainer's DeepSpeed engine
             (training.trainer.build_engine: the recipe's ZeRO stage, precision, clipping, AdamW and
             warmup/cosine schedule), stepped by the trainer's own training.trainer.micro_step
  torch      ours (same seed, same weights) with plain torch: the same AdamW + schedule
             (training.trainer.build_optimizer, so the same settings, fused kernel included) and gradient
             clipping over the parameter list taken once, no DeepSpeed (fp32 only)
  ds-image   the `ds` engine on an image micro-batch (1-frame videos), for the loader comparison
  diffusers  diffusers' I2VGenXLUNet of the equal config (model.convert), our weights converted, behind our
             UNet's call signature, in a DeepSpeed engine of its own built like `ds`
Pixels are seeded uniform noise in [-1, 1] at the recipe's data shape: a step's cost does not depend on
the pixel values, and no shards are needed (the GPU machine has none).

FLOPs (model FLOPs, for MFU): torch.utils.flop_counter.FlopCounterMode over one forward + backward of the
UNet on the first sample of the batch (FLOPs are linear in the batch), with activation checkpointing off
(recomputation is not model work), times the batch size. Attention backward counts as twice its forward
(the four gradient products; torch's own formula adds the flash kernels' recomputation of the scores),
and CPU's flash-attention op, which torch does not count, gets the same rule as the GPU kernels.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from model.encoders import ClipConfig

FLAVOR_RECIPES = {"tiny": "configs/train/tiny-base.yaml", "base-448x256": "configs/train/base-448x256.yaml"}
VARIANTS = {
    "ds": "ours in DeepSpeed (training.engine, the recipe's ZeRO stage)",
    "torch": "ours, plain torch AdamW (same schedule and clipping), no DeepSpeed",
    "ds-image": "ours in DeepSpeed, image micro-batch (1 frame)",
    "diffusers": "diffusers I2VGenXLUNet (equal config, our weights) in DeepSpeed",
}
DS_VARIANTS = ("ds", "ds-image")
CAPTIONS = ("a red fox runs across a snowy field", "waves break on a rocky shore at sunset")


def bench_config(recipe: str, overrides: list[str], *, device: str, precision: str):
    """The recipe's TrainConfig for a bench: overrides applied, MLflow off, grad_accum_steps 1 (every timed
    micro-step is an optimizer step, as the torch variant's is), and tiny random frozen encoders sized to the
    UNet when the recipe names real ones (their weights are local files a bench machine lacks; every variant
    shares them, so they do not tilt a comparison)."""
    from training.config import load_config, unet_config, validate

    extra = ["tracking.enabled=false", f"device={device}", f"deepspeed.precision={precision}", "grad_accum_steps=1"]
    cfg = load_config(recipe, [*overrides, *extra])
    ucfg = unet_config(cfg)
    if cfg.model.clip.kind != "tiny-random":
        cfg.model.clip = ClipConfig(kind="tiny-random", text_dim=ucfg.cross_attention_dim,
                                    image_dim=ucfg.image_embed_dim)
    if cfg.model.vae.kind != "tiny-random":
        cfg.model.vae = replace(cfg.model.vae, kind="tiny-random", path="")
    validate(cfg)
    return cfg


def synthetic_batch(cfg, kind: str):
    """A training.data.Batch of `kind` at the recipe's data shape: seeded pixels in [-1, 1]."""
    from training.data import Batch

    d = cfg.data
    b, f = d.kind_batch_size(kind), (d.num_frames if kind == "video" else 1)
    g = torch.Generator().manual_seed(1234)
    return Batch(kind=kind, pixels=torch.rand(b, 3, f, d.height, d.width, generator=g) * 2 - 1,
                 fps=torch.full((b,), d.fps_choices[0], dtype=torch.int64),
                 captions=[CAPTIONS[i % len(CAPTIONS)] for i in range(b)],
                 sample_ids=torch.arange(b, dtype=torch.int64), keys=[f"bench-{kind}-{i}" for i in range(b)])


class DiffusersUNet(nn.Module):
    """diffusers' I2VGenXLUNet behind our UNet's call: same keyword inputs (cast to its dtype, as ours
    casts them), the prediction tensor out."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, fps=None, image_latents=None, image_embeddings=None,
                encoder_hidden_states=None) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype
        return self.unet(sample.to(dtype), timestep, fps=fps, image_latents=image_latents.to(dtype),
                         image_embeddings=image_embeddings.to(dtype),
                         encoder_hidden_states=encoder_hidden_states.to(dtype), return_dict=False)[0]


def build_diffusers(cfg) -> nn.Module:
    """diffusers' UNet of the recipe's config holding ours' initial weights (fp32, CPU)."""
    from diffusers import I2VGenXLUNet

    from model.convert import config_to_diffusers, state_dict_to_diffusers
    from training.config import unet_config
    from training.trainer import build_unet

    ucfg = unet_config(cfg)
    if not (ucfg.use_text and ucfg.use_fps and ucfg.use_image_global and ucfg.use_image_local
            and ucfg.use_image_concat):
        raise SystemExit("--vs-diffusers needs a base-stage UNet (diffusers' I2VGenXLUNet has every "
                         "conditioning path); use a base recipe")
    state = state_dict_to_diffusers(build_unet(cfg).state_dict())
    with torch.device("meta"):
        unet = I2VGenXLUNet(**{k: v for k, v in config_to_diffusers(ucfg).items() if not k.startswith("_")})
    unet.load_state_dict(state, strict=True, assign=True)
    return DiffusersUNet(unet.float()).train()


# ----------------------------------------------------------------------------------------------- FLOPs
def _attention_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_rules() -> dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    rules = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_forward}
    for name in ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward"):
        if hasattr(aten, name):
            rules[getattr(aten, name)] = _attention_backward
    return rules


def count_flops(module: nn.Module, kwargs: dict[str, Any], target: torch.Tensor, loss_fn) -> tuple[int, dict[str, int]]:
    """(FLOPs of one fwd + bwd of `module` at the batch of `kwargs`, FLOPs by aten op), counted on the first
    sample and multiplied by the batch size; gradient checkpointing is switched off meanwhile and the
    parameters' grads are dropped afterwards. Call before the module is wrapped by DeepSpeed (its hooks)."""
    batch = target.shape[0]
    one = {k: v[:1] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in kwargs.items()}
    ckpt = getattr(module, "gradient_checkpointing", False)
    if ckpt:
        module.enable_gradient_checkpointing(False)
    counter = FlopCounterMode(display=False, custom_mapping=_attention_rules())
    with counter:
        loss_fn(module(**one), target[:1]).backward()
    if ckpt:
        module.enable_gradient_checkpointing(True)
    for p in module.parameters():
        p.grad = None
    by_op = {str(op): int(n) * batch for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()) * batch, by_op


# ---------------------------------------------------------------------------------------------- steps
@dataclass
class Setup:
    """What every variant of one worker shares."""

    cfg: Any
    device: torch.device
    dtype: torch.dtype
    encoders: Any
    objective: Any
    batches: dict[str, Any]


def make_setup(cfg) -> Setup:
    """Distributed init (world size 1 without a launcher), frozen encoders, objective, the batches."""
    from training import engine as ds
    from training.trainer import build_step_inputs

    info = ds.setup_distributed(cfg.device)
    dtype = ds.resolve_precision(cfg.deepspeed.precision, info.device)
    encoders, objective = build_step_inputs(cfg, info.device, dtype)
    return Setup(cfg, info.device, dtype, encoders, objective,
                 {k: synthetic_batch(cfg, k) for k in ("video", "image")})


def ds_step(s: Setup, engine, batch) -> float:
    """One training.trainer.micro_step (what the trainer's loop runs); the loss as a float (a device sync)."""
    from training.trainer import micro_step

    return float(micro_step(engine, s.objective, s.encoders, batch))


def torch_step(s: Setup, model: nn.Module, params: list[nn.Parameter], opt, sched, batch) -> float:
    """The same micro-step with plain torch: backward, clip, AdamW, schedule."""
    kwargs, target = s.objective.inputs(batch, s.encoders)
    loss = s.objective.loss(model(**kwargs), target)
    loss.backward()
    if s.cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, s.cfg.optim.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def build_variants(s: Setup, names: list[str], flops: bool) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
    """({name: step()}, {name: {"params", "flops", "flops_by_op"}}) for the requested variants."""
    from training.trainer import build_engine, build_optimizer, build_unet

    steps: dict[str, Callable[[], float]] = {}
    info: dict[str, Any] = {}
    video = s.batches["video"]

    def counted(name: str, module: nn.Module) -> nn.Module:
        info[name] = {"params": sum(p.numel() for p in module.parameters())}
        if flops and name != "torch":
            kwargs, target = s.objective.inputs(video, s.encoders)
            info[name]["flops"], info[name]["flops_by_op"] = count_flops(module.to(s.device), kwargs, target,
                                                                         s.objective.loss)
            module.to("cpu")  # back where the trainer builds it: DeepSpeed moves (and casts) it
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()  # the fp32 count is no part of a training step's memory
        return module

    if any(n in DS_VARIANTS for n in names):
        engine = build_engine(s.cfg, counted("ds", build_unet(s.cfg)), s.dtype)
        steps["ds"] = lambda: ds_step(s, engine, video)
        steps["ds-image"] = lambda: ds_step(s, engine, s.batches["image"])
    if "torch" in names:
        if s.dtype != torch.float32:  # pure low-precision AdamW would not be the step DeepSpeed takes
            raise SystemExit("the torch variant is an fp32 baseline (DeepSpeed keeps fp32 master weights)")
        model = counted("torch", build_unet(s.cfg)).to(s.device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt, sched = build_optimizer(s.cfg, params)
        steps["torch"] = lambda: torch_step(s, model, params, opt, sched, video)
    if "diffusers" in names:
        engine_d = build_engine(s.cfg, counted("diffusers", build_diffusers(s.cfg)), s.dtype)
        steps["diffusers"] = lambda: ds_step(s, engine_d, video)
    return {n: steps[n] for n in names}, {n: info.get("ds" if n == "ds-image" else n) for n in names}


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_steps(cfg, names: list[str], *, warmup: int, iterations: int, flops: bool) -> dict[str, Any]:
    """Build the variants, `warmup` untimed steps each, then `iterations` rounds of one timed step per
    variant (order rotated every round, so a slow spell of a shared machine hits them alike). With one
    variant, its memory too: CUDA max_memory_allocated over the process and the peak of one more step above
    the memory allocated before it (the FLOP count excluded); CPU: the process's peak RSS (VmHWM) above its
    RSS once the libraries are imported and the frozen encoders built (the model, optimizer and steps; the
    diffusers variant's includes building ours once, whose weights it takes)."""
    s = make_setup(cfg)
    setup_rss = _vm_kib("VmRSS") * 1024  # imports, frozen encoders, process group
    steps, info = build_variants(s, names, flops)
    cuda = s.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iterations):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    memory: dict[str, Any] = {}
    if len(names) == 1:
        if cuda:
            memory["peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            steps[names[0]]()
            sync()
            memory["step_peak_bytes"] = torch.cuda.max_memory_allocated() - base
            memory["method"] = "cuda max_memory_allocated (process; one step above its start)"
        else:
            memory["peak_bytes"] = _vm_kib("VmHWM") * 1024 - setup_rss
            memory["method"] = "process peak RSS (VmHWM) above the RSS after imports + frozen encoders"
    d = cfg.data
    return {"times": times, "median_s": {n: statistics.median(t) for n, t in times.items()} if iterations else {},
            "info": info, "memory": memory, "threads": torch.get_num_threads(),
            "device": str(s.device), "device_name": torch.cuda.get_device_name(s.device) if cuda else "cpu",
            "dtype": str(s.dtype).replace("torch.", ""), "zero_stage": cfg.deepspeed.zero_stage,
            "activation_checkpointing": cfg.activation_checkpointing,
            "batch": {"video": [d.batch_size, d.num_frames, d.height, d.width],
                      "image": [d.kind_batch_size("image"), 1, d.height, d.width]}}
