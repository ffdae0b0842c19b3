"""The Ray stage classes called directly (no Ray): open_clip inside stage 1, several sources per actor, and
how the job sizes its actors from the cluster's resources."""

from __future__ import annotations

import copy
import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from curation.config import load_config
from curation.inputs import InputItem
from common.configtree import ConfigError
from pipeline.cluster import plan_actors
from pipeline.stages import (CLIP_LOAD_ERROR, STAGE_BUG, ClipScoring, ProcessSources, ScoreClips, decode_payload,
                             item_to_row)
from tests import synth
from tests.decoder_faults import running_decoders

REPO = Path(__file__).resolve().parents[2]
DEFAULT_YAML = REPO / "configs" / "curate_default.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEFAULT_YAML,
                       ["shots.min_shot_s=0.5", "filter.min_duration_s=0.5", "decode.timeout_s=60",
                        "job.source_timeout_s=120"])  # a hang fails a test in minutes, not the suite


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("stages")
    return [synth.write_shots_video(folder / f"v{k}.mp4", (30, 24, 36), seed=k)[0] for k in range(3)]


def _batch(path: Path) -> dict:
    item = InputItem(source=str(path), uri=str(path), kind="video", caption="a textured pattern moves sideways")
    return {"item": np.array([item_to_row(item)["item"]], dtype=object)}


def _result(out: dict):
    return decode_payload(out["payload"][0])


def _rows(result) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "_timing"} for r in result.clip_rows]


def test_open_clip_in_stage1_equals_its_own_stage(cfg, videos):
    """clip_placement 'stage1' (ProcessSources scoring its own clips) gives the rows of stage 1 followed
    by stage 2 (ScoreClips), and drops the sampled frames before the payload leaves the actor."""
    fused = _result(ProcessSources(cfg, score_clips=True)(_batch(videos[0])))
    plain = ProcessSources(cfg)(_batch(videos[0]))
    assert _result(plain).clip_frames  # stage 1 alone ships the sampled frames on
    two_stage = _result(ScoreClips(cfg)({"key": plain["key"], "payload": plain["payload"]}))
    assert fused.clip_frames == [] and two_stage.clip_frames == []
    assert len(fused.clip_rows) == 3
    assert all(np.isfinite(r["clip_similarity"]) for r in fused.clip_rows)
    assert _rows(fused) == _rows(two_stage)
    assert fused.media == two_stage.media


def test_clip_scoring_fills_each_clip_row_and_handles_missing_frames_and_captions(cfg):
    """ClipScoring.score, what both placements of open_clip run: per clip the cosine between its mean frame
    embedding and the source's caption (clips of several sizes in one source), NaN for a clip without frames
    or a source without a caption; the sampled frames are dropped afterwards."""
    from curation.clip_score import clip_similarity
    from curation.process import SourceResult

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 72, 128, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    scoring = ClipScoring(cfg)

    def result(caption: str) -> SourceResult:
        return SourceResult({"source": "s"}, clip_rows=[{"caption": caption, "clip_similarity": float("nan")}
                                                        for _ in range(3)], clip_frames=[a, b, a[:0]])

    res = result("a cat")
    scoring.score(res)
    text = scoring.scorer.embed_texts(["a cat"])[0]
    got = [r["clip_similarity"] for r in res.clip_rows]
    assert got[0] == pytest.approx(clip_similarity(scoring.scorer.embed_images(a), text), abs=1e-5)
    assert got[1] == pytest.approx(clip_similarity(scoring.scorer.embed_images(b), text), abs=1e-5)
    assert got[0] != pytest.approx(got[1], abs=1e-3) and np.isnan(got[2])  # no frames: no similarity
    assert res.clip_frames == [] and res.source_row["_clip_random_weights"] is True
    uncaptioned = result("   ")
    scoring.score(uncaptioned)
    assert all(np.isnan(r["clip_similarity"]) for r in uncaptioned.clip_rows) and uncaptioned.clip_frames == []


