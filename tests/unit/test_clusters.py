"""Every launch spec in clusters/ is loaded and checked: it parses, KubeRay manifests carry the fields their
CRD (ray.io/v1) requires, its commands (in the spec, in its comments, and those the Slurm script runs) are
accepted by the real argument parsers (torchrun's, the deepspeed launcher's, `ray job submit`'s,
training.train's, training.ray_train's, pipeline.curate's), the configs they name load and validate, and
what they ask for fits what they declare (nodes, GPUs, CPUs, the curation job's actor plan, rendezvous
address, the shared volume that holds every path a run reads or writes). Placeholders are marked
REPLACE_ME. Nothing is launched: no Ray; the only processes are the Slurm script under stub srun/scontrol.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from common import configtree
from common.configtree import ConfigError
from curation import config as curate_config
from curation.config import CurateConfig
from pipeline import curate
from pipeline.cluster import plan_actors
from training import ray_train, train
from training.config import TrainConfig, load_config, missing_paths, validate

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
PLACEHOLDER = "REPLACE_ME"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
LAUNCHERS = ("torchrun", "deepspeed", "ray job submit", "python -m", "ray up", "ray down", "sbatch")
GPU = "nvidia.com/gpu"


# ------------------------------------------------------------------------------------------------ helpers
def comment_commands(path: Path) -> list[list[str]]:
    """Commands written in a spec's comments: an indented `#   <launcher> ...` line (prose has one space
    after the #), continued by trailing backslashes; a trailing `# ...` note is dropped."""
    commands, current = [], None
    for line in path.read_text().splitlines():
        text = line[1:] if line.startswith("#") else None
        if current is not None and text is not None:
            current += " " + text.strip()
        elif text is not None and text.startswith("  ") and text.strip().startswith(LAUNCHERS):
            current = text.strip()
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1]
        else:
            commands.append(shlex.split(current, comments=True))
            current = None
    return commands


def check_train_args(argv: list[str]) -> TrainConfig:
    """training.train's parser accepts argv; its recipe loads and validates with its overrides."""
    args = train.parse_args(argv)
    config = Path(args.config)
    assert not config.is_absolute() and (REPO / config).is_file(), args.config
    cfg = load_config(REPO / config, args.overrides)
    validate(cfg)
    return cfg


def check_shared_paths(cfg: TrainConfig, shared: set[str]) -> None:
    """The output dir, the shards and every model file the run needs lie on a shared mount (absolute)."""
    needed = missing_paths(cfg)
    assert needed, "the check must see the model files the recipe needs"  # none exist on this machine
    paths = [("output_dir", cfg.output_dir), *[("data.shards", s) for s in cfg.data.shards], *needed]
    for key, path in paths:
        assert Path(path).is_absolute() and any(Path(path).is_relative_to(m) for m in shared), (key, path, shared)


def check_ray_train_args(argv: list[str]) -> tuple:
    """training.ray_train's parser accepts argv (both its own options and training.train's)."""
    args, train_argv = ray_train.parse_args(argv)
    return args, check_train_args(train_argv)


def module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def python_module(argv: list[str]) -> tuple[str, list[str]]:
    """(module, its args) of `[.../]python -m MODULE ARGS`."""
    assert Path(argv[0]).name == "python" and argv[1] == "-m", argv
    assert module_exists(argv[2]), argv[2]
    return argv[2], argv[3:]


def check_entrypoint(argv: list[str], shared: set[str]) -> None:
    """A `python -m training.ray_train|training.train|pipeline.curate ...` command line."""
    module, args = python_module(argv)
    if module == "training.ray_train":
        _, cfg = check_ray_train_args(args)
        check_shared_paths(cfg, shared)
    elif module == "training.train":
        check_shared_paths(check_train_args(args), shared)
    else:
        assert module == "pipeline.curate", module
        check_curate_args(args, shared)


