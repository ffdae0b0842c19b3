"""Benchmark of training: the DeepSpeed step, the loader and ZeRO memory; on a GPU, ours vs diffusers' UNet.

    python -m bench.train                          # CPU, tiny-base recipe: the three ratios below
    python -m bench.train --device cuda --flavor base-448x256 --precision bf16      # the GPU must-show

Default run (CPU, configs/train/tiny-base.yaml), printed as a table, then one JSON line:
  zero2_vs_torch_time   one 1-process DeepSpeed ZeRO-2 training step of the tiny UNet over a plain torch
                        AdamW step of the same model (same weights, batch, frozen encoders and objective, the
                        same clipping and LR schedule); target <= 1.10. Both in ONE process, steps alternated
                        (order rotated each iteration) after warm-up steps; the median of the per-iteration
                        ratios (bench/model.py's reasoning: a shared machine's speed drifts between processes).
                        The DeepSpeed step is the trainer's own (training.trainer.build_engine + micro_step); the
                        torch step uses the trainer's AdamW settings (training.trainer.build_optimizer) and
                        clipping, so the ratio is DeepSpeed's own cost (bench/train_steps.py).
  loader_vs_step        samples/s of training.data.TrainLoader at the recipe's data settings (its workers,
                        image:video mix) on real shards from the curation job, over the samples/s the tiny
                        DeepSpeed step trains on those same micro-batches (each video / image micro-batch the
                        loader delivered costed at the median step time of its kind); target >= 4. The loader
                        is timed (after warm-up batches) in two halves, right before and after the step worker
                        (the second with the next seed: other draws of the same shards).
  zero3_vs_zero2_mem_per_rank  parameter + optimizer bytes per rank of the real trainer run by torchrun with
                        2 processes (`python -m training.train`, a few steps), ZeRO-3 over ZeRO-2, from the
                        `"event": "memory"` line the trainer writes to OUTPUT/metrics.jsonl (the largest rank of
                        each). ZeRO-3 is run as a large model has it: every parameter sharded (tests/integration
                        ZERO3: the tiny UNet's tensors are all under DeepSpeed's persistence threshold). Also
                        the peak RSS of the largest process of each job (wait4 rusage).
The shards: --shards (a curation OUT folder), default out/curate-sample, curated from tests/assets/sample
first when missing (as the Makefile does).

--vs-diffusers (implied by --device cuda): ours vs diffusers' I2VGenXLUNet of the equal config in the same
DeepSpeed training step (same batch, frames, encoders, objective; activation checkpointing off for both,
since diffusers' I2VGenXLUNet has none, unless --set activation_checkpointing=true): step time (each
variant in its own process, --rounds of them; and the paired ratio, both in one process, steps alternated),
peak memory (CUDA max_memory_allocated of the process; CPU: peak RSS), FLOPs per step (FlopCounterMode over
one fwd + bwd of each UNet, bench/train_steps.py) and MFU = FLOPs / step time / the device's peak dense
FLOP/s (PEAK_TFLOPS for bf16, else --peak-tflops). Ours skips arithmetic diffusers does (per-clip K/V
of the cross-attention context, folded GEGLU projections), so ours' count is lower; ours_mfu uses ours'
own count (no credit for skipped work), ours_mfu_reference_flops diffusers' count. Goals: ours/diffusers
step time <= 0.8, ours_mfu >= 40%. The frozen encoders are tiny random stand-ins sized to the UNet (the
GPU machine has no ViT-H/VAE weights; both variants share them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.train_runs import DEFAULT_SHARDS, REPO, bench_env, ensure_shards, measure_loader, zero_memory

PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}  # bf16 dense, vendor sheets
GPU_COMMAND = ("set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
               "--upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; "
               "PYTHONUNBUFFERED=1 python3 -m bench.train --vs-diffusers --device cuda --flavor base-448x256 "
               "--precision bf16 "
               "2>&1 | tee $OUT/bench-train.log")
GPU_HOW = ("device tool `run`, carry [\".whl\"] (filled by ../shared/gpu/wheelhouse.sh in the repo root), "
           "timeout_s 600")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.train_steps import FLAVOR_RECIPES

    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--vs-diffusers", action="store_true", help="ours vs diffusers' UNet (implied by --device cuda)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--flavor", default="tiny", choices=sorted(FLAVOR_RECIPES), help="recipe by UNet flavour")
    p.add_argument("--config", help="a training recipe instead of the flavour's (configs/train/*.yaml)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, repeatable (e.g. --set data.batch_size=2)")
    p.add_argument("--shards", help=f"curation OUT folder for the loader and trainer runs (default {DEFAULT_SHARDS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each own-process run (--vs-diffusers)")
    p.add_argument("--rounds", type=int, default=1, help="own-process runs per variant (--vs-diffusers)")
    p.add_argument("--paired-steps", type=int, default=8, help="iterations of the paired run (0 skips it in "
                   "--vs-diffusers; the default run needs it)")
    p.add_argument("--loader-warmup", type=int, default=4, help="loader micro-batches before timing")
    p.add_argument("--loader-batches", type=int, default=30, help="timed loader micro-batches (two halves)")
    p.add_argument("--mem-steps", type=int, default=1, help="optimizer steps of each torchrun trainer job")
    p.add_argument("--peak-tflops", type=float, help="device peak dense FLOP/s in TFLOP/s for MFU (default: "
                   f"the bf16 table {PEAK_TFLOPS})")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the step workers (0 = default)")
    p.add_argument("--workdir", help="folder for the trainer jobs' outputs (default: a temporary one, removed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # worker mode: comma list of bench.train_steps variants
    p.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recipe = str(Path(args.config).resolve() if args.config else REPO / FLAVOR_RECIPES[args.flavor])
    for name in ("warmup", "steps", "rounds", "paired_steps", "loader_warmup", "loader_batches"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.mem_steps < 1 or args.loader_batches < 1 or args.steps < 1:
        p.error("--steps, --mem-steps and --loader-batches must be >= 1")
    return args


def worker_main(args: argparse.Namespace) -> None:
    from bench.train_steps import VARIANTS, bench_config, measure_steps

    names = args.worker.split(",")
    if any(n not in VARIANTS for n in names):
        raise SystemExit(f"unknown variant in {names}; valid: {sorted(VARIANTS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = bench_config(args.recipe, args.overrides, device=args.device, precision=args.precision)
    result = measure_steps(cfg, names, warmup=args.warmup, iterations=args.iterations, flops=args.flops)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(args: argparse.Namespace, names: list[str], iterations: int, flops: bool = False) -> dict:
    """Run `names` in a fresh process (bench/train_steps.py) and return its RESULT."""
    cmd = [sys.executable, "-m", "bench.train", f"--device={args.device}", f"--config={args.recipe}",
           f"--precision={args.precision}", f"--warmup={args.warmup}", f"--threads={args.threads}",
           *[f"--set={o}" for o in args.overrides], f"--worker={','.join(names)}", f"--iterations={iterations}"]
    if flops:
        cmd.append("--flops")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=bench_env())
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"worker {','.join(names)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------ helpers
def median_ratio(a: list[float], b: list[float]) -> tuple[float, list[float]]:
    """Median of the per-iteration ratios a[i] / b[i], and the ratios."""
    ratios = [x / y for x, y in zip(a, b)]
    return statistics.median(ratios), ratios


def peak_tflops(device_name: str, dtype: str, override: float | None) -> float | None:
    """--peak-tflops, else the bf16 dense peak of a known GPU (first matching name), else None."""
    if override:
        return override
    if dtype != "bfloat16":
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -------------------------------------------------------------------------------------- the two runs
def default_run(args: argparse.Namespace) -> dict[str, Any]:
    """zero2_vs_torch_time, loader_vs_step, zero3_vs_zero2_mem_per_rank (module docstring)."""
    if args.paired_steps < 1:
        raise SystemExit("the default run needs --paired-steps >= 1")
    shards = ensure_shards(args.shards)
    # the loader is timed in two halves, right before and right after the step worker, so that a drift of
    # the shared machine's speed between the two measurements is averaged out (and seen: `halves`); the
    # second half runs with the next seed, so it reads other draws (order, start frames, fps, crops)
    first = (args.loader_batches + 1) // 2
    halves = [measure_loader(args.recipe, args.overrides, shards, warmup=args.loader_warmup, batches=first)]
    paired = run_worker(args, ["ds", "torch", "ds-image"], args.paired_steps)
    t, med = paired["times"], paired["median_s"]
    ratio, per_iter = median_ratio(t["ds"], t["torch"])
    print(f"paired steps: ds {med['ds']:.3f} s  torch {med['torch']:.3f} s  ds-image {med['ds-image']:.3f} s",
          flush=True)
    if args.loader_batches > first:
        halves.append(measure_loader(args.recipe, args.overrides, shards, warmup=args.loader_warmup,
                                     batches=args.loader_batches - first, seed_offset=1))
    loader = {**halves[0], "time_s": sum(h["time_s"] for h in halves),
              "kinds": [k for h in halves for k in h["kinds"]], "sizes": [n for h in halves for n in h["sizes"]],
              "samples": sum(h["samples"] for h in halves),
              "skipped": {r: sum(h["skipped"].get(r, 0) for h in halves) for h in halves for r in h["skipped"]},
              "halves_samples_per_s": [h["samples"] / h["time_s"] for h in halves]}
    step_time = sum(med["ds" if k == "video" else "ds-image"] for k in loader["kinds"])
    loader_rate, step_rate = loader["samples"] / loader["time_s"], loader["samples"] / step_time
    print(f"loader: {loader['samples']} samples in {loader['time_s']:.2f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        mem = {}
        for stage in (2, 3):
            mem[stage] = zero_memory(args.recipe, args.overrides, shards, stage=stage, steps=args.mem_steps,
                                     device=args.device, workdir=workdir)
            print(f"ZeRO-{stage} 2 processes: param+optim per rank {mem[stage]['param_optim_bytes']}", flush=True)
    z2, z3 = max(mem[2]["param_optim_bytes"]), max(mem[3]["param_optim_bytes"])
    p2, o2 = max(mem[2]["param_bytes"]), max(mem[2]["optim_bytes"])
    return {
        "zero2_vs_torch_time": ratio, "ds_step_s": med["ds"], "torch_step_s": med["torch"],
        "ds_image_step_s": med["ds-image"], "zero2_vs_torch_time_per_iteration": per_iter,
        "loader_vs_step": loader_rate / step_rate, "loader_samples_per_s": loader_rate,
        "step_samples_per_s": step_rate, "loader": loader,
        "zero3_vs_zero2_mem_per_rank": z3 / z2, "zero2_param_optim_bytes_per_rank": z2,
        "zero3_param_optim_bytes_per_rank": z3, "memory_runs": {f"zero{s}": m for s, m in mem.items()},
        "zero3_vs_zero2_if_params_halved": (p2 / 2 + o2) / (p2 + o2),
        "shards": str(shards), "paired_iterations": args.paired_steps, "threads": paired["threads"],
        "params": paired["info"]["ds"]["params"], "batch": paired["batch"], "dtype": paired["dtype"],
    }


def _variant(name: str, own: list[dict], paired: dict | None, info: dict, peak: float | None) -> dict[str, Any]:
    """One UNet's figures: step time (median over its own-process runs, else the paired run), memory (its
    own-process runs), FLOPs per step and MFU."""
    own_times = [t for run in own for t in run["times"][name]]
    step = statistics.median(own_times or (paired["times"][name] if paired else [math.nan]))
    memory = [run["memory"] for run in own]
    flops = info.get("flops")
    return {"step_s": step, "step_s_source": "own process" if own_times else "paired",
            "paired_step_s": paired["median_s"][name] if paired else None,
            "peak_bytes": max((m["peak_bytes"] for m in memory), default=None),
            "step_peak_bytes": max((m["step_peak_bytes"] for m in memory if "step_peak_bytes" in m), default=None),
            "flops_per_step": flops, "flops_by_op": info.get("flops_by_op"), "params": info.get("params"),
            "mfu": mfu(flops, step, peak)}


def mfu(flops: int | None, step_s: float, peak: float | None) -> float | None:
    """flops / step_s over the peak (TFLOP/s); None without FLOPs, a peak or a finite step time."""
    return flops / step_s / (peak * 1e12) if flops and peak and math.isfinite(step_s) else None


def diffusers_run(args: argparse.Namespace) -> dict[str, Any]:
    """Ours vs diffusers' UNet in the DeepSpeed step: time, memory, FLOPs, MFU (module docstring). A run that
    fails (say out of GPU memory) is reported and the others still count."""
    if not any(o.split("=")[0] == "activation_checkpointing" for o in args.overrides):
        args.overrides = [*args.overrides, "activation_checkpointing=false"]
    names = ["ds", "diffusers"]
    own: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(args.rounds):
        for n in names:
            try:
                own[n].append(run_worker(args, [n], args.steps, flops=not own[n]))
                print(f"round {r + 1} {n:<10} step {own[n][-1]['median_s'][n]:.3f} s  "
                      f"peak {gib(own[n][-1]['memory'].get('peak_bytes'))}", flush=True)
            except RuntimeError as exc:
                errors[f"{n} round {r + 1}"] = str(exc)[-1500:]
                print(f"round {r + 1} {n}: FAILED\n{exc}", flush=True)
    paired = None
    if args.paired_steps:
        try:
            paired = run_worker(args, names, args.paired_steps, flops=not all(own.values()))
        except RuntimeError as exc:
            errors["paired"] = str(exc)[-1500:]
            print(f"paired run: FAILED\n{exc}", flush=True)
    runs = [*(run for n in names for run in own[n]), *([paired] if paired else [])]
    if not runs:
        raise SystemExit("every run failed:\n" + "\n".join(errors.values()))
    info = {n: next((run["info"][n] for run in runs if "flops" in run["info"].get(n, {})), {}) for n in names}
    meta = runs[0]
    peak = peak_tflops(meta["device_name"], meta["dtype"], args.peak_tflops)
    res = {n: _variant(n, own[n], paired, info[n], peak) for n in names}
    o, d = res["ds"], res["diffusers"]
    if paired:
        ratio, per_iter = median_ratio(paired["times"]["ds"], paired["times"]["diffusers"])
    else:
        ratio, per_iter = o["step_s"] / d["step_s"], []
    methods = [run["memory"]["method"] for n in names for run in own[n]]
    return {
        "ours_vs_diffusers_time": ratio, "ours_vs_diffusers_time_per_iteration": per_iter,
        "time_ratio_method": "paired (one process, steps alternated)" if paired else "separate processes",
        "ours_step_s": o["step_s"], "diffusers_step_s": d["step_s"],
        "ours_peak_bytes": o["peak_bytes"], "diffusers_peak_bytes": d["peak_bytes"],
        "ours_flops_per_step": o["flops_per_step"], "diffusers_flops_per_step": d["flops_per_step"],
        "ours_mfu": o["mfu"], "diffusers_mfu": d["mfu"],
        "ours_mfu_reference_flops": mfu(d["flops_per_step"], o["step_s"], peak), "peak_tflops": peak,
        "memory_method": methods[0] if methods else None,
        "results": {"ours" if n == "ds" else n: r for n, r in res.items()}, "errors": errors,
        "device_name": meta["device_name"], "dtype": meta["dtype"], "batch": meta["batch"],
        "zero_stage": meta["zero_stage"], "activation_checkpointing": meta["activation_checkpointing"],
        "threads": meta["threads"], "rounds": args.rounds, "paired_iterations": args.paired_steps if paired else 0,
    }


# --------------------------------------------------------------------------------------------- output
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_default(r: dict[str, Any]) -> None:
    b = r["batch"]
    lo, hi = min(r["zero2_vs_torch_time_per_iteration"]), max(r["zero2_vs_torch_time_per_iteration"])
    ld, m2, m3 = r["loader"], r["memory_runs"]["zero2"], r["memory_runs"]["zero3"]
    kinds = f"{ld['kinds'].count('video')} video + {ld['kinds'].count('image')} image micro-batches"
    print(f"\nbench.train on cpu: {Path(r['recipe']).name}, {r['params']:,} UNet params, {r['dtype']}, video "
          f"micro-batch {b['video'][0]} x {b['video'][1]} frames {b['video'][2]}x{b['video'][3]}, torch threads "
          f"{r['threads']}, load average {r['load_average_start']} -> {r['load_average_end']}")
    print(f"{'key':<30}{'value':>8}  {'target':<8}  how")
    rows = [
        ("zero2_vs_torch_time", r["zero2_vs_torch_time"], "<= 1.10",
         f"DeepSpeed ZeRO-2 step {r['ds_step_s']:.3f} s vs torch AdamW step {r['torch_step_s']:.3f} s (one process, "
         f"alternated, median of {r['paired_iterations']} per-iteration ratios, {lo:.2f}-{hi:.2f})"),
        ("loader_vs_step", r["loader_vs_step"], ">= 4",
         f"TrainLoader {r['loader_samples_per_s']:.1f} samples/s (halves before/after the steps "
         f"{'/'.join(f'{x:.1f}' for x in ld['halves_samples_per_s'])}; {ld['num_workers']} worker(s), {kinds}, "
         f"skipped {sum(ld['skipped'].values())}) vs DeepSpeed step {r['step_samples_per_s']:.2f} samples/s on them "
         f"(image step {r['ds_image_step_s']:.3f} s)"),
        ("zero3_vs_zero2_mem_per_rank", r["zero3_vs_zero2_mem_per_rank"], "",
         f"param+optim per rank at 2 processes: ZeRO-3 {gib(r['zero3_param_optim_bytes_per_rank'])} "
         f"(params {gib(max(m3['param_bytes']))}, optim {gib(max(m3['optim_bytes']))}) vs ZeRO-2 "
         f"{gib(r['zero2_param_optim_bytes_per_rank'])} (params {gib(max(m2['param_bytes']))}, optim "
         f"{gib(max(m2['optim_bytes']))}: ZeRO-2 splits the optimizer state already, so ZeRO-3 halving the "
         f"params gives {r['zero3_vs_zero2_if_params_halved']:.3f}); largest process peak RSS "
         f"{gib(m3['peak_rss_bytes'])} vs {gib(m2['peak_rss_bytes'])}"),
    ]
    for key, value, target, how in rows:
        print(f"{key:<30}{value:>8.3f}  {target:<8}  {how}")


def print_diffusers(r: dict[str, Any]) -> None:
    b = r["batch"]["video"]
    print(f"\nbench.train --vs-diffusers on {r['device_name']}: {Path(r['recipe']).name}, {r['dtype']}, ZeRO-"
          f"{r['zero_stage']}, micro-batch {b[0]} x {b[1]} frames {b[2]}x{b[3]} px, activation checkpointing "
          f"{r['activation_checkpointing']}, peak {_fmt(r['peak_tflops'], '.1f')} TFLOP/s, threads {r['threads']}, "
          f"load average {r['load_average_start']} -> {r['load_average_end']}")
    print(f"{'UNet':<11}{'params':>15}{'step s':>9}{'paired s':>10}{'peak mem':>14}{'step mem':>14}"
          f"{'TFLOP/step':>12}{'MFU':>8}")
    for name, v in r["results"].items():
        flops = "-" if v["flops_per_step"] is None else f"{v['flops_per_step'] / 1e12:.4f}"
        print(f"{name:<11}{_fmt(v['params'], ',d'):>15}{_fmt(v['step_s']):>9}{_fmt(v['paired_step_s']):>10}"
              f"{gib(v['peak_bytes']):>14}{gib(v['step_peak_bytes']):>14}{flops:>12}{_pct(v['mfu']):>8}")
    ratio = r["ours_vs_diffusers_time"]
    no_peak = "; no peak FLOP/s known for this device: give --peak-tflops" if r["peak_tflops"] is None else ""
    print(f"ours / diffusers step time {_fmt(ratio)} ({r['time_ratio_method']}; goal <= 0.8); ours MFU "
          f"{_pct(r['ours_mfu'])} on its own FLOPs, {_pct(r['ours_mfu_reference_flops'])} on diffusers' "
          f"(goal >= 40%{no_peak})")
    print(f"peak mem: {r['memory_method']}; step mem (cuda): one step's peak above the memory allocated before "
          f"it; step s: {r['results']['ours']['step_s_source']} median")
    for where, err in r["errors"].items():
        print(f"FAILED {where}: {err.splitlines()[-1] if err else ''}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    if args.device == "cuda" and not args.vs_diffusers:
        print("--device cuda: running --vs-diffusers (the default run's ZeRO memory jobs are a CPU measurement)")
        args.vs_diffusers = True
    start = load_average()
    result = diffusers_run(args) if args.vs_diffusers else default_run(args)
    result.update(bench="train", mode="vs-diffusers" if args.vs_diffusers else "default", device=args.device,
                  recipe=args.recipe, overrides=args.overrides, load_average_start=start,
                  load_average_end=load_average(), gpu_command=GPU_COMMAND)
    (print_diffusers if args.vs_diffusers else print_default)(result)
    print(f"GPU must-show ({GPU_HOW}):\n  {GPU_COMMAND}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
