"""training.checkpoint (resume lookup, RNG states) and training.engine's DeepSpeed config dict.

The save/load path itself runs with real DeepSpeed processes in tests/integration/test_train_resume.py.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt
from training.engine import DeepSpeedConfig, DistInfo, ds_config


def _fake(out, step, complete):
    folder = ckpt.step_dir(out, step)
    folder.mkdir(parents=True)
    (folder / "trainer_state_rank0.pt").write_bytes(b"x")
    if complete:
        (folder / ckpt.COMPLETE).write_text(json.dumps({"step": step, "world_size": 1}))
    return folder


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert ckpt.find_resume(tmp_path, "auto") is None  # nothing yet: a fresh start
    two = _fake(tmp_path, 2, True)
    _fake(tmp_path, 10, True)
    _fake(tmp_path, 12, False)  # a save that died half way
    (ckpt.checkpoints_dir(tmp_path) / "step-junk").mkdir()
    assert ckpt.find_resume(tmp_path, "auto") == ckpt.step_dir(tmp_path, 10)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 10]
    assert ckpt.find_resume(tmp_path, "none") is None
    assert ckpt.find_resume(tmp_path, str(two)) == two
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.find_resume(tmp_path, str(ckpt.step_dir(tmp_path, 12)))
    with pytest.raises(FileNotFoundError):
        ckpt.find_resume(tmp_path, str(tmp_path / "nope"))


def test_trainer_state_needs_the_world_size_that_wrote_it(tmp_path):
    folder = ckpt.step_dir(tmp_path, 4)
    folder.mkdir(parents=True)
    (folder / ckpt.COMPLETE).write_text(json.dumps({"step": 4, "world_size": 2}))
    for rank in (0, 1):
        torch.save({"step": 4, "rank": rank}, ckpt.trainer_state_path(folder, rank))
    assert ckpt.load_trainer_state(folder, DistInfo(1, 2, 1, torch.device("cpu"))) == {"step": 4, "rank": 1}
    with pytest.raises(ValueError, match="written by 2 processes.*now 1"):
        ckpt.load_trainer_state(folder, DistInfo(0, 1, 0, torch.device("cpu")))


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.rand(3), np.random.rand(3), random.random()
    state = ckpt.rng_state()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.save({"rng": state}, tmp_path / "s.pt")
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_deepspeed_config_dict():
    cfg = ds_config(DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True,
                                    param_persistence_threshold=0), micro_batch=2, grad_accum=4, grad_clip=0.5,
                    dtype=torch.bfloat16)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] == 0
    assert cfg["bf16"]["enabled"] and cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert "optimizer" not in cfg and "scheduler" not in cfg  # torch objects are passed in (no FusedAdam build)
    assert cfg["zero_allow_untested_optimizer"]
    two = ds_config(DeepSpeedConfig(), micro_batch=1, grad_accum=1, grad_clip=1.0, dtype=torch.float32)
    assert two["zero_optimization"]["stage"] == 2 and not two["bf16"]["enabled"]
    assert "offload_optimizer" not in two["zero_optimization"]
    # gradients are copied into contiguous buckets on a GPU (allocator fragmentation), reduced in place on
    # DeepSpeed's CPU accelerator (where the copy is pure overhead)
    assert two["zero_optimization"]["contiguous_gradients"] is torch.cuda.is_available()
