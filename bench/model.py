"""Benchmark: our I2VGenUNet vs diffusers' I2VGenXLUNet, same config and weights, fwd+bwd time and peak memory.

    python -m bench.model                                   # CPU, small-but-real config (see BENCH_CPU)
    python -m bench.model --device cuda --flavor base-448x256 --dtype bf16 --frames 16

Two measurements, both printed:
  paired   (the headline time ratio) all variants in ONE process, their steps alternated (order rotated
           each iteration); the ratio is taken within each iteration, then its median. On a shared machine
           (this project's 2-core VMs) the speed of a whole process drifts by +-10% from run to run, which
           swamped the separate-process ratio (one variant's process could land in a slow spell); steps run
           back to back see the same machine. They also share one allocator, which seems to favour ours
           (0.89-0.90x here against 0.97-0.98x own-proc, measured 2026-11-30): read both.
  own-proc each variant in its own subprocess (fresh allocator, nothing shared), `--rounds` of them
           interleaved: peak memory (the largest), and the separate-process step time.
Two warm-up steps by default: on CPU diffusers' second step is often ~15% slower than its later ones (ours
settles after one), so timing from the second step on flattered ours.
Both models get the same randomly initialised weights (diffusers' init, converted with model.convert),
the same inputs, train mode (dropout on) and one fwd + bwd of mean(out^2) per step.

Peak memory = activations + temporaries of one fwd+bwd step, excluding weights, grads and inputs:
  cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the allocated baseline.
  cpu : the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set
        before the step. For that one extra step glibc is switched (mallopt) to mmap every allocation
        >= 64 KiB and trimmed first, so freed tensors go straight back to the OS and the RSS follows live
        tensor memory; the timed steps before it run with the default allocator. Grads are pre-allocated
        before the baseline so they are not counted.
The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time

from common.dtypes import ALIASES, DTYPES, dtype_of

BENCH_CPU = dict(  # "tiny" scaled up: every block type, real channel counts at the top level
    block_out_channels=(64, 128, 256, 256), attention_head_dim=32, cross_attention_dim=256,
    image_embed_dim=256, norm_num_groups=32,
)
VARIANTS = {
    "diffusers": "diffusers I2VGenXLUNet (eager)",
    "ours": "ours, defaults (fused recompute of norm/act/dropout/GEGLU)",
    "ours-plain": "ours without selective recompute",
    "ours-cl": "ours defaults + channels-last activations",
    "ours-ckpt": "ours + full per-block activation checkpointing",
    "ours-compile": "ours defaults + torch.compile",
}


def _config(args):
    from model.config import get_flavor

    if args.flavor == "bench-cpu":
        return get_flavor("tiny", **BENCH_CPU)
    return get_flavor(args.flavor)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_variant(args, variant: str):
    """(model, step function) of one variant: the same weights (diffusers' init from seed 0, converted for
    ours), the same inputs, grads pre-allocated; `step()` runs one fwd + bwd."""
    import torch
    from diffusers import I2VGenXLUNet

    from model.convert import config_to_diffusers, state_dict_from_diffusers
    from model.unet import I2VGenUNet, build_image_latents

    dev = torch.device(args.device)
    dtype = dtype_of(args.dtype)
    cfg = _config(args)
    dcfg = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    torch.manual_seed(0)  # every variant regenerates the same weights the same way
    ref = I2VGenXLUNet(**dcfg)
    if variant == "diffusers":
        model = ref
    else:
        model = I2VGenUNet(cfg)
        model.load_state_dict(state_dict_from_diffusers(ref.state_dict()))
        del ref
        if variant == "ours-plain":
            model.enable_selective_recompute(False)
        if variant == "ours-cl":
            model.set_channels_last(True)
        if variant == "ours-ckpt":
            model.enable_gradient_checkpointing(True)
    model = model.to(dev, dtype).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    b, f, h, w = args.batch, args.frames, args.height, args.width
    g = torch.Generator().manual_seed(1)
    inp = dict(
        sample=torch.randn(b, cfg.in_channels, f, h, w, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
        fps=torch.full((b,), 8),
        image_latents=build_image_latents(torch.randn(b, 4, h, w, generator=g), f),
        image_embeddings=torch.randn(b, cfg.image_embed_dim, generator=g),
        encoder_hidden_states=torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
    )
    inp = {k: v.to(dev, dtype) if v.is_floating_point() else v.to(dev) for k, v in inp.items()}
    fwd = torch.compile(model) if variant == "ours-compile" else model

    def step():
        out = fwd(**inp, return_dict=False)[0] if variant == "diffusers" else fwd(**inp)
        out.float().square().mean().backward()

    return model, step


def _sync(args):
    import torch

    return torch.cuda.synchronize if args.device == "cuda" else (lambda: None)


def worker(args) -> dict:
    """Build one variant, run warm-up + timed steps and the memory step, return its numbers (runs inside a
    subprocess of its own)."""
    import torch

    dev = torch.device(args.device)
    model, step = build_variant(args, args.variant)
    sync = _sync(args)
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: big blocks are mmapped and unmapped on free
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: return freed heap tops at once
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
        step()
        peak = _rss_kib("VmHWM") * 1024 - base
    return {"variant": args.variant, "times": times, "cpu_times": cpu_times, "peak_bytes": peak,
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


def paired_worker(args) -> dict:
    """Every variant in ONE process, their steps alternated: each iteration times one step of every variant
    back to back (the order rotated every iteration), so a slow spell of a shared machine hits them alike and
    the ratio within an iteration stays meaningful. No memory here (the variants share one allocator)."""
    import torch

    variants = args.paired.split(",")
    steps = {v: build_variant(args, v)[1] for v in variants}
    sync = _sync(args)
    for v in variants:
        for _ in range(args.warmup):
            steps[v]()
    sync()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.paired_steps):
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:
            t0 = time.perf_counter()
            steps[v]()
            sync()
            times[v].append(time.perf_counter() - t0)
    return {"times": times, "threads": torch.get_num_threads()}


def _run_worker(passthrough: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.model", *passthrough, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{' '.join(extra)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--flavor", default="bench-cpu", help="bench-cpu (default) or a model.config flavour")
    parser.add_argument("--dtype", default="fp32", choices=[*ALIASES, *DTYPES])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=32, help="latent height")
    parser.add_argument("--width", type=int, default=32, help="latent width")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per own-process run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (see the module docstring)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved repetitions of every variant in a process of its own (memory, and "
                             "the separate-process time)")
    parser.add_argument("--paired-steps", type=int, default=6,
                        help="iterations of the paired run (every variant in one process, steps alternated: "
                             "the headline time ratio); 0 skips it")
    parser.add_argument("--variants", default="diffusers,ours,ours-plain,ours-ckpt",
                        help=f"comma list from {sorted(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch default)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # worker mode: one variant
    parser.add_argument("--paired", help=argparse.SUPPRESS)  # worker mode: these variants, steps alternated
    args = parser.parse_args(argv)
    if args.variant or args.paired:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(worker(args) if args.variant else paired_worker(args)))
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "diffusers" not in variants:
        raise SystemExit(f"--variants must include diffusers and use names from {sorted(VARIANTS)}; bad: {unknown}")
    passthrough = [f"--{k}={getattr(args, k)}" for k in
                   ("device", "flavor", "dtype", "batch", "frames", "height", "width", "steps", "warmup", "threads")]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            runs[v].append(_run_worker(passthrough, ["--variant", v]))
            print(f"round {r + 1} {v:<13} step {statistics.median(runs[v][-1]['times']):7.3f} s wall "
                  f"{statistics.median(runs[v][-1]['cpu_times']):7.3f} s cpu  "
                  f"peak {runs[v][-1]['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    paired = None
    if args.paired_steps > 0:
        paired = _run_worker(passthrough, [f"--paired-steps={args.paired_steps}", "--paired", ",".join(variants)])
        print("paired run: " + "  ".join(f"{v} {statistics.median(t):.3f} s" for v, t in paired["times"].items()),
              flush=True)

    summary = {}
    for v, rs in runs.items():
        summary[v] = {"separate_time_s": statistics.median(t for r in rs for t in r["times"]),
                      "cpu_time_s": statistics.median(t for r in rs for t in r["cpu_times"]),
                      "peak_mib": max(r["peak_bytes"] for r in rs) / 2**20, "params": rs[0]["params"]}
    base = summary["diffusers"]
    for v, s in summary.items():
        s["separate_time_ratio"] = s["separate_time_s"] / base["separate_time_s"]
        s["cpu_time_ratio"] = s["cpu_time_s"] / base["cpu_time_s"]
        s["mem_ratio"] = s["peak_mib"] / base["peak_mib"]
        if paired:
            # one ratio per iteration (both steps ran back to back there), then their median
            s["paired_time_s"] = statistics.median(paired["times"][v])
            s["time_ratio_per_iteration"] = [a / d for a, d in zip(paired["times"][v], paired["times"]["diffusers"])]
            s["time_ratio"] = statistics.median(s["time_ratio_per_iteration"])
        else:
            s["time_ratio"] = s["separate_time_ratio"]
    print(f"\nconfig {args.flavor} {args.dtype} on {args.device}: B={args.batch} F={args.frames} "
          f"latent {args.height}x{args.width}, {base['params']:,} params, threads {runs['diffusers'][0]['threads']}")
    print(f"{'variant':<14}{'paired s':>9}{'x diff':>8}{'iterations':>12}{'own-proc s':>11}{'x diff':>8}"
          f"{'cpu x':>7}{'peak MiB':>10}{'x diff':>8}  what")
    for v, s in summary.items():
        if paired:
            per = s["time_ratio_per_iteration"]
            head = f"{s['paired_time_s']:>9.3f}{s['time_ratio']:>8.2f}{f'{min(per):.2f}-{max(per):.2f}':>12}"
        else:
            head = f"{'-':>9}{'-':>8}{'-':>12}"
        print(f"{v:<14}{head}{s['separate_time_s']:>11.3f}{s['separate_time_ratio']:>8.2f}{s['cpu_time_ratio']:>7.2f}"
              f"{s['peak_mib']:>10.1f}{s['mem_ratio']:>8.2f}  {VARIANTS[v]}")
    print("(paired = all variants in one process, steps alternated; x diff there = median of the per-iteration "
          "ratios, iterations = their lowest-highest. own-proc = each variant in its own process, --rounds of them "
          "(where peak memory is measured); cpu x = its process CPU time ratio)")
    print(json.dumps({"bench": "model", "device": args.device, "dtype": args.dtype, "flavor": args.flavor,
                      "batch": args.batch, "frames": args.frames, "latent": [args.height, args.width],
                      "memory_method": "cuda max_memory_allocated" if args.device == "cuda" else "VmHWM-VmRSS, mallopt mmap>=64KiB for the memory step",
                      "time_ratio_method": "paired (one process, steps alternated)" if paired else "separate processes",
                      "results": summary}))


if __name__ == "__main__":
    main()
