"""training.eval_cascade through `python -m training.evaluate --checkpoint REFINE --base BASE` on tiny random
exports (built in code) with MLflow on a temporary SQLite store: both videos of every prompt scored with the
same scorer, the refined video equal to what `python -m model.generate` writes for the same seed, the grid's
three columns, eval.json's keys, the MLflow names, the errors for a wrong stage pairing, and the
evaluation.base_checkpoint rules of the training config. Also training.eval_media.grid_frames on known cells."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from common.configtree import ConfigError
from model.cascade import resize_center_crop
from model.config import ClipConfig
from model.generate import main as generate_main
from model.generate import to_uint8_frames, write_tiny_checkpoints
from training.config import load_config, missing_paths, validate
from training.eval_cascade import BASE_PREFIX, upsample
from training.eval_media import GRID_GAP, grid_frames, read_frames
from training.eval_metrics import METRICS, build_scorer, scorer_config, video_metrics
from training.evaluate import main
from training.subconfigs import EvaluationConfig

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "assets" / "sample" / "tears_of_steel_frame_0040.jpg"
CAPTION = "a robot on a bridge"
RECIPES = REPO / "configs" / "train"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread in this module: with several, CPU kernels may split their reductions differently
    after a different call history (an evaluation of two prompts vs one `model.generate` run), which moves a
    few pixels of an otherwise identical video and would defeat the bit-for-bit comparison below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny random base (64x64) and refine (96x64) exports, 4 frames, 4 sampler steps."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("exports"), seed=0)


@pytest.fixture(scope="module")
def cascade(exports, tmp_path_factory):
    """One cascade evaluation of two prompts (a captioned one, a plain one) into a new MLflow run."""
    tmp = tmp_path_factory.mktemp("cascade")
    prompts = tmp / "prompts"
    prompts.mkdir()
    Image.open(IMAGE).save(prompts / "captioned.jpg")
    (prompts / "captioned.txt").write_text(CAPTION)
    Image.open(IMAGE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(prompts / "plain.png")
    out, store = tmp / "eval", f"sqlite:///{tmp / 'mlflow.db'}"
    assert main(["--checkpoint", str(exports[1]), "--base", str(exports[0]), "--images", str(prompts),
                 "--out", str(out), "--tracking-uri", store, "--seed", "3", "--device", "cpu"]) == 0
    return {"out": out, "store": store, "prompts": prompts, "result": json.loads((out / "eval.json").read_text())}


def test_both_videos_of_every_prompt_are_scored_alike(cascade):
    out, result = cascade["out"], cascade["result"]
    assert [p["key"] for p in result["prompts"]] == ["captioned", "plain"]
    assert result["clip"]["source"] == "tiny-random (fallback)"  # the tiny stages have no local CLIP file
    scorer = build_scorer(scorer_config(EvaluationConfig(), ClipConfig(kind="tiny-random")))
    for prompt, caption in zip(result["prompts"], (CAPTION, "")):
        assert set(METRICS) | {BASE_PREFIX + m for m in METRICS} <= set(prompt)
        base, refined = read_frames(out / prompt["base_video"]), read_frames(out / prompt["video"])
        assert base.shape == (4, 64, 64, 3) and refined.shape == (4, 64, 96, 3)
        # the stored scores are those of each video (not swapped, not one video scored twice)
        image = Image.open(cascade["prompts"] / ("captioned.jpg" if caption else "plain.png"))
        seen = reference(image)
        for frames, prefix in ((refined, ""), (base, BASE_PREFIX)):
            expect = video_metrics(scorer, frames, seen, caption, 8)
            for name in METRICS:
                assert prompt[prefix + name] == pytest.approx(expect[name], abs=1e-4), prefix + name
        assert prompt["motion"] != prompt[BASE_PREFIX + "motion"]  # the refiner changed the video
    assert (prompt := result["prompts"][1])["text_alignment"] is None and prompt["base/text_alignment"] is None
    for name in ("fidelity_mean", "motion"):
        for prefix in ("", BASE_PREFIX):
            values = [p[prefix + name] for p in result["prompts"]]
            assert result["means"][prefix + name] == pytest.approx(np.mean(values))
    assert result["base_checkpoint"].endswith("base") and result["checkpoint"].endswith("refine")
    assert result["settings"]["refine"]["width"] == 96 and result["settings"]["base"]["width"] == 64


def reference(image: Image.Image) -> np.ndarray:
    """The prompt image as the base stage sees it (64x64 centre crop), as eval_cascade scores against."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    return to_uint8_frames(resize_center_crop(x, 64, 64)[0][:, None])[0]


def test_the_videos_are_what_model_generate_writes_with_the_same_seed(cascade, exports, tmp_path, capsys):
    """Prompt 1 ("plain") is generated with seed 3 + 1: `model.generate` with --seed 4 gives the same refined
    frames (with --refine) and the same base frames (without), bit for bit."""
    out, plain = cascade["out"], cascade["result"]["prompts"][1]
    args = ["--image", str(cascade["prompts"] / "plain.png"), "--base", str(exports[0]), "--seed", "4",
            "--device", "cpu", "--quiet"]
    assert generate_main([*args, "--refine", str(exports[1]), "--out", str(tmp_path / "cascade.mp4")]) == 0
    assert generate_main([*args, "--out", str(tmp_path / "base.mp4")]) == 0
    capsys.readouterr()
    assert np.array_equal(read_frames(tmp_path / "cascade.mp4"), read_frames(out / plain["video"]))
    assert np.array_equal(read_frames(tmp_path / "base.mp4"), read_frames(out / plain["base_video"]))


