"""The training launch specs in clusters/ are loaded and checked: the Kubernetes Indexed Job (train-k8s-job.yaml),
the DeepSpeed hostfile and the commands in its comments (train-hostfile.example) and the Slurm batch script
(train-slurm.sbatch). Their commands are accepted by the real argument parsers (torchrun's, the deepspeed
launcher's, training.train's), the recipes they name load and validate with their overrides, and what they ask
for fits what they declare (nodes, GPUs per node, CPUs, rendezvous address, the shared volume that holds every
path a run reads or writes); each broken field is caught. There is one DeepSpeed config: the one the trainer
builds from the recipe, never a second copy in clusters/ or configs/. Every file in clusters/ is checked by
this file or tests/unit/test_clusters_kuberay.py. Nothing is launched: no Ray; the only processes are the Slurm
script under stub srun/scontrol.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from common.configtree import ConfigError
from tests.cluster_checks import (
    CLUSTERS,
    PLACEHOLDER,
    REPO,
    check_placeholders,
    check_shared_paths,
    check_train_args,
    comment_commands,
    deepspeed_args,
    expand_k8s_vars,
    mounts,
    torchrun_args,
)
from training.config import TrainConfig, load_config

COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


# --------------------------------------------------------------------------------- Kubernetes Indexed Job
def check_k8s_job(docs: list[dict]) -> None:
    """A headless Service and an Indexed Job whose pods each run one torchrun (node rank = completion index)."""
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"Service", "Job"}
    service, job = by_kind["Service"], by_kind["Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    check_placeholders(pod)
    (container,) = pod["containers"]
    assert container["command"][0] == f"{container['workingDir']}/.venv/bin/torchrun"
    env = container["env"]
    run = torchrun_args([*container["command"], *expand_k8s_vars(container["args"], env)])
    # the node rank is the pod's completion index (0 .. completions-1)
    (rank_var,) = re.findall(r"\$\((\w+)\)", next(a for a in container["args"] if a.startswith("--node-rank")))
    rank_env = next(e for e in env if e["name"] == rank_var)
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    assert int(run.nnodes) == spec["completions"]
    assert int(run.nproc_per_node) == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert run.master_addr == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert run.master_port in [p["port"] for p in service["spec"]["ports"]]
    assert run.module and run.training_script == "training.train"
    cfg = check_train_args(run.training_script_args)
    check_shared_paths(cfg, set(mounts(pod)))
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in env)  # pods cannot see a local mlflow.db


def _k8s_docs() -> list[dict]:
    return list(yaml.safe_load_all((CLUSTERS / "train-k8s-job.yaml").read_text()))


def test_kubernetes_indexed_job():
    check_k8s_job(_k8s_docs())


def _container(docs):
    return next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]


def _replace_arg(docs, prefix: str, new: str):
    args = _container(docs)["args"]
    (i,) = [i for i, a in enumerate(args) if a.startswith(prefix)]
    args[i] = new
    return docs


@pytest.mark.parametrize("break_it", [
    lambda d: _replace_arg(d, "--nproc-per-node", "--nproc-per-node=4"),           # GPUs != ranks per node
    lambda d: _replace_arg(d, "--master-addr", "--master-addr=i2vgen-train-base"),  # not pod 0
    lambda d: _replace_arg(d, "--node-rank", "--node-rank=$(RANK)"),                # undeclared variable
    lambda d: _replace_arg(d, "output_dir=", "output_dir=runs/base"),               # not on the shared volume
    lambda d: _replace_arg(d, "model.vae.path=", "model.vae.path=/data/vae"),       # neither
    lambda d: [d[0], {**d[1], "spec": {**d[1]["spec"], "completions": 3, "parallelism": 3}}],  # pods != --nnodes
    lambda d: _replace_arg(d, "--nnodes", "--nnodez=2"),                            # torchrun rejects it
])
def test_kubernetes_check_catches_broken_specs(break_it):
    with pytest.raises((AssertionError, SystemExit)):
        check_k8s_job(break_it(copy.deepcopy(_k8s_docs())))


def test_a_bad_override_in_a_spec_is_a_config_error():
    docs = _replace_arg(_k8s_docs(), "data.shards=", "data.shardz=[/shared/curated]")
    with pytest.raises(ConfigError, match="shardz"):
        check_k8s_job(docs)


# ------------------------------------------------------------------------------------- DeepSpeed hostfile
def test_deepspeed_hostfile_and_its_launch_commands():
    from deepspeed.launcher.runner import fetch_hostfile

    path = CLUSTERS / "train-hostfile.example"
    hosts = fetch_hostfile(str(path))  # DeepSpeed's own hostfile reader
    assert hosts and all(h.startswith(PLACEHOLDER) for h in hosts)
    commands = {argv[0]: argv for argv in comment_commands(path)}
    assert set(commands) == {"deepspeed", "torchrun"}
    ds = deepspeed_args(commands["deepspeed"])
    assert Path(ds.hostfile) == path.relative_to(REPO)
    assert ds.num_nodes == len(hosts) and all(slots == ds.num_gpus for slots in hosts.values())
    assert ds.master_addr == next(iter(hosts)) and ds.module and ds.user_script == "training.train"
    # the launcher appends --local_rank to every rank's arguments; training.train must accept it
    check_shared_paths(check_train_args([*ds.user_args, "--local_rank=3"]), {"/shared"})
    tr = torchrun_args(commands["torchrun"])
    assert int(tr.nnodes) == len(hosts) and int(tr.nproc_per_node) == ds.num_gpus
    assert tr.master_addr == ds.master_addr and tr.module and tr.training_script == "training.train"
    assert tr.training_script_args == ds.user_args  # the same job either way


# ------------------------------------------------------------------------------------------------- Slurm
SLURM = CLUSTERS / "train-slurm.sbatch"
SBATCH_OPTIONS = ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--mem", "--job-name",
                  "--output", "--partition", "--account", "--time")
STUB_SRUN = '#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGV"\n'
STUB_SCONTROL = ('#!/bin/bash\n[ "$1 $2 $3" = "show hostnames $SLURM_JOB_NODELIST" ] || exit 1\n'
                 'printf "%s\\n" $STUB_HOSTS\n')


def sbatch_parser() -> argparse.ArgumentParser:
    """sbatch's options used here (Slurm is not installed: its own parser is not at hand), `--x=v` or `--x v`."""
    p = argparse.ArgumentParser(prog="sbatch", allow_abbrev=False)
    for option in SBATCH_OPTIONS:
        p.add_argument(option)
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


