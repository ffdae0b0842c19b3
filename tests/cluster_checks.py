"""Shared checkers and parsers for the launch specs in clusters/ (used by tests/unit/test_clusters_*.py).

They read a spec's comment commands, run command lines through the real argument parsers (torchrun's, the
deepspeed launcher's, `ray job submit`'s, training.train's, training.ray_train's, pipeline.curate's), load
and validate the configs those commands name, check that every path a run reads or writes lies on a shared
mount, that pod specs carry REPLACE_ME placeholders, and that KubeRay manifests carry the fields their CRD
(ray.io/v1) requires (returning the CPUs and GPUs Ray sees on every node). Nothing is launched.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
import shlex
import tempfile
from pathlib import Path

from common import configtree
from curation import config as curate_config
from curation.config import CurateConfig
from pipeline import curate
from training import ray_train, train
from training.config import TrainConfig, load_config, missing_paths, validate

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
PLACEHOLDER = "REPLACE_ME"
LAUNCHERS = ("torchrun", "deepspeed", "ray job submit", "python -m", "ray up", "ray down", "sbatch")
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------- commands and configs
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
    """Whether NAME is an importable module here."""
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


def check_ray_job_submit(argv: list[str], shared: set[str]) -> dict:
    """`ray job submit OPTIONS -- ENTRYPOINT`: Ray's own CLI parser, then the entrypoint; returns the parsed
    options (address, runtime_env_json, entrypoint, ...)."""
    from ray.dashboard.modules.job.cli import submit

    assert argv[:3] == ["ray", "job", "submit"], argv
    params = submit.make_context("submit", argv[3:]).params
    assert params["address"] and params["working_dir"] == "."  # submitted from the checkout
    check_entrypoint(list(params["entrypoint"]), shared)
    return params


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


# ------------------------------------------------------------------------------ Ray cluster launcher (ray up)
def check_launcher_config(spec: dict) -> dict:
    """What `ray up` does to a cluster-launcher spec before it starts anything: its config preparation (for
    the local provider: head_ip, worker_ips, no node types of its own) and Ray's JSON schema (no unknown
    keys, the types of known ones); a local cluster keeps every listed machine (min_workers = max_workers =
    the worker IPs: Ray silently caps larger numbers). Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(spec)
    validate_config(prepared)
    if spec["provider"]["type"] == "local":
        ips = spec["provider"]["worker_ips"]
        assert spec["min_workers"] == spec["max_workers"] == len(ips) == len(set(ips)), (spec["min_workers"], ips)
    return prepared


def ray_start_params(command: str, checkout: str) -> dict:
    """`cd CHECKOUT && [VAR=value ...] .venv/bin/ray start ...` (a head/worker start command): the checkout's
    ray, its options through Ray's own `ray start` parser; returns them (num_cpus, num_gpus, head, ...)."""
    from ray.scripts.scripts import start

    cd, run = (shlex.split(part) for part in command.split("&&"))
    assert cd == ["cd", checkout], command
    while "=" in run[0]:  # environment assignments
        run = run[1:]
    assert run[:2] == [".venv/bin/ray", "start"], command
    return start.make_context("start", run[2:]).params


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


def pod_specs(cluster: dict) -> list[dict]:
    """The pod specs of a RayClusterSpec, the head first."""
    return [cluster["headGroupSpec"]["template"]["spec"], *[g["template"]["spec"] for g in cluster["workerGroupSpecs"]]]