def check_curate_args(argv: list[str], shared: set[str]) -> CurateConfig:
    """pipeline.curate's parser accepts argv; the config the job would load (--config, else
    configs/curate_default.yaml) loads through the real loader with the overrides (every key and type) and
    validates; IN, OUT and the open_clip weights lie on a shared mount."""
    args = curate.parse_args(argv)
    if args.config:
        assert not Path(args.config).is_absolute() and (REPO / args.config).is_file(), args.config
    cfg = configtree.load(CurateConfig, REPO / args.config if args.config else curate.default_config_path(),
                          args.overrides)
    weights = cfg.scores.clip.checkpoint
    for path in (args.input, args.output, *([weights] if weights else [])):
        assert Path(path).is_absolute() and any(Path(path).is_relative_to(m) for m in shared), (path, shared)
    # validate() wants the weights file to exist: a local stand-in for the one on the shared volume
    with tempfile.NamedTemporaryFile(suffix=Path(weights or "x.bin").suffix) as stand_in:
        checked = copy.deepcopy(cfg)
        if weights:
            checked.scores.clip.checkpoint = stand_in.name
        curate_config.validate(checked)
    return cfg


def check_ray_job_submit(argv: list[str], shared: set[str]) -> None:
    """`ray job submit OPTIONS -- ENTRYPOINT`: Ray's own CLI parser, then the entrypoint."""
    from ray.dashboard.modules.job.cli import submit

    assert argv[:3] == ["ray", "job", "submit"], argv
    params = submit.make_context("submit", argv[3:]).params
    assert params["address"] and params["working_dir"] == "."  # submitted from the checkout
    check_entrypoint(list(params["entrypoint"]), shared)


def torchrun_args(argv: list[str]):
    """torchrun's own parser (torch.distributed.run) on a torchrun command line."""
    from torch.distributed.run import parse_args as torchrun_parse

    assert Path(argv[0]).name == "torchrun", argv
    return torchrun_parse(argv[1:])


def deepspeed_args(argv: list[str]):
    """The deepspeed launcher's own parser on a deepspeed command line."""
    from deepspeed.launcher.runner import parse_args as deepspeed_parse

    assert argv[0] == "deepspeed", argv
    return deepspeed_parse(argv[1:])


def mounts(pod_spec: dict) -> dict[str, str]:
    """{mountPath: claimName} of the pod's containers' mounts backed by a PersistentVolumeClaim."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    declared = {v["name"] for v in pod_spec.get("volumes", [])}
    out = {}
    for container in pod_spec["containers"]:
        for m in container.get("volumeMounts", []):
            assert m["name"] in declared, m
            if m["name"] in claims:
                out[m["mountPath"]] = claims[m["name"]]
    return out


def check_placeholders(pod_spec: dict) -> None:
    """Image and claims are placeholders marked REPLACE_ME (nobody applies the spec unedited by mistake)."""
    for container in pod_spec["containers"]:
        assert container["image"].startswith(PLACEHOLDER), container["image"]
    for claim in mounts(pod_spec).values():
        assert claim.startswith(PLACEHOLDER), claim


def expand_k8s_vars(args: list[str], env: list[dict]) -> list[str]:
    """Kubernetes' $(VAR) expansion in args (every variable used must be declared; values from fieldRef
    are only known in the pod: 0 here, a valid node rank)."""
    values = {e["name"]: str(e.get("value", "0")) for e in env}
    used = {name for arg in args for name in re.findall(r"\$\((\w+)\)", arg)}
    assert used <= set(values), used - set(values)
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg) for arg in args]


# --------------------------------------------------------------------------------- Kubernetes Indexed Job
def check_k8s_job(docs: list[dict]) -> None:
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


# ---------------------------------------------------------------------------- KubeRay CRD fields (ray.io/v1)
def k8s_cpus(quantity) -> float:
    """A Kubernetes CPU quantity ("8", 8, "500m") in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def check_string_map(params, where: str) -> None:
    """rayStartParams is a map[string]string in the CRD: `num-cpus: 0` (a number) is rejected on apply."""
    assert isinstance(params, dict), where
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), (where, params)


