"""The KubeRay and Ray launch specs in clusters/ are loaded and checked: every RayCluster and RayJob carries
the fields its CRD (ray.io/v1) requires, with their types; the training RayJob (train-rayjob.yaml) and its
`ray job submit` command run training.ray_train with one rank per GPU on the shared volume; the curation
RayCluster (curate-raycluster.yaml) and RayJob (curate-rayjob.yaml) run the same pipeline.curate job on the
same cluster shape, whose command goes through pipeline.curate's parser, config loader and actor planner
against the cluster's resources; the cluster launcher specs for curation (ray-cluster.yaml) and for training
(train-ray-cluster.yaml: GPU nodes, both training stages as Ray jobs sized to the nodes' declared GPUs and CPUs,
every path on the shared file system its setup requires) and their ray up / job submit / down commands;
kubectl commands in comments name their own spec. Each broken field is caught. Commands go through the real
parsers (`ray up`'s config preparation and schema, `ray start`'s, `ray job submit`'s, training.ray_train's,
pipeline.curate's). Nothing is launched: no Ray, no processes.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from click import ClickException
from jsonschema import ValidationError

from common.configtree import ConfigError
from pipeline.cluster import plan_actors
from tests.cluster_checks import (
    CLUSTERS,
    GPU,
    REPO,
    check_curate_args,
    check_placeholders,
    check_ray_job_submit,
    check_ray_train_args,
    check_raycluster,
    check_launcher_config,
    check_raycluster_spec,
    check_rayjob_fields,
    check_shared_paths,
    comment_commands,
    mounts,
    pod_specs,
    python_module,
    ray_start_params,
    split_entrypoint,
)


# --------------------------------------------------------------------------------------- KubeRay RayJob
def check_rayjob(job: dict) -> None:
    """The training RayJob: training.ray_train with one rank per GPU of a fixed cluster, on the shared volume."""
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
    check_launcher_config(spec)
    assert spec["provider"]["type"] == "local" and spec["min_workers"] == len(spec["provider"]["worker_ips"])
    commands = comment_commands(path)
    assert [c[:2] for c in commands] == [["ray", "up"], ["ray", "job"], ["ray", "down"]]
    assert all(Path(c[2]) == path.relative_to(REPO) for c in (commands[0], commands[2]))
    check_ray_job_submit(commands[1], {"/shared"})
    # every node starts Ray from the checkout the head syncs to it
    (mount,) = spec["file_mounts"]
    for command in [*spec["setup_commands"], *spec["head_start_ray_commands"], *spec["worker_start_ray_commands"]]:
        assert command.startswith(f"cd {mount} && ")


# ------------------------------------------------------------------- training cluster (ray cluster launcher)
TRAIN_LAUNCHER = CLUSTERS / "train-ray-cluster.yaml"


def check_training_launcher(spec: dict, commands: list[list[str]]) -> None:
    """The training launcher spec and the commands in its comments: `ray up` accepts the spec (a fixed set of
    machines); every node installs the checkout (`make setup`) after its setup has checked the shared mount;
    the head runs no rank (0 CPUs, 0 GPUs for Ray), every worker declares its GPUs and CPUs; `ray up`, one
    `ray job submit` per training stage to this head, `ray down`. Each job: training.ray_train with one rank
    per declared GPU (none idle, none missing), its ranks' CPUs fitting every node and the whole cluster, every
    path on the shared mount, recovery from a lost node (--max-failures != 0), MLflow on a server."""
    check_launcher_config(spec)
    (checkout,) = spec["file_mounts"]
    assert spec["file_mounts"][checkout] == "."  # this checkout, synced to every node
    setup = spec["setup_commands"]
    checks = [i for i, c in enumerate(setup) if c.startswith("mountpoint -q ")]
    shared = {shlex.split(setup[i])[2] for i in checks}
    install = f"cd {checkout} && make setup"
    assert shared and install in setup and max(checks) < setup.index(install)  # installed after the mount check
    (head,) = [ray_start_params(c, checkout) for c in spec["head_start_ray_commands"]]
    assert head["head"] and head["num_cpus"] == 0 and head["num_gpus"] == 0  # the driver and controller only
    (worker,) = [ray_start_params(c, checkout) for c in spec["worker_start_ray_commands"]]
    assert not worker["head"] and worker["num_gpus"] and worker["num_cpus"]  # declared: the sizes checked below
    nodes, node_gpus, node_cpus = len(spec["provider"]["worker_ips"]), worker["num_gpus"], worker["num_cpus"]

    assert [c[:2] for c in commands] == [["ray", "up"], ["ray", "job"], ["ray", "job"], ["ray", "down"]]
    assert all(Path(c[2]) == TRAIN_LAUNCHER.relative_to(REPO) for c in (commands[0], commands[-1]))
    stages = set()
    for submit in commands[1:-1]:
        params = check_ray_job_submit(submit, shared)  # parsers, config load + validate, shared paths
        assert params["address"] == f"http://{spec['provider']['head_ip']}:8265"
        env = json.loads(params["runtime_env_json"])["env_vars"]
        assert env["MLFLOW_TRACKING_URI"].startswith("http")  # not a mlflow.db in the job's temporary dir
        module, args = python_module(list(params["entrypoint"]))
        assert module == "training.ray_train"
        launch, cfg = check_ray_train_args(args)
        stages.add(cfg.stage)
        assert launch.gpus_per_worker == 1 and launch.max_failures != 0
        assert launch.workers * launch.gpus_per_worker == nodes * node_gpus  # one rank per GPU, none idle
        assert launch.workers * launch.cpus_per_worker <= nodes * node_cpus
        assert node_gpus // launch.gpus_per_worker * launch.cpus_per_worker <= node_cpus  # a node's ranks fit it
        assert launch.cpus_per_worker >= 1 + cfg.data.num_workers  # the rank + its loader processes
    assert stages == {"base", "refine"}


def _launcher() -> tuple[dict, list[list[str]]]:
    return yaml.safe_load(TRAIN_LAUNCHER.read_text()), comment_commands(TRAIN_LAUNCHER)


def test_training_cluster_launcher_spec_and_its_commands():
    check_training_launcher(*_launcher())


def test_training_launcher_marks_what_a_user_replaces():
    """The machines, the SSH user and the worker sizes are on lines marked `# replace`, as in ray-cluster.yaml;
    the job commands address the head placeholder."""
    marked = [line.split(":")[0].strip() for line in TRAIN_LAUNCHER.read_text().splitlines()
              if "# replace" in line and not line.startswith("#")]
    assert {"head_ip", "worker_ips", "ssh_user"} <= set(marked) and any("--num-gpus" in m for m in marked)
    spec, commands = _launcher()
    provider = spec["provider"]
    assert provider["head_ip"] == "HEAD_IP" and all(ip.startswith("WORKER_IP_") for ip in provider["worker_ips"])
    assert all(c[3:5] == ["--address", "http://HEAD_IP:8265"] for c in commands if c[:2] == ["ray", "job"])


def _in_commands(old: str, new: str):
    def change(spec: dict, commands: list[list[str]]) -> None:
        lines = [shlex.join(c) for c in commands]
        assert any(old in line for line in lines)
        commands[:] = [shlex.split(line.replace(old, new)) for line in lines]
    return change


def _in_spec(key: str, old: str, new: str):
    def change(spec: dict, commands: list[list[str]]) -> None:
        assert any(old in c for c in spec[key])
        spec[key] = [c.replace(old, new) for c in spec[key]]
    return change


def _spec_set(key: str, value):
    def change(spec: dict, commands: list[list[str]]) -> None:
        spec[key] = value
    return change


def _one_worker(spec: dict, commands: list[list[str]]) -> None:
    spec["provider"]["worker_ips"] = spec["provider"]["worker_ips"][:1]
    spec["min_workers"] = spec["max_workers"] = 1


def _no_mount_check(spec: dict, commands: list[list[str]]) -> None:
    spec["setup_commands"] = [c for c in spec["setup_commands"] if not c.startswith("mountpoint")]


@pytest.mark.parametrize("change", [
    _in_commands("--workers 16", "--workers 32"),                  # more ranks than the nodes' GPUs
    _in_commands("--workers 16", "--workers 8"),                   # half the GPUs idle
    _in_commands("--cpus-per-worker 8", "--cpus-per-worker 16"),   # 8 ranks x 16 CPUs on a 64-CPU node
    _in_commands("--cpus-per-worker 8", "--cpus-per-worker 4"),    # a rank + 6 loader processes on 4 CPUs
    _in_commands("--max-failures 3", "--max-failures 0"),          # a lost node ends the run
    _in_commands("--max-failures 3", "--max-failure 3"),           # a typo: training.train rejects it
    _in_commands("output_dir=/shared/", "output_dir=/data/"),      # checkpoints off the shared mount
    _in_commands("http://HEAD_IP:8265", "http://127.0.0.1:8265"),  # not this cluster's head
    _in_commands("refine-1280x720.yaml", "base-448x256.yaml"),     # the refine stage is missing
    _in_spec("worker_start_ray_commands", "--num-gpus=8", "--num-gpus=4"),  # nodes with fewer GPUs
    _in_spec("worker_start_ray_commands", " --num-gpus=8", ""),    # GPUs not declared: nothing to size by
    _in_spec("worker_start_ray_commands", "--num-cpus=64", "--num-cpu=64"),  # `ray start` rejects it
    _in_spec("head_start_ray_commands", "--num-gpus=0", "--num-gpus=8"),     # ranks could land on the head
    _in_spec("setup_commands", "make setup", "make install"),      # the checkout's .venv is never built
    _no_mount_check,                                               # no shared file system required
    _one_worker,                                                   # 8 GPUs for 16 ranks
    _spec_set("min_workers", 1),                                   # not every machine joins
    _spec_set("available_node_types", {"gpu": {"resources": {"GPU": 8}}}),  # the local provider refuses it
    _spec_set("idle_timeout_minutes", "5m"),                       # Ray's schema: a number
])
def test_training_launcher_check_catches_broken_specs(change):
    spec, commands = _launcher()
    change(spec, commands)
    with pytest.raises((AssertionError, KeyError, SystemExit, ClickException, ValidationError)):
        check_training_launcher(spec, commands)


# ------------------------------------------------------------------- curation on KubeRay (RayCluster, RayJob)
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
