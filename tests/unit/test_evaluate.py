"""training.evaluate + training.eval_metrics: the scores on constructed videos (frozen vs moving, a frame equal
to the image, shuffled frames), the CLIP choice and its "not meaningful" marking on every output, and the CLI
end to end on a tiny random base export (built in code) with MLflow on a temporary SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from common.configtree import ConfigError
from curation.clip_score import TINY_MODEL, TINY_MODEL_CFG, ClipScoreConfig, ClipScorer
from model.config import ClipConfig
from model.generate import write_tiny_checkpoints
from training.config import load_config, missing_paths, validate
from training.eval_metrics import (
    METRICS,
    NO_VIT_H,
    build_scorer,
    clip_metrics,
    mean_metrics,
    pixel_motion,
    scorer_config,
    video_metrics,
)
from training.eval_media import prompt_files
from training.evaluate import main
from training.subconfigs import EvaluationConfig

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "assets" / "sample" / "tears_of_steel_frame_0040.jpg"
TINY_BASE = REPO / "configs" / "train" / "tiny-base.yaml"


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer(ClipScoreConfig(model=TINY_MODEL, device="cpu"))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The bundled frame, 128x96 (H, W, 3) uint8."""
    return np.array(Image.open(IMAGE).convert("RGB").resize((128, 96)))


def panning(photo: np.ndarray, frames: int = 8, step: int = 3) -> np.ndarray:
    """A camera pan over the photo: 64x64 windows moving `step` px right per frame."""
    return np.stack([photo[16:80, i * step:i * step + 64] for i in range(frames)])


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("exports"), seed=0)


# --------------------------------------------------------------------------------------------- metrics
def test_frozen_video_has_no_motion_and_a_moving_one_has(scorer, photo):
    moving = panning(photo)
    frozen = np.repeat(moving[:1], len(moving), axis=0)
    still, pan = (video_metrics(scorer, v, moving[0], "", fps=8) for v in (frozen, moving))
    assert still["motion"] == 0.0 and still["flow_motion"] < 0.1 and still["flicker"] == 0.0
    assert pan["motion"] > 2.0 and pan["flow_motion"] > 10.0  # 3 px/frame of 64 at 8 fps = 37.5 % width/s
    assert pixel_motion(frozen) == 0.0 and pixel_motion(moving) > 2.0
    assert still["consistency"] == pytest.approx(1.0, abs=1e-5)  # identical frames


def test_frames_equal_to_the_image_give_fidelity_one(scorer, photo):
    video = panning(photo)
    exact = video_metrics(scorer, video, video[0], "", fps=8)
    assert exact["fidelity_first"] == pytest.approx(1.0, abs=1e-5)
    assert exact["fidelity_mean"] < exact["fidelity_first"]  # later frames drift away from the image
    frozen = video_metrics(scorer, np.repeat(video[:1], 8, axis=0), video[0], "", fps=8)
    assert frozen["fidelity_mean"] == pytest.approx(1.0, abs=1e-5)
    other = video_metrics(scorer, video, np.ascontiguousarray(video[0][::-1, ::-1]), "", fps=8)
    assert other["fidelity_first"] < exact["fidelity_first"] - 1e-3


def test_shuffled_frames_are_less_consistent(scorer, photo):
    """A gradual change of content (a cross-fade from the photo to its inverted mirror image) against the same
    frames out of order. (A pan is no test for the tiny RANDOM CLIP: its patch embedding does not vary
    smoothly with a shift; a trained CLIP's does.)"""
    a = photo[16:80, 32:96].astype(np.float32)
    b = 255.0 - a[::-1]
    video = np.stack([((1 - t) * a + t * b).round().astype(np.uint8) for t in np.linspace(0, 1, 8)])
    shuffled = video[[0, 7, 1, 6, 2, 5, 3, 4]]
    smooth = video_metrics(scorer, video, video[0], "", fps=8)
    jumpy = video_metrics(scorer, shuffled, video[0], "", fps=8)
    assert jumpy["consistency"] < smooth["consistency"] - 0.02  # measured 0.950 vs 0.997
    assert jumpy["motion"] > smooth["motion"]  # pixel space agrees


