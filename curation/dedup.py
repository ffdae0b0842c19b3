"""Near-duplicate clips (stage 4) without comparing all pairs.

Each clip gets a 64-bit DCT perceptual hash (`phash64`, of its middle frame by default). Two clips are
near-duplicates when their hashes differ in at most `max_hamming` bits.

Search (multi-index hashing, a pigeonhole LSH): the 64 bits are cut into `bands` bands. If two hashes
differ in at most r bits, some band differs in at most t = r // bands bits (else the total would exceed r).
Each clip is stored under its exact band values; a query probes, in every band, all values within t bits
of its own (t = 0 when bands > r: one equal band, the classic case). Only clips found in probed buckets are
compared. A bucket holds about N / 2^(64 / bands) clips, so per item the cost is
bands * C(64/bands, <=t) lookups + that many times the bucket size comparisons: O(1) while
N << 2^(64/bands). Default bands=4 (16-bit bands, t=1 for r=6: 68 lookups; buckets stay small up to
millions of clips). 8 bands (t=0) needs only 8 lookups but its 8-bit buckets grow as N/256.

`find_duplicates` is the deterministic batch form used at the end of the job: whatever the input order, it
keeps the highest-priority clip of each group (ties: smallest clip_id) and maps every other one to it.
"""

from __future__ import annotations

from itertools import combinations

import cv2
import numpy as np

_MASK64 = (1 << 64) - 1


def _to_signed(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def phash64(frame: np.ndarray) -> int:
    """64-bit perceptual hash of one (H, W, 3) uint8 RGB (or (H, W) gray) frame, as a signed int64 value.

    Gray -> 32x32 (area) -> 2-D DCT -> the 8x8 lowest frequencies -> one bit each: above their median.
    Robust to re-encoding, resizing and small brightness changes; not to crops or flips.
    """
    img = np.asarray(frame)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    bits = (low > np.median(low)).reshape(-1)
    return _to_signed(int.from_bytes(np.packbits(bits).tobytes(), "big"))


def clip_phash(frames: np.ndarray) -> int:
    """Hash of a clip: `phash64` of its middle frame."""
    return phash64(frames[len(frames) // 2])


def hamming(a: int, b: int) -> int:
    """Differing bits between two 64-bit hashes (signed or unsigned form)."""
    return ((a ^ b) & _MASK64).bit_count()


def _band_widths(bands: int) -> list[int]:
    return [(i + 1) * 64 // bands - i * 64 // bands for i in range(bands)]


def band_keys(h: int, bands: int = 4) -> list[tuple[int, int]]:
    """(band index, band value) for `bands` contiguous bit bands of the 64-bit hash (widths differ by at most
    one bit when 64 is not a multiple of `bands`). Hamming distance <= bands - 1 implies one equal key."""
    if not 1 <= bands <= 64:
        raise ValueError(f"bands must be in [1, 64], got {bands}")
    u = h & _MASK64
    keys, lo = [], 0
    for i, width in enumerate(_band_widths(bands)):
        keys.append((i, (u >> lo) & ((1 << width) - 1)))
        lo += width
    return keys


MAX_PROBE_RADIUS = 2


class DedupIndex:
    """In-memory band index; `add` returns the id of an indexed near-duplicate, or None (then indexes it).

    Only clips that were not duplicates are indexed, so each group is represented by its first member.
    See the module docstring for the cost per add.
    """

    def __init__(self, max_hamming: int = 6, bands: int = 4):
        if not 0 <= max_hamming <= 32:
            raise ValueError(f"max_hamming must be in [0, 32], got {max_hamming}")
        if not 1 <= bands <= 64:
            raise ValueError(f"bands must be in [1, 64], got {bands}")
        self.radius = max_hamming // bands
        if self.radius > MAX_PROBE_RADIUS:
            raise ValueError(
                f"dedup bands ({bands}) too few for max_hamming ({max_hamming}): each band would be probed "
                f"within {self.radius} bits; use bands >= {max_hamming // (MAX_PROBE_RADIUS + 1) + 1}"
            )
        self.max_hamming = max_hamming
        self.bands = bands
        # Bucket key of band i: (i << 64) | (hash & band mask), so probing is one XOR per flip mask.
        self._band_masks: list[tuple[int, int, list[int]]] = []
        lo = 0
        for i, width in enumerate(_band_widths(bands)):
            bits = [1 << (lo + b) for b in range(width)]
            flips = [0]
            for r in range(1, self.radius + 1):
                for combo in combinations(bits, r):
                    flips.append(sum(combo))
            self._band_masks.append((i << 64, ((1 << width) - 1) << lo, flips))
            lo += width
        self._buckets: dict[int, list[tuple[str, int]]] = {}
        self._exact: dict[int, str] = {}
        self.comparisons = 0
        """Hamming comparisons made so far (to check the search is not all pairs)."""

    def __len__(self) -> int:
        return len(self._exact)

    def query(self, h: int) -> str | None:
        """The closest indexed clip within max_hamming (ties: smallest id), or None."""
        u = h & _MASK64
        if u in self._exact:
            return self._exact[u]
        best: tuple[int, str] | None = None
        buckets, limit, seen = self._buckets, self.max_hamming, 0
        for tag, mask, flips in self._band_masks:
            base = tag | (u & mask)
            for flip in flips:
                bucket = buckets.get(base ^ flip)
                if bucket is None:
                    continue
                seen += len(bucket)
                for other_id, other in bucket:
                    d = (u ^ other).bit_count()
                    if d <= limit and (best is None or (d, other_id) < best):
                        best = (d, other_id)
        self.comparisons += seen
        return best[1] if best else None

    def add(self, clip_id: str, h: int) -> str | None:
        """Duplicate-of id, or None after indexing (clip_id, h)."""
        dup = self.query(h)
        if dup is not None:
            return dup
        u = h & _MASK64
        self._exact[u] = clip_id
        for tag, mask, _ in self._band_masks:
            self._buckets.setdefault(tag | (u & mask), []).append((clip_id, u))
        return None


def find_duplicates(items: list[tuple[str, int, float]], max_hamming: int = 6, bands: int = 4) -> dict[str, str]:
    """{duplicate clip_id: kept clip_id} for (clip_id, hash, priority) items; deterministic in any order.

    Greedy in priority order (highest first, NaN lowest, ties by smallest clip_id): a clip within
    max_hamming of an already kept clip is its duplicate, otherwise it is kept. Clip ids must be unique.
    """

    def rank(item: tuple[str, int, float]) -> tuple[float, str]:
        p = item[2]
        p = float("-inf") if p is None or p != p else float(p)
        return (-p, item[0])

    index = DedupIndex(max_hamming, bands)
    dups: dict[str, str] = {}
    for clip_id, h, _ in sorted(items, key=rank):
        kept = index.add(clip_id, h)
        if kept is not None:
            dups[clip_id] = kept
    return dups
