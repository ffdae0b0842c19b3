"""DeepSpeed, and only here: the one module of the repo that imports `deepspeed`.

What the trainer needs from DeepSpeed, behind plain functions:
- `setup_distributed`: one process without a launcher (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
  defaulted for world size 1) or several under `torchrun` / `deepspeed`, same code; on a machine without
  CUDA the accelerator is `cpu` and the backend gloo (DS_ACCELERATOR=cpu is set before the import).
- `ds_config` + `initialize`: `deepspeed.initialize` with a torch optimizer and LR scheduler passed in
  (a DS-config optimizer block would JIT-build FusedAdam), ZeRO 2 or 3, optional CPU offload.
- `model_init_context` + `load_partitioned`: under ZeRO-3 the model is built with `deepspeed.zero.Init`
  (each parameter partitioned over the ranks as soon as its module exists: no rank ever holds the whole
  model) and pretrained weights are loaded one submodule at a time (`zero.GatheredParameters`).
- ZeRO-3-aware views of the weights: `local_param_shards` (full tensors under ZeRO 0-2, this rank's
  partition under ZeRO-3; what the EMA averages) and `gather_full` (collective; the export).
- `param_optim_bytes` / `module_param_bytes`: bytes of this rank's parameter storage (+ optimizer state).
- `save_engine` / `load_engine`: the DeepSpeed part of a checkpoint (model, optimizer, LR schedule).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR)
from deepspeed.accelerator import get_accelerator  # noqa: E402

from common.dtypes import dtype_of  # noqa: E402
from training.subconfigs import DeepSpeedConfig  # noqa: E402

DS_TAG = "ds"


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank and the torch device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed(device: Literal["auto", "cpu", "cuda"] = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; launcher-less runs get world-size-1 defaults."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """deepspeed.precision as a dtype: auto = bf16 on a GPU that supports it, else fp32 (CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    dtype = dtype_of(name)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("deepspeed.precision=bf16 but this GPU has no bf16 support; use fp32")
    return dtype


def ds_config(cfg: DeepSpeedConfig, *, micro_batch: int, grad_accum: int, grad_clip: float,
              dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config dict (no optimizer/scheduler blocks: torch objects are passed in).

    `contiguous_gradients` follows DeepSpeed's accelerator: on a GPU (DeepSpeed's default, on) each gradient
    is copied into a preallocated bucket as backward produces it, which keeps the caching allocator from
    fragmenting. The CPU accelerator has no such allocator: there the copy is a second pass over every
    gradient (and over a bucket buffer allocated afresh each step), so ZeRO-2 reduces the gradients where
    autograd left them instead (same values: the same sum, divided by the world size first)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": False,
                            "contiguous_gradients": get_accelerator().device_name() != "cpu"}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # the export gathers itself (EMA)
        zero["stage3_param_persistence_threshold"] = int(cfg.param_persistence_threshold)
        zero["stage3_max_reuse_distance"] = int(cfg.max_reuse_distance)
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def zero3(config: dict[str, Any] | None) -> bool:
    """Whether a DeepSpeed config dict partitions the parameters (ZeRO stage 3)."""
    return config is not None and int(config["zero_optimization"]["stage"]) == 3


class _PartitionOnInit(deepspeed.zero.Init):
    """`zero.Init` whose modules create their tensors as plain torch does (no tensor-constructor overrides:
    CPU, float32, torch's global CPU generator), so a seeded init draws exactly the values it draws outside
    the context. Each parameter is cast to the training dtype (the one DeepSpeed's engine expects of a
    zero.Init model) right before DeepSpeed moves it to the rank's device, broadcasts it from rank 0 and
    partitions it. `_post_init_method` is DeepSpeed's per-module hook for subclasses."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config_dict_or_path=config, tensor_overrides=[])

    def _post_init_method(self, module: torch.nn.Module) -> None:
        for p in module.parameters(recurse=False):
            if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)
        super()._post_init_method(module)


@contextlib.contextmanager
def model_init_context(config: dict[str, Any] | None) -> Iterator[None]:
    """Context to construct the trained model in. ZeRO-3 (`zero3(config)`): `deepspeed.zero.Init`, so a
    parameter is partitioned over the ranks as soon as the module owning it is built, and a rank never
    holds more than one module's parameters in full (peak) besides its partitions. The values equal those
    of the same construction outside the context (same seed, float32; cast like the engine casts a full
    model for bf16); a module that re-initialises a child must do it through `Module.apply`
    (model.weight_init). Any other config (ZeRO-2, None): nothing; every rank builds the full model."""
    if not zero3(config):
        yield
        return
    with _PartitionOnInit(config):
        yield


def load_partitioned(module: torch.nn.Module, read: Callable[[str], torch.Tensor],
                     shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Copy full weights into a module built under `model_init_context` (ZeRO-3), one submodule at a time:
    its parameters are gathered (`deepspeed.zero.GatheredParameters`), rank 0 copies `read(name)` into each,
    one tensor at a time, and on leaving the context DeepSpeed broadcasts rank 0's values and re-partitions
    them. So a rank holds at most one submodule's parameters in full and one source tensor besides its
    partitions; `read` is called on rank 0 only. `shapes` ({name: shape} of every source tensor) must match
    the parameters exactly (names and shapes, like a strict load_state_dict), else ValueError naming them."""
    params = dict(module.named_parameters())
    own = {name: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for name, p in params.items()}
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    wrong = sorted(n for n in set(own) & set(shapes) if tuple(shapes[n]) != own[n])
    problems = [f"{len(names)} {what}, e.g. {names[:3]}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if names]
    if problems:
        raise ValueError(f"the weights do not fit the model: {'; '.join(problems)}")
    is_main = dist.get_rank() == 0
    for prefix, sub in module.named_modules():
        named = list(sub.named_parameters(recurse=False))
        if not named:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0), torch.no_grad():
            if is_main:
                for name, p in named:
                    p.data.copy_(read(f"{prefix}.{name}" if prefix else name))


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict[str, Any]):
    """`deepspeed.initialize` -> the engine (forward, backward, step, checkpoints)."""
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    return engine


