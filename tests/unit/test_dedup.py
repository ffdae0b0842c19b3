"""Perceptual hashes and band-LSH near-duplicate search (deterministic, never all pairs)."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest

from curation.dedup import DedupIndex, band_keys, clip_phash, find_duplicates, hamming, phash64


def _picture(seed: int, h: int = 180, w: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 20, w // 20, 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _jpeg(frame: np.ndarray, quality: int) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


def test_phash_is_int64_and_robust_to_reencode_and_resize():
    a = _picture(1)
    h = phash64(a)
    assert -(1 << 63) <= h < (1 << 63)
    assert phash64(a.copy()) == h
    assert hamming(h, phash64(_jpeg(a, 40))) <= 4
    assert hamming(h, phash64(cv2.resize(a, (128, 72), interpolation=cv2.INTER_AREA))) <= 4
    assert hamming(h, phash64(np.clip(a.astype(int) + 12, 0, 255).astype(np.uint8))) <= 4
    others = [hamming(h, phash64(_picture(s))) for s in range(2, 12)]
    assert min(others) > 12  # different pictures are far apart
    assert clip_phash(np.stack([_picture(9), a, _picture(8)])) == h  # middle frame


def test_band_keys_pigeonhole():
    rng = random.Random(0)
    for bands in (4, 7, 8, 13):
        for _ in range(200):
            h = rng.getrandbits(64) - (1 << 63)
            flips = rng.sample(range(64), rng.randint(0, bands - 1))
            g = h
            for bit in flips:
                g ^= 1 << bit
            assert set(band_keys(h, bands)) & set(band_keys(g, bands)), (bands, flips)
        keys = band_keys(h, bands)
        assert [k[0] for k in keys] == list(range(bands))


def test_index_finds_near_duplicates_only():
    index = DedupIndex(max_hamming=6, bands=4)
    assert index.add("a", 0) is None
    assert index.add("b", 0b111111) == "a"  # 6 bits away
    assert index.add("c", 0b1111111) is None  # 7 bits away from "a"; "b" was not indexed
    assert index.add("d", -1) is None
    assert index.add("e", -1 ^ 0b11) == "d"  # signed and unsigned forms agree
    assert len(index) == 3
    with pytest.raises(ValueError, match="bands"):
        DedupIndex(max_hamming=12, bands=4)  # would probe 3 bits per band


def _clusters(n_groups: int, per_group: int, seed: int) -> list[tuple[str, int, float]]:
    rng = random.Random(seed)
    items = []
    for g in range(n_groups):
        base = rng.getrandbits(64)
        for j in range(per_group):
            h = base
            for bit in rng.sample(range(64), rng.randint(0, 3)):
                h ^= 1 << bit
            items.append((f"clip-{g:04d}-{j}", h - (1 << 63) if h >= 1 << 63 else h, float(rng.randint(0, 3))))
    return items


def _brute_force(items, max_hamming):
    kept, dups = [], {}
    for clip_id, h, _ in sorted(items, key=lambda it: (-it[2], it[0])):
        near = [(hamming(h, kh), kid) for kid, kh in kept if hamming(h, kh) <= max_hamming]
        if near:
            dups[clip_id] = min(near)[1]
        else:
            kept.append((clip_id, h))
    return dups


def test_find_duplicates_deterministic_and_equal_to_brute_force():
    items = _clusters(60, 4, seed=1)
    want = _brute_force(items, 6)
    assert len(want) > 60  # the groups really contain duplicates
    for seed in range(3):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        assert find_duplicates(shuffled, max_hamming=6, bands=4) == want
        assert find_duplicates(shuffled, max_hamming=6, bands=8) == want  # exact-band variant
        assert find_duplicates(shuffled, max_hamming=6, bands=3) == want


def test_find_duplicates_priority_then_smallest_id():
    items = [("b", 5, 1.0), ("a", 5, 1.0), ("c", 5, 2.0), ("d", 5, float("nan"))]
    assert find_duplicates(items, 6) == {"a": "c", "b": "c", "d": "c"}
    assert find_duplicates([("b", 5, 1.0), ("a", 5, 1.0)], 6) == {"b": "a"}


def test_search_is_not_all_pairs():
    items = _clusters(3000, 2, seed=2)  # 6000 clips
    index = DedupIndex(max_hamming=6, bands=4)
    found = {cid for cid, h, _ in items if index.add(cid, h) is not None}
    assert len(found) > 1000
    assert index.comparisons < 10 * len(items)  # about 4 per clip here; all pairs would be ~18 million