def test_open_clip_that_cannot_load_flags_the_source_for_the_driver(cfg, videos, tmp_path):
    broken = tmp_path / "vit.safetensors"
    broken.write_bytes(b"not a checkpoint")
    bad = dataclasses.replace(cfg, scores=dataclasses.replace(
        cfg.scores, clip=dataclasses.replace(cfg.scores.clip, checkpoint=str(broken))))
    res = _result(ProcessSources(bad, score_clips=True)(_batch(videos[0])))
    assert "open_clip did not load" in res.source_row[CLIP_LOAD_ERROR]
    assert res.clip_frames == []


def test_a_programming_error_in_stage_1_is_flagged_for_the_driver_not_recorded_as_bad_input(cfg, videos):
    """A bug (here a config value of the wrong type slipped in after validation) is not an input error:
    stage 1 hands it to the driver, which stops the job (Ray Data would drop a block that raised)."""
    stage = ProcessSources(cfg)
    decode = copy.copy(stage.cfg.decode)
    decode.max_pixels = "64 MP"  # bypasses __post_init__, as a bug would
    stage.cfg = dataclasses.replace(stage.cfg, decode=decode)
    res = _result(stage(_batch(videos[0])))
    assert res.source_row[STAGE_BUG].startswith("stage 1: ")
    assert "TypeError" in res.source_row[STAGE_BUG] or "DecoderBugError" in res.source_row[STAGE_BUG]


def test_a_programming_error_in_open_clip_scoring_is_flagged_not_a_score_error(cfg, videos):
    plain = ProcessSources(cfg)(_batch(videos[0]))
    stage2 = ScoreClips(cfg)
    stage2.scoring.score = lambda result: None.attribute  # an AttributeError from our own code
    res = _result(stage2({"key": plain["key"], "payload": plain["payload"]}))
    assert res.source_row[STAGE_BUG].startswith("stage 2 (open_clip): ") and "AttributeError" in res.source_row[STAGE_BUG]
    assert not any(r.get("score_error") for r in res.clip_rows)


def test_sources_run_in_parallel_threads_with_their_own_decoders(cfg, videos):
    """One actor called from several threads at once (job.sources_per_actor): every source gives what it
    gives alone, and each calling thread decodes in a decoder process of its own."""
    stage = ProcessSources(cfg, score_clips=True)
    alone = [_rows(_result(stage(_batch(v)))) for v in videos]
    before = running_decoders()
    got: dict[int, list] = {}
    during: list[set[int]] = []
    failed: list[BaseException] = []
    barrier = threading.Barrier(len(videos), timeout=300)  # a thread that fails breaks it for the others

    def work(k: int) -> None:
        try:
            barrier.wait()  # all three start together
            got[k] = _rows(_result(stage(_batch(videos[k]))))
            # a decoder process dies with the thread that started it (PR_SET_PDEATHSIG): look while all live
            if barrier.wait() == 0:
                during.append(running_decoders())
            barrier.wait()
        except BaseException as exc:  # shown by the assertion below, not lost in a thread
            failed.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(videos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not [t for t in threads if t.is_alive()] and not failed, failed
    assert [got[k] for k in range(len(videos))] == alone
    assert len(during[0] - before) == len(videos)  # one new decoder process per calling thread


def test_a_model_load_that_never_ends_stops_the_job_with_a_reason_instead_of_waiting_forever(cfg, videos):
    """open_clip loads in the background of a stage-1 actor; its sources wait for it at most
    job.source_timeout_s, then the source carries the reason the driver stops the job with."""
    import concurrent.futures

    quick = dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, source_timeout_s=1.0))
    stage = ProcessSources(quick, score_clips=True)
    stage._scoring.result()  # the real load is done; stand in a load that is still running
    stage._scoring = concurrent.futures.Future()
    res = _result(stage(_batch(videos[0])))
    assert res.source_row[CLIP_LOAD_ERROR] == "open_clip did not load: not loaded within 1 s (job.source_timeout_s)"
    assert res.clip_frames == []