def group_resources(group: dict, where: str) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of a head/worker group: rayStartParams num-cpus / num-gpus, else
    what KubeRay passes to `ray start` from the Ray container's (the first) limits. The pod template's
    required fields are checked on the way."""
    check_string_map(group["rayStartParams"], f"{where}.rayStartParams")
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c["name"] and c["image"] for c in containers), where
    for c in containers:
        resources = c.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        if GPU in requests:  # an extended resource: Kubernetes wants requests == limits
            assert str(requests[GPU]) == str(limits.get(GPU)), (where, resources)
    limits = containers[0].get("resources", {}).get("limits", {})
    params = group["rayStartParams"]
    gpus = int(limits.get(GPU, 0))
    ray_gpus = float(params.get("num-gpus", gpus))
    assert ray_gpus <= gpus, (where, "Ray is told of GPUs the pod does not get", ray_gpus, gpus)
    return float(params.get("num-cpus", k8s_cpus(limits.get("cpu", 0)))), ray_gpus


def check_raycluster_spec(spec: dict) -> list[tuple[float, float]]:
    """The required fields of a ray.io/v1 RayClusterSpec (a RayCluster's spec, a RayJob's rayClusterSpec);
    returns (CPUs, GPUs) of every Ray node it starts, the head first."""
    if "rayVersion" in spec:  # the image runs the Ray this repository installs
        assert spec["rayVersion"] == importlib.metadata.version("ray"), spec["rayVersion"]
    nodes = [group_resources(spec["headGroupSpec"], "headGroupSpec")]
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert all(names) and len(set(names)) == len(names), names
    for g in groups:
        low, n, high = g["minReplicas"], g["replicas"], g["maxReplicas"]
        assert all(isinstance(v, int) for v in (low, n, high)) and 0 <= low <= n <= high, (g["groupName"], low, n, high)
        nodes += [group_resources(g, g["groupName"])] * n
    return nodes


def check_raycluster(doc: dict) -> list[tuple[float, float]]:
    """A ray.io/v1 RayCluster: apiVersion, kind, name and its spec's required fields."""
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    return check_raycluster_spec(doc["spec"])


def check_rayjob_fields(job: dict) -> list[tuple[float, float]]:
    """A ray.io/v1 RayJob: entrypoint, and a cluster: rayClusterSpec (torn down when the job ends:
    shutdownAfterJobFinishes) or a clusterSelector naming a running one."""
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "one of rayClusterSpec / clusterSelector"
    if "clusterSelector" in spec:
        return []
    assert spec["shutdownAfterJobFinishes"] is True  # else the GPUs stay held after the job
    return check_raycluster_spec(spec["rayClusterSpec"])


def split_entrypoint(entrypoint: str, pods: list[dict]) -> list[str]:
    """`cd <workingDir> && .venv/bin/python -m ...` (run by a shell): the cd is to every container's
    workingDir; returns the python command."""
    cd, command = (shlex.split(part) for part in entrypoint.split("&&"))
    assert cd[0] == "cd" and all(c["workingDir"] == cd[1] for p in pods for c in p["containers"])
    return command


