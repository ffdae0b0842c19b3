"""Caption <-> frame similarity with open_clip (stage 4: the caption filter score).

`ClipScorer` loads an open_clip model once (once per Ray actor), embeds a few frames per clip and the
caption, and `clip_similarity` is the cosine between the mean frame embedding and the caption embedding.

Weights come only from a local file (`scores.clip.checkpoint`: safetensors, or `torch.load(weights_only=True)`),
so nothing is ever downloaded. `model="tiny-random"` builds a tiny randomly initialised CLIP for tests and the
demo; its scores mean nothing (`random_weights` is True) and the pipeline must not filter on them.

Plain ViT CLIPs (ViT-H-14, the other ViT-* configs open_clip ships, tiny-random) are built by
curation.clip_model, in torch alone: the same weights, tokens and embeddings as open_clip's, without
importing open_clip (and with it torchvision, torch._dynamo and timm) in every actor, and a checkpoint is
assigned to a model built on the meta device (no random initialisation first). Every other architecture,
and a checkpoint that does not fit the plain model exactly (open_clip converts or resizes some), goes
through open_clip (`create_model(pretrained=None)`
+ `load_checkpoint`).

Shapes: frames (K, H, W, 3) uint8 RGB -> image embeddings (K, D) float32, rows L2-normalised;
texts list[str] of length T -> (T, D) float32.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

# Defensive: open_clip/huggingface_hub must never reach a hub from a curation worker.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.configtree import ConfigError  # noqa: E402
from common.dtypes import Precision, resolve_dtype  # noqa: E402

if TYPE_CHECKING:
    import torch

# torch and open_clip are imported where they are used: this module's config and helpers are imported by
# the driver and by every stage-1 actor, which never build a CLIP (importing both costs ~3 s of start-up).

TINY_MODEL = "tiny-random"
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""open_clip's default image normalisation (open_clip.constants; what its plain ViT configs use)."""
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

ClipDevice = Literal["auto", "cpu", "cuda"]
"""Where open_clip runs. No "cuda:N": a Ray actor sees only the GPU Ray gave it, as "cuda"."""

# A CLIP small enough for CI (~1.7M parameters); same code path as ViT-H-14 (registered open_clip config).
TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class ClipScoreConfig:
    """open_clip caption-frame similarity (`scores.clip`)."""

    model: str = "ViT-H-14"
    """open_clip architecture name (ViT-H-14 is what I2VGen-XL uses), or "tiny-random": a tiny CLIP with
    random weights built in code, for tests and the demo only (its scores are never used to filter)."""
    checkpoint: str | None = None
    """Local path to the open_clip weights (.safetensors, .bin, .pt, .pth). Required unless model is
    tiny-random (where it is optional: a tiny checkpoint saved earlier). Never downloaded."""
    frames_per_clip: int = 3
    """Frames sampled evenly in each clip; their embeddings are averaged into the clip embedding."""
    batch_size: int = 64
    """Images (or captions) per forward pass."""
    device: ClipDevice = "auto"
    """"auto" (cuda if available, else cpu), "cpu" or "cuda" (the job checks that the cluster has a GPU
    for it before any work)."""
    precision: Precision = "auto"
    """"auto" (float16 on cuda, float32 on cpu), "float32", "bfloat16" or "float16"."""


def _open_clip_model(cfg: ClipScoreConfig, checkpoint: Path | None):
    """(model, tokenizer, preprocess config) built by open_clip: the architectures curation.clip_model does
    not build, and checkpoints that need open_clip's conversions."""
    import open_clip

    if cfg.model == TINY_MODEL:
        register_tiny_model()
    # pretrained=None: open_clip builds the architecture only and never looks up a tag or a hub.
    model = open_clip.create_model(cfg.model, pretrained=None, device="cpu")
    if checkpoint is not None:
        # strict=True: a checkpoint of another architecture fails loudly instead of half-loading.
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    return model, open_clip.get_tokenizer(cfg.model), open_clip.get_model_preprocess_cfg(model)


