"""Shared pytest fixtures: the real test videos in ../shared (skipped when absent) and env defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "data" / "videos"

# Loopback-only Ray, no telemetry anywhere, one extension cache inside the repo.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """Folder of real clips with hand-checked shot ground truth; skips the test when absent."""
    if not (SHARED_VIDEOS / "ground_truth.json").is_file():
        pytest.skip(f"real test videos not found at {SHARED_VIDEOS} (a user's clone has no ../shared)")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def ground_truth(shared_videos: Path) -> dict:
    """ground_truth.json of the shared videos, without its `_about` entry."""
    data = json.loads((shared_videos / "ground_truth.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}
