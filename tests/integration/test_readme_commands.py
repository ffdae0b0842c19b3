"""The README followed literally: every command of every ```bash block of README.md, in document order, in
the clone where test_demo_browser.py's `demo` fixture ran the first one (`make demo`), as one terminal.

Each README command is in exactly one of two tables: RUN (run here, as written, from the clone root, with
a timeout, its output in a log printed on failure, and a check that it did what the README says) or SKIP
(cannot run on one CPU machine, with the reason and where the same thing is tested). A command in
neither (a new README line) fails `test_every_readme_command_is_run_or_skipped_with_a_reason`, saying to
add it. What a RUN command needs filled in (IN, OUT, FILE, RELEASE/unet, frame.jpg, optional `[...]`
parts) comes from the one PLACEHOLDERS table; nothing else is changed, except that `make` gets clone_support's
`-o .venv/.installed BIN=<repo venv>` (the clone links the repo's venv in place of `make setup`; without
them make would re-run pip into it and DeepSpeed would rebuild its extension).

The commands run in one `readme_support.Terminal`: `export ...` and `source .venv/bin/activate` carry
over to the commands after them. Long-running commands run for real: the README's `ray start --head` (a
daemon on the fixed ports 6379 / 8265; its processes are found by the marker variable every process of the
terminal carries, and stopped by PID when its block ends: never `ray stop`), and `mlflow ui` (port 5000,
its process group stopped once it served). The terminal's RAY_TMPDIR is a private folder, so this Ray
cannot meet (or be joined by) another Ray on the machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from clone_support import make_cmd, stop_group
from readme_support import Terminal, fill, port_in_use, readme_commands, wait_http
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

SAMPLE_JPG = "tests/assets/sample/tears_of_steel_frame_0040.jpg"
# What a RUN command's placeholders become. {clone}: the clone's absolute path (the Ray job needs them).
PLACEHOLDERS = {
    "--input IN": "--input tests/assets/sample",  # the bundled sample, as `make curate` and the demo take it
    "--output OUT": "--output out/curate-sample",  # the demo's OUT: the run resumes, every source skipped
    "[--config FILE]": "--config configs/curate_default.yaml",  # the default config, named explicitly
    "[key=value ...]": "",  # a changed decode/scores/... setting is refused on an existing OUT
    "/abs/path/in": "{clone}/tests/assets/sample",
    "/abs/path/out": "{clone}/out/readme-ray-curate",  # a new OUT: the job curates everything on the cluster
    # no release here: a diffusers-format UNet written from the tiny base export stands in (`--to-diffusers`)
    "RELEASE/unet": "out/readme-release/unet",
    "/weights/i2vgen-xl/unet": "out/readme-release/unet",
    "frame.jpg": SAMPLE_JPG,
    "[--refine ckpt/tiny/refine]": "--refine ckpt/tiny/refine",  # optional parts that run here are kept
    "[--steps 25 --guidance 9 --seed 0]": "--steps 25 --guidance 9 --seed 0",
    "[--images FOLDER]": "--images tests/assets/sample",
    "[--out DIR]": "--out out/readme-eval",
    "[--clip-checkpoint /weights/open_clip_vit_h_14.safetensors]": "",  # no ViT-H/14 here: the tiny random CLIP
    "[--mlflow-run-id ID | --no-mlflow]": "--no-mlflow",  # the store keeps one run per stage (the browser test)
    "[...]": "",  # further optional flags
}
# GCS, dashboard, Ray client, dashboard agent (runs submitted jobs): the defaults the README's `ray start` takes
RAY_PORTS = (6379, 8265, 10001, 52365)
MLFLOW_PORT = 5000


@dataclass(frozen=True)
class Step:
    """How a RUN command runs: `run` to its end; `demo` already run by the `demo` fixture; `daemon` starts
    processes that outlive it (stopped when its README block ends); `serve` blocks until stopped."""

    check: Callable[[Path, str], None]  # (clone, output) -> assertions
    mode: Literal["run", "demo", "daemon", "serve"] = "run"
    timeout_s: float = 300


# ------------------------------------------------------------------------------------------ checks
def _demo_ran(clone: Path, output: str) -> None:
    assert "demo finished" in output and (clone / "out" / "demo" / "video.mp4").is_file(), output[-3000:]


def _curate_resumed(clone: Path, output: str) -> None:
    # every source of the demo's run is finished already: all of them are skipped, the shards re-packed
    assert "sources: 4 (3 ok, 1 error; 4 resumed)" in output, output[-3000:]
    assert (clone / "out" / "curate-sample" / "report.html").is_file()


def _ray_job_curated(clone: Path, output: str) -> None:
    assert "succeeded" in output and "sources: 4 (3 ok, 1 error; 0 resumed)" in output, output[-3000:]
    # the job on the cluster writes the clips of the demo's local run (same sample, same config): the same
    # shards holding the same mp4 / jpg / txt bytes (clip ids, and so the json rows, hash the source path,
    # absolute here)
    ours, demo = clone / "out" / "readme-ray-curate" / "shards", clone / "out" / "curate-sample" / "shards"
    assert _shard_payloads(demo) and _shard_payloads(ours) == _shard_payloads(demo), output[-3000:]


def _shard_payloads(folder: Path) -> dict[str, list[str]]:
    """{shard name: sorted sha256 of its non-json members}."""
    payloads = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            payloads[shard.name] = sorted(hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                                          for m in tar.getmembers() if m.isfile() and not m.name.endswith(".json"))
    return payloads


def _ray_started(clone: Path, output: str) -> None:
    # and its dashboard answered on 8265 (the runner waited for it before the next command)
    assert "Ray runtime started" in output, output[-3000:]


def _summary(clone: Path, output: str) -> None:
    assert "1,420,469,224" in output, output[-2000:]  # the parameter count the README's comment gives


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), (a, b)


def _converted(out: str) -> Callable[[Path, str], None]:
    def check(clone: Path, output: str) -> None:  # back from diffusers' layout bit-identically
        _same_weights(clone / out, clone / "runs" / "tiny-base" / "export" / "unet")
    return check


def _tiny_checkpoints(clone: Path, output: str) -> None:
    for stage in ("base", "refine"):
        assert (clone / "ckpt" / "tiny" / stage / "stage.yaml").is_file(), output[-2000:]


def _video(path: str) -> Callable[[Path, str], None]:
    def check(clone: Path, output: str) -> None:
        mp4 = clone / path
        assert mp4.is_file() and mp4.stat().st_size > 0, output[-2000:]
        assert any((clone / path.replace(".mp4", "_frames")).glob("*.png")), output[-2000:]
    return check


def _resumed_complete(run: str) -> Callable[[Path, str], None]:
    def check(clone: Path, output: str) -> None:
        records = [json.loads(line) for line in (clone / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
        last = records[starts[-1]]
        # a second start, resumed from the final checkpoint, and no training step after it
        assert len(starts) >= 2 and last["resumed_from"], output[-3000:]
        assert int(Path(last["resumed_from"]).name.split("-")[1]) == last["step"] > 0, last
        assert not any("loss" in r for r in records[starts[-1]:]), output[-3000:]
    return check


def _mlflow_ui(clone: Path, output: str) -> None:
    url = f"http://127.0.0.1:{MLFLOW_PORT}/api/2.0/mlflow/experiments/search"
    request = urllib.request.Request(url, data=json.dumps({"max_results": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        names = {e["name"] for e in json.load(response)["experiments"]}
    assert {"i2vgen-xl-base", "i2vgen-xl-refine"} <= names, names  # both stages' runs, from ./mlflow.db


def _evaluated(clone: Path, output: str) -> None:
    out = clone / "out" / "readme-eval"
    scores = json.loads((out / "eval.json").read_text())
    assert (out / "grid.mp4").is_file() and scores["means"]["motion"] is not None, output[-3000:]


def _evaluated_cascade(clone: Path, output: str) -> None:
    scores = json.loads((clone / "out" / "readme-eval" / "eval.json").read_text())
    # both videos of the cascade scored: the refined one under the plain names, the base one under base/
    assert scores["base_checkpoint"].endswith("runs/tiny-base/export"), scores["base_checkpoint"]
    assert scores["means"]["motion"] is not None and scores["means"]["base/motion"] is not None, output[-3000:]


RUN: dict[str, Step] = {
    "make demo": Step(_demo_ran, mode="demo"),
    ".venv/bin/python -m pipeline.curate --input IN --output OUT [--config FILE] [key=value ...]":
        Step(_curate_resumed, timeout_s=240),
    "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0":
        Step(lambda clone, output: None, timeout_s=10),  # its effect is checked on the terminal (ENV_AFTER)
    "source .venv/bin/activate": Step(lambda clone, output: None, timeout_s=10),
    "ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1":
        Step(_ray_started, mode="daemon", timeout_s=180),
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipeline.curate "
    "--input /abs/path/in --output /abs/path/out": Step(_ray_job_curated, timeout_s=400),
    ".venv/bin/python -m model.summary i2vgen-xl": Step(_summary, timeout_s=120),
    ".venv/bin/python -m model.convert --from-diffusers RELEASE/unet --out ckpt/unet":
        Step(_converted("ckpt/unet"), timeout_s=120),
    ".venv/bin/python -m model.generate --write-tiny-checkpoints ckpt/tiny": Step(_tiny_checkpoints, timeout_s=120),
    '.venv/bin/python -m model.generate --image frame.jpg --prompt "a robot" --out out.mp4 --base ckpt/tiny/base '
    "[--refine ckpt/tiny/refine] [--steps 25 --guidance 9 --seed 0]": Step(_video("out.mp4"), timeout_s=240),
    ".venv/bin/python -m model.convert --from-diffusers /weights/i2vgen-xl/unet --out weights/i2vgen-xl-unet":
        Step(_converted("weights/i2vgen-xl-unet"), timeout_s=120),
    "make train-base": Step(_resumed_complete("tiny-base"), timeout_s=400),
    "make train-refine": Step(_resumed_complete("tiny-refine"), timeout_s=400),
    ".venv/bin/mlflow ui": Step(_mlflow_ui, mode="serve", timeout_s=240),
    ".venv/bin/python -m model.generate --base runs/tiny-base/export --refine runs/tiny-refine/export --image "
    f'{SAMPLE_JPG} --prompt "a robot" --out out/cascade.mp4': Step(_video("out/cascade.mp4"), timeout_s=240),
    ".venv/bin/python -m training.evaluate --checkpoint runs/tiny-base/export [--images FOLDER] [--out DIR] "
    "[--clip-checkpoint /weights/open_clip_vit_h_14.safetensors] [--mlflow-run-id ID | --no-mlflow]":
        Step(_evaluated, timeout_s=300),
    ".venv/bin/python -m training.evaluate --checkpoint runs/tiny-refine/export --base runs/tiny-base/export "
    "[--images FOLDER] [--out DIR]": Step(_evaluated_cascade, timeout_s=300),
}
# What the terminal's environment holds after a command (the shell-state commands have no output to check).
ENV_AFTER = {
    "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0":
        lambda env: env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0" and env.get("RAY_AUTH_MODE") == "disabled"
        and env.get("RAY_USAGE_STATS_ENABLED") == "0",
    "source .venv/bin/activate":
        lambda env: bool(env.get("VIRTUAL_ENV")) and env["PATH"].split(":")[0] == f"{env['VIRTUAL_ENV']}/bin",
}

CLUSTER_SPECS = ("tests/unit/test_clusters_train.py and test_clusters_kuberay.py load every clusters/ spec and "
                 "run its commands through the real argument parsers and config loaders")
SKIP: dict[str, str] = {
    "make test": "the suite this test is part of (it would run itself)",
    "make train-base CONFIG=configs/train/finetune-i2vgen-xl.yaml":
        "needs the released I2VGen-XL UNet (converted), OpenCLIP ViT-H/14 and the SD 2.1 VAE on local disk, "
        "and a GPU-size model; tests/unit/test_train_config.py loads the recipe and checks that each missing "
        "file stops the job naming its path and key",
    "make train-base NPROC=2 ARGS=output_dir=runs/tiny-base-2proc":
        "trains the tiny base again from step 0 in 2 processes (minutes on 2 cores); 2 processes under torchrun "
        "(ZeRO-2 and ZeRO-3, equal to one process step by step) are tested in "
        "tests/integration/test_train_deepspeed.py and test_train_ray.py",
    "make train-base CONFIG=configs/train/base-448x256.yaml ARGS='data.shards=[/data/out1,/data/out2]'":
        "the paper-size base stage (1.4 B parameters, real VAE and OpenCLIP files, curated data under /data): "
        "a GPU job; tests/unit/test_train_config.py loads the recipe",
    "ray job submit --address http://HEAD_IP:8265 --working-dir . -- python -m pipeline.curate --input "
    "/shared/in --output /shared/out":
        "a cluster of several machines with a shared file system; tests/integration/test_two_nodes.py submits "
        "the curation job with `ray job submit` to a two-node Ray cluster on loopback",
    "ray job submit --address http://HEAD_IP:8265 --working-dir . -- python -m training.ray_train --config "
    "configs/train/base-448x256.yaml --workers 16 --cpus-per-worker 8 --gpus-per-worker 1 "
    "output_dir=/shared/runs/base data.shards=[/shared/out]":
        "16 GPU workers; tests/integration/test_train_ray.py and test_two_nodes.py run training.ray_train with "
        "2 Ray Train workers (one per node) and compare them with torchrun",
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m training.train "
    "--config configs/train/base-448x256.yaml output_dir=/shared/runs/base ...":
        f"2 nodes x 8 GPUs; {CLUSTER_SPECS}; torchrun with 2 processes: test_train_deepspeed.py",
    "deepspeed --hostfile clusters/train-hostfile.example --num_nodes 2 --num_gpus 8 --module training.train "
    "--config configs/train/base-448x256.yaml output_dir=/shared/runs/base ...":
        f"2 nodes over SSH; {CLUSTER_SPECS}; the deepspeed launcher with 2 processes: test_two_nodes.py",
    "sbatch --nodes 4 clusters/train-slurm.sbatch configs/train/base-448x256.yaml output_dir=/shared/runs/base ...":
        f"a Slurm cluster; {CLUSTER_SPECS}",
}


# --------------------------------------------------------------------------------------------- tests
def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = [c.text for c in readme_commands()]
    both = sorted(set(RUN) & set(SKIP))
    missing = [c for c in commands if c not in RUN and c not in SKIP]
    stale = sorted((set(RUN) | set(SKIP)) - set(commands))
    assert not both, f"in both RUN and SKIP of {__file__}: {both}"
    assert not missing, (f"README commands in neither RUN nor SKIP of {__file__}: add each to RUN (with a check "
                         f"that it did what the README says) or to SKIP (with why it cannot run here and where it "
                         f"is tested): {missing}")
    assert not stale, f"RUN/SKIP of {__file__} list commands the README no longer has: {stale}"
    assert len(commands) == len(set(commands)), "a README command appears twice: give each its own table entry"
    for text in RUN:
        filled = fill(text, PLACEHOLDERS, clone="/CLONE")
        assert "[" not in filled and "..." not in filled, \
            f"a placeholder PLACEHOLDERS does not fill: {filled!r}"


def test_readme_parser_and_placeholders_read_bash_as_bash():
    text = ("# Top\n```bash\nfoo --a 1 \\\n    --b '# kept' \"x # y\" # gone\nbar#baz   # gone\n  # only a comment\n```\n"
            "## Next\n```\nnot bash\n```\n```bash\nbaz [--out DIR] IN\n```\n")
    commands = readme_commands(text)
    assert [(c.text, c.heading, c.block) for c in commands] == [
        ("foo --a 1 --b '# kept' \"x # y\"", "Top", 0), ("bar#baz", "Top", 0), ("baz [--out DIR] IN", "Next", 1)]
    # one pass, longest key first: a replacement is never replaced again, a dropped part leaves one space
    assert fill(commands[2].text, {"[--out DIR]": "--out IN", "IN": "{clone}/in"}, clone="/c") == "baz --out IN /c/in"
    assert fill("a [x] b", {"[x]": ""}) == "a b"


@pytest.mark.slow
def test_readme_commands_run_in_order_in_the_demo_clone(demo):
    clone = demo["clone"]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths must stay < 107 chars
    term = Terminal(clone, clone.parent / "readme-logs", RAY_TMPDIR=str(ray_tmp))
    commands = readme_commands()
    timings: dict[str, float] = {}
    stopped: dict[int, int] = {}  # README block -> processes of it still running when it ended
    try:
        for i, command in enumerate(commands):
            if i and command.block != commands[i - 1].block:
                stopped[commands[i - 1].block] = _end_block(term)
            if command.text in SKIP:
                print(f"skip  {command.text[:90]}\n      ({SKIP[command.text][:100]}...)")
                continue
            step = RUN[command.text]
            t0 = time.monotonic()
            rc, output = _run(term, command.text, step, clone, demo)
            timings[command.text] = time.monotonic() - t0
            assert rc == 0, f"README command exited {rc}: {command.text!r}\n{output[-6000:]}"
            try:
                if step.mode != "serve":  # a server is checked while it serves, in _run
                    step.check(clone, output)
                if command.text in ENV_AFTER:
                    assert ENV_AFTER[command.text](term.env), {k: term.env.get(k) for k in ("PATH", "VIRTUAL_ENV")}
            except AssertionError as exc:
                raise AssertionError(f"README command {command.text!r} ran but: {exc}\n{output[-6000:]}") from None
            print(f"ran   {command.text[:90]}  ({timings[command.text]:.0f} s)")
        stopped[commands[-1].block] = _end_block(term)
    finally:
        term.stop_marked()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # the Ray block's head ran until its block ended (its GCS, raylet, dashboard, ... by PID), no other block
    # left anything running
    ray_block = next(c.block for c in commands if c.text.startswith("ray start"))
    assert stopped.pop(ray_block) >= 3 and not any(stopped.values()), stopped
    print(f"README commands: {len(timings)} run in {sum(timings.values()):.0f} s, {len(SKIP)} skipped")


def _end_block(term: Terminal) -> int:
    """Stop what a README block left running (as closing its terminal would); how many processes that was.
    AssertionError if any of them is still alive afterwards."""
    n = term.stop_marked()
    alive = term.marked()
    assert not alive, f"still running after stop: {[(p.pid, p.name()) for p in alive]}"
    return n


def _run(term: Terminal, text: str, step: Step, clone: Path, demo: dict) -> tuple[int, str]:
    """Run one README command in `term` as `step` says; (exit code, output)."""
    if step.mode == "demo":
        return 0, demo["again"]["log"]  # the fixture ran it twice and checked both exit codes
    command = fill(text, PLACEHOLDERS, clone=str(clone))
    if command.startswith("make "):  # `make -o .venv/.installed BIN=<repo venv>` + the README's arguments
        command = " ".join(make_cmd("")[:-1]) + command[len("make"):]
    if "RELEASE/unet" in text or "/weights/i2vgen-xl/unet" in text:
        _release_stand_in(term, clone)
    if step.mode == "serve":
        assert not port_in_use(MLFLOW_PORT), f"port {MLFLOW_PORT} is taken: {text!r} needs it"
        proc, log = term.serve(command, "serve", MLFLOW_PORT, "/health", step.timeout_s)
        try:
            step.check(clone, "")
        except (AssertionError, OSError) as exc:
            raise AssertionError(f"README command {text!r} serves, but: {exc!r}\n{log.read_text()[-4000:]}") from None
        finally:
            stop_group(proc)
        return 0, log.read_text(errors="replace")
    if step.mode == "daemon":
        deadline = time.monotonic() + 120  # a curation job's short-lived local Ray may hold 52365 a moment
        while (busy := [port for port in RAY_PORTS if port_in_use(port)]) and time.monotonic() < deadline:
            time.sleep(2)
        assert not busy, f"ports {busy} are taken by another process: {text!r} needs them (never `ray stop` it)"
        rc, output = term.run(command, "daemon", step.timeout_s, keep_children=True)
        if rc == 0:
            wait_http("http://127.0.0.1:8265/api/version", step.timeout_s)
            deadline = time.monotonic() + step.timeout_s  # the agent `ray job submit` needs, as start_head waits
            while not port_in_use(52365) and time.monotonic() < deadline:
                time.sleep(0.5)
        return rc, output
    return term.run(command, command.split()[0].replace("/", "_").strip("._")[:20], step.timeout_s)


def _release_stand_in(term: Terminal, clone: Path) -> None:
    """out/readme-release/unet: the tiny base export's UNet in diffusers' layout, standing in for the
    release's `unet/` (the README's other direction, `model.convert --to-diffusers`)."""
    if (clone / "out" / "readme-release" / "unet").is_dir():
        return
    rc, output = term.run(".venv/bin/python -m model.convert --to-diffusers runs/tiny-base/export/unet "
                          "--out out/readme-release/unet", "to-diffusers", 120)
    assert rc == 0, output[-4000:]