def test_text_alignment_only_with_a_caption_and_means_skip_missing_values(scorer, photo):
    video = panning(photo, frames=3)
    with_caption = video_metrics(scorer, video, video[0], "a robot on a bridge", fps=8)
    without = video_metrics(scorer, video, video[0], "  ", fps=8)
    assert set(with_caption) == set(METRICS) and -1.0 <= with_caption["text_alignment"] <= 1.0
    assert without["text_alignment"] is None
    means = mean_metrics([with_caption, without])
    assert means["text_alignment"] == with_caption["text_alignment"]
    assert means["motion"] == pytest.approx((with_caption["motion"] + without["motion"]) / 2)
    assert mean_metrics([without])["text_alignment"] is None
    one = clip_metrics(np.eye(4)[:1], np.eye(4)[0], None)  # a one-frame video: no pair to compare
    assert one["consistency"] is None and one["fidelity_first"] == 1.0
    with pytest.raises(ValueError):
        pixel_motion(video.astype(np.float32))


# ---------------------------------------------------------------------------------------- CLIP choice
def test_scorer_choice_uses_a_local_checkpoint_else_says_tiny_random(tmp_path):
    tiny_stage = ClipConfig(kind="tiny-random")
    fallback = scorer_config(EvaluationConfig(), tiny_stage)
    assert (fallback.config.model, fallback.real, fallback.note) == (TINY_MODEL, False, NO_VIT_H)
    weights = tmp_path / "open_clip.bin"
    weights.write_bytes(b"")
    staged = scorer_config(EvaluationConfig(), ClipConfig(kind="openclip", checkpoint=str(weights)))
    assert (staged.config.model, staged.config.checkpoint, staged.source, staged.real) == (
        "ViT-H-14", str(weights), "stage clip", True)
    given = scorer_config(EvaluationConfig(clip_checkpoint=str(weights)), tiny_stage)
    assert (given.config.checkpoint, given.source, given.note) == (str(weights), "evaluation.clip_checkpoint", None)
    with pytest.raises(FileNotFoundError, match="clip_checkpoint"):
        scorer_config(EvaluationConfig(clip_checkpoint=str(tmp_path / "missing.bin")), tiny_stage)


def test_tiny_scorer_is_the_same_model_whatever_the_rng_state(photo):
    choice = scorer_config(EvaluationConfig(), ClipConfig(kind="tiny-random"))
    torch.manual_seed(1)
    first = build_scorer(choice).embed_images(photo[None])
    torch.rand(100)
    before = torch.random.get_rng_state()
    assert np.array_equal(build_scorer(choice).embed_images(photo[None]), first)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left as it was


def test_evaluation_config_in_the_training_tree(tmp_path):
    cfg = load_config(TINY_BASE)
    assert cfg.evaluation.every_steps == 0  # the tiny recipe evaluates once, at the end
    with pytest.raises(ConfigError, match="evaluation.every_steps"):
        load_config(TINY_BASE, ["evaluation.every_steps=-1"])
    with pytest.raises(ConfigError, match="evaluation.every_steps"):
        validate(load_config(REPO / "configs" / "train" / "tiny-refine.yaml", ["evaluation.every_steps=0"]))
    cfg = load_config(TINY_BASE, [f"evaluation.images={tmp_path / 'none'}",
                                  f"evaluation.clip_checkpoint={tmp_path / 'vit.bin'}"])
    assert {k for k, _ in missing_paths(cfg)} == {"evaluation.images", "evaluation.clip_checkpoint"}
    off = load_config(TINY_BASE, ["evaluation.every_steps=null", f"evaluation.images={tmp_path / 'none'}"])
    assert not missing_paths(off)


