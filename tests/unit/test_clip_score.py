"""open_clip caption-frame similarity: tiny random CLIP built in code, real loading path, no network."""

from __future__ import annotations

import socket

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from common.configtree import ConfigError
from curation.clip_score import (
    TINY_MODEL,
    ClipScoreConfig,
    ClipScorer,
    clip_similarity,
    known_models,
    resolve_device,
    resolve_precision,
    sample_frame_indices,
    validate_clip_config,
)


@pytest.fixture(scope="module")
def tiny() -> ClipScorer:
    torch.manual_seed(0)
    return ClipScorer(ClipScoreConfig(model="tiny-random", device="cpu", batch_size=8))


def _frames(n: int, h: int = 72, w: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_sample_frame_indices_even_and_bounded():
    assert sample_frame_indices(0, 9, 3) == [1, 4, 7]
    assert sample_frame_indices(10, 20, 2) == [12, 17]
    assert sample_frame_indices(5, 7, 3) == [5, 6]  # fewer frames than asked: each once
    assert sample_frame_indices(5, 5, 3) == []
    idx = sample_frame_indices(100, 1100, 7)
    assert len(idx) == 7 and idx == sorted(set(idx)) and 100 <= idx[0] and idx[-1] < 1100


def test_clip_similarity_is_cosine_of_mean_frame():
    text = np.array([1.0, 0.0, 0.0], np.float32)
    frames = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]], np.float32) / np.sqrt(2)
    assert clip_similarity(frames, text) == pytest.approx(1.0)  # mean points along the text
    assert clip_similarity(frames[:1], text) == pytest.approx(1 / np.sqrt(2))
    assert clip_similarity(-frames, text[None]) == pytest.approx(-1.0)
    assert np.isnan(clip_similarity(np.zeros((0, 3), np.float32), text))
    assert np.isnan(clip_similarity(np.array([[1.0, 0, 0], [-1.0, 0, 0]]), text))  # mean is zero


def test_tiny_embeddings_shape_and_normalisation(tiny: ClipScorer):
    assert tiny.random_weights is True
    img = tiny.embed_images(_frames(11))  # 11 > batch_size 8: two batches
    txt = tiny.embed_texts(["a red car on a road", "two dogs playing", ""])
    assert img.shape == (11, 32) and txt.shape == (3, 32)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    # batching does not change results; different frames give different embeddings
    np.testing.assert_allclose(tiny.embed_images(_frames(11)[:3]), img[:3], atol=1e-5)
    assert not np.allclose(img[0], img[1])


def test_batched_preprocess_matches_open_clip_transform(tiny: ClipScorer):
    # A smooth frame (so resampling filters agree closely), non-square and larger than the model input.
    y, x = np.mgrid[0:90, 0:160]
    frame = np.stack([x * 1.5, y * 2.5, (x + y)], -1).clip(0, 255).astype(np.uint8)
    ours = tiny.preprocess(frame[None])[0]
    from open_clip.transform import PreprocessCfg, image_transform_v2  # the model's own (PIL) transform

    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(tiny.model)), is_train=False)
    ref = transform(Image.fromarray(frame))
    assert ours.shape == ref.shape == (3, 64, 64)
    assert float((ours - ref).abs().mean()) < 0.03  # normalised units (one 8-bit step is ~0.015)


def test_embed_clips_groups_sizes_and_keeps_clip_order(tiny: ClipScorer):
    a, b = _frames(3, seed=1), _frames(2, 40, 60, seed=2)  # two sizes in one call
    got = tiny.embed_clips([a, b, a[:0], a[:1]])
    assert got[2] is None and [e.shape for e in (got[0], got[1], got[3])] == [(3, 32), (2, 32), (1, 32)]
    np.testing.assert_allclose(got[0], tiny.embed_images(a), atol=1e-5)
    np.testing.assert_allclose(got[1], tiny.embed_images(b), atol=1e-5)
    np.testing.assert_allclose(got[3], got[0][:1], atol=1e-5)


def test_missing_checkpoint_names_path_and_key(tmp_path):
    missing = tmp_path / "nowhere" / "open_clip_vit_h14.safetensors"
    with pytest.raises(ConfigError) as err:
        ClipScorer(ClipScoreConfig(model="ViT-H-14", checkpoint=str(missing), device="cpu"))
    assert str(missing) in str(err.value) and "scores.clip.checkpoint" in str(err.value)
    with pytest.raises(ConfigError, match="scores.clip.checkpoint"):
        ClipScorer(ClipScoreConfig(model="ViT-H-14", checkpoint=None, device="cpu"))


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="scores.clip.model.*did you mean"):
        ClipScorer(ClipScoreConfig(model="ViT-H-15", checkpoint="/x.pt", device="cpu"))
    with pytest.raises(ConfigError, match="scores.clip.model"):
        validate_clip_config(ClipScoreConfig(model="ViT-Nope-99", checkpoint="/x.pt"))


def test_model_names_are_checked_without_importing_open_clip_and_match_its_registry():
    """The driver checks scores.clip.model from open_clip's packaged configs (no import: seconds saved);
    that list must be exactly what open_clip itself offers."""
    assert set(known_models()) == set(open_clip.list_models()) - {TINY_MODEL}
    assert "ViT-H-14" in known_models()


def test_precision_names_are_the_repo_dtype_map():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert [resolve_precision(p, cpu) for p in ("float32", "bfloat16", "float16")] == \
        [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_machine_without_one_is_a_config_error():
    with pytest.raises(ConfigError, match="scores.clip.device: 'cuda'"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="scores.clip.device"):
        ClipScorer(ClipScoreConfig(model="tiny-random", device="cuda"))
    assert resolve_device("auto") == torch.device("cpu")


def test_bfloat16_scorer_runs_in_bfloat16(tiny: ClipScorer):
    torch.manual_seed(0)
    bf16 = ClipScorer(ClipScoreConfig(model="tiny-random", device="cpu", precision="bfloat16", batch_size=8))
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    frames = _frames(2, seed=3)
    np.testing.assert_allclose(bf16.embed_images(frames), tiny.embed_images(frames), atol=0.05)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_offline(tiny: ClipScorer, tmp_path, monkeypatch, suffix):
    state = {k: v.detach().clone().contiguous() for k, v in tiny.model.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)

    def no_network(*args, **kwargs):
        raise AssertionError("network access while loading a local checkpoint")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", no_network)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = ClipScorer(ClipScoreConfig(model="tiny-random", checkpoint=str(path), device="cpu"))
    assert loaded.random_weights is False
    frames = _frames(4, seed=5)
    np.testing.assert_allclose(loaded.embed_images(frames), tiny.embed_images(frames), atol=1e-6)
    np.testing.assert_allclose(loaded.embed_texts(["a boat"]), tiny.embed_texts(["a boat"]), atol=1e-6)


def test_checkpoint_of_other_architecture_fails_loudly(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(RuntimeError):
        ClipScorer(ClipScoreConfig(model="tiny-random", checkpoint=str(path), device="cpu"))
