"""Unit-test defaults."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models are op-overhead bound; on a 2-core box one intra-op thread avoids OpenMP
    oversubscription (measured 2.7 s vs 22 s for the CPU generation test under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
