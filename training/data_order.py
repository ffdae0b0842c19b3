"""The order of training samples: which sample each rank reads at each position, and the kind of each
micro-step. Pure functions of (seed, epoch, world size, rank); no I/O.

Per kind (video, image) and epoch, a permutation of the dataset indices seeded by (seed, kind, epoch).
The epochs' permutations concatenated form one endless global stream; rank r reads global positions
r, r + W, r + 2W, ... (W = world size). So in every epoch each sample goes to exactly one rank and ranks
differ by at most one sample, and one process with batch 2B reads at step s exactly the union of what two
processes with batch B read, across epoch boundaries too (each rank wrapping on its own, as
DistributedSampler does, would break that at every epoch end).
"""

from __future__ import annotations

import numpy as np

from training.shard_dataset import KIND_IDS, SEED_DOMAIN_MIX, SEED_DOMAIN_ORDER


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

    def chunk(self, c: int) -> list[tuple[int, int]]:
        """(epoch, index) of the samples of chunk `c` of this rank."""
        out = []
        for s in range(c * self.batch_size, (c + 1) * self.batch_size):
            epoch, offset = divmod(s * self.world_size + self.rank, self.size)
            out.append((epoch, int(self.permutation(epoch)[offset])))
        return out