def decoded(path: Path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].width, frames[0].height


def test_grid_has_image_base_refined_columns(cascade):
    # 2 rows of (64x64 image | 4 | 96x64 upsampled base | 4 | 96x64 refined), 4 px between rows
    assert decoded(cascade["out"] / "grid.mp4") == (4, 64 + GRID_GAP + 96 + GRID_GAP + 96, 2 * 64 + GRID_GAP)


def test_grid_frames_places_held_images_and_videos():
    image = np.full((6, 4, 3), 200, np.uint8)
    video = np.stack([np.full((4, 8, 3), 10 * (f + 1), np.uint8) for f in range(3)])
    short = video[:1]
    grid = grid_frames([[image, video], [image, short, video]])
    assert grid.shape == (3, 6 + GRID_GAP + 6, 4 + GRID_GAP + 8 + GRID_GAP + 8, 3)  # rows as tall as their tallest cell
    assert (grid[:, :6, :4] == 200).all()  # the image is held in every frame
    assert [int(grid[f, 0, 4 + GRID_GAP, 0]) for f in range(3)] == [10, 20, 30]
    second = grid[:, 6 + GRID_GAP:]
    assert [int(second[f, 0, 4 + GRID_GAP, 0]) for f in range(3)] == [10, 10, 10]  # a short video holds its last frame
    assert [int(second[f, 0, 4 + 2 * GRID_GAP + 8, 0]) for f in range(3)] == [10, 20, 30]
    assert (grid[:, 6:6 + GRID_GAP] == 0).all() and (grid[:, :, 4:4 + GRID_GAP] == 0).all()  # black gaps
    with pytest.raises(ValueError, match="uint8"):
        grid_frames([[image.astype(np.float32)]])


def test_upsample_matches_the_size_and_keeps_a_flat_frame():
    frames = np.full((2, 4, 4, 3), 77, np.uint8)
    up = upsample(frames, 8, 12)
    assert up.shape == (2, 8, 12, 3) and up.dtype == np.uint8 and (up == 77).all()


def test_mlflow_gets_refined_and_base_metrics_in_the_refine_experiment(cascade):
    client = MlflowClient(cascade["store"])
    experiment = client.get_experiment_by_name("i2vgen-xl-refine")
    (run,) = client.search_runs([experiment.experiment_id])
    means = cascade["result"]["means"]
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "evaluation"
    assert run.data.tags["eval.base_checkpoint"] == cascade["result"]["base_checkpoint"]
    assert run.data.metrics["eval/fidelity_mean"] == pytest.approx(means["fidelity_mean"])
    assert run.data.metrics["eval/base/fidelity_mean"] == pytest.approx(means["base/fidelity_mean"])
    assert run.data.metrics["eval/motion"] != run.data.metrics["eval/base/motion"]
    assert client.get_experiment_by_name("i2vgen-xl-base") is None  # nothing went to the base experiment
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval")) == ["eval/eval.json",
                                                                                      "eval/grid.mp4"]


def test_wrong_stage_pairings_are_errors_before_mlflow_and_models(exports, tmp_path):
    base, refine = (str(p) for p in exports)
    store = tmp_path / "mlflow.db"
    common = ["--out", str(tmp_path / "eval"), "--tracking-uri", f"sqlite:///{store}", "--device", "cpu"]
    with pytest.raises(ValueError, match="pass --base BASE_EXPORT"):
        main(["--checkpoint", refine, *common])
    with pytest.raises(ValueError, match="is a base-stage export: evaluate it alone"):
        main(["--checkpoint", base, "--base", base, *common])
    with pytest.raises(ValueError, match=r"--base: .* holds a 'refine' stage"):
        main(["--checkpoint", refine, "--base", refine, *common])
    with pytest.raises(FileNotFoundError, match="--base: no base-stage export at"):
        main(["--checkpoint", refine, "--base", str(tmp_path / "nothing"), *common])
    assert not store.exists() and not (tmp_path / "eval").exists()  # nothing was started or written


def test_base_checkpoint_in_the_training_config(exports, tmp_path):
    refine = RECIPES / "tiny-refine.yaml"
    with pytest.raises(ConfigError, match="set evaluation.base_checkpoint to one"):
        validate(load_config(refine, ["evaluation.every_steps=0"]))
    validate(load_config(refine, []))  # the shipped recipe: evaluation off, no base export needed
    missing = tmp_path / "no-export"
    cfg = load_config(refine, ["evaluation.every_steps=0", f"evaluation.base_checkpoint={missing}"])
    validate(cfg)
    assert ("evaluation.base_checkpoint", str(missing / "stage.yaml")) in missing_paths(cfg)
    ok = load_config(refine, ["evaluation.every_steps=0", f"evaluation.base_checkpoint={exports[0]}"])
    validate(ok)
    assert not missing_paths(ok)
    with pytest.raises(ConfigError, match="evaluation.base_checkpoint: .* is for a refine stage run"):
        validate(load_config(RECIPES / "tiny-base.yaml", [f"evaluation.base_checkpoint={exports[0]}"]))
