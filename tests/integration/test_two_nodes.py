"""A two-node Ray cluster on this machine: a head on 127.0.0.1 and a worker node on 127.0.0.2, 1 CPU each
(pipeline.local_cluster.start_head / start_node; only the processes started here are stopped, never with
`ray stop`). While it runs, a LoopbackWatch samples every TCP connection of its processes (GCS, raylets,
agents, drivers, actors, the launchers started here) and every test asserts none left 127.0.0.0/8: Ray
rewrites a head address of 127.0.0.1 to the machine's own non-loopback address for a node joining from
another IP, which must never be contacted. (Listening sockets are not connections: Ray binds some of its
servers to the wildcard address once a node joined through [::ffff:127.0.0.1]; the watch lists them.)

1. The curation job, submitted with `ray job submit`, runs its stage-1 actors on both nodes (OUT/stats.json
   `stage1_sources_by_node`, and a `ray::MapWorker` process under each node's processes), and its output
   (both manifests, every shard byte for byte) equals the run on the one-node cluster of the session.
2. `python -m training.ray_train --workers 2`: one Ray Train worker per node (a `ray::RayTrainWorker`
   process under each node), the per-step losses of the 2-process run started by the `deepspeed` launcher
   (train_support's reference B; test_train_deepspeed's tolerance LOSS_RTOL) and the same samples per step;
   that run in turn equals the torchrun one bit for bit.
3. Node failure: the same training run; the moment the step-4 checkpoint folder appears, the second node
   dies (SIGKILL to its raylet and every process under it at once: with the raylet alone, its workers live
   on for a moment and the rank there finished its save). The surviving rank's step fails within seconds (its Ray Train worker process is
   gone, no hang), the node is started again, Ray Train starts the worker group anew (FailureConfig,
   training.ray_train --max-failures), every rank resumes from the newest *complete* checkpoint (never a
   folder without its COMPLETE marker), and the run ends with the losses and samples of the reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_train_deepspeed import LOSS_RTOL
from train_support import (
    base_args, curated_shards, finish, job_processes, kill_job, launch, metrics, run, steps, two_process_zero2,
)
from two_node_support import LoopbackWatch, wait_for_nodes

from pipeline.local_cluster import ray_env, start_head, start_node

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "assets" / "sample"
SECOND = "127.0.0.2"
LAUNCHER = ["-m", "training.ray_train", "--workers", "2", "--cpus-per-worker", "1"]
REFERENCE_B = ["data.batch_size=1", "deepspeed.zero_stage=2"]  # train_support.two_process_zero2's arguments

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cluster_env() -> dict[str, str]:
    """Environment of both nodes and of the drivers started here: the repo importable, loopback-only Ray."""
    return ray_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cluster():
    head = start_head(num_cpus=1, dashboard=True, env=cluster_env(), cwd=REPO, timeout=90)
    nodes = {}
    watch = LoopbackWatch({"head": head.proc.pid}).start()
    try:
        nodes["second"] = start_node(head, SECOND, num_cpus=1)
        watch.add_root("second", nodes["second"].proc.pid)
        wait_for_nodes(head.dashboard, ["127.0.0.1", SECOND])
        yield {"head": head, "nodes": nodes, "watch": watch}
    finally:
        watch.stop()
        for node in nodes.values():
            node.stop()
        head.stop()


def _assert_loopback_only(watch: LoopbackWatch) -> None:
    watch.sample()
    print(f"loopback watch: {watch.connections_seen} connection samples, listening on {sorted(watch.listening)}; "
          f"not on loopback: {sorted(watch.wildcard_listeners)}")
    assert watch.connections_seen > 0  # the watch saw the cluster talk at all
    assert not watch.violations, watch.violations[:10]


def _inputs(folder: Path) -> Path:
    """The bundled sample twice, each copy under its own names: 8 sources (6 videos, 2 of them broken, and 2
    image-text pairs), so that both stage-1 actors get work."""
    folder.mkdir()
    for copy in ("a", "b"):
        for src in SAMPLE.iterdir():
            (folder / f"{copy}_{src.name}").write_bytes(src.read_bytes())
    return folder


def _tables(out: Path) -> dict[str, list[dict]]:
    key = {"sources": "source", "clips": "clip_id"}
    return {name: sorted(pq.read_table(out / "manifest" / f"{name}.parquet").to_pylist(), key=lambda r: r[k])
            for name, k in key.items()}


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_curation_job_submitted_to_two_nodes_uses_both_and_equals_one_node(cluster, ray_cluster, tmp_path):
    inp = _inputs(tmp_path / "in")
    two, one = tmp_path / "two-nodes", tmp_path / "one-node"
    curate = ["python", "-m", "pipeline.curate", "--input", str(inp)]
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster["head"].dashboard,
              "--working-dir", ".", "--", *curate, "--output", str(two)]
    res = subprocess.run(submit, env=cluster_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    by_node = json.loads((two / "stats.json").read_text())["stage1_sources_by_node"]
    assert set(by_node) == {"127.0.0.1", SECOND} and all(n > 0 for n in by_node.values()), by_node
    assert sum(by_node.values()) == 8
    watch = cluster["watch"]
    assert watch.ran_on("head", "ray::MapWorker") and watch.ran_on("second", "ray::MapWorker")

    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]}  # the session's one-node cluster
    res = subprocess.run([sys.executable, *curate[1:], "--output", str(one)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert set(json.loads((one / "stats.json").read_text())["stage1_sources_by_node"]) == {"127.0.0.1"}
    assert _tables(two) == _tables(one)
    shards = _shard_bytes(two)
    assert shards and shards == _shard_bytes(one)
    _assert_loopback_only(watch)


def test_ray_train_one_worker_per_node_trains_like_the_deepspeed_launcher(cluster, tmp_path_factory, tmp_path,
                                                                          monkeypatch):
    shards = curated_shards(tmp_path_factory)
    reference = steps(metrics(two_process_zero2(tmp_path_factory, shards, launcher="deepspeed")))
    # the `deepspeed` launcher's 2 processes and torchrun's do the same arithmetic on the same samples
    torchrun = steps(metrics(two_process_zero2(tmp_path_factory, shards)))
    assert {s: (r["keys"], r["loss"]) for s, r in reference.items()} == \
        {s: (r["keys"], r["loss"]) for s, r in torchrun.items()}
    monkeypatch.setenv("RAY_ADDRESS", cluster["head"].address)  # train_support.train_env copies os.environ
    got = steps(run([*base_args(shards), *REFERENCE_B], tmp_path / "out", module=LAUNCHER, timeout=600))
    watch = cluster["watch"]
    assert watch.ran_on("head", "ray::RayTrainWorker") and watch.ran_on("second", "ray::RayTrainWorker")
    assert sorted(got) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for s in reference:
        assert got[s]["keys"] == reference[s]["keys"] and got[s]["sample_ids"] == reference[s]["sample_ids"], s
        assert got[s]["loss"] == pytest.approx(reference[s]["loss"], rel=LOSS_RTOL), s
    _assert_loopback_only(watch)


def _train_workers(root_pid: int) -> set[int]:
    import psutil

    found = set()
    try:
        for p in psutil.Process(root_pid).children(recursive=True):
            try:
                if "ray::RayTrainWorker" in " ".join(p.cmdline()):
                    found.add(p.pid)
            except psutil.Error:
                pass
    except psutil.NoSuchProcess:
        pass
    return found


def _kill_node(node) -> int:
    """The second node dies at once: SIGKILL to its raylet and every process below its `ray start` (the Ray
    workers, the training rank among them). Killing the raylet alone leaves its workers running for a moment:
    the rank there would finish its save first, and the test wants the save cut off."""
    import psutil

    procs = psutil.Process(node.proc.pid).children(recursive=True)
    raylet = node.raylet_pid()
    for p in sorted(procs, key=lambda p: p.pid != raylet):  # the raylet first
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def test_node_loss_mid_save_fails_fast_then_resumes_from_the_newest_complete_checkpoint(
        cluster, tmp_path_factory, tmp_path, monkeypatch):
    shards = curated_shards(tmp_path_factory)
    reference = steps(metrics(two_process_zero2(tmp_path_factory, shards)))
    head, node, watch = cluster["head"], cluster["nodes"]["second"], cluster["watch"]
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    monkeypatch.setenv("RAY_ADDRESS", head.address)
    proc = launch([*base_args(shards), *REFERENCE_B, f"output_dir={out}"], module=LAUNCHER,
                  log=tmp_path / "run.log")
    watch.add_root("launcher", proc.pid)
    seen = set(job_processes(proc))
    try:
        deadline = time.monotonic() + 400
        while not (ckpts / "step-00000004").is_dir():  # the kill lands inside the step-4 save
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step-4 checkpoint"
            time.sleep(0.002)
        survivors = _train_workers(head.proc.pid)
        assert _train_workers(node.proc.pid)  # rank 1 runs on the second node
        lost = _kill_node(node)
        killed_at = time.monotonic()
        assert survivors  # rank 0 ran on the head
        while _train_workers(head.proc.pid) & survivors:  # the surviving rank's step fails, its worker ends
            assert time.monotonic() - killed_at < 60, "the surviving worker hangs after the node loss"
            time.sleep(0.2)
        fail_s = time.monotonic() - killed_at
        complete = sorted(p.name for p in ckpts.glob("step-*") if (p / "COMPLETE").is_file())
        partial = sorted(p.name for p in ckpts.glob("step-*") if not (p / "COMPLETE").is_file())
        print(f"node lost ({lost} processes killed); the surviving rank failed {fail_s:.1f} s later; "
              f"complete {complete}, partial {partial}")
        assert complete == ["step-00000002"] and partial == ["step-00000004"]  # the kill cut the save off

        node.stop()  # what is left of the dead node's processes
        cluster["nodes"]["second"] = node = start_node(head, SECOND, num_cpus=1)
        back_at = time.monotonic()
        watch.add_root("second", node.proc.pid)
        while proc.poll() is None and len([r for r in metrics(out) if r.get("event") == "start"]) < 2:
            time.sleep(0.5)  # Ray Train places the group again once the node is back (it retries on its own)
        print(f"the ranks started again {time.monotonic() - back_at:.1f} s after the node was back")
        rc = finish(proc, timeout=600)
    finally:
        if proc.poll() is None:  # a failed assertion above: nothing of the job outlives the test
            kill_job(proc, [*seen, *job_processes(proc)])
    assert rc == 0, (tmp_path / "run.log").read_text()[-4000:]
    records = metrics(out)
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] is None
    assert Path(starts[1]["resumed_from"]).name == "step-00000002"  # never the cut-off step-4 folder
    after = steps(records[records.index(starts[1]):])
    assert sorted(after) == [3, 4, 5, 6]
    final = steps(records)
    for s in reference:
        assert final[s]["keys"] == reference[s]["keys"] and final[s]["sample_ids"] == reference[s]["sample_ids"], s
        assert final[s]["loss"] == pytest.approx(reference[s]["loss"], rel=LOSS_RTOL), s
    assert (ckpts / "step-00000004" / "COMPLETE").is_file() and (ckpts / "latest").read_text().strip() == "step-00000006"
    _assert_loopback_only(watch)
