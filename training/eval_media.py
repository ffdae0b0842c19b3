"""Prompts and pictures of an evaluation (`training.evaluate`, `training.eval_cascade`): the held-out prompt
folder, the lossless frames a generated video was scored on, and the side-by-side grid video.

    prompt_files   NAME.jpg/.jpeg/.png (+ caption NAME.txt) of a folder, default the bundled sample
    load_prompts   those images resized and centre-cropped to a stage size (as the training samples)
    read_frames    the PNG frames `model.generate.write_video` writes beside an mp4
    grid_frames    one row per prompt of images (held) and videos, side by side
    write_grid     the grid as an H.264 mp4 that plays in a browser
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.tracking_store import repo_root
from curation.encode import EncodeConfig, encode_mp4
from training.samples import image_items
from training.subconfigs import SamplingConfig

BUNDLED_PROMPTS = repo_root() / "tests" / "assets" / "sample"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
GRID_GAP = 4
"""Black pixels between the columns of the grid and between prompt rows (even: yuv420p)."""


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


def grid_frames(rows: list[list[np.ndarray]]) -> np.ndarray:
    """One row per prompt, its cells left to right with GRID_GAP black pixels between them and between rows:
    (F, H', W', 3) uint8. A cell is an image (H, W, 3), held for every frame, or a video (F, H, W, 3); a
    shorter video holds its last frame."""
    if not rows or any(not row for row in rows):
        raise ValueError("grid_frames needs at least one row, each with at least one cell")
    for cell in (c for row in rows for c in row):
        if cell.dtype != np.uint8 or cell.ndim not in (3, 4) or cell.shape[-1] != 3:
            raise ValueError(f"grid cells are (H, W, 3) images or (F, H, W, 3) videos of uint8, got "
                             f"{cell.shape} {cell.dtype}")
    videos = [c[None] if c.ndim == 3 else c for c in (c for row in rows for c in row)]
    num_frames = max(len(v) for v in videos)
    width = max(sum(c.shape[-2] for c in row) + GRID_GAP * (len(row) - 1) for row in rows)
    out = []
    for row in rows:
        height = max(c.shape[-3] for c in row)
        band = np.zeros((num_frames, height, width, 3), np.uint8)
        x = 0
        for cell in row:
            h, w = cell.shape[-3:-1]
            for f in range(num_frames):
                band[f, :h, x:x + w] = cell if cell.ndim == 3 else cell[min(f, len(cell) - 1)]
            x += w + GRID_GAP
        out.append(band)
        out.append(np.zeros((num_frames, GRID_GAP, width, 3), np.uint8))
    grid = np.concatenate(out[:-1], axis=1)
    pad_h, pad_w = grid.shape[1] % 2, grid.shape[2] % 2  # yuv420p needs even sizes
    return np.pad(grid, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else grid


def write_grid(frames: np.ndarray, fps: float, path: str | Path) -> Path:
    """H.264 yuv420p faststart mp4 at full size (curation.encode.encode_mp4: plays in a browser)."""
    data, _ = encode_mp4(frames, fps, EncodeConfig(max_side=max(frames.shape[1:3]), max_fps=float(fps), crf=18,
                                                   preset="veryfast"))
    Path(path).write_bytes(data)
    return Path(path)