def sbatch_directives(path: Path) -> argparse.Namespace:
    """The script's #SBATCH lines; Slurm reads them only above the first command, and ignores later ones."""
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if i and line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first, "an #SBATCH line below the first command is ignored"
    return sbatch_parser().parse_args([t for i in directives for t in shlex.split(lines[i][7:])] + [str(path)])


def run_slurm_script(args: list[str], tmp_path: Path, nodes: int, **env: str) -> tuple[subprocess.CompletedProcess,
                                                                                    list[str] | None]:
    """Run the batch script as Slurm would on the job's first node, with stub srun/scontrol on PATH: srun
    records the command it was asked to run on every node. Returns (the run, srun's argv or None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    argv_file = tmp_path / "srun.argv"
    argv_file.unlink(missing_ok=True)
    hosts = [f"gpu{i:03d}" for i in range(1, nodes + 1)]
    slurm = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64"}
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SRUN_ARGV": str(argv_file),
                "STUB_HOSTS": " ".join(hosts), **slurm, **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    run = subprocess.run(["bash", str(SLURM), *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                         timeout=60)
    srun = argv_file.read_text().split("\0")[:-1] if argv_file.exists() else None
    return run, srun


def check_slurm_launch(srun: list[str], nodes: int, gpus: int, cpus: int) -> TrainConfig:
    """srun starts one torchrun per node (the checkout's .venv), torchrun one rank per GPU meeting at a c10d
    rendezvous on the first node; training.train's args load and validate, on the shared file system."""
    i = next(i for i, a in enumerate(srun) if not a.startswith("-"))
    options, command = srun[:i], srun[i:]
    assert {f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"} <= set(options), options
    assert command[0] == str(REPO / ".venv" / "bin" / "torchrun") and os.access(command[0], os.X_OK)
    run = torchrun_args(command)
    assert int(run.nnodes) == nodes and int(run.nproc_per_node) == gpus
    assert run.rdzv_backend == "c10d" and run.rdzv_endpoint == "gpu001:29500" and run.rdzv_id == "4242"
    assert run.module and run.training_script == "training.train"
    cfg = check_train_args(run.training_script_args)
    check_shared_paths(cfg, {"/shared"})
    assert cpus >= gpus * (1 + cfg.data.num_workers)  # every rank and its loader processes get a CPU
    return cfg


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)


def test_slurm_script_launches_both_stages_as_its_comments_say(tmp_path):
    directives = sbatch_directives(SLURM)
    assert directives.ntasks_per_node == "1" and directives.exclusive
    gpus, cpus = int(directives.gpus_per_node), int(directives.cpus_per_task)
    commands = comment_commands(SLURM)
    stages = set()
    for argv in commands:
        assert argv[0] == "sbatch", argv
        submit = sbatch_parser().parse_args(argv[1:])
        assert Path(submit.script) == SLURM.relative_to(REPO)
        nodes = int(submit.nodes or directives.nodes)
        run, srun = run_slurm_script(submit.script_args, tmp_path, nodes,
                                     SLURM_GPUS_ON_NODE=str(gpus), SLURM_CPUS_PER_TASK=str(cpus))
        assert run.returncode == 0 and srun, run.stderr
        stages.add(check_slurm_launch(srun, nodes, gpus, cpus).stage)
    assert stages == {"base", "refine"}


def test_slurm_script_reads_typed_gpus_per_node(tmp_path):
    """--gpus-per-node=h100:4 without SLURM_GPUS_ON_NODE: 4 ranks per node."""
    argv = comment_commands(SLURM)[0]
    run, srun = run_slurm_script(sbatch_parser().parse_args(argv[1:]).script_args, tmp_path, 2,
                                 SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE="h100:4", SLURM_CPUS_PER_TASK="32")
    assert run.returncode == 0, run.stderr
    check_slurm_launch(srun, 2, 4, 32)


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {}, "usage"),
    (["configs/train/base.yaml"], {}, "recipe not found"),
    (None, {"SLURM_GPUS_ON_NODE": None}, "no GPUs"),
    (None, {"SLURM_SUBMIT_DIR": None}, "not under Slurm"),
])
def test_slurm_script_stops_before_srun_on_a_mistake(tmp_path, args, env, message):
    if args is None:
        args = sbatch_parser().parse_args(comment_commands(SLURM)[0][1:]).script_args
    run, srun = run_slurm_script(args, tmp_path, 2, **env)
    assert run.returncode != 0 and message in run.stderr and srun is None


