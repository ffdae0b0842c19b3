"""curation.clip_model builds plain ViT CLIPs exactly as open_clip does: same random weights from the same
seed, same state-dict keys, same tokens, same embeddings (bit for bit); ClipScorer takes that path for plain
architectures and open_clip's for everything else."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from curation import clip_model
from curation.clip_score import (TINY_MODEL, TINY_MODEL_CFG, ClipScoreConfig, ClipScorer, architecture,
                                 open_clip_folder, register_tiny_model)

BPE = open_clip_folder() / "bpe_simple_vocab_16e6.txt.gz"
TEXTS = ["A red car drives along a coastal road at sunset.", "", "   ", "don't stop: 1,234 émigrés’ café",
         "Ünïcödé &amp;amp; <b>html</b>\tand\n\nspaces", "emoji 🎬🍿 and CJK 電影 and Ελληνικά", "<start_of_text> x",
         "word " * 120]  # the last one is cut to the context length, keeping its end token


def _pair(name: str, cfg: dict, seed: int = 0):
    """(open_clip's model, ours) from the same RNG state. Registered names go through create_model (what
    the job did before), test-only configs through open_clip.CLIP (what create_model instantiates)."""
    torch.manual_seed(seed)
    if name in open_clip.list_models():
        ref = open_clip.create_model(name, pretrained=None, device="cpu")
    else:
        ref = open_clip.CLIP(**cfg)
    torch.manual_seed(seed)
    ours = clip_model.build(cfg)
    return ref.eval(), ours.eval()


def _reference_tokenizer(name: str, cfg: dict):
    if name in open_clip.list_models():
        return open_clip.get_tokenizer(name)
    return open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


QUICK = {**copy.deepcopy(TINY_MODEL_CFG), "quick_gelu": True,
         "vision_cfg": {"image_size": 48, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8, "mlp_ratio": 3.0},
         "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 2}}


@pytest.fixture(scope="module", params=["tiny-random", "tiny-quickgelu", "ViT-S-32"])
def pair(request):
    name = request.param
    if name == TINY_MODEL:
        register_tiny_model()
        cfg = TINY_MODEL_CFG
    elif name == "tiny-quickgelu":
        cfg = QUICK
    else:
        cfg = architecture(name)
    ref, ours = _pair(name, cfg)
    return name, cfg, ref, ours


def test_same_seed_same_weights_and_keys(pair):
    _, _, ref, ours = pair
    want, got = ref.state_dict(), ours.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_same_tokens(pair):
    name, cfg, _, _ = pair
    ours = clip_model.Tokenizer(BPE, cfg["text_cfg"].get("context_length", 77))
    ref = _reference_tokenizer(name, cfg)
    got, want = ours(TEXTS), ref(TEXTS)
    assert torch.equal(got, want)
    assert got[-1, -1] == ours.eot_token_id  # truncated, end token kept


def test_same_embeddings_bit_for_bit(pair):
    name, cfg, ref, ours = pair
    size = ours.visual.image_size
    images = torch.randn(5, 3, *size, generator=torch.Generator().manual_seed(1))
    tokens = clip_model.Tokenizer(BPE, ours.context_length)(TEXTS)
    with torch.inference_mode():
        for normalize in (False, True):
            assert torch.equal(ours.encode_image(images, normalize), ref.encode_image(images, normalize))
            assert torch.equal(ours.encode_text(tokens, normalize), ref.encode_text(tokens, normalize))
        bf16_ref, bf16_ours = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
        assert torch.equal(bf16_ours.encode_text(tokens), bf16_ref.encode_text(tokens))
        assert torch.equal(bf16_ours.encode_image(images.bfloat16()), bf16_ref.encode_image(images.bfloat16()))


def test_checkpoint_is_assigned_to_a_meta_built_model(pair, tmp_path):
    _, cfg, ref, _ = pair
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    model = clip_model.load(cfg, state).eval()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.visual.conv1.weight.data_ptr() == state["visual.conv1.weight"].data_ptr()  # assigned, not copied
    tokens = clip_model.Tokenizer(BPE, model.context_length)(TEXTS[:3])
    with torch.inference_mode():
        assert torch.equal(model.encode_text(tokens), ref.encode_text(tokens))
    assert clip_model.load(cfg, {**state, "visual.proj": torch.zeros(3, 3)}) is None  # another shape
    assert clip_model.load(cfg, {**state, "logit_bias": torch.zeros(1)}) is None  # another key
    missing = dict(state)
    del missing["ln_final.bias"]
    assert clip_model.load(cfg, missing) is None


def test_plain_configs():
    assert clip_model.is_plain(TINY_MODEL_CFG)
    for name in ("ViT-H-14", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-bigG-14"):
        assert clip_model.is_plain(architecture(name)), name
    for name in ("RN50", "ViT-B-16-SigLIP", "coca_ViT-B-32", "convnext_base", "EVA02-B-16", "xlm-roberta-base-ViT-B-32"):
        assert not clip_model.is_plain(architecture(name)), name


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 72, 128, 3), dtype=np.uint8)


def test_scorer_uses_the_plain_model_and_reads_open_clip_checkpoint_layouts(tmp_path):
    torch.manual_seed(0)
    plain = ClipScorer(ClipScoreConfig(model=TINY_MODEL, device="cpu"))
    assert isinstance(plain.model, clip_model.PlainCLIP)
    register_tiny_model()
    torch.manual_seed(0)
    ref = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    frames = _frames(3)
    with torch.inference_mode():
        want = ref.encode_image(plain.preprocess(frames), normalize=True).numpy()
    np.testing.assert_array_equal(plain.embed_images(frames), want)
    # a training checkpoint of a DataParallel model: {'state_dict': {'module.<key>': ...}}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 3}, path)
    loaded = ClipScorer(ClipScoreConfig(model=TINY_MODEL, checkpoint=str(path), device="cpu"))
    assert isinstance(loaded.model, clip_model.PlainCLIP) and not loaded.random_weights
    np.testing.assert_array_equal(loaded.embed_texts(TEXTS[:2]), plain.embed_texts(TEXTS[:2]))


def test_scorer_hands_other_checkpoints_and_architectures_to_open_clip(tmp_path):
    """A checkpoint trained at another image size (open_clip interpolates its position embedding) is loaded
    by open_clip, as before (the architectures is_plain refuses go the same way)."""
    torch.manual_seed(0)
    state = open_clip.CLIP(**{**TINY_MODEL_CFG, "vision_cfg": {**TINY_MODEL_CFG["vision_cfg"], "image_size": 32}}).state_dict()
    path = tmp_path / "tiny32.pt"
    torch.save(state, path)
    assert clip_model.load(TINY_MODEL_CFG, state) is None
    resized = ClipScorer(ClipScoreConfig(model=TINY_MODEL, checkpoint=str(path), device="cpu"))
    assert not isinstance(resized.model, clip_model.PlainCLIP)
    assert resized.embed_images(_frames(2)).shape == (2, 32)


def test_scoring_path_imports_neither_open_clip_nor_torchvision():
    """The point of clip_model: an actor that scores with a plain model never imports open_clip, torchvision
    or torch._dynamo (~1.6 CPU-s per process)."""
    code = ("import sys\n"
            "from curation.clip_score import ClipScoreConfig, ClipScorer\n"
            "s = ClipScorer(ClipScoreConfig(model='tiny-random', device='cpu'))\n"
            "s.embed_texts(['a cat']); s.embed_clips([__import__('numpy').zeros((2, 72, 128, 3), 'uint8')])\n"
            "print(sorted(m for m in ('open_clip', 'torchvision', 'torch._dynamo', 'timm') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
