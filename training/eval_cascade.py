"""Evaluation of the cascade a user gets: a refine-stage export applied after a base-stage export.

    python -m training.evaluate --checkpoint REFINE_EXPORT --base BASE_EXPORT [--images FOLDER]

and, in a refine training run, `evaluation.every_steps` with `evaluation.base_checkpoint`. A refine stage has
no image prompt of its own (it SDEdits a given video), so it is judged on what it adds to the base stage.
Per held-out prompt i (`training.eval_media.prompt_files`), the prompt image at its own size and its caption
go through `model.generate`'s cascade (`load_cascade` + `run_cascade`: the base export samples with its
stage.yaml sampler, frames and fps; the refiner SDEdits the decoded video with its own sampler and t_start;
one generator seeded seed + i), i.e. exactly what

    python -m model.generate --image IMG --prompt CAPTION --base BASE --refine REFINE --seed SEED+i

writes (and the base video what the same command without --refine writes). The base video and the refined
video are scored by the same scorer (`training.eval_metrics`, the CLIP of the base stage's choice) against
the same image: the prompt image centre-cropped to the base size, as the base stage sees it.

Outputs in OUT:
    eval.json   per prompt: key, caption, video (refined), base_video and every score of the refined video,
                with the base video's under `base/<score>`; `means` over prompts holds both the same way
    grid.mp4    one row per prompt: image | base video upsampled to the refined size (bilinear, the
                refiner's own first step) | refined video
    videos/NN-KEY.mp4 (refined), videos/NN-KEY-base.mp4 (base), each with its lossless _frames/ PNGs
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.atomic import write_text
from curation.clip_score import ClipScorer
from model.cascade import RefineStage, StageConfig, resize_center_crop
from model.generate import (
    STAGE_FILE,
    cascade_steps,
    load_cascade,
    load_image,
    load_stage_config,
    run_cascade,
    to_uint8_frames,
    write_video,
)
from training.eval_media import BUNDLED_PROMPTS, grid_frames, prompt_files, write_grid
from training.eval_metrics import ScorerChoice, mean_metrics, scorer_config, video_metrics
from training.samples import file_key
from training.subconfigs import EvaluationConfig

log = logging.getLogger("training.evaluate")

BASE_PREFIX = "base/"
"""Scores of the base video in a cascade evaluation: `base/<score>` in eval.json, `eval/base/<score>` in MLflow."""
EVAL_JSON, GRID_MP4, VIDEOS = "eval.json", "grid.mp4", "videos"
NEEDS_BASE = ("--base BASE_EXPORT (the base-stage export whose videos it refines; in a training run: "
              "evaluation.base_checkpoint)")


def evaluation_stage(export: str | Path, base: str | Path | None) -> StageConfig:
    """stage.yaml of the export to evaluate, checked against `base`: a base export is evaluated alone (no
    `base`), a refine export only as the cascade after `base`, a base-stage export. Errors say what to pass."""
    stage = load_stage_config(export)
    if stage.stage == "base" and base is not None:
        raise ValueError(f"--checkpoint {export} is a base-stage export: evaluate it alone (without --base), or "
                         "pass a refine-stage export as --checkpoint to evaluate the cascade after --base")
    if stage.stage != "base" and base is None:
        raise ValueError(f"--checkpoint {export} is a '{stage.stage}'-stage export: it refines a base video and "
                         f"has no image prompt, so it is evaluated as the cascade; pass {NEEDS_BASE}")
    if base is not None:
        check_base_export(base, "--base")
    return stage


def check_base_export(folder: str | Path, key: str) -> StageConfig:
    """stage.yaml of the base-stage export a cascade starts from; missing or another stage: an error naming
    `key` (--base, evaluation.base_checkpoint) and the path."""
    folder = Path(folder)
    if not (folder / STAGE_FILE).is_file():
        raise FileNotFoundError(f"{key}: no base-stage export at {folder} (expected {folder / STAGE_FILE} + unet/, "
                                "e.g. runs/tiny-base/export)")
    stage = load_stage_config(folder)
    if stage.stage != "base":
        raise ValueError(f"{key}: {folder} holds a '{stage.stage}' stage; the cascade starts from a base-stage "
                         "export (e.g. runs/tiny-base/export)")
    return stage


def upsample(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, height, width, 3) uint8, bilinear as `RefineStage.refine` upsamples."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def evaluate_cascade(cfg: EvaluationConfig, scorer_of: Callable[[ScorerChoice], ClipScorer],
                     refine_export: str | Path, base_export: str | Path, out_dir: str | Path, *,
                     device: torch.device, dtype: torch.dtype,
                     bar: Callable[[int], tqdm] | None = None,
                     refine_pipe: RefineStage | None = None) -> dict[str, Any]:
    """Run the cascade on every prompt of `cfg.images`, score both videos, write OUT_DIR/eval.json, grid.mp4 and
    videos/ (module docstring); returns what eval.json holds. `scorer_of` builds (or reuses) the scorer;
    `bar(total)` makes the progress bar over the denoising steps (none by default); `refine_pipe`: the refine
    export already loaded (the trainer's, which rendered its samples with it), else it is loaded here."""
    t0 = time.perf_counter()
    evaluation_stage(refine_export, base_export)
    out_dir, videos_dir = Path(out_dir), Path(out_dir) / VIDEOS
    paths, captions = prompt_files(cfg.images)
    base, refine = load_cascade(base_export, None if refine_pipe is not None else refine_export, device, dtype)
    refine = refine_pipe if refine_pipe is not None else refine
    bcfg, rcfg = base.cfg, refine.cfg
    choice = scorer_config(cfg, bcfg.clip, device="cuda" if device.type == "cuda" else "cpu")
    if choice.note:
        log.warning("evaluation: %s", choice.note)
    scorer = scorer_of(choice)
    prompts, rows = [], []
    total = len(paths) * cascade_steps(bcfg.sampler, refine)
    progress = bar(total) if bar is not None else tqdm(total=total, disable=True)
    for i, (path, caption) in enumerate(zip(paths, captions)):
        image = load_image(path).to(device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed + i)
        base_video, refined = run_cascade(base, refine, image, [caption], generator=generator, progress=progress.update)
        name = f"{i:02d}-{file_key(Path(path).stem)}"
        base_frames, refined_frames = to_uint8_frames(base_video[0]), to_uint8_frames(refined[0])
        base_mp4, _ = write_video(base_frames, videos_dir / f"{name}-base.mp4", bcfg.fps)
        refined_mp4, _ = write_video(refined_frames, videos_dir / f"{name}.mp4", bcfg.fps)
        # the reference: the prompt as the base stage sees it (its VAE input), the same for both videos
        seen = to_uint8_frames(resize_center_crop(image, bcfg.height, bcfg.width)[0][:, None])[0]
        scores = video_metrics(scorer, refined_frames, seen, caption, bcfg.fps)
        base_scores = video_metrics(scorer, base_frames, seen, caption, bcfg.fps)
        prompts.append({"key": Path(path).stem, "caption": caption, "video": str(refined_mp4.relative_to(out_dir)),
                        "base_video": str(base_mp4.relative_to(out_dir)), **scores,
                        **{BASE_PREFIX + k: v for k, v in base_scores.items()}})
        rows.append([seen, upsample(base_frames, *refined_frames.shape[1:3]), refined_frames])
    progress.close()
    write_grid(grid_frames(rows), bcfg.fps, out_dir / GRID_MP4)
    base_means = mean_metrics([{k[len(BASE_PREFIX):]: v for k, v in p.items() if k.startswith(BASE_PREFIX)}
                               for p in prompts])
    result = {
        "checkpoint": str(Path(refine_export).resolve()), "base_checkpoint": str(Path(base_export).resolve()),
        "clip": choice.describe(),
        "settings": {"seed": cfg.seed, "prompts": cfg.images or str(BUNDLED_PROMPTS),
                     "base": {"steps": bcfg.sampler.steps, "guidance": bcfg.sampler.guidance,
                              "num_frames": bcfg.num_frames, "fps": bcfg.fps, "height": bcfg.height,
                              "width": bcfg.width},
                     "refine": {"steps": rcfg.sampler.steps, "guidance": rcfg.sampler.guidance,
                                "t_start": rcfg.t_start, "height": rcfg.height, "width": rcfg.width}},
        "means": {**mean_metrics(prompts), **{BASE_PREFIX + k: v for k, v in base_means.items()}},
        "prompts": prompts, "grid": GRID_MP4, "seconds": round(time.perf_counter() - t0, 3),
    }
    write_text(out_dir / EVAL_JSON, json.dumps(result, indent=2) + "\n")
    shown = " ".join(f"{k}={v:.4f}" for k, v in result["means"].items() if v is not None)
    log.info("evaluation of the cascade %s -> %s (%d prompts, CLIP %s%s): %s", base_export, refine_export,
             len(prompts), choice.config.model, "" if choice.real else ", NOT MEANINGFUL: tiny random CLIP", shown)
    return result
