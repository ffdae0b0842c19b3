"""Evaluate an exported checkpoint: generate from held-out image (+caption) prompts and score the videos.

    python -m training.evaluate --checkpoint DIR [--images FOLDER] [--out OUT] [--clip-checkpoint FILE]
                                [--mlflow-run-id ID | --no-mlflow] [--tracking-uri URI] [--seed N]
    python -m training.evaluate --checkpoint REFINE_DIR --base BASE_DIR [same options]

DIR is a base-stage checkpoint in model/'s format (stage.yaml + unet/, as training exports it to
OUTPUT/export and `python -m model.generate --write-tiny-checkpoints` writes it). Prompts: --images FOLDER
of NAME.jpg/.jpeg/.png with an optional caption NAME.txt; default the bundled image-text pair(s) of
tests/assets/sample (`training.eval_media`). Each prompt is rendered by `training.samples.render_samples`
(the export loaded by `model.generate.load_pipeline`, stage.yaml's sampler, frames, size and fps; prompt i
with seed + i), i.e. exactly what the training samples give, and scored by `training.eval_metrics`
(fidelity to the image, text alignment, frame consistency, motion; definitions there).

A refine-stage export has no image prompt (it SDEdits a given video): it is evaluated as the cascade a user
gets, after the base-stage export --base (`training.eval_cascade`: model.generate's cascade per prompt; the
base video and the refined video scored alike, the base's as `base/<score>`). A refine export without --base,
or a base export with it, is an error saying what to pass.

Outputs in OUT (default DIR/../eval):
    eval.json          per prompt (key, caption, video, every score) + means over prompts + the CLIP used
    grid.mp4           one row per prompt: the input image (held) | the generated video (H.264, faststart);
                       cascade: image | base video upsampled to the refined size | refined video
    videos/NN-KEY.mp4  the generated videos (+ NN-KEY_frames/*.png, lossless: what was scored); cascade:
                       the refined ones, and the base ones as NN-KEY-base.mp4

CLIP: --clip-checkpoint (open_clip --clip-model weights, ViT-H-14 by default), else the (base) stage's own
CLIP when stage.yaml names a local open_clip checkpoint, else the tiny random CLIP built in code; then
eval.json (`clip.note`), a WARNING log line and the MLflow tag `eval.clip_note` say the CLIP scores are not
meaningful.

MLflow (training.tracking's store: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db):
metrics `eval/<score>` (means over prompts; for the cascade those of the refined video, and the base video's
as `eval/base/<score>`), tags (the CLIP; `eval.base_checkpoint` for the cascade) and artifacts (eval/grid.mp4,
eval/eval.json). With --mlflow-run-id they go into that existing run, e.g. the training run of the export,
whose status is left as is; without it into a new run named `eval-<DIR name>` (tag kind=evaluation) in the
experiment of DIR's stage (i2vgen-xl-base, or i2vgen-xl-refine for the cascade). --no-mlflow: files only.
During training (`evaluation.every_steps`; a refine run with `evaluation.base_checkpoint`) the trainer calls
the same `Evaluator` on each export and logs into its own run at the training step (artifacts eval/step-N/).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common.atomic import write_text
from common.configtree import to_dict, to_yaml
from common.dtypes import ALIASES, DTYPES, resolve_dtype
from common.tracking_store import TrackingConfig
from model.cascade import BaseStage, RefineStage
from model.generate import to_uint8_frames
from training.eval_cascade import EVAL_JSON, GRID_MP4, VIDEOS, evaluate_cascade, evaluation_stage
from training.eval_media import BUNDLED_PROMPTS, grid_frames, load_prompts, read_frames, write_grid
from training.eval_metrics import ScorerChoice, build_scorer, mean_metrics, scorer_config, video_metrics
from training.samples import render_samples
from training.subconfigs import EvaluationConfig
from training.tracking import Tracker

log = logging.getLogger("training.evaluate")


# ------------------------------------------------------------------------------------------ evaluator
class Evaluator:
    """Renders and scores exports with one `EvaluationConfig`; the scoring CLIP is built once and reused
    (the trainer keeps one Evaluator for the whole run; the CLI uses one for one export). `progress`: a
    progress bar over the denoising steps of all prompts (the CLI; the trainer shows its own bar)."""

    def __init__(self, cfg: EvaluationConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = False):
        self.cfg, self.device, self.dtype, self.progress = cfg, torch.device(device), dtype, progress
        self._scorer: tuple[ScorerChoice, Any] | None = None

    def bar(self, total: int) -> tqdm:
        """The progress bar of one evaluation (disabled unless `progress`)."""
        return tqdm(total=total, desc="evaluate", unit="step", disable=not self.progress)

    def scorer(self, choice: ScorerChoice):
        """The ClipScorer of `choice`, cached while the choice stays the same."""
        if self._scorer is None or self._scorer[0].config != choice.config:
            self._scorer = (choice, build_scorer(choice))
        return self._scorer[1]

    def evaluate(self, export: str | Path, out_dir: str | Path, base: str | Path | None = None,
                 pipe: BaseStage | RefineStage | None = None) -> dict[str, Any]:
        """Render every prompt from the base export `export`, score it, write OUT_DIR/eval.json, grid.mp4 and
        videos/; returns what eval.json holds. A refine export is evaluated as the cascade after the base
        export `base` (`training.eval_cascade`); without `base` it is an error saying so. `pipe`: `export`
        already loaded (model.generate.load_pipeline; the trainer's), else it is loaded here."""
        if base is not None:  # evaluate_cascade checks the pairing itself
            return evaluate_cascade(self.cfg, self.scorer, export, base, out_dir, device=self.device,
                                    dtype=self.dtype, bar=self.bar, refine_pipe=pipe)
        t0 = time.perf_counter()
        stage = evaluation_stage(export, None)
        out_dir = Path(out_dir)
        items = load_prompts(self.cfg.images, stage.height, stage.width)
        clip_device = "cuda" if self.device.type == "cuda" else "cpu"
        choice = scorer_config(self.cfg, stage.clip, device=clip_device)
        if choice.note:
            log.warning("evaluation: %s", choice.note)
        with self.bar(len(items) * stage.sampler.steps) as bar:
            paths = render_samples(export, items, out_dir / VIDEOS, seed=self.cfg.seed, device=self.device,
                                   dtype=self.dtype, progress=bar.update, pipe=pipe)
        scorer = self.scorer(choice)
        prompts, rows = [], []
        for item, path in zip(items, paths):
            frames = read_frames(path)
            image = to_uint8_frames(item["image"][:, None])[0]  # the input as the model saw it
            scores = video_metrics(scorer, frames, image, item["caption"], stage.fps)
            prompts.append({"key": item["key"], "caption": item["caption"],
                            "video": str(path.relative_to(out_dir)), **scores})
            rows.append([image, frames])
        write_grid(grid_frames(rows), stage.fps, out_dir / GRID_MP4)
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
    """Means as metrics `eval/<score>` at `step` (a cascade's base video: `eval/base/<score>`), the CLIP used as
    tags (`eval.clip`, `eval.clip_real`, `eval.clip_note` when it is the tiny random one; a cascade's base
    export as `eval.base_checkpoint`), grid.mp4 + eval.json under `artifact_path`."""
    metrics = {f"eval/{k}": v for k, v in result["means"].items() if v is not None}
    tracker.log_metrics(metrics, step)
    clip = result["clip"]
    tags = {"eval.clip": clip["model"], "eval.clip_real": str(clip["real"]).lower()}
    if clip["note"]:
        tags["eval.clip_note"] = clip["note"]
    if result.get("base_checkpoint"):
        tags["eval.base_checkpoint"] = result["base_checkpoint"]
    tracker.set_tags(tags)
    for name in (GRID_MP4, EVAL_JSON):
        tracker.log_file(Path(out_dir) / name, artifact_path)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="export folder (stage.yaml + unet/): a base stage, or a "
                                                       "refine stage evaluated as the cascade after --base")
    p.add_argument("--base", help="base-stage export the refine --checkpoint refines (the cascade); only with a "
                                  "refine-stage --checkpoint")
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
    p.add_argument("--experiment", help="experiment of a new run (default: the stage's, "
                                                          "i2vgen-xl-base or i2vgen-xl-refine)")
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
    stage = evaluation_stage(export, args.base)  # the stage pairing is checked before MLflow and the models
    tracker = None
    if not args.no_mlflow:  # the store is checked before any model is built
        tracker = Tracker(TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment,
                                         run_name=f"eval-{export.resolve().name}", system_metrics=False),
                          stage=stage.stage, is_main=True)
        tracker.check()
        if args.mlflow_run_id:
            tracker.attach(args.mlflow_run_id)
    result = Evaluator(cfg, device, dtype, progress=True).evaluate(export, out_dir, base=args.base)
    if tracker is not None:
        if not args.mlflow_run_id:
            ran = {"checkpoint": result["checkpoint"]}
            if args.base:
                ran["base_checkpoint"] = result["base_checkpoint"]
            tracker.start({"evaluation": to_dict(cfg), **ran, "out": str(out_dir)}, to_yaml(cfg),
                          {"kind": "evaluation", **ran})
        log_evaluation(tracker, result, out_dir, step=args.step)
        result["mlflow_run_id"] = tracker.run_id
        if not args.mlflow_run_id:
            tracker.end("FINISHED")
    print(json.dumps({"out": str(out_dir), "means": result["means"], "clip": result["clip"],
                      "mlflow_run_id": result.get("mlflow_run_id"), "seconds": result["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