def register_tiny_model() -> None:
    """Register TINY_MODEL_CFG with open_clip under TINY_MODEL (once per process), so that open_clip's own
    factory (`open_clip.create_model("tiny-random")`) builds it: the path for checkpoints the plain model does
    not take, and the reference the tests compare curation.clip_model with."""
    import open_clip

    if TINY_MODEL in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory(prefix="tiny_clip_") as tmp:
        path = Path(tmp) / f"{TINY_MODEL}.json"
        path.write_text(json.dumps(TINY_MODEL_CFG))
        # add_model_config reads the file into open_clip's in-memory registry; the file can then go.
        open_clip.add_model_config(path)


def open_clip_folder() -> Path:
    """The installed open_clip package's folder, found without importing it (that takes seconds)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("scores.clip: the open_clip package is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _configs_folder() -> Path:
    return open_clip_folder() / "model_configs"


def known_models() -> list[str]:
    """open_clip's architecture names (the model configs it ships), read without importing open_clip,
    which takes seconds: the driver checks scores.clip.model with this before any work."""
    return sorted(p.stem for p in _configs_folder().glob("*.json"))


def architecture(model: str) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg, ...) of `model`: TINY_MODEL_CFG for
    tiny-random, else the JSON open_clip ships (read without importing open_clip)."""
    if model == TINY_MODEL:
        return copy.deepcopy(TINY_MODEL_CFG)
    return json.loads((_configs_folder() / f"{model}.json").read_text())


def validate_clip_config(cfg: ClipScoreConfig) -> None:
    """Everything about `scores.clip` that can be checked without torch: sizes, the model name, the
    checkpoint file. ConfigError names the field and the fix. (The device is checked where it is used:
    by the job against the cluster, by ClipScorer against this machine.)"""
    if cfg.frames_per_clip < 1 or cfg.batch_size < 1:
        raise ConfigError("scores.clip.frames_per_clip and scores.clip.batch_size must be >= 1")
    if cfg.model != TINY_MODEL:
        models = known_models()
        if cfg.model not in models:
            close = difflib.get_close_matches(cfg.model, models, n=3)
            hint = f"did you mean {close}? " if close else ""
            raise ConfigError(
                f"scores.clip.model: {cfg.model!r} is not an open_clip architecture; {hint}use {TINY_MODEL!r} "
                f"or one of {models}"
            )
    checkpoint_path(cfg)


def checkpoint_path(cfg: ClipScoreConfig) -> Path | None:
    """The checked local weights file of `cfg` (None: tiny-random without checkpoint, random weights)."""
    if cfg.checkpoint is None:
        if cfg.model == TINY_MODEL:
            return None
        raise ConfigError(
            f"scores.clip.checkpoint: open_clip {cfg.model} needs local weights; set "
            "scores.clip.checkpoint=/path/to/open_clip_model.safetensors (nothing is downloaded), "
            f"or scores.clip.model={TINY_MODEL} for a test run"
        )
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"scores.clip.checkpoint: file not found: {str(path)!r} (open_clip {cfg.model} weights); "
            "download the weights yourself and point the key at the local file"
        )
    return path.resolve()


