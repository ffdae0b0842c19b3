"""No-reference image quality (stage 4) on a few frames of a clip, plus an optional aesthetic score.

Scores (each the mean over `frames_per_clip` evenly sampled frames, resized to `analysis_width`):
- sharpness: variance of the Laplacian of the 8-bit gray frame at `analysis_width` px wide (fixing the
  width makes it comparable across sources; sharp natural footage is in the hundreds, blur below ~50).
- brightness: mean luma in [0, 1].  contrast: luma standard deviation in [0, 1].
- colorfulness: Hasler & Suesstrunk (2003) metric on 8-bit RGB (0 = gray; ~15 slightly, ~60 very colourful).
- blank_fraction: share of sampled frames that are (nearly) uniform: black, white or one flat colour.
- aesthetic: ONLY when `aesthetic_head` names a local LAION-style head (a linear layer or the stack of
  linear layers of the "improved aesthetic predictor") applied to the clip's mean CLIP image embedding. With
  no head no aesthetic score exists; none is invented.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from curation.clip_score import sample_frame_indices


@dataclass
class QualityConfig:
    """Image quality scores (`scores.quality`)."""

    frames_per_clip: int = 3
    """Frames sampled evenly per clip for the quality scores."""
    analysis_width: int = 256
    """Frames are resized to this width first: fixes the cost and the scale of `sharpness`."""
    blank_std: float = 4.0
    """A frame whose luma standard deviation (0-255) is below this counts as blank."""
    aesthetic_head: str | None = None
    """Optional local path to a LAION-style aesthetic head (.pth/.pt/.safetensors) taking L2-normalised CLIP
    image embeddings of the configured `scores.clip.model`; None -> no aesthetic score."""


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class AestheticHead:
    """A stack of linear layers (keys `[prefix.]N.weight/bias` in index order, or one `weight/bias`), as in
    LAION's aesthetic predictors. Those heads have no activations between layers (dropout only), so neither
    does this; the output is the predicted rating (roughly 1-10)."""

    def __init__(self, path: str):
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"aesthetic head not found: {str(p)!r} (config key scores.quality.aesthetic_head); "
                "set it to a local file or to null to skip the aesthetic score"
            )
        state = _load_state_dict(p)
        layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, value in state.items():
            name, _, kind = key.rpartition(".")
            if kind in ("weight", "bias"):
                w, b = layers.get(name, (None, None))
                arr = value.float().numpy()
                layers[name] = (arr, b) if kind == "weight" else (w, arr)
        if not layers or any(w is None or w.ndim != 2 for w, _ in layers.values()):
            raise ValueError(f"{p}: not a stack of linear layers (keys: {sorted(state)[:8]})")

        def order(name: str) -> list[int]:
            return [int(x) for x in re.findall(r"\d+", name)]

        self.layers = [layers[n] for n in sorted(layers, key=order)]
        for (w1, _), (w2, _) in zip(self.layers, self.layers[1:]):
            if w1.shape[0] != w2.shape[1]:
                raise ValueError(f"{p}: layer sizes do not chain ({w1.shape} then {w2.shape})")
        if self.layers[-1][0].shape[0] != 1:
            raise ValueError(f"{p}: the last layer must have one output, has {self.layers[-1][0].shape[0]}")
        self.input_dim = int(self.layers[0][0].shape[1])

    def __call__(self, image_emb: np.ndarray) -> float:
        """Rating for the mean of (K, D) image embeddings (re-normalised, as the heads were trained)."""
        emb = np.asarray(image_emb, np.float32).reshape(-1, np.shape(image_emb)[-1])
        if emb.shape[1] != self.input_dim:
            raise ValueError(
                f"aesthetic head expects {self.input_dim}-d CLIP embeddings, got {emb.shape[1]}-d: "
                "scores.quality.aesthetic_head does not match scores.clip.model"
            )
        x = emb.mean(axis=0)
        x = x / max(float(np.linalg.norm(x)), 1e-8)
        for w, b in self.layers:
            x = w @ x + (b if b is not None else 0.0)
        return float(x[0])


def colorfulness(frame: np.ndarray) -> float:
    """Hasler & Suesstrunk colourfulness of one (H, W, 3) uint8 RGB frame."""
    f = frame.astype(np.float32)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def quality_scores(
    frames: np.ndarray,
    cfg: QualityConfig,
    image_emb: np.ndarray | None = None,
    head: AestheticHead | None = None,
) -> dict[str, float]:
    """Quality scores of one clip's frames (T, H, W, 3) uint8 RGB; a few are sampled (see module docstring).

    `aesthetic` is added only when `head` is given with the clip's CLIP image embeddings `image_emb`.
    Empty input gives NaN scores.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"quality_scores expects (T, H, W, 3) uint8 frames, got shape {frames.shape}")
    keys = ("sharpness", "brightness", "contrast", "colorfulness", "blank_fraction")
    idx = sample_frame_indices(0, len(frames), cfg.frames_per_clip)
    if not idx:
        out = {k: float("nan") for k in keys}
    else:
        rows = []
        for i in idx:
            f = frames[i]
            h, w = f.shape[:2]
            if w > cfg.analysis_width:
                f = cv2.resize(f, (cfg.analysis_width, max(2, round(h * cfg.analysis_width / w))),
                               interpolation=cv2.INTER_AREA)
            gray = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)
            lap = cv2.Laplacian(gray, cv2.CV_32F)
            std = float(gray.std())
            rows.append((float(lap.var()), gray.mean() / 255.0, std / 255.0, colorfulness(f),
                         float(std < cfg.blank_std)))
        out = dict(zip(keys, (float(v) for v in np.mean(np.array(rows, np.float64), axis=0))))
    if head is not None:
        if image_emb is None or len(image_emb) == 0:
            out["aesthetic"] = float("nan")
        else:
            out["aesthetic"] = head(image_emb)
    elif cfg.aesthetic_head:
        raise ValueError("quality_scores: scores.quality.aesthetic_head is set, pass head=AestheticHead(path)")
    return out
