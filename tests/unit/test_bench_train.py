"""`python -m bench.train` at tiny settings on CPU: its last line is JSON with the must-show keys, every ratio
finite and positive, and the FLOP counts of the GPU must-show mode are sound. No timing is asserted (the
machine is shared); the benchmark runs as a user runs it, in subprocesses with real DeepSpeed and torchrun.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_shards import image_sample, video_sample, write_tar

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def bench(*args: str) -> tuple[dict, str]:
    """Run the benchmark; (its last line as JSON, its whole stdout)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "bench.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1100)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_default_run_reports_the_three_ratios(tmp_path):
    out = tmp_path / "curated"  # a curation OUT folder's layout, shards built in code from a real clip
    write_tar(out / "shards" / "video-000000.tar", [video_sample(f"v{i}", offset=i) for i in range(4)])
    write_tar(out / "shards" / "image-000000.tar", [image_sample(f"i{i}", frame=i) for i in range(2)])
    r, stdout = bench("--shards", str(out), "--paired-steps", "2", "--warmup", "0", "--loader-warmup", "1",
                      "--loader-batches", "3", "--workdir", str(tmp_path / "work"))
    assert r["bench"] == "train" and r["mode"] == "default"
    for key in ("zero2_vs_torch_time", "loader_vs_step", "zero3_vs_zero2_mem_per_rank", "ds_step_s", "torch_step_s",
                "ds_image_step_s", "loader_samples_per_s", "step_samples_per_s", "zero2_param_optim_bytes_per_rank",
                "zero3_param_optim_bytes_per_rank"):
        assert positive(r[key]), (key, r[key])
    table = stdout.splitlines()[:-1]
    for key in ("zero2_vs_torch_time", "loader_vs_step", "zero3_vs_zero2_mem_per_rank"):
        assert any(line.startswith(key) for line in table), key  # a row of the table, not only JSON
    assert len(r["zero2_vs_torch_time_per_iteration"]) == 2
    loader = r["loader"]
    assert len(loader["kinds"]) == 3 and loader["samples"] == sum(loader["sizes"]) > 0
    assert len(loader["halves_samples_per_s"]) == 2  # timed before and after the step worker
    assert loader["num_workers"] == 1  # the tiny-base recipe's loader settings
    for stage in ("zero2", "zero3"):  # both ranks of both torchrun jobs reported their memory
        run = r["memory_runs"][stage]
        assert len(run["param_optim_bytes"]) == 2 and all(positive(b) for b in run["param_optim_bytes"])
        assert positive(run["peak_rss_bytes"])
    # ZeRO-3 splits the parameters that ZeRO-2 keeps whole on each rank; the optimizer state both split
    z2, z3 = r["memory_runs"]["zero2"], r["memory_runs"]["zero3"]
    assert max(z3["param_bytes"]) < max(z2["param_bytes"])
    assert r["zero3_vs_zero2_mem_per_rank"] < 1
    assert (tmp_path / "work" / "zero3" / "metrics.jsonl").is_file()
    assert "--device cuda --flavor base-448x256 --precision bf16" in r["gpu_command"]


def test_vs_diffusers_mode_counts_flops_of_both_unets():
    # each UNet in a process of its own (memory, FLOPs, time); the paired worker is the default run's above
    r, stdout = bench("--vs-diffusers", "--device", "cpu", "--flavor", "tiny", "--rounds", "1", "--steps", "1",
                      "--warmup", "0", "--paired-steps", "0", "--peak-tflops", "1")
    assert r["mode"] == "vs-diffusers" and not r["errors"] and r["time_ratio_method"] == "separate processes"
    for key in ("ours_vs_diffusers_time", "ours_step_s", "diffusers_step_s", "ours_peak_bytes", "diffusers_peak_bytes",
                "ours_flops_per_step", "diffusers_flops_per_step", "ours_mfu", "diffusers_mfu",
                "ours_mfu_reference_flops"):
        assert positive(r[key]), (key, r[key])
    assert r["activation_checkpointing"] is False  # diffusers' I2VGenXLUNet has none: off for both
    ours, diffusers = r["results"]["ours"], r["results"]["diffusers"]
    assert ours["params"] == diffusers["params"]  # the equal config
    for v in (ours, diffusers):
        # attention is counted (torch has no formula for CPU's flash op; the bench adds the GPU kernels' rule)
        assert sum(n for op, n in v["flops_by_op"].items() if "attention" in op) > 0
        assert sum(v["flops_by_op"].values()) == v["flops_per_step"]
        assert v["flops_per_step"] % r["batch"]["video"][0] == 0  # counted on one sample, times the batch
        assert math.isclose(v["mfu"], v["flops_per_step"] / v["step_s"] / 1e12)
    # the same network, but ours skips arithmetic diffusers does (per-clip K/V of the context, folded GEGLU)
    assert 0.5 * diffusers["flops_per_step"] < ours["flops_per_step"] < diffusers["flops_per_step"]
    assert "GPU must-show" in stdout
