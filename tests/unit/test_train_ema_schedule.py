"""training.ema (update rule, start step, every N, state) and training.schedule (warmup + cosine)."""

from __future__ import annotations

import math

import pytest
import torch

from training.ema import EMA, EMAConfig
from training.schedule import build_scheduler, lr_factor


def test_ema_follows_the_update_rule_in_fp32():
    w = [torch.zeros(3), torch.ones(2, 2)]
    ema = EMA(EMAConfig(decay=0.9, start_step=2, every=2), w)
    history = []
    for step in range(1, 7):
        for t in w:
            t.add_(1.0)
        ema.update(w, step)
        history.append(ema.shadow[0][0].item())
    # step 1 (< start): copy -> 1; step 2: 0.9*1 + 0.1*2 = 1.1; step 3 skipped (every 2);
    # step 4: 0.9*1.1 + 0.1*4 = 1.39; step 5 skipped; step 6: 0.9*1.39 + 0.1*6 = 1.851
    assert history == pytest.approx([1.0, 1.1, 1.1, 1.39, 1.39, 1.851])
    assert ema.shadow[1].dtype == torch.float32 and ema.shadow[1].shape == (2, 2)


def test_ema_shadow_is_fp32_for_bf16_weights_and_restores():
    w = [torch.full((4,), 1.0, dtype=torch.bfloat16)]
    ema = EMA(EMAConfig(decay=0.999), w)
    for step in range(1, 11):
        ema.update([torch.full((4,), 2.0, dtype=torch.bfloat16)], step)
    expect = 2 - 0.999**10
    assert ema.shadow[0].dtype == torch.float32
    assert ema.shadow[0][0].item() == pytest.approx(expect, rel=1e-6)  # bf16 could not hold this
    other = EMA(EMAConfig(decay=0.999), w)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="world size"):
        EMA(EMAConfig(), [torch.zeros(5)]).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("bad", [dict(decay=1.0), dict(every=0), dict(start_step=-1)])
def test_ema_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="ema."):
        EMAConfig(**bad)


def test_warmup_then_cosine_to_min_lr():
    kw = dict(warmup_steps=4, max_steps=20, min_ratio=0.1)
    assert [lr_factor(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, **kw) == pytest.approx(1.0)
    assert lr_factor(12, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(20, **kw) == pytest.approx(0.1) and lr_factor(50, **kw) == pytest.approx(0.1)
    values = [lr_factor(s, **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warmup


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [1e-3 * lr_factor(s, warmup_steps=2, max_steps=6, min_ratio=0.1) for s in range(6)]
    assert seen == pytest.approx(expect)
    assert seen[0] == pytest.approx(5e-4) and seen[-1] > 1e-4
    # the state round-trips (DeepSpeed saves it in the checkpoint)
    again = build_scheduler(torch.optim.AdamW([p], lr=1e-3), lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=6)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == 6 and math.isclose(again.get_last_lr()[0], sched.get_last_lr()[0])
    with pytest.raises(ValueError, match="min_lr"):
        build_scheduler(opt, lr=1e-3, min_lr=1e-2, warmup_steps=0, max_steps=6)