def test_prompt_folder(tmp_path):
    images, captions = prompt_files(None)
    assert [Path(p).name for p in images] == [IMAGE.name] and "robot" in captions[0]
    Image.open(IMAGE).save(tmp_path / "b.png")
    Image.open(IMAGE).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a robot\n on a bridge ")
    (tmp_path / "notes.md").write_text("ignored")
    images, captions = prompt_files(tmp_path)
    assert [Path(p).name for p in images] == ["a.jpg", "b.png"] and captions == ["a robot on a bridge", ""]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        prompt_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        prompt_files(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- CLI
def decoded(path: Path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].width, frames[0].height


def test_cli_end_to_end_on_a_tiny_export_says_tiny_clip_everywhere(tiny_exports, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    Image.open(IMAGE).save(prompts / "captioned.jpg")
    (prompts / "captioned.txt").write_text("a robot on a bridge")
    Image.open(IMAGE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(prompts / "plain.png")
    out, store = tmp_path / "eval", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--checkpoint", str(tiny_exports[0]),
                           "--images", str(prompts), "--out", str(out), "--tracking-uri", store, "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["clip"]["note"] == NO_VIT_H and summary["clip"]["real"] is False  # stdout says so
    assert "NOT MEANINGFUL" in proc.stderr and NO_VIT_H in proc.stderr  # the log says so

    result = json.loads((out / "eval.json").read_text())
    assert result["clip"]["note"] == NO_VIT_H  # eval.json says so
    assert [p["key"] for p in result["prompts"]] == ["captioned", "plain"]
    assert result["prompts"][0]["text_alignment"] is not None and result["prompts"][1]["text_alignment"] is None
    for name in ("fidelity_first", "fidelity_mean", "consistency", "motion", "flow_motion", "flicker"):
        assert all(np.isfinite(p[name]) for p in result["prompts"]), name
        assert result["means"][name] == pytest.approx(np.mean([p[name] for p in result["prompts"]]))
    assert result["means"]["text_alignment"] == result["prompts"][0]["text_alignment"]
    assert result["settings"]["num_frames"] == 4 and (out / result["prompts"][0]["video"]).is_file()
    # grid: 2 rows of (64x64 image | 4 px | 64x64 video), 4 px between rows
    assert decoded(out / "grid.mp4") == (4, 132, 132)

    client = MlflowClient(store)
    run = client.get_run(summary["mlflow_run_id"])  # a new run in the base stage's experiment
    assert client.get_experiment(run.info.experiment_id).name == "i2vgen-xl-base"
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "evaluation"
    assert run.data.tags["eval.clip"] == TINY_MODEL and run.data.tags["eval.clip_note"] == NO_VIT_H  # MLflow too
    assert run.data.metrics["eval/fidelity_mean"] == pytest.approx(result["means"]["fidelity_mean"])
    assert "eval/text_alignment" in run.data.metrics
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval")) == ["eval/eval.json",
                                                                                      "eval/grid.mp4"]


def test_cli_logs_into_an_existing_run_with_a_real_clip_checkpoint(tiny_exports, tmp_path, capsys):
    """--mlflow-run-id: metrics at --step, tags and artifacts land in that run, its status untouched; a local
    CLIP checkpoint (the tiny CLIP's weights saved to a file) is used and nothing says 'not meaningful'."""
    torch.manual_seed(0)
    from curation import clip_model

    weights = tmp_path / "clip.pt"
    torch.save(clip_model.build(TINY_MODEL_CFG).state_dict(), weights)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.create_experiment("train-base", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id, "FINISHED")
    assert main(["--checkpoint", str(tiny_exports[0]), "--out", str(tmp_path / "eval"), "--tracking-uri", store,
                 "--mlflow-run-id", run_id, "--step", "150", "--clip-model", TINY_MODEL, "--clip-checkpoint",
                 str(weights), "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mlflow_run_id"] == run_id and summary["clip"]["real"] is True and summary["clip"]["note"] is None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["eval.clip_real"] == "true"
    assert "eval.clip_note" not in run.data.tags
    history = client.get_metric_history(run_id, "eval/motion")
    assert [m.step for m in history] == [150] and history[0].value == pytest.approx(summary["means"]["motion"])
    with pytest.raises(Exception, match="no run"):
        main(["--checkpoint", str(tiny_exports[0]), "--tracking-uri", store, "--mlflow-run-id", "0" * 32])


def test_refine_export_alone_is_refused_naming_the_base_flag(tiny_exports, tmp_path):
    with pytest.raises(ValueError, match="has no image prompt, so it is evaluated as the cascade; pass --base"):
        main(["--checkpoint", str(tiny_exports[1]), "--out", str(tmp_path / "eval"), "--no-mlflow", "--device", "cpu"])
