"""The Ray side of the curation job: connect to a cluster, and size the actor pools from its resources.

`init_ray` connects to RAY_ADDRESS (set by `ray job submit`; `RAY_ADDRESS=auto` picks the cluster `ray
start` made on this machine), else starts a local Ray bound to 127.0.0.1. `plan_actors` is a pure function
of the config and the cluster's resources (tested without Ray); `plan_for_cluster` asks the connected
cluster for them. Both run before any source is processed, so a setting the cluster cannot honour (open_clip
on `cuda` without a GPU) stops the job before any work, as a ConfigError naming the field.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.configtree import ConfigError

if TYPE_CHECKING:  # annotations only: pipeline.local_cluster imports RAY_ENV from here, without the config tree
    from curation.config import CurateConfig

log = logging.getLogger(__name__)

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Loopback-friendly, telemetry-free Ray (set unless the environment already says otherwise)."""


def init_ray(cfg: CurateConfig) -> None:
    """Connect to RAY_ADDRESS (set by `ray job submit`), else start a local cluster on 127.0.0.1."""
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs = {}
        if cfg.job.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.job.object_store_memory_mb * 2**20
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)


@dataclass(frozen=True)
class ActorPlan:
    """The actor pools of one run, resolved from `job.*` and the cluster's resources."""

    clip_in_stage1: bool
    """open_clip runs inside the stage-1 actors (job.clip_placement resolved to 'stage1')."""
    clip_gpus: float
    """GPUs per open_clip actor in stage 2 (0 when clip_in_stage1)."""
    clip_cpus: float
    """CPUs per open_clip actor in stage 2 (0 when clip_in_stage1)."""
    threads: int
    """Sources in flight per stage-1 actor (job.sources_per_actor, capped at what one node holds)."""
    process_cpus: float
    """CPUs each stage-1 actor reserves."""
    process_actors: int
    """Stage-1 pool size (fixed, so all actors start together)."""


def plan_actors(cfg: CurateConfig, cluster: dict[str, float], node_cpus: list[float] | None = None) -> ActorPlan:
    """Resolve `job.clip_placement` and the `job.*` sizes left at None against the cluster's resources.

    `cluster`: ray.cluster_resources(); `node_cpus`: the CPUs of each alive node (None: one node).
    Stage-1 actors get the CPUs that the open_clip actors do not reserve. ConfigError when
    scores.clip.device is 'cuda' but open_clip would get no GPU.
    """
    job = cfg.job
    has_gpu = cluster.get("GPU", 0) >= 1
    placement = job.clip_placement if job.clip_placement != "auto" else ("actors" if has_gpu else "stage1")
    in_stage1 = placement == "stage1"
    if in_stage1:
        clip_gpus = clip_cpus = 0.0
    else:
        clip_gpus = float(job.clip_num_gpus) if job.clip_num_gpus is not None else (1.0 if has_gpu else 0.0)
        clip_cpus = float(job.clip_cpus) if job.clip_cpus is not None else (1.0 if clip_gpus > 0 else 0.0)
    if cfg.scores.clip.device == "cuda" and clip_gpus <= 0:
        # Ray hides every GPU from an actor that reserved none: open_clip could not see one
        raise ConfigError(
            f"scores.clip.device: 'cuda' but open_clip gets no GPU here (cluster GPUs: {cluster.get('GPU', 0):g}, "
            f"job.clip_placement resolves to {placement!r}, job.clip_num_gpus={job.clip_num_gpus}); use "
            "scores.clip.device=auto or cpu, or a cluster with a GPU (GPU nodes an autoscaler adds later: set "
            "job.clip_placement=actors and job.clip_num_gpus=1)"
        )
    total = cluster.get("CPU", 1)
    free = total - (0.0 if in_stage1 else job.clip_actors * clip_cpus)
    biggest_node = max(node_cpus) if node_cpus else total
    # an actor must fit on one node: no more threads than one node has CPU shares for
    threads = max(1, min(job.sources_per_actor, int(biggest_node // job.process_cpus)))
    actor_cpus = job.process_cpus * threads
    if job.process_actors is not None:
        process_actors = job.process_actors
    else:
        slots = max(1, int(free // job.process_cpus))  # sources in flight over the whole cluster
        process_actors = max(1, math.ceil(slots / threads))
        if free > 0:
            # e.g. 3 CPUs, 2 threads: two actors of 1.5 CPUs, not one actor and an idle CPU
            actor_cpus = min(actor_cpus, free / process_actors)
    return ActorPlan(clip_in_stage1=in_stage1, clip_gpus=clip_gpus, clip_cpus=clip_cpus, threads=threads,
                     process_cpus=actor_cpus, process_actors=process_actors)


def plan_for_cluster(cfg: CurateConfig) -> ActorPlan:
    """plan_actors for the cluster Ray is connected to (logged)."""
    import ray

    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    plan = plan_actors(cfg, ray.cluster_resources(), nodes or None)
    if plan.clip_in_stage1:
        log.info("stage-1 actors: %d x %g CPU, %d sources at a time each, CLIP scoring inside them",
                 plan.process_actors, plan.process_cpus, plan.threads)
    else:
        log.info("stage-1 actors: %d x %g CPU, %d sources at a time each; CLIP scoring actors: %d x (%g CPU, "
                 "%g GPU)", plan.process_actors, plan.process_cpus, plan.threads, cfg.job.clip_actors,
                 plan.clip_cpus, plan.clip_gpus)
    return plan