@pytest.mark.parametrize("cluster, nodes, overrides, want", [
    # CPU only: open_clip in stage 1, one actor per CPU
    ({"CPU": 2}, [2], [], dict(clip_in_stage1=True, threads=1, process_cpus=1.0, process_actors=2)),
    # a GPU: open_clip gets its actor (1 GPU, 1 CPU), stage 1 the rest
    ({"CPU": 8, "GPU": 1}, [8], [], dict(clip_in_stage1=False, clip_gpus=1.0, clip_cpus=1.0, process_actors=7)),
    # CPU only but asked for its own actors: 0 CPU reserved, stage 1 keeps every CPU
    ({"CPU": 4}, [4], ["job.clip_placement=actors"], dict(clip_in_stage1=False, clip_cpus=0.0, process_actors=4)),
    # two sources per actor
    ({"CPU": 8}, [8], ["job.sources_per_actor=2"], dict(threads=2, process_cpus=2.0, process_actors=4)),
    # 3 CPUs, 2 per actor: two actors of 1.5 CPUs, no idle CPU
    ({"CPU": 3}, [3], ["job.sources_per_actor=2"], dict(threads=2, process_cpus=1.5, process_actors=2)),
    # an actor must fit on one node: no more threads than the biggest node has CPUs
    ({"CPU": 8}, [2, 2, 2, 2], ["job.sources_per_actor=4"], dict(threads=2, process_cpus=2.0, process_actors=4)),
    # explicit pool size
    ({"CPU": 16}, [16], ["job.process_actors=3", "job.sources_per_actor=2"],
     dict(threads=2, process_cpus=2.0, process_actors=3)),
])
def test_actor_sizes_follow_the_cluster(cluster, nodes, overrides, want):
    plan = plan_actors(load_config(DEFAULT_YAML, overrides), cluster, nodes)
    assert {k: getattr(plan, k) for k in want} == want


def test_clip_placement_and_threads_are_checked_early():
    with pytest.raises(ConfigError, match=r"job.clip_placement: 'gpu' is not one of \['auto', 'actors', 'stage1'\]"):
        load_config(DEFAULT_YAML, ["job.clip_placement=gpu"])
    with pytest.raises(ConfigError, match="job.sources_per_actor"):
        load_config(DEFAULT_YAML, ["job.sources_per_actor=0"])


@pytest.mark.parametrize("cluster, overrides", [
    ({"CPU": 2}, []),                                              # no GPU: auto puts open_clip in stage 1
    ({"CPU": 8, "GPU": 1}, ["job.clip_placement=stage1"]),          # a GPU, but stage-1 actors reserve none
    ({"CPU": 8, "GPU": 1}, ["job.clip_num_gpus=0"]),                # its own actors, without a GPU
])
def test_clip_on_cuda_without_a_gpu_for_it_is_refused_naming_the_field(cluster, overrides):
    cfg = load_config(DEFAULT_YAML, ["scores.clip.device=cuda", *overrides])
    with pytest.raises(ConfigError, match="scores.clip.device: 'cuda' but open_clip gets no GPU"):
        plan_actors(cfg, cluster, [cluster["CPU"]])


def test_clip_on_cuda_with_a_gpu_is_planned_on_it():
    cfg = load_config(DEFAULT_YAML, ["scores.clip.device=cuda"])
    plan = plan_actors(cfg, {"CPU": 8, "GPU": 2}, [8])
    assert (plan.clip_in_stage1, plan.clip_gpus) == (False, 1.0)
    # a cluster whose GPU nodes an autoscaler adds later: asked for explicitly
    later = load_config(DEFAULT_YAML, ["scores.clip.device=cuda", "job.clip_placement=actors", "job.clip_num_gpus=1"])
    assert plan_actors(later, {"CPU": 8}, [8]).clip_gpus == 1.0
