"""The order of training samples and their seeds: which sample each rank reads at each position, the kind
of each micro-step, and the id and random draws of a sample. Pure functions of (seed, kind, epoch, world
size, rank, dataset index); no I/O.

Per kind (video, image) and epoch, a permutation of the dataset indices seeded by (seed, kind, epoch).
The epochs' permutations concatenated form one endless global stream; rank r reads global positions
r, r + W, r + 2W, ... (W = world size). So in every epoch each sample goes to exactly one rank and ranks
differ by at most one sample, and one process with batch 2B reads at step s exactly the union of what two
processes with batch B read, across epoch boundaries too (each rank wrapping on its own, as
DistributedSampler does, would break that at every epoch end).

Every random choice of a sample comes from a generator seeded by (seed, kind, epoch, dataset index), never
from the rank, worker or position that loads it.
"""

from __future__ import annotations

import numpy as np

KIND_IDS: dict[str, int] = {"video": 0, "image": 1}
KINDS: tuple[str, ...] = tuple(KIND_IDS)

# Seed domains, so that no two kinds of random draw share a stream.
SEED_DOMAIN_SAMPLE = 1
SEED_DOMAIN_ORDER = 2
SEED_DOMAIN_MIX = 3

_INDEX_BITS = 32


def sample_id(kind: str, epoch: int, index: int) -> int:
    """int64 id unique per (kind, epoch, dataset index): epoch * 2**33 + kind * 2**32 + index."""
    return (epoch << (_INDEX_BITS + 1)) | (KIND_IDS[kind] << _INDEX_BITS) | index


def sample_index(sid: int) -> int:
    """The dataset index of sample id `sid` (the inverse of sample_id for the index)."""
    return int(sid) & ((1 << _INDEX_BITS) - 1)


def sample_uniforms(seed: int, kind: str, epoch: int, index: int) -> np.ndarray:
    """The 4 uniforms in [0, 1) of a sample: fps choice, start frame, crop row, crop column."""
    return np.random.default_rng([seed, SEED_DOMAIN_SAMPLE, KIND_IDS[kind], epoch, index]).random(4)


def micro_step_kind(seed: int, step: int, image_fraction: float) -> str:
    """"image" or "video": the kind of micro-step `step`, the same on every rank."""
    if image_fraction <= 0.0:
        return "video"
    if image_fraction >= 1.0:
        return "image"
    u = np.random.default_rng([seed, SEED_DOMAIN_MIX, step]).random()
    return "image" if u < image_fraction else "video"


class RankStream:
    """A rank's endless stream of (epoch, dataset index) of one kind, cut in chunks of `batch_size`."""

    def __init__(self, kind: str, size: int, *, seed: int, rank: int, world_size: int, batch_size: int):
        self.kind, self.size, self.seed = kind, size, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset order of `epoch` (the same on every rank)."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, SEED_DOMAIN_ORDER, KIND_IDS[self.kind], epoch])
            self._perms[epoch] = rng.permutation(self.size)
        return self._perms[epoch]

    def _global(self, s: int) -> tuple[int, int]:
        """(epoch, offset in that epoch's permutation) of this rank's s-th sample."""
        return divmod(s * self.world_size + self.rank, self.size)

    def chunk_epoch(self, c: int) -> int:
        """The epoch of the first sample of chunk `c`."""
        return self._global(c * self.batch_size)[0]

    def chunk(self, c: int) -> list[tuple[int, int]]:
        """(epoch, index) of the samples of chunk `c` of this rank."""
        out = []
        for s in range(c * self.batch_size, (c + 1) * self.batch_size):
            epoch, offset = self._global(s)
            out.append((epoch, int(self.permutation(epoch)[offset])))
        return out