# ----------------------------------------------------------------------------------- ZeRO-aware weights
@dataclass
class ShardInfo:
    """One parameter as this rank holds it: full, or the [start, start + length) slice of its flat form."""

    name: str
    shape: torch.Size
    numel: int
    partition_size: int
    """Elements per rank of the padded flat parameter (ZeRO-3), or numel when not partitioned."""
    sharded: bool


def local_param_shards(engine) -> tuple[list[ShardInfo], list[torch.Tensor]]:
    """This rank's live parameter storage: full params (ZeRO 0-2), else each param's local partition
    trimmed to its real elements (`ds_tensor` minus padding). Fetch anew after each step (never cached)."""
    return module_param_shards(engine.module)


def module_param_shards(module: torch.nn.Module) -> tuple[list[ShardInfo], list[torch.Tensor]]:
    """`local_param_shards` of a module (e.g. one just built under `model_init_context`)."""
    infos, tensors = [], []
    rank = dist.get_rank()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_tensor"):
            ps = int(p.ds_tensor.ds_numel)
            valid = max(0, min(ps, int(p.ds_numel) - rank * ps))
            infos.append(ShardInfo(name, torch.Size(p.ds_shape), int(p.ds_numel), ps, True))
            tensors.append(p.ds_tensor.detach().view(-1).narrow(0, 0, valid))
        else:
            infos.append(ShardInfo(name, p.shape, p.numel(), p.numel(), False))
            tensors.append(p.detach())
    return infos, tensors


def gather_full(infos: list[ShardInfo], tensors: list[torch.Tensor], *, is_main: bool,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Full CPU float tensors {name: weight} from per-rank shards (collective: every rank must call);
    only the main rank gets a filled dict. Full tensors pass through. `device` is where the collective
    runs (the rank's GPU under NCCL, even when the shards were offloaded to CPU)."""
    out: dict[str, torch.Tensor] = {}
    world = dist.get_world_size()
    for info, t in zip(infos, tensors):
        if not info.sharded:
            if is_main:
                out[info.name] = t.detach().float().cpu().reshape(info.shape).clone()
            continue
        part = torch.zeros(info.partition_size, dtype=t.dtype, device=device)
        part[: t.numel()] = t.reshape(-1)
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        if is_main:
            out[info.name] = torch.cat(parts)[: info.numel].reshape(info.shape).float().cpu()
    return out


def _storage_bytes(tensors, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _param_storages(module: torch.nn.Module) -> list[torch.Tensor]:
    tensors = []
    for p in module.parameters():
        tensors.append(p.data)  # empty for a released ZeRO-3 parameter
        if hasattr(p, "ds_tensor"):
            tensors.append(p.ds_tensor)
    return tensors


def module_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameter storage this rank holds for `module`, each storage once: the full weights of
    a plain module, the local partitions (+ any gathered weights) of a ZeRO-3 one."""
    return _storage_bytes(_param_storages(module), set())


def param_optim_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters and the optimizer (fp32 master partitions and Adam moments),
    each storage counted once; gradients and activations excluded. Parameters = the ZeRO-3 partitions
    plus whatever full weights stay gathered between steps (persistent small parameters), or the full
    weights under ZeRO 0-2. Call between steps, after the first (Adam creates its moments lazily)."""
    seen: set[int] = set()
    param_bytes = _storage_bytes(_param_storages(engine.module), seen)
    zero_opt = engine.optimizer
    torch_opt = getattr(zero_opt, "optimizer", zero_opt)
    optim_tensors: list[torch.Tensor] = []
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        optim_tensors += list(getattr(zero_opt, attr, []) or [])
    for group in torch_opt.param_groups:
        optim_tensors += list(group["params"])
    for state in torch_opt.state.values():
        optim_tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
    optim_bytes = _storage_bytes(optim_tensors, seen)
    return {"param_bytes": param_bytes, "optim_bytes": optim_bytes, "total_bytes": param_bytes + optim_bytes}


# --------------------------------------------------------------------------------------- checkpoints
def save_engine(engine, folder: str | Path) -> None:
    """Every rank writes its part (model states on rank 0, its ZeRO optimizer partition) under folder/ds/."""
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={}, save_latest=False)


def load_engine(engine, folder: str | Path) -> None:
    """Restore model, optimizer and LR scheduler from folder/ds/ (same world size and ZeRO stage)."""
    path, _ = engine.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {Path(folder) / DS_TAG}")


# ------------------------------------------------------------------------------------- collectives
def barrier() -> None:
    """Wait for every rank."""
    dist.barrier()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean over ranks of a short list of floats (float64, so no precision is lost)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects only)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Tear the process group down (end of a run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
