"""The one map from precision names in configs and command lines to torch dtypes.

Configs spell precisions as `float32`, `bfloat16`, `float16` (the short forms `fp32`, `bf16`, `fp16` are
accepted by `dtype_of` too) or `auto`, which each caller resolves to what suits the device it runs on (a
model that has native bf16 kernels on a CPU is not the same question as mixed precision on a GPU), so
`auto` takes the caller's choice as an argument instead of a fixed rule here.

torch is imported inside the functions: config modules import `Precision` from here, and the curation
driver validates its config without ever paying for a torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "float32", "bfloat16", "float16"]
"""Precision names a config field may hold (`Literal`, so common.configtree validates them)."""

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""The precision names with a fixed dtype (same spelling as the torch attribute)."""
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_of(name: str) -> torch.dtype:
    """torch dtype of a precision name (`float32` / `fp32`, ...); ValueError lists the valid names."""
    import torch

    key = ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"precision {name!r} is not one of {list(DTYPES) + sorted(ALIASES)}")
    return getattr(torch, key)


def resolve_dtype(name: str, auto: torch.dtype) -> torch.dtype:
    """`name` as a dtype, where `auto` stands for the caller's device-dependent choice."""
    return auto if name == "auto" else dtype_of(name)


def cuda_mixed_dtype(device: torch.device | str) -> torch.dtype:
    """The usual low precision on `device`: bfloat16 on a GPU that supports it, float16 on an older GPU,
    float32 on a CPU (no autocast speed-up there for most models)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
