"""training.trainer's step parts: `build_engine` + `micro_step` (the trainer's loop and bench.train's DeepSpeed
variant) against plain torch with `build_optimizer` (bench.train's baseline), in this process: a real
`deepspeed.initialize` ZeRO-2 engine at world size 1 (gloo on CPU), the tiny UNet, tiny random encoders.

The two must be the same training step, or bench.train's zero2_vs_torch_time compares different work.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from bench.train_steps import synthetic_batch
from training.config import load_config

TINY = str(Path(__file__).resolve().parents[2] / "configs/train/tiny-base.yaml")
STEPS = 3


@pytest.fixture(scope="module")
def world_of_one():
    """A world-size-1 process group (the env a launcher would give, set for this module only). It is left
    up for the rest of the session: DeepSpeed caches its groups, so a second init after a teardown fails;
    `training.engine.setup_distributed` reuses a live one."""
    from training import engine as ds

    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            mp.setenv(key, value)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            mp.setenv("MASTER_PORT", str(sock.getsockname()[1]))
        yield ds.setup_distributed("cpu")


def test_deepspeed_micro_step_is_the_plain_torch_step(world_of_one):
    from training.trainer import build_engine, build_optimizer, build_step_inputs, build_unet, micro_step

    # lr high enough that a step moves the weights far more than roundoff, and clipping active (norm > 0.05)
    cfg = load_config(TINY, ["tracking.enabled=false", "device=cpu", "optim.lr=1e-2", "optim.warmup_steps=1",
                             "optim.grad_clip=0.05", "optim.weight_decay=0.01"])
    dtype = torch.float32
    encoders, objective = build_step_inputs(cfg, world_of_one.device, dtype)
    batch = synthetic_batch(cfg, "video")

    torch.manual_seed(7)  # the UNet's dropout draws from the global generator: the same masks in both runs
    engine = build_engine(cfg, build_unet(cfg), dtype)
    assert engine.zero_optimization_stage() == 2
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"  # DeepSpeed drives the step
    ds_losses = [float(micro_step(engine, objective, encoders, batch)) for _ in range(STEPS)]
    ds_norm = float(engine.get_global_grad_norm())

    torch.manual_seed(7)
    model = build_unet(cfg)
    params = list(model.parameters())
    opt, sched = build_optimizer(cfg, params)
    torch_losses, norm = [], None
    for _ in range(STEPS):
        kwargs, target = objective.inputs(batch, encoders)
        loss = objective.loss(model(**kwargs), target)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        torch_losses.append(float(loss.detach()))

    assert norm > 2 * cfg.optim.grad_clip  # the clip acts, so a missing or different clip would show
    assert ds_norm == pytest.approx(norm, rel=1e-5)
    assert len(set(torch_losses)) == STEPS  # the weights move between steps
    # the same fp32 arithmetic up to summation order (the gradient norm per tensor vs foreach): measured
    # equal losses and weights within 4e-7 after 3 steps that moved them by 3e-2
    assert ds_losses == pytest.approx(torch_losses, rel=1e-5)
    ours = dict(engine.module.named_parameters())
    worst = max((ours[n].detach() - p.detach()).abs().max().item() for n, p in model.named_parameters())
    moved = max((p.detach() - q.detach()).abs().max().item()
                for p, q in zip(model.parameters(), build_unet(cfg).parameters()))
    assert moved > 1e-3 and worst < 1e-3 * moved, (worst, moved)
    assert engine.get_lr()[0] == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
