"""bench.curation's CPU accounting on real processes (no Ray): roles from command lines, CPU by role."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.curation import CpuMeter, children_cpu, process_role

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\ntime.sleep({idle})\n"


def test_roles_from_command_lines():
    assert process_role("/venv/bin/python -m pipeline.curate --input x --output y") == "driver"
    assert process_role("/venv/bin/python -m curation.decode_worker") == "decoders"
    assert process_role("ray::MapWorker(MapBatches(ProcessSources))") == "stage-1 actors"
    assert process_role("ray::MapWorker(MapBatches(ScoreClips))") == "open_clip actors"
    assert process_role("ray::_StatsActor") == "Ray Data service actors"
    assert process_role("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x") == \
        "Ray (services, idle workers)"


def test_meter_counts_children_from_the_start_and_splits_at_the_mark():
    """A process's CPU before start() is not counted; a grandchild is found; what a process born after
    mark() spends is `after`."""
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.4, idle=0.3) + (
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.6, idle=0.4)!r}])\n"
        "time.sleep(30)\n")])
    try:
        proc = psutil.Process(parent.pid)
        while sum(proc.cpu_times()[:2]) < 0.4:  # the parent's own burn is over before the meter starts
            time.sleep(0.02)
        meter = CpuMeter([parent.pid], interval=0.05).start()
        while not proc.children():  # the grandchild starts after the parent's 0.3 s idle
            time.sleep(0.02)
        while proc.children():  # ... burns 0.6 s, idles 0.4 s (the meter sees its final CPU) and exits
            time.sleep(0.02)
        meter.mark()
        burn_after = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.3, idle=0.3)])
        meter.add_root(burn_after.pid)
        burn_after.wait()
        before, after = meter.stop()
    finally:
        parent.kill()
        parent.wait()
    assert 0.6 <= sum(before.values()) < 0.6 + 0.4, before  # the grandchild (and interpreter start-ups)
    assert 0.3 <= sum(after.values()) < 0.3 + 0.3, after
    assert set(before) == {"Ray (services, idle workers)"}


def test_children_cpu_counts_waited_children():
    cpu0 = children_cpu()
    subprocess.run([sys.executable, "-c", BURN.format(s=0.3, idle=0)], check=True)
    assert 0.3 <= children_cpu() - cpu0 < 1.5


def test_a_process_counts_under_the_role_it_execs_into():
    """A forked child shows its parent's command line until it execs (subprocess.Popen starts decoders that
    way): the role follows the command line it ends with."""
    code = ("import os, sys, time\ntime.sleep(0.3)\n"
            f"os.execv(sys.executable, [sys.executable, '-c', {BURN.format(s=0.3, idle=0.3)!r}, 'curation.decode_worker'])\n")
    child = subprocess.Popen([sys.executable, "-c", code, "pipeline.curate"])  # looks like the driver at first
    meter = CpuMeter([child.pid], interval=0.02).start()
    child.wait()
    before, _ = meter.stop()
    assert before.get("decoders", 0.0) >= 0.25 and "driver" not in before, before
