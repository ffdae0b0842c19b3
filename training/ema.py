"""Exponential moving average of the weights, over whatever parameter storage this rank holds.

The engine hands the EMA a list of tensors (`training.engine.local_param_shards`): the full parameters
under ZeRO 0-2 (every rank holds them), only this rank's partition of each parameter under ZeRO-3. The EMA
keeps an fp32 shadow of exactly those tensors and updates it in place after each optimizer step, so under
ZeRO-3 its memory and work are 1/world of the model and nothing is gathered per step. The full EMA weights
are assembled only at export time (`training.engine.gather_full`).

Update rule (every `every` optimizer steps, from `start_step` on; before `start_step` the shadow copies
the weights, as diffusers' EMAModel does with update_after_step):
    shadow <- decay * shadow + (1 - decay) * weights
"""

from __future__ import annotations

import torch

from training.subconfigs import EMAConfig


class EMA:
    """fp32 shadow of a fixed list of tensors (full parameters or ZeRO-3 local partitions)."""

    def __init__(self, cfg: EMAConfig, tensors: list[torch.Tensor]):
        self.cfg = cfg
        self.shadow = [t.detach().float().clone() for t in tensors]

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor], step: int) -> None:
        """Fold the weights after optimizer step `step` (1-based) into the shadow."""
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors, got {len(tensors)}")
        if step >= self.cfg.start_step and step % self.cfg.every:
            return
        # foreach ops: one call over the ~1500 tensors of a UNet instead of a Python loop (GPU: a few kernels)
        tensors = [t.detach() if t.dtype == s.dtype else t.detach().to(s.dtype) for s, t in zip(self.shadow, tensors)]
        if step < self.cfg.start_step:
            torch._foreach_copy_(self.shadow, tensors)
        else:
            torch._foreach_lerp_(self.shadow, tensors, 1.0 - self.cfg.decay)

    def state_dict(self) -> dict:
        """Shadow tensors (a list in the engine's tensor order) for the per-rank trainer state."""
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore the shadow saved by `state_dict`; shapes must match (same world size and model)."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA state does not match this model's local parameters (different model or "
                             "world size than the checkpoint)")
        for s, t in zip(self.shadow, shadow):
            s.copy_(t)