@pytest.mark.parametrize(("old", "new"), [
    ("output_dir=/shared/", "output_dir=runs/"),         # checkpoints off the shared file system
    ("data.shards=", "data.shardz="),                     # a key typo (ConfigError)
    ("model.vae.path=/shared/", "model.vae.path=/data/"),  # weights off the shared file system
])
def test_slurm_check_catches_broken_commands(tmp_path, old, new):
    argv = [a.replace(old, new) for a in sbatch_parser().parse_args(comment_commands(SLURM)[0][1:]).script_args]
    run, srun = run_slurm_script(argv, tmp_path, 2)
    assert run.returncode == 0
    with pytest.raises((AssertionError, ConfigError)):
        check_slurm_launch(srun, 2, 8, 64)


# ------------------------------------------------------------------------------- DeepSpeed config: one copy
DEEPSPEED_KEYS = ("zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size")
ENTRY_MODULES = {"training.train", "training.ray_train", "pipeline.curate"}


def test_the_deepspeed_config_is_the_one_the_trainer_builds_from_the_recipe():
    """No second copy: the trainer builds its DeepSpeed config in code from the recipe's YAML tree
    (training.trainer.engine_config), so no file in clusters/ or configs/ holds DeepSpeed config keys or is a
    JSON config, unless the trainer itself names it; and every spec launches only training.train /
    training.ray_train (or the curation job), never a script or a --deepspeed_config of its own."""
    training_sources = "\n".join(p.read_text() for p in (REPO / "training").glob("*.py"))
    files = [p for d in (CLUSTERS, REPO / "configs") for p in sorted(d.rglob("*")) if p.is_file()]
    second_copies = [p for p in files
                     if (p.suffix == ".json" or any(k in p.read_text() for k in DEEPSPEED_KEYS))
                     and str(p.relative_to(REPO)) not in training_sources]
    assert not second_copies
    launched = set()
    for path in CLUSTERS.iterdir():
        # words of the spec and its comments (YAML list items `- -m`, `- training.train`; prose in backquotes)
        tokens = [t.strip("`'\"();,") for t in path.read_text().split() if t != "-"]
        launched |= {tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in ("-m", "--module")}
        assert not any(t.startswith(("--deepspeed", "--ds_config")) or t.endswith(".py") for t in tokens), path
    assert launched == ENTRY_MODULES
    # and the recipe is what DeepSpeed gets: its ZeRO stage and micro-batch go into the built config
    import torch

    from training.trainer import engine_config

    for recipe in sorted((REPO / "configs" / "train").glob("*.yaml")):
        cfg = load_config(recipe, [])
        built = engine_config(cfg, torch.float32)
        assert built["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage, recipe
        assert built["train_micro_batch_size_per_gpu"] == cfg.data.batch_size, recipe


# --------------------------------------------------------------------------------------- every spec
# each file in clusters/ and the test file that loads it (as CLUSTERS / "<name>")
CHECKED = {"train-k8s-job.yaml": "test_clusters_train.py", "train-hostfile.example": "test_clusters_train.py",
           "train-slurm.sbatch": "test_clusters_train.py", "train-rayjob.yaml": "test_clusters_kuberay.py",
           "ray-cluster.yaml": "test_clusters_kuberay.py", "train-ray-cluster.yaml": "test_clusters_kuberay.py",
           "curate-raycluster.yaml": "test_clusters_kuberay.py",
           "curate-rayjob.yaml": "test_clusters_kuberay.py"}


def test_every_spec_in_clusters_is_checked_here():
    assert {p.name for p in CLUSTERS.iterdir()} == set(CHECKED)
    for name, test_file in CHECKED.items():
        assert f'CLUSTERS / "{name}"' in (Path(__file__).parent / test_file).read_text(), (name, test_file)


def test_comment_commands_reads_continued_lines(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("# intro\n#   torchrun --nnodes 2 \\\n#       -m training.train --config a.yaml x=1\n"
                    "# deepspeed is mentioned in prose\nkey: 1\n#   ray down c.yaml   # a note\n")
    assert comment_commands(spec) == [["torchrun", "--nnodes", "2", "-m", "training.train", "--config", "a.yaml",
                                       "x=1"], ["ray", "down", "c.yaml"]]