# --------------------------------------------------------------------------------------- KubeRay RayJob
def check_rayjob(job: dict) -> None:
    check_rayjob_fields(job)
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    groups = cluster["workerGroupSpecs"]
    pods = [head, *[g["template"]["spec"] for g in groups]]
    for pod in pods:
        check_placeholders(pod)
    shared = set.intersection(*[set(mounts(p)) for p in pods])  # what the driver and every worker see
    module, args = python_module(split_entrypoint(spec["entrypoint"], pods))
    assert module == "training.ray_train"
    launch, cfg = check_ray_train_args(args)
    check_shared_paths(cfg, shared)
    assert launch.cpus_per_worker >= 1 + cfg.data.num_workers  # the rank + its loader processes
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # no rank on the head
    limits = [(g["replicas"], g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in groups]
    gpus = sum(n * int(lim.get("nvidia.com/gpu", 0)) for n, lim in limits)
    cpus = sum(n * float(lim["cpu"]) for n, lim in limits)
    assert launch.workers * launch.gpus_per_worker == gpus  # one rank per GPU, none idle
    assert launch.workers * launch.cpus_per_worker <= cpus
    assert all(g["replicas"] == g["minReplicas"] == g["maxReplicas"] for g in groups)  # a fixed world size
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert "MLFLOW_TRACKING_URI" in env


def test_rayjob_and_the_ray_job_submit_command():
    path = CLUSTERS / "train-rayjob.yaml"
    job = yaml.safe_load(path.read_text())
    check_rayjob(job)
    (submit,) = comment_commands(path)
    check_ray_job_submit(submit, {"/shared"})
    entry = submit[submit.index("--") + 1:]
    assert entry[3:] == shlex.split(job["spec"]["entrypoint"].split("&&")[1])[3:]  # the same job


def _entrypoint(old: str, new: str):
    def change(job: dict) -> None:
        assert old in job["spec"]["entrypoint"]
        job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(old, new)
    return change


def _unmount_head(job: dict) -> None:
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("volumeMounts")


@pytest.mark.parametrize("change", [
    _entrypoint("--workers 16", "--workers 32"),                 # more ranks than GPUs
    _entrypoint("--gpus-per-worker 1", "--gpus-per-worker 0"),   # CPU ranks, GPUs idle
    _entrypoint("--cpus-per-worker 8", "--cpus-per-worker 2"),   # a rank + 6 loader processes on 2 CPUs
    _entrypoint("--workers 16", "--worker 16"),                  # a typo: no abbreviation, training.train rejects it
    _unmount_head,                                               # the driver cannot see /shared
])
def test_rayjob_check_catches_broken_specs(change):
    job = yaml.safe_load((CLUSTERS / "train-rayjob.yaml").read_text())
    change(job)
    with pytest.raises((AssertionError, SystemExit)):
        check_rayjob(job)


# ------------------------------------------------------------------- curation cluster (ray cluster launcher)
def test_curation_cluster_launcher_spec():
    path = CLUSTERS / "ray-cluster.yaml"
    spec = yaml.safe_load(path.read_text())
    assert spec["provider"]["type"] == "local" and spec["min_workers"] == len(spec["provider"]["worker_ips"])
    commands = comment_commands(path)
    assert [c[:2] for c in commands] == [["ray", "up"], ["ray", "job"], ["ray", "down"]]
    assert all(Path(c[2]) == path.relative_to(REPO) for c in (commands[0], commands[2]))
    check_ray_job_submit(commands[1], {"/shared"})
    # every node starts Ray from the checkout the head syncs to it
    (mount,) = spec["file_mounts"]
    for command in [*spec["setup_commands"], *spec["head_start_ray_commands"], *spec["worker_start_ray_commands"]]:
        assert command.startswith(f"cd {mount} && ")


# ------------------------------------------------------------------- curation on KubeRay (RayCluster, RayJob)
def pod_specs(cluster: dict) -> list[dict]:
    """The pod specs of a RayClusterSpec, the head first."""
    return [cluster["headGroupSpec"]["template"]["spec"], *[g["template"]["spec"] for g in cluster["workerGroupSpecs"]]]


def check_curation_cluster(cluster: dict, argv: list[str]) -> None:
    """`pipeline.curate argv` on the Ray cluster of a RayClusterSpec: every pod mounts the volume holding
    IN, OUT and the weights; the job's own actor planner (pipeline.cluster.plan_actors) accepts the
    cluster's resources; every GPU runs an open_clip actor and the stage-1 pool fits the CPUs."""
    nodes = check_raycluster_spec(cluster)
    pods = pod_specs(cluster)
    for pod in pods:
        check_placeholders(pod)
    shared = set.intersection(*[set(mounts(p)) for p in pods])  # the driver and every actor see them
    cfg = check_curate_args(argv, shared)
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # no stage-1 actor on the head
    # the actor pools are sized from the cluster when the job starts: a fixed cluster
    assert all(g["replicas"] == g["minReplicas"] == g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    resources = {"CPU": sum(c for c, _ in nodes), "GPU": sum(g for _, g in nodes)}
    plan = plan_actors(cfg, resources, [c for c, _ in nodes])  # ConfigError: open_clip on cuda without a GPU
    assert any(g == 0 and c > 0 for c, g in nodes), "a CPU group for stage 1"
    assert not plan.clip_in_stage1 and plan.clip_gpus <= max(g for _, g in nodes)  # one actor fits a node
    assert cfg.job.clip_actors * plan.clip_gpus == resources["GPU"]  # open_clip on every GPU, none asked beyond
    clip_cpus = cfg.job.clip_actors * plan.clip_cpus
    assert plan.process_actors * plan.process_cpus + clip_cpus <= resources["CPU"]


def _curate_docs() -> tuple[dict, dict]:
    return (yaml.safe_load((CLUSTERS / "curate-raycluster.yaml").read_text()),
            yaml.safe_load((CLUSTERS / "curate-rayjob.yaml").read_text()))


def test_curation_raycluster_and_its_ray_job_submit_command():
    path = CLUSTERS / "curate-raycluster.yaml"
    doc, _ = _curate_docs()
    check_raycluster(doc)
    (submit,) = comment_commands(path)
    check_ray_job_submit(submit, {"/shared"})
    _, args = python_module(submit[submit.index("--") + 1:])
    check_curation_cluster(doc["spec"], args)


def test_curation_rayjob_runs_the_same_job_on_the_same_cluster():
    doc, job = _curate_docs()
    check_rayjob_fields(job)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster == doc["spec"]  # "the shape of curate-raycluster.yaml": one cluster shape, two ways to run
    module, args = python_module(split_entrypoint(job["spec"]["entrypoint"], pod_specs(cluster)))
    assert module == "pipeline.curate"
    check_curation_cluster(cluster, args)
    submit = comment_commands(CLUSTERS / "curate-raycluster.yaml")[0]
    assert args == python_module(submit[submit.index("--") + 1:])[1]  # the same job either way


def _job_args(old: str, new: str):
    def change(job: dict) -> None:
        assert old in job["spec"]["entrypoint"]
        job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(old, new)
    return change


def _group(name: str, edit):
    def change(job: dict) -> None:
        (group,) = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == name]
        edit(group)
    return change


def _drop_group(name: str):
    def change(job: dict) -> None:
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        groups[:] = [g for g in groups if g["groupName"] != name]
    return change


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _pop(*keys: str):
    """Delete job[keys[0]]...[keys[-1]]."""
    def change(job: dict) -> None:
        node = job
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return change


def _set(*keys, value):
    def change(job: dict) -> None:
        node = job
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


HEAD = ("spec", "rayClusterSpec", "headGroupSpec")

# required fields of the CRDs, and their types: RayJob, then RayClusterSpec (in a RayJob or a RayCluster)
RAYJOB_BREAKS = [
    _set("apiVersion", value="ray.io/v1alpha1"),                           # another CRD version
    _pop("spec", "entrypoint"),
    _pop("spec", "rayClusterSpec"),                                          # no cluster at all
    _set("spec", "clusterSelector", value={"ray.io/cluster": "i2vgen-curate"}),  # two clusters
    _pop("spec", "shutdownAfterJobFinishes"),                                # the cluster outlives the job
]
CLUSTER_BREAKS = [
    _pop(*HEAD, "rayStartParams"),
    _set(*HEAD, "rayStartParams", "num-cpus", value=0),                     # map[string]string
    _set(*HEAD, "template", "spec", "containers", value=[]),
    _pop("spec", "rayClusterSpec", "workerGroupSpecs"),
    _group("cpu", lambda g: g.pop("groupName")),
    _group("gpu", lambda g: g.update(groupName="cpu")),                     # group names must be unique
    _group("cpu", lambda g: g.pop("rayStartParams")),
    _group("cpu", lambda g: g.update(minReplicas=5)),                       # min > replicas
    _group("gpu", lambda g: g.update(maxReplicas=1)),                       # replicas > max
    _group("gpu", lambda g: g["template"]["spec"]["containers"][0].pop("image")),
    _group("gpu", lambda g: g["rayStartParams"].update({"num-gpus": "2"})),  # more GPUs than the pod gets
    _group("gpu", lambda g: g["template"]["spec"]["containers"][0]["resources"].update(requests={GPU: 2})),
    _set("spec", "rayClusterSpec", "rayVersion", value="2.9.0"),            # not the Ray of this repository
]
# what the curation job needs from its cluster
JOB_BREAKS = [
    _drop_group("gpu"),                                           # open_clip on cuda, no GPU: the planner refuses
    _group("gpu", lambda g: _limits(g).pop(GPU)),                 # the same: the pods get no GPU
    _group("gpu", lambda g: g["template"]["spec"]["containers"][0].pop("volumeMounts")),  # weights unreachable
    _group("gpu", lambda g: g.update(replicas=1, minReplicas=1)),  # 2 open_clip actors, 1 GPU
    _group("cpu", lambda g: g.update(maxReplicas=8)),             # autoscaling: pools are sized at the start
    _set(*HEAD, "rayStartParams", "num-cpus", value="8"),         # stage-1 actors on the driver's node
    _job_args("job.clip_actors=2", "job.clip_actors=4"),         # more open_clip actors than GPUs
    _job_args("job.clip_actors=2", "job.clip_actors=1"),         # a GPU idles
    _job_args("job.clip_actors=2", "job.clip_actors=2 job.process_actors=500"),  # more than the CPUs hold
    _job_args("job.clip_placement=actors", "job.clip_placement=stage1"),  # cuda inside CPU actors: refused
    _job_args("job.clip_actors=2", "job.clip_actors=2 job.clip_num_gpus=0.5"),  # 2 actors on 1 of 2 GPUs
    _job_args("--output /shared/out", "--output /data/out"),     # OUT off the shared volume
    _job_args("scores.clip.checkpoint=/shared/", "scores.clip.checkpoint=/weights/"),
    _job_args("job.clip_actors=2", "job.clip_actor=2"),          # a key typo (ConfigError)
    _job_args("scores.clip.device=cuda", "scores.clip.device=gpu"),  # not a choice (ConfigError)
    _job_args("scores.clip.model=ViT-H-14", "scores.clip.model=ViT-H-41"),  # no such open_clip model
    _job_args("--input", "--inptu"),                              # pipeline.curate's parser rejects it
]


@pytest.mark.parametrize("change", RAYJOB_BREAKS + CLUSTER_BREAKS + JOB_BREAKS)
def test_curation_rayjob_check_catches_broken_specs(change):
    _, job = _curate_docs()
    change(job)

    def check() -> None:
        check_rayjob_fields(job)
        cluster = job["spec"]["rayClusterSpec"]
        _, args = python_module(split_entrypoint(job["spec"]["entrypoint"], pod_specs(cluster)))
        check_curation_cluster(cluster, args)

    with pytest.raises((AssertionError, KeyError, SystemExit, ConfigError)):
        check()


@pytest.mark.parametrize("change", CLUSTER_BREAKS)
def test_raycluster_check_catches_broken_specs(change):
    doc, _ = _curate_docs()
    job = {"spec": {"rayClusterSpec": doc["spec"]}}  # the same paths as in the RayJob
    change(job)
    with pytest.raises((AssertionError, KeyError)):
        check_raycluster(doc)


def test_kubectl_commands_in_comments_name_their_own_spec():
    """`kubectl apply/delete -f X` in a spec's comments names that spec; port-forward names the head
    service KubeRay makes for it (<name>-head-svc)."""
    seen = 0
    for path in sorted(CLUSTERS.glob("*.yaml")):
        names = {d.get("metadata", {}).get("name") for d in yaml.safe_load_all(path.read_text())}
        comments = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        for target in re.findall(r"kubectl (?:apply|delete) -f (\S+)", comments):
            assert Path(target) == path.relative_to(REPO), (path.name, target)
            seen += 1
        for service in re.findall(r"kubectl port-forward service/(\S+)", comments):
            assert service in {f"{n}-head-svc" for n in names}, (path.name, service)
            seen += 1
    assert seen >= 5


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
CHECKED = {"train-k8s-job.yaml", "train-hostfile.example", "train-rayjob.yaml", "ray-cluster.yaml",
           "train-slurm.sbatch", "curate-raycluster.yaml", "curate-rayjob.yaml"}


def test_every_spec_in_clusters_is_checked_here():
    assert {p.name for p in CLUSTERS.iterdir()} == CHECKED


def test_comment_commands_reads_continued_lines(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("# intro\n#   torchrun --nnodes 2 \\\n#       -m training.train --config a.yaml x=1\n"
                    "# deepspeed is mentioned in prose\nkey: 1\n#   ray down c.yaml   # a note\n")
    assert comment_commands(spec) == [["torchrun", "--nnodes", "2", "-m", "training.train", "--config", "a.yaml",
                                       "x=1"], ["ray", "down", "c.yaml"]]
