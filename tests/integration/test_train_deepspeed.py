"""Real DeepSpeed on CPU (gloo), shards written by the real curation job: 2 processes under ZeRO-2 and
ZeRO-3 train the tiny base model exactly like 1 process with the same global batch and seed.

Runs (6 optimizer steps each, UNet dropout 0, image:video mix 1:4 as in the tiny recipe):
    A  1 process,   ZeRO-3, micro-batch 2
    B  2 processes, ZeRO-2, micro-batch 1 per rank
    C  2 processes, ZeRO-3, micro-batch 1 per rank, activation checkpointing on, started by the test-only
       ema_reference_launcher.py (adds a full-parameter reference EMA beside the run)
A and B are shared with test_train_resume.py (train_support.reference_run).

ZeRO-3 builds the UNet partitioned (deepspeed.zero.Init): right after the build each of 2 ranks holds half
of the weights, and the gathered weights are bit for bit those of a full build (random init from the seed,
in fp32 and bf16, and init_from's converted weights: the test-only zero3_build_check.py). Fine-tuning from
init_from trains the same under ZeRO-3 (2 processes) as under ZeRO-2 (1 process), 2 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import get_flavor
from model.convert import OUR_WEIGHTS, save_checkpoint
from model.unet import I2VGenUNet
from train_support import (
    TINY_BASE, ZERO3, base_args, curated_shards, finish, launch, metrics, one_process_zero3, reference_run, steps,
    two_process_zero2,
)

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Loss tolerance. The runs do the same arithmetic on differently shaped work: a UNet forward over a batch
# of 2 vs two batches of 1 (other GEMM blockings), gradients summed in another order (gloo all-reduce /
# reduce-scatter vs one process), ZeRO-3 flat partitions vs full tensors in AdamW, activation checkpointing
# recomputing the forward. Each step's fp32 roundoff (~1e-7 relative) is amplified by Adam (an update
# divides by sqrt(v), so roundoff in near-zero gradient entries becomes weight differences of up to ~lr)
# and compounds over steps; measured over these 6 steps: <= 3e-7 relative (loss), <= 1.2e-6 (grad norm).
# 1e-5 leaves 30x headroom yet is 1000x below a real difference: one sample dropped, duplicated or given
# other noise changes a step's loss by 1-50% (the losses here range 0.18-0.52).
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = curated_shards(tmp_path_factory)
    a = one_process_zero3(tmp_path_factory, shards)
    b = two_process_zero2(tmp_path_factory, shards)
    c = reference_run(tmp_path_factory, "p2-zero3-actckpt",
                      [*base_args(shards), "data.batch_size=1", *ZERO3, "activation_checkpointing=true"],
                      nproc=2, module=[str(HERE / "ema_reference_launcher.py")])
    return {"A": a, "B": b, "C": c}


def test_two_processes_match_one_process_step_by_step(runs):
    ref = steps(metrics(runs["A"]))
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    for name in ("B", "C"):
        got = steps(metrics(runs[name]))
        assert sorted(got) == sorted(ref), name
        for s in ref:
            # the global batch is the same samples: the ranks' micro-batches together = A's micro-batch
            assert len(got[s]["keys"]) == 2 and len(ref[s]["keys"]) == 1
            assert sorted(got[s]["keys"][0] + got[s]["keys"][1]) == sorted(ref[s]["keys"][0]), (name, s)
            assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
            assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=LOSS_RTOL), (name, s)
            assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (name, s)
    losses = [ref[s]["loss"] for s in sorted(ref)]
    assert len(set(losses)) == len(losses)  # the comparison is not between constants


def _memory(out):
    return next(r for r in metrics(out) if r.get("event") == "memory")


def test_zero3_halves_parameter_and_optimizer_memory_per_rank(runs):
    one = _memory(runs["A"])["param_optim_bytes"]
    two = _memory(runs["C"])["param_optim_bytes"]
    assert len(one) == 1 and len(two) == 2
    ratios = [b / one[0] for b in two]
    # fp32 weight partition + fp32 master partition + 2 Adam moments, each split in two (+ padding)
    assert all(0.49 <= r <= 0.52 for r in ratios), ratios
    zero2 = _memory(runs["B"])["param_optim_bytes"]  # ZeRO-2 keeps full weights on every rank: 2.5 / 4
    assert all(0.6 <= b / one[0] <= 0.66 for b in zero2), [b / one[0] for b in zero2]


def _names_shapes():
    with torch.device("meta"):
        unet = I2VGenUNet(get_flavor("tiny"))
    return [(n, p.shape) for n, p in unet.named_parameters()]


def _state(out, rank):
    return torch.load(out / "checkpoints" / "step-00000006" / f"trainer_state_rank{rank}.pt", weights_only=True)


def test_ema_of_zero3_shards_equals_full_ema_and_is_what_gets_exported(runs):
    names = _names_shapes()
    # C (ZeRO-3, 2 ranks): each rank averaged only its own partition, about half of every tensor
    shards = [_state(runs["C"], r)["ema"]["shadow"] for r in (0, 1)]
    total = sum(shape.numel() for _, shape in names)
    local = [sum(t.numel() for t in s) for s in shards]
    assert sum(local) == total and max(local) <= total // 2 + len(names)
    full_c = {n: torch.cat([shards[0][i], shards[1][i]]).reshape(shape) for i, (n, shape) in enumerate(names)}
    # the reference EMA of C's FULL parameters (gathered every step by the test launcher) is the same,
    # to the bit: the update is elementwise, so sharding must not change a single value
    reference = load_file(runs["C"] / "ema_reference.safetensors")
    exported = load_file(runs["C"] / "export" / "unet" / "model.safetensors")
    assert set(reference) == set(exported) == set(full_c)
    for n in full_c:
        assert torch.equal(full_c[n], reference[n]), n
        assert torch.equal(exported[n], reference[n]), n  # the export is the EMA, gathered at export time
    # B (ZeRO-2) kept the EMA of full tensors; its export is that EMA and not the trained weights
    full_b = dict(zip([n for n, _ in names], _state(runs["B"], 0)["ema"]["shadow"]))
    exported_b = load_file(runs["B"] / "export" / "unet" / "model.safetensors")
    raw = torch.load(runs["B"] / "checkpoints" / "step-00000006" / "ds" / "mp_rank_00_model_states.pt",
                     weights_only=False, map_location="cpu")["module"]
    for n in full_b:
        assert torch.equal(exported_b[n], full_b[n]), n
    moved = [n for n in full_b if not torch.allclose(raw[n], full_b[n], rtol=1e-3, atol=1e-6)]
    assert len(moved) > len(names) // 2  # EMA decay 0.5 over 6 steps lags the weights visibly
    # across runs (1 vs 2 processes) the EMAs agree as closely as the weights do. Adam turns roundoff into
    # weight differences: m / sqrt(v) of an element whose gradient is mostly roundoff can differ by up to a
    # whole step, lr (1e-3), between runs; measured: all but 0-2 of 4.46 M elements within 2e-4, the worst
    # 4e-4. A slicing mistake moves a large share of elements by the size of the weights (~0.1).
    full_a = {n: t.reshape(shape) for (n, shape), t in zip(names, _state(runs["A"], 0)["ema"]["shadow"])}
    for other in (full_a, full_b):
        diffs = torch.cat([(full_c[n] - other[n].reshape(full_c[n].shape)).abs().flatten() for n in full_c])
        assert float(diffs.max()) <= 1e-3  # no element further apart than one step's update
        assert int((diffs > 2e-4).sum()) <= total // 100_000  # and all but a handful as close as the weights


# ------------------------------------------------------------------------------------- ZeRO-3 model build
def _start(out):
    return next(r for r in metrics(out) if r.get("event") == "start")


def _full_bytes() -> int:
    """fp32 bytes of the whole tiny UNet: what every rank held after the build before zero.Init."""
    return 4 * sum(shape.numel() for _, shape in _names_shapes())


def test_zero3_ranks_hold_half_of_the_weights_right_after_the_build(runs):
    full = _full_bytes()
    assert _start(runs["A"])["param_bytes_built"] == [full]  # 1 process: its partition is the whole model
    assert _start(runs["B"])["param_bytes_built"] == [full, full]  # ZeRO-2: every rank builds the full model
    two = _start(runs["C"])["param_bytes_built"]
    assert len(two) == 2 and all(0.49 <= b / full <= 0.52 for b in two), [b / full for b in two]


@pytest.fixture(scope="module")
def init_from(tmp_path_factory):
    """model.convert folders: the tiny UNet of seed 7 in fp16 (weights no seed-0 run starts from), and a
    copy missing one tensor."""
    root = tmp_path_factory.getbasetemp() / "init-from"
    good, bad = root / "seed7-fp16", root / "missing-tensor"
    if not (bad / OUR_WEIGHTS).is_file():
        ucfg = get_flavor("tiny")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            state = {k: v.half() for k, v in I2VGenUNet(ucfg).state_dict().items()}
        save_checkpoint(good, ucfg, state)
        del state["time_embed.linear_1.weight"]
        save_checkpoint(bad, ucfg, state)
    return good, bad


def test_zero3_build_gathers_to_the_weights_of_a_full_build(tmp_path, init_from):
    out, log = tmp_path / "check.json", tmp_path / "check.log"
    args = [str(out), str(init_from[0]), str(init_from[1]), "--config", TINY_BASE, "model.overrides.dropout=0.0",
            *ZERO3]
    rc = finish(launch(args, nproc=2, module=[str(HERE / "zero3_build_check.py")], log=log), timeout=400)
    assert rc == 0, log.read_text()[-4000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["tensors"] == len(_names_shapes()) and r["full_bytes"] == _full_bytes()
    for case in ("fp32", "init_from"):  # bit for bit, every tensor; each rank holds half after the build
        assert r[case]["mismatched"] == [], (case, r[case]["mismatched"][:5])
        assert all(0.49 <= b / r["full_bytes"] <= 0.52 for b in r[case]["built_bytes"]), (case, r[case])
    assert r["bf16"]["mismatched"] == [] and r["bf16"]["differs_from_fp32"]  # = the fp32 init cast to bf16
    assert all(0.24 <= b / r["full_bytes"] <= 0.26 for b in r["bf16"]["built_bytes"]), r["bf16"]
    assert r["init_from"]["differs_from_random"]  # the file's weights, not the seed's
    assert len(r["bad"]) == 2 and r["bad"][0] == r["bad"][1]  # every rank stops with the same error
    assert "model.init_from" in r["bad"][0] and "missing" in r["bad"][0]
    assert "time_embed.linear_1.weight" in r["bad"][0]


def test_init_from_trains_the_same_under_zero3_as_under_zero2(tmp_path_factory, init_from, runs):
    shards = curated_shards(tmp_path_factory)
    args = [*base_args(shards), "model.flavor=null", f"model.init_from={init_from[0]}", "max_steps=2"]
    zero3_out = reference_run(tmp_path_factory, "p2-zero3-init-from", [*args, "data.batch_size=1", *ZERO3], nproc=2)
    zero2_out = reference_run(tmp_path_factory, "p1-zero2-init-from",
                              [*args, "data.batch_size=2", "deepspeed.zero_stage=2"], nproc=1)
    zero3, zero2, seed0 = steps(metrics(zero3_out)), steps(metrics(zero2_out)), steps(metrics(runs["B"]))
    assert sorted(zero3) == sorted(zero2) == [1, 2]
    for s in (1, 2):
        assert sorted(zero3[s]["keys"][0] + zero3[s]["keys"][1]) == sorted(zero2[s]["keys"][0]), s
        assert zero3[s]["loss"] == pytest.approx(zero2[s]["loss"], rel=LOSS_RTOL), s
        assert zero3[s]["grad_norm"] == pytest.approx(zero2[s]["grad_norm"], rel=1e-4), s
    # the same samples as the seed-0 runs: a different loss comes from init_from's weights
    assert sorted(seed0[1]["keys"][0] + seed0[1]["keys"][1]) == sorted(zero2[1]["keys"][0])
    assert zero2[1]["loss"] != pytest.approx(seed0[1]["loss"], rel=1e-3)
    full = _full_bytes()
    assert all(0.49 <= b / full <= 0.52 for b in _start(zero3_out)["param_bytes_built"])
