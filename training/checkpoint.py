"""Training checkpoints: layout, per-rank trainer state, the COMPLETE marker and the atomic `latest`.

    OUTPUT/checkpoints/
      step-00000200/
        ds/                          DeepSpeed: model states (rank 0), each rank's ZeRO optimizer partition
        trainer_state_rank0.pt       per rank: step, data position, RNG states, EMA shard, MLflow run id
        trainer_state_rank1.pt
        config.yaml                  the resolved config tree of the run
        COMPLETE                     written last, by rank 0, after a barrier (JSON: step, world size)
      latest                         name of the newest complete folder (common.atomic: tmp + fsync + rename)

A folder without COMPLETE is a save that died half way: resume never reads it (the newest COMPLETE
folder wins) and the next save of the same step clears it first. Trainer states hold only tensors and
plain Python values (RNG states included), so they load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import atomic
from training import engine as ds

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
CONFIG_NAME = "config.yaml"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    """OUTPUT/checkpoints."""
    return Path(output_dir) / CHECKPOINTS


def step_dir(output_dir: str | Path, step: int) -> Path:
    """OUTPUT/checkpoints/step-XXXXXXXX."""
    return checkpoints_dir(output_dir) / f"step-{step:08d}"


def is_complete(folder: str | Path) -> bool:
    """True when the folder's COMPLETE marker exists (every rank's files were written before it)."""
    return (Path(folder) / COMPLETE).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """[(step, folder)] of the complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir() and is_complete(child):
                found.append((int(m.group(1)), child))
    return sorted(found)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one under OUTPUT (None if there is none),
    `none` = start fresh, else a checkpoint folder, which must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {folder}: no such checkpoint folder")
    if not is_complete(folder):
        raise ValueError(f"--resume {folder}: checkpoint is incomplete (no {COMPLETE} marker: its save was "
                         "interrupted); use an older one or --resume auto")
    return folder


# --------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, numpy, python) as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------- save / load
def trainer_state_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"trainer_state_rank{rank}.pt"


def save(output_dir: str | Path, step: int, engine, trainer_state: dict[str, Any], config_yaml: str,
         dist_info: ds.DistInfo, keep_last: int) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). Order: clear a leftover folder, every
    rank's DeepSpeed files and trainer state, config.yaml, barrier, COMPLETE, `latest`, prune to keep_last."""
    folder = step_dir(output_dir, step)
    if dist_info.is_main:
        if folder.exists():  # an interrupted save of this step from an earlier life of the run
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    ds.barrier()
    ds.save_engine(engine, folder)
    torch.save(trainer_state, trainer_state_path(folder, dist_info.rank))
    if dist_info.is_main:
        atomic.write_text(folder / CONFIG_NAME, config_yaml)
    ds.barrier()
    if dist_info.is_main:
        marker = {"step": step, "world_size": dist_info.world_size, "time": time.time()}
        atomic.write_text(folder / COMPLETE, json.dumps(marker) + "\n")  # durable before `latest` names it
        root = checkpoints_dir(output_dir)
        atomic.remove_temp_files(root)  # of a `latest` whose write a kill interrupted
        atomic.write_text(root / LATEST, folder.name + "\n")
        for _, old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    ds.barrier()
    return folder


def load_trainer_state(folder: str | Path, dist_info: ds.DistInfo) -> dict[str, Any]:
    """This rank's trainer state of a complete checkpoint, after checking that as many processes wrote it
    as run now (ValueError otherwise). Needs no model: the trainer checks a checkpoint before building one,
    and restores the DeepSpeed part afterwards (`training.engine.load_engine`)."""
    folder = Path(folder)
    marker = json.loads((folder / COMPLETE).read_text())
    if int(marker["world_size"]) != dist_info.world_size:
        raise ValueError(f"{folder} was written by {marker['world_size']} processes; resume it with the same "
                         f"number (now {dist_info.world_size}): the data position is per rank")
    return torch.load(trainer_state_path(folder, dist_info.rank), map_location="cpu", weights_only=True)
