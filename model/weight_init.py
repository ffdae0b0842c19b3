"""Weight-init helpers of the UNet's modules that also hold when parameters are partitioned at construction.

A module that re-initialises a child it has just built (zero-init of an output projection, so a fresh
block starts as the identity) must do it through `nn.Module.apply`: DeepSpeed's ZeRO-3 `zero.Init`
partitions every module's parameters as soon as that module's own `__init__` returns, so a direct
`nn.init.zeros_(child.weight)` in the parent would write into the empty placeholder left on each rank
and be lost. `zero.Init` wraps `Module.apply` to gather the parameters of each module the function is
applied to, run it, and re-partition; in plain PyTorch `apply` is just the call. Pure torch: nothing here
imports DeepSpeed.
"""

from __future__ import annotations

from torch import nn


def _zero_own_parameters(module: nn.Module) -> None:
    for p in module.parameters(recurse=False):
        nn.init.zeros_(p)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` (and its children) to zero in place; returns `module`.
    Draws no random numbers, so the seeded init of every other parameter is unchanged."""
    module.apply(_zero_own_parameters)
    return module  # not apply's result: zero.Init's wrapped apply returns None