def resolve_device(device: ClipDevice) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" on a machine without one is a ConfigError."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("scores.clip.device: 'cuda' but torch sees no CUDA GPU here; use auto or cpu")
    return torch.device(device)


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype of `precision` (common.dtypes); "auto" is float16 on cuda, float32 on cpu."""
    import torch

    return resolve_dtype(precision, torch.float16 if device.type == "cuda" else torch.float32)


def sample_frame_indices(start: int, end: int, k: int) -> list[int]:
    """`k` indices spread evenly over [start, end): the centres of k equal segments, without repeats.

    Fewer than k come back when the range holds fewer than k frames; an empty range gives [].
    """
    n = end - start
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(start, end))
    return [start + int((i + 0.5) * n / k) for i in range(k)]


def clip_similarity(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Cosine between the mean of the frame embeddings (K, D) and one caption embedding (D,) or (1, D).

    NaN when there is no frame or the mean embedding is zero (nothing to compare), never an exception.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32).reshape(-1, np.shape(text_emb)[-1])
    text = np.asarray(text_emb, dtype=np.float32).reshape(-1)
    if image_emb.shape[0] == 0:
        return float("nan")
    mean = image_emb.mean(axis=0)
    norm_i, norm_t = float(np.linalg.norm(mean)), float(np.linalg.norm(text))
    if norm_i == 0.0 or norm_t == 0.0 or not math.isfinite(norm_i * norm_t):
        return float("nan")
    return float(np.dot(mean, text) / (norm_i * norm_t))


class ClipScorer:
    """An open_clip model loaded once; embeds frames and captions in batches."""

    def __init__(self, cfg: ClipScoreConfig):
        validate_clip_config(cfg)
        import torch

        from curation import clip_model

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        arch = architecture(cfg.model)
        checkpoint = checkpoint_path(cfg)
        model = None
        if clip_model.is_plain(arch):
            model = (clip_model.build(arch) if checkpoint is None
                     else clip_model.load(arch, clip_model.read_checkpoint(checkpoint)))
        if model is not None:
            self.tokenizer = clip_model.Tokenizer(open_clip_folder() / "bpe_simple_vocab_16e6.txt.gz",
                                                  model.context_length)
            pp: dict = {}  # open_clip's default preprocessing, which its plain configs use
        else:  # open_clip reads the file itself (and converts or resizes what it can)
            model, self.tokenizer, pp = _open_clip_model(cfg, checkpoint)
        self.random_weights: bool = checkpoint is None
        """True when no weights were loaded (tiny-random without checkpoint): scores are meaningless."""
        self.model = model.to(self.device, dtype=self.dtype).eval()
        size = pp.get("size", model.visual.image_size)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.resize_mode = pp.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(f"scores.clip.model: open_clip resize_mode {self.resize_mode!r} is not supported")
        self.interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(pp.get("mean", OPENAI_DATASET_MEAN), device=self.device).view(shape)
        self.std = torch.tensor(pp.get("std", OPENAI_DATASET_STD), device=self.device).view(shape)
        self.embed_dim = int(model.text_projection.shape[-1]) if model.text_projection is not None else None

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """(K, H, W, 3) uint8 -> (K, 3, S, S) normalised tensor on the device, like the model's own
        transform (resize the shortest side with antialiasing, centre crop, normalise) but batched."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            nh, nw = th, tw
        else:
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[:, :, top : top + th, left : left + tw].clamp_(0.0, 1.0)
        return ((x - self.mean) / self.std).to(self.dtype)

    def embed_images(self, frames: np.ndarray) -> np.ndarray:
        """(K, H, W, 3) uint8 RGB -> (K, D) float32, L2-normalised rows."""
        import torch

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"embed_images expects (K, H, W, 3) uint8 frames, got shape {frames.shape}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(frames), self.cfg.batch_size):
                batch = self.preprocess(frames[i : i + self.cfg.batch_size])
                out.append(self.model.encode_image(batch, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim or 0), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """list of T captions -> (T, D) float32, L2-normalised rows (long captions are truncated)."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.cfg.batch_size):
                tokens = self.tokenizer([str(t) for t in texts[i : i + self.cfg.batch_size]]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim or 0), np.float32)

    def embed_clips(self, clip_frames: list[np.ndarray]) -> list[np.ndarray | None]:
        """Per clip, the (k_i, D) embeddings of its sampled frames (None for a clip without frames).

        Frames of all clips of one size go through the model together (sources differ in size)."""
        out: list[np.ndarray | None] = [None] * len(clip_frames)
        by_shape: dict[tuple, list[int]] = {}
        for i, frames in enumerate(clip_frames):
            if len(frames):
                by_shape.setdefault(tuple(frames.shape[1:]), []).append(i)
        for group in by_shape.values():
            emb = self.embed_images(np.concatenate([clip_frames[i] for i in group]))
            offset = 0
            for i in group:
                out[i] = emb[offset : offset + len(clip_frames[i])]
                offset += len(clip_frames[i])
        return out


def build_seeded_scorer(cfg: ClipScoreConfig) -> ClipScorer:
    """ClipScorer(cfg) built right after `torch.manual_seed(0)`: the tiny random model (no checkpoint) draws its
    weights from torch's global RNG, so every process that builds it (curation actors, a resumed run, the
    trainer's evaluations) gets the same model and the same scores; real weights do not depend on it. The
    caller's RNG state is restored afterwards, and the build holds curation.torch_rng.GLOBAL_RNG_LOCK (another
    thread of the process may be building a model from the global RNG)."""
    import torch

    from curation.torch_rng import GLOBAL_RNG_LOCK

    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ClipScorer(cfg)
