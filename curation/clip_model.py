"""Plain OpenCLIP ViT models (ViT-H-14 and the other ViT-* configs open_clip ships, and the tiny test CLIP)
built with torch alone, for the caption-frame similarity.

Why not open_clip itself: its package imports every submodule, so using any of it imports torchvision
(`open_clip.utils` needs it, and torchvision's ops import torch._dynamo) and timm, which cost more start-up
than torch itself and which scoring never uses; every stage-1 actor of the curation job would pay for them
(bench.curation --cpu shows the actors' CPU). Scoring needs only `encode_image` and `encode_text` of a plain
ViT CLIP, which this module builds:

- the architecture from open_clip's own config (its packaged JSON, or an in-code dict), only when every
  setting in it is one this module implements (`is_plain`); anything else (timm or Hugging Face towers,
  ResNets, attentional pooling, layer scale, custom blocks, other tokenizers) is built by open_clip;
- the same parameter names and shapes as open_clip's `CLIP` (its checkpoints load strictly), the same
  parameter construction order (the same seed gives the same random weights) and the same operations in
  the same order (the same embeddings, bit for bit; tests/unit/test_clip_model.py checks all three
  against open_clip);
- open_clip's `SimpleTokenizer` (ftfy + HTML unescape, whitespace and lower case, its BPE merges file,
  start/end tokens, truncation to the context length).

With a checkpoint the model is built on the meta device and the weights are assigned as loaded: no random
initialisation of parameters that the checkpoint replaces (ViT-H-14 has 986M of them).
"""

from __future__ import annotations

import functools
import gzip
import html
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PLAIN_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
PLAIN_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
PLAIN_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's CLIP default (numpy's log, same float)


def is_plain(model_cfg: dict) -> bool:
    """True when this module builds `model_cfg` (an open_clip model config) exactly as open_clip does."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    return (set(model_cfg) <= PLAIN_TOP_KEYS and set(vision) <= PLAIN_VISION_KEYS and set(text) <= PLAIN_TEXT_KEYS
            and isinstance(vision.get("layers", 12), int))


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: torch's, with the result cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(orig_type)


class QuickGELU(nn.Module):
    """The activation OpenAI's CLIP was trained with (configs with `quick_gelu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm self-attention + MLP block (open_clip's default block, no layer scale)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        mask = attn_mask.to(y.dtype) if attn_mask is not None else None
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks on (batch, tokens, width)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act_layer)
                                        for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class VisionTransformer(nn.Module):
    """ViT image tower: patches + class token, ln_pre, blocks, ln_post on the class token, projection."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 output_dim: int, act_layer: type[nn.Module]):
        super().__init__()
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        grid = (self.image_size[0] // patch_size) * (self.image_size[1] // patch_size)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid, width)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)
        return x[:, 0] @ self.proj


class PlainCLIP(nn.Module):
    """open_clip's `CLIP` for plain ViT configs: `encode_image`, `encode_text`, open_clip's state-dict keys."""

    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, quick_gelu: bool = False):
        super().__init__()
        act = QuickGELU if quick_gelu else nn.GELU
        v = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
             **vision_cfg}
        t = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0,
             **text_cfg}
        # construction order = open_clip's (vision tower, then the text tower's parts): same seed, same weights
        self.visual = VisionTransformer(v["image_size"], v["patch_size"], v["width"], v["layers"],
                                        v["width"] // v["head_width"], v["mlp_ratio"], embed_dim, act)
        token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        positional_embedding = nn.Parameter(torch.empty(t["context_length"], t["width"]))
        self.transformer = Transformer(t["width"], t["layers"], t["heads"], t["mlp_ratio"], act)
        self.context_length = t["context_length"]
        self.token_embedding = token_embedding
        self.positional_embedding = positional_embedding
        self.ln_final = LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.empty(t["width"], embed_dim))
        self.register_buffer("attn_mask", causal_mask(t["context_length"]), persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * INIT_LOGIT_SCALE)
        self._init_text()

    def _init_text(self) -> None:
        """open_clip's TextTransformer.init_parameters (the image tower keeps torch's defaults, as there)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = (width ** -0.5) * ((2 * layers) ** -0.5), width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        dtype = self.transformer.resblocks[0].mlp.c_fc.weight.dtype
        x = self.token_embedding(text).to(dtype) + self.positional_embedding.to(dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection  # EOT token
        return F.normalize(x, dim=-1) if normalize else x


def causal_mask(n: int) -> torch.Tensor:
    """Additive (n, n) mask: -inf above the diagonal."""
    return torch.empty(n, n).fill_(float("-inf")).triu_(1)


def build(model_cfg: dict) -> PlainCLIP:
    """The model of a plain `model_cfg` (see is_plain) with random weights from torch's global RNG (the
    ones open_clip draws for it from the same RNG state)."""
    if not is_plain(model_cfg):
        raise ValueError(f"not a plain ViT CLIP config: {sorted(model_cfg)}")
    return PlainCLIP(**model_cfg)


def load(model_cfg: dict, state_dict: dict[str, torch.Tensor]) -> PlainCLIP | None:
    """The model of a plain `model_cfg` holding `state_dict`'s tensors (assigned, not copied, into a model
    built on the meta device: nothing is initialised first); None when the state dict does not fit it
    exactly (other keys or shapes: a checkpoint open_clip would convert, resize or refuse)."""
    if not is_plain(model_cfg):
        raise ValueError(f"not a plain ViT CLIP config: {sorted(model_cfg)}")
    with torch.device("meta"):
        model = PlainCLIP(**model_cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if "logit_scale" in state_dict and state_dict["logit_scale"].numel() == 1:  # a scalar or a 1-vector
        state_dict = {**state_dict, "logit_scale": state_dict["logit_scale"].reshape(model.logit_scale.shape)}
    if want != {k: tuple(v.shape) for k, v in state_dict.items()}:
        return None
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.attn_mask = causal_mask(model.context_length)  # a buffer outside the state dict
    return model


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, as open_clip reads one: safetensors, else torch.load with
    weights_only; the 'state_dict' entry of a training checkpoint; a DataParallel 'module.' prefix dropped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint = load_file(str(path), device="cpu")
    else:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"] if isinstance(checkpoint, dict) and "state_dict" in checkpoint else checkpoint
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if next(iter(state)).startswith("module"):
        state = {k[7:]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- tokenizer


@functools.lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map of the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class Tokenizer:
    """open_clip's SimpleTokenizer (clean='lower', no reduction): texts -> (T, context_length) int64.

    `bpe_path`: the BPE merges file open_clip ships (bpe_simple_vocab_16e6.txt.gz)."""

    def __init__(self, bpe_path: str | Path, context_length: int = 77):
        import ftfy
        import regex

        self._fix_text = ftfy.fix_text
        with gzip.open(bpe_path) as fh:
            merges = fh.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(special)
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {t: t for t in special}
        self.pat = regex.compile("|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.sot_token_id, self.eot_token_id = self.encoder[special[0]], self.encoder[special[1]]
        self.context_length = context_length

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (without start/end tokens)."""
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        text = " ".join(text.split()).strip().lower()
        ids: list[int] = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(T, context_length) int64: start token, the text's tokens, end token, zero padding; a text too
        long is cut and keeps its end token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        result = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot_token_id
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result
