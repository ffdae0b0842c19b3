"""Scores of a generated video against its prompt (image + optional caption), used by `training.evaluate`.

Every frame, the input image and the caption go through one CLIP (`curation.clip_score.ClipScorer`:
L2-normalised embeddings), so each CLIP score is a cosine in [-1, 1]:

    fidelity_first   cos(frame 0, input image): does the video start from the image it was given?
    fidelity_mean    mean over frames f of cos(frame f, input image): does it stay on that image?
    text_alignment   mean over frames f of cos(frame f, caption); None when the prompt has no caption
    consistency      mean over f of cos(frame f, frame f+1): temporal coherence (shuffled frames score lower)

and two pixel-space scores, which need no CLIP and so mean the same with the tiny model:

    motion           mean |frame f+1 - frame f| over pixels, channels and pairs, in % of the 8-bit range:
                     0 for a frozen video (the failure it exists to catch), ~0.5-5 for natural motion
    flow_motion      mean optical-flow magnitude in % of the frame width per second and
    flicker          mean jump of global brightness between frames in % of the 8-bit range, both exactly as
                     the curation job measures its clips (`curation.motion.motion_scores`), so generated
                     and curated videos share units

Which CLIP scores: `scorer_config` (the evaluation's own checkpoint, else the stage's local OpenCLIP, else
the tiny random CLIP, whose scores are marked as meaningless: `ScorerChoice.note`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curation.clip_score import TINY_MODEL, ClipScoreConfig, ClipScorer, build_seeded_scorer
from curation.motion import MotionConfig, motion_scores
from model.config import ClipConfig
from training.subconfigs import EvaluationConfig

METRICS = ("fidelity_first", "fidelity_mean", "text_alignment", "consistency", "motion", "flow_motion", "flicker")
"""Every per-prompt score, in report order."""
NO_VIT_H = ("no local ViT-H/14 CLIP checkpoint: CLIP scores come from a tiny RANDOM CLIP built in code and are "
            "not meaningful (set --clip-checkpoint / evaluation.clip_checkpoint to open_clip ViT-H-14 weights)")


@dataclass
class ScorerChoice:
    """The CLIP an evaluation scores with, and why."""

    config: ClipScoreConfig
    """What `ClipScorer` builds."""
    source: str
    """"evaluation.clip_checkpoint", "stage clip" or "tiny-random (fallback)"."""
    note: str | None
    """Set when the scores are not meaningful (the tiny random CLIP): shown on every output."""

    @property
    def real(self) -> bool:
        """True when trained CLIP weights score (not the tiny random model)."""
        return self.note is None

    def describe(self) -> dict[str, object]:
        """The choice as eval.json records it."""
        return {"model": self.config.model, "checkpoint": self.config.checkpoint, "source": self.source,
                "real": self.real, "note": self.note}


def scorer_config(cfg: EvaluationConfig, stage_clip: ClipConfig, device: str = "auto") -> ScorerChoice:
    """The scoring CLIP: `cfg.clip_checkpoint` (a missing file is FileNotFoundError naming the key), else the
    stage's own CLIP when it is a local open_clip checkpoint (I2VGen-XL's is ViT-H-14), else tiny-random."""
    if cfg.clip_checkpoint:
        path = Path(cfg.clip_checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluation.clip_checkpoint / --clip-checkpoint: file not found: {path}")
        return ScorerChoice(ClipScoreConfig(model=cfg.clip_model, checkpoint=str(path), device=device),
                            "evaluation.clip_checkpoint", None)
    if stage_clip.kind == "openclip" and stage_clip.checkpoint and Path(stage_clip.checkpoint).is_file():
        return ScorerChoice(ClipScoreConfig(model=stage_clip.arch, checkpoint=stage_clip.checkpoint, device=device),
                            "stage clip", None)
    return ScorerChoice(ClipScoreConfig(model=TINY_MODEL, checkpoint=None, device=device),
                        "tiny-random (fallback)", NO_VIT_H)


def build_scorer(choice: ScorerChoice) -> ClipScorer:
    """The ClipScorer of `choice` (built once per evaluator: ViT-H-14 takes seconds to load), seeded as the
    curation job builds it (curation.clip_score.build_seeded_scorer): every evaluation of the tiny random CLIP
    scores with the same model."""
    return build_seeded_scorer(choice.config)


# -------------------------------------------------------------------------------------------- scores
def _pairs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (K, D) arrays of L2-normalised rows."""
    return np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=-1)


def clip_metrics(frame_emb: np.ndarray, image_emb: np.ndarray, text_emb: np.ndarray | None) -> dict[str, float | None]:
    """fidelity_first / fidelity_mean / text_alignment / consistency (module docstring) from L2-normalised
    embeddings: frames (F, D), the input image (D,), the caption (D,) or None."""
    frame_emb = np.asarray(frame_emb)
    if frame_emb.ndim != 2 or len(frame_emb) == 0:
        raise ValueError(f"clip_metrics expects (F, D) frame embeddings with F >= 1, got {frame_emb.shape}")
    to_image = _pairs_cos(frame_emb, np.asarray(image_emb).reshape(1, -1))
    out: dict[str, float | None] = {"fidelity_first": float(to_image[0]), "fidelity_mean": float(to_image.mean())}
    out["text_alignment"] = (None if text_emb is None
                             else float(_pairs_cos(frame_emb, np.asarray(text_emb).reshape(1, -1)).mean()))
    out["consistency"] = float(_pairs_cos(frame_emb[:-1], frame_emb[1:]).mean()) if len(frame_emb) > 1 else None
    return out


def pixel_motion(frames: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, (F, H, W, 3) uint8, in % of the 8-bit range (0 for a
    frozen video; NaN for a single frame)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"pixel_motion expects (F, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if len(frames) < 2:
        return float("nan")
    diffs = [np.abs(frames[i + 1].astype(np.int16) - frames[i].astype(np.int16)).mean() for i in range(len(frames) - 1)]
    return float(np.mean(diffs)) / 255.0 * 100.0


def video_metrics(scorer: ClipScorer, frames: np.ndarray, image: np.ndarray, caption: str,
                  fps: float) -> dict[str, float | None]:
    """Every score of METRICS for one generated video: frames (F, H, W, 3) uint8, the input image
    (H', W', 3) uint8 as the model saw it, its caption ("" = none) and the video's fps. The image and the
    frames may differ in size (a refined video is larger than the base stage's input): CLIP's preprocessing
    resizes and centre-crops each to its input size."""
    image_emb = scorer.embed_images(np.asarray(image)[None])[0]
    text_emb = scorer.embed_texts([caption])[0] if caption.strip() else None
    out = clip_metrics(scorer.embed_images(np.asarray(frames)), image_emb, text_emb)
    out["motion"] = pixel_motion(frames)
    flow = motion_scores(frames, fps, MotionConfig())
    out["flow_motion"], out["flicker"] = flow["motion"], flow["flicker"]
    return {k: _finite_or_none(out[k]) for k in METRICS}


def mean_metrics(per_prompt: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Per metric, the mean over the prompts that have it (None when none does, e.g. no captions)."""
    out: dict[str, float | None] = {}
    for name in METRICS:
        values = [m[name] for m in per_prompt if m.get(name) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
