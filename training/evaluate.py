"""Evaluate an exported base-stage checkpoint: generate from held-out image (+caption) prompts and score.

    python -m training.evaluate --checkpoint DIR [--images FOLDER] [--out OUT] [--clip-checkpoint FILE]
                                [--mlflow-run-id ID | --no-mlflow] [--tracking-uri URI] [--seed N]

DIR is a base-stage checkpoint in model/'s format (stage.yaml + unet/, as training exports it to
OUTPUT/export and `python -m model.generate --write-tiny-checkpoints` writes it). Prompts: --images FOLDER
of NAME.jpg/.jpeg/.png with an optional caption NAME.txt; default the bundled image-text pair(s) of
tests/assets/sample. Each prompt is rendered by `training.samples.render_samples` (the export loaded by
`model.generate.load_pipeline`, stage.yaml's sampler, frames, size and fps; prompt i with seed + i), i.e.
exactly what the training samples and `python -m model.generate` give, and scored by
`training.eval_metrics` (fidelity to the image, text alignment, frame consistency, motion; definitions
there). The refinement stage is not evaluated here: its job (SDEdit of a given video) has no image prompt.

Outputs in OUT (default DIR/../eval):
    eval.json          per prompt (key, caption, video, every score) + means over prompts + the CLIP used
    grid.mp4           one row per prompt: the input image (held) | the generated video (H.264, faststart)
    videos/NN-KEY.mp4  the generated videos (+ NN-KEY_frames/*.png, lossless: what was scored)

CLIP: --clip-checkpoint (open_clip --clip-model weights, ViT-H-14 by default), else the stage's own CLIP
when stage.yaml names a local open_clip checkpoint, else the tiny random CLIP built in code; then eval.json
(`clip.note`), a WARNING log line and the MLflow tag `eval.clip_note` say the CLIP scores are not meaningful.

MLflow (training.tracking's store: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db):
with --mlflow-run-id the metrics `eval/<score>` (means over prompts), tags and artifacts (eval/grid.mp4,
eval/eval.json) go into that existing run, e.g. the training run of the export, whose status is left as is;
without it a new run named `eval-<DIR name>` (tag kind=evaluation) in the stage's experiment
(i2vgen-xl-base). --no-mlflow: files only. During training (`evaluation.every_steps`) the trainer calls the
same `Evaluator` on each export and logs into its own run at the training step (artifacts eval/step-N/).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import write_text
from common.configtree import to_dict, to_yaml
from common.dtypes import ALIASES, DTYPES, resolve_dtype
from curation.encode import EncodeConfig, encode_mp4
from model.generate import load_stage_config, to_uint8_frames
from training.eval_metrics import (
    METRICS,
    ScorerChoice,
    build_scorer,
    mean_metrics,
    scorer_config,
    video_metrics,
)
from training.samples import image_items, render_samples
from training.subconfigs import EvaluationConfig, SamplingConfig
from training.tracking import Tracker, TrackingConfig, repo_root

log = logging.getLogger("training.evaluate")

BUNDLED_PROMPTS = repo_root() / "tests" / "assets" / "sample"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
GRID_GAP = 4
"""Black pixels between the image column and the video, and between prompt rows (even: yuv420p)."""
EVAL_JSON, GRID_MP4, VIDEOS = "eval.json", "grid.mp4", "videos"


# ------------------------------------------------------------------------------------------- prompts
def prompt_files(folder: str | Path | None) -> tuple[list[str], list[str]]:
    """(image paths, captions) of a prompt folder, sorted by name: NAME.jpg/.jpeg/.png and the text of
    NAME.txt ("" without one). None: the bundled sample. A missing or image-less folder is an error."""
    folder = Path(folder) if folder else BUNDLED_PROMPTS
    if not folder.is_dir():
        raise FileNotFoundError(f"evaluation.images / --images: folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"evaluation.images / --images: no {'/'.join(IMAGE_SUFFIXES)} image in {folder}")
    captions = []
    for path in images:
        txt = path.with_suffix(".txt")
        captions.append(" ".join(txt.read_text(encoding="utf-8").split()) if txt.is_file() else "")
    return [str(p) for p in images], captions


def load_prompts(folder: str | Path | None, height: int, width: int) -> list[dict[str, Any]]:
    """Items {"key", "image" (3, H, W) in [-1, 1], "caption"} of `prompt_files`, resized and centre-cropped
    to the stage size as the training samples are (`training.samples.image_items`)."""
    images, captions = prompt_files(folder)
    return image_items(SamplingConfig(images=images, captions=captions), height, width)


# ---------------------------------------------------------------------------------------------- media
def read_frames(mp4: str | Path) -> np.ndarray:
    """(F, H, W, 3) uint8: the lossless PNG frames `model.generate.write_video` puts in MP4STEM_frames/."""
    from PIL import Image

    mp4 = Path(mp4)
    paths = sorted((mp4.parent / f"{mp4.stem}_frames").glob("frame_*.png"))
    if not paths:
        raise FileNotFoundError(f"no PNG frames beside {mp4} (expected {mp4.stem}_frames/frame_0000.png ...)")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def grid_frames(images: list[np.ndarray], videos: list[np.ndarray]) -> np.ndarray:
    """One row per prompt, image | video, rows stacked with GRID_GAP black pixels: (F, H', W', 3) uint8.
    Shorter videos hold their last frame."""
    num_frames = max(len(v) for v in videos)
    width = max(i.shape[1] + GRID_GAP + v.shape[2] for i, v in zip(images, videos))
    rows = []
    for image, video in zip(images, videos):
        h = max(image.shape[0], video.shape[1])
        row = np.zeros((num_frames, h, width, 3), np.uint8)
        row[:, :image.shape[0], :image.shape[1]] = image
        x = image.shape[1] + GRID_GAP
        for f in range(num_frames):
            row[f, :video.shape[1], x:x + video.shape[2]] = video[min(f, len(video) - 1)]
        rows.append(row)
        rows.append(np.zeros((num_frames, GRID_GAP, width, 3), np.uint8))
    grid = np.concatenate(rows[:-1], axis=1)
    pad_h, pad_w = grid.shape[1] % 2, grid.shape[2] % 2  # yuv420p needs even sizes
    return np.pad(grid, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else grid


def write_grid(frames: np.ndarray, fps: float, path: str | Path) -> Path:
    """H.264 yuv420p faststart mp4 at full size (curation.encode.encode_mp4: plays in a browser)."""
    data, _ = encode_mp4(frames, fps, EncodeConfig(max_side=max(frames.shape[1:3]), max_fps=float(fps), crf=18,
                                                   preset="veryfast"))
    Path(path).write_bytes(data)
    return Path(path)


# ------------------------------------------------------------------------------------------ evaluator
class Evaluator:
    """Renders and scores exports with one `EvaluationConfig`; the scoring CLIP is built once and reused
    (the trainer keeps one Evaluator for the whole run; the CLI uses one for one export)."""

    def __init__(self, cfg: EvaluationConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self._scorer: tuple[ScorerChoice, Any] | None = None

    def scorer(self, choice: ScorerChoice):
        """The ClipScorer of `choice`, cached while the choice stays the same."""
        if self._scorer is None or self._scorer[0].config != choice.config:
            self._scorer = (choice, build_scorer(choice))
        return self._scorer[1]

    def evaluate(self, export: str | Path, out_dir: str | Path) -> dict[str, Any]:
        """Render every prompt from the base export `export`, score it, write OUT_DIR/eval.json, grid.mp4 and
        videos/; returns what eval.json holds."""
        t0 = time.perf_counter()
        stage = load_stage_config(export)
        if stage.stage != "base":
            raise ValueError(f"{export}: a '{stage.stage}' stage; evaluation scores image-to-video generation, "
                             "so it takes a base-stage export")
        out_dir = Path(out_dir)
        items = load_prompts(self.cfg.images, stage.height, stage.width)
        clip_device = "cuda" if self.device.type == "cuda" else "cpu"
        choice = scorer_config(self.cfg, stage.clip, device=clip_device)
        if choice.note:
            log.warning("evaluation: %s", choice.note)
        paths = render_samples(export, items, out_dir / VIDEOS, seed=self.cfg.seed, device=self.device,
                               dtype=self.dtype)
        scorer = self.scorer(choice)
        prompts, images, videos = [], [], []
        for item, path in zip(items, paths):
            frames = read_frames(path)
            image = to_uint8_frames(item["image"][:, None])[0]  # the input as the model saw it
            scores = video_metrics(scorer, frames, image, item["caption"], stage.fps)
            prompts.append({"key": item["key"], "caption": item["caption"],
                            "video": str(path.relative_to(out_dir)), **scores})
            images.append(image)
            videos.append(frames)
        write_grid(grid_frames(images, videos), stage.fps, out_dir / GRID_MP4)
        result = {
            "checkpoint": str(Path(export).resolve()), "clip": choice.describe(),
            "settings": {"seed": self.cfg.seed, "steps": stage.sampler.steps, "guidance": stage.sampler.guidance,
                         "num_frames": stage.num_frames, "fps": stage.fps, "height": stage.height,
                         "width": stage.width, "prompts": self.cfg.images or str(BUNDLED_PROMPTS)},
            "means": mean_metrics(prompts), "prompts": prompts, "grid": GRID_MP4,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_text(out_dir / EVAL_JSON, json.dumps(result, indent=2) + "\n")
        shown = " ".join(f"{k}={v:.4f}" for k, v in result["means"].items() if v is not None)
        log.info("evaluation of %s (%d prompts, CLIP %s%s): %s", export, len(prompts), choice.config.model,
                 "" if choice.real else ", NOT MEANINGFUL: tiny random CLIP", shown)
        return result


def log_evaluation(tracker: Tracker, result: dict[str, Any], out_dir: str | Path, step: int,
                   artifact_path: str = "eval") -> None:
    """Means as metrics `eval/<score>` at `step`, the CLIP used as tags (`eval.clip`, `eval.clip_real`,
    `eval.clip_note` when it is the tiny random one), grid.mp4 + eval.json under `artifact_path`."""
    metrics = {f"eval/{k}": v for k, v in result["means"].items() if v is not None}
    tracker.log_metrics(metrics, step)
    clip = result["clip"]
    tags = {"eval.clip": clip["model"], "eval.clip_real": str(clip["real"]).lower()}
    if clip["note"]:
        tags["eval.clip_note"] = clip["note"]
    tracker.set_tags(tags)
    for name in (GRID_MP4, EVAL_JSON):
        tracker.log_file(Path(out_dir) / name, artifact_path)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="base-stage export folder (stage.yaml + unet/)")
    p.add_argument("--images", help="prompt folder: NAME.jpg/.jpeg/.png (+ NAME.txt); default the bundled sample")
    p.add_argument("--out", help="output folder (default: CHECKPOINT/../eval)")
    p.add_argument("--clip-checkpoint", help="local open_clip weights of the scoring CLIP (default: the stage's "
                                              "own local CLIP, else the tiny random one, marked as such)")
    p.add_argument("--clip-model", default=EvaluationConfig.clip_model, help="open_clip architecture")
    p.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed + i")
    p.add_argument("--device", help="cpu / cuda / cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES, *ALIASES])
    p.add_argument("--mlflow-run-id", help="log into this existing run (e.g. the training run of the export)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else <repo>/mlflow.db)")
    p.add_argument("--step", type=int, default=0, help="MLflow step of the metrics (e.g. the export's training step)")
    p.add_argument("--experiment", help="experiment of a new run (default: i2vgen-xl-base)")
    p.add_argument("--no-mlflow", action="store_true", help="write files only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = EvaluationConfig(images=args.images, clip_model=args.clip_model, clip_checkpoint=args.clip_checkpoint,
                           seed=args.seed)
    export = Path(args.checkpoint)
    out_dir = Path(args.out) if args.out else export.resolve().parent / "eval"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tracker = None
    if not args.no_mlflow:  # the store is checked before any model is built
        tracker = Tracker(TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment,
                                         run_name=f"eval-{export.resolve().name}", system_metrics=False),
                          stage="base", is_main=True)
        tracker.check()
        if args.mlflow_run_id:
            tracker.attach(args.mlflow_run_id)
    result = Evaluator(cfg, device, dtype).evaluate(export, out_dir)
    if tracker is not None:
        if not args.mlflow_run_id:
            tracker.start({"evaluation": to_dict(cfg), "checkpoint": result["checkpoint"], "out": str(out_dir)},
                          to_yaml(cfg), {"kind": "evaluation", "checkpoint": result["checkpoint"]})
        log_evaluation(tracker, result, out_dir, step=args.step)
        result["mlflow_run_id"] = tracker.run_id
        if not args.mlflow_run_id:
            tracker.end("FINISHED")
    print(json.dumps({"out": str(out_dir), "means": result["means"], "clip": result["clip"],
                      "mlflow_run_id": result.get("mlflow_run_id"), "seconds": result["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
