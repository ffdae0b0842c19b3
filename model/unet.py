"""I2VGen-XL 3D latent UNet (pure PyTorch; behaviour-equivalent to diffusers' I2VGenXLUNet).

Shapes (B clips, F frames, latent H x W; frames are folded into the batch between blocks):
    sample                  (B, C_in, F, H, W)   noisy latents
    timestep                scalar or (B,)
    fps                     scalar or (B,)       frames-per-second micro-condition (use_fps)
    image_latents           (B, 4, F, H, W)      see `build_image_latents` (use_image_local / use_image_concat)
    image_embeddings        (B, E)               CLIP image embedding (use_image_global)
    encoder_hidden_states   (B, L, D)            text tokens (use_text)
    hidden                  (B*F, C, h, w)       inside the network
    emb                     (B*F, 4*C0)          time (+fps) embedding per frame
    context                 (B, Lc, D)           [text | local image | global image] tokens, shared by frames
    output                  (B, C_out, F, H, W)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import SpatialTransformer, TemporalTransformer
from model.config import UNetConfig
from model.embeddings import TimestepMLP, as_batch_vector, sinusoidal_embedding
from model.image_conditioning import ConcatImageEncoder, GlobalImageTokens, LocalImageTokens, build_image_latents
from model.recompute import set_recompute_cheap
from model.resnet import Downsample, ResBlock, Upsample


class UNetLevel(nn.Module):
    """One resolution level: ResBlocks, each followed (when `attention`) by a spatial and a temporal
    transformer; then an optional 2x resampler. A decoder level concatenates one skip per ResBlock."""

    def __init__(self, cfg: UNetConfig, in_channels: list[int], out_channels: int, attention: bool, resample: str | None):
        super().__init__()
        groups, hd = cfg.norm_num_groups, cfg.attention_head_dim
        self.res = nn.ModuleList(
            ResBlock(c, out_channels, cfg.time_embed_dim, groups, cfg.norm_eps, cfg.resnet_dropout, cfg.dropout)
            for c in in_channels
        )
        n = len(in_channels) if attention else 0
        self.spatial = nn.ModuleList(
            SpatialTransformer(out_channels, hd, cfg.cross_attention_dim, groups) for _ in range(n)
        )
        self.temporal = nn.ModuleList(
            TemporalTransformer(out_channels, out_channels // hd, hd, groups) for _ in range(n)
        )
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def unit(self, j: int, x, emb, context, num_frames: int) -> torch.Tensor:
        """ResBlock j (+ its temporal conv) and, at attention levels, its spatial and temporal transformers."""
        x = self.res[j](x, emb, num_frames)
        if self.spatial:
            x = self.spatial[j](x, context)
            x = self.temporal[j](x, num_frames)
        return x


class MidBlock(nn.Module):
    """ResBlock -> spatial transformer -> temporal transformer -> ResBlock, at the deepest level."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        groups, hd = cfg.norm_num_groups, cfg.attention_head_dim
        self.res = nn.ModuleList(
            ResBlock(channels, channels, cfg.time_embed_dim, groups, cfg.norm_eps, cfg.resnet_dropout, cfg.dropout)
            for _ in range(2)
        )
        self.spatial = SpatialTransformer(channels, hd, cfg.cross_attention_dim, groups)
        self.temporal = TemporalTransformer(channels, channels // hd, hd, groups)

    def forward(self, x, emb, context, num_frames: int) -> torch.Tensor:
        x = self.res[0](x, emb, num_frames)
        x = self.temporal(self.spatial(x, context), num_frames)
        return self.res[1](x, emb, num_frames)


class I2VGenUNet(nn.Module):
    """The 3D UNet of I2VGen-XL; `cfg` switches the fps, image (global/local/concat) and text paths.

    Same parameters and outputs as diffusers' I2VGenXLUNet (model.convert maps the weights); differences
    are in execution only: temporal convs as Conv2d (3,1), one q/k/v GEMM for self-attention, batched-matmul
    attention for the short (F-frame) temporal sequences on CPU, cross-attention k/v projected once per clip
    and attended by all the clip's frames at once, selective recomputation (fused GroupNorm-SiLU-Dropout and
    GEGLU nodes that keep only their inputs; the first temporal transformer's feed-forward output folded
    into its proj_out), a sub-pixel 2x upsampler (model/resnet.py `Upsample`), optional channels-last
    activations and optional per-block activation checkpointing."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch, c0, tdim, groups = cfg.block_out_channels, cfg.block_out_channels[0], cfg.time_embed_dim, cfg.norm_num_groups
        self.gradient_checkpointing = False
        self.channels_last = False
        # conditioning
        self.time_embed = TimestepMLP(c0, tdim)
        self.fps_embed = TimestepMLP(c0, tdim, zero_init_last=True) if cfg.use_fps else None
        self.image_global = (
            GlobalImageTokens(cfg.image_embed_dim, tdim, cfg.num_global_image_tokens, cfg.cross_attention_dim)
            if cfg.use_image_global else None
        )
        self.image_local = (
            LocalImageTokens(cfg.image_latent_channels, cfg.in_channels * 8, cfg.local_pool_size, cfg.cross_attention_dim)
            if cfg.use_image_local else None
        )
        self.image_concat = ConcatImageEncoder(cfg.image_latent_channels, cfg.in_channels) if cfg.use_image_concat else None
        # stem
        self.conv_in = nn.Conv2d(cfg.conv_in_channels, c0, 3, padding=1)
        self.transformer_in = TemporalTransformer(c0, cfg.transformer_in_heads, cfg.attention_head_dim, groups)
        # encoder; `skips` tracks the channels of every saved skip tensor, consumed in reverse by the decoder
        skips, prev = [c0], c0
        self.down_blocks = nn.ModuleList()
        for i, out in enumerate(ch):
            last = i == len(ch) - 1
            ins = [prev] + [out] * (cfg.layers_per_block - 1)
            self.down_blocks.append(UNetLevel(cfg, ins, out, cfg.attention_levels[i], None if last else "down"))
            skips += [out] * (cfg.layers_per_block + (0 if last else 1))
            prev = out
        self.mid_block = MidBlock(cfg, ch[-1])
        # decoder
        self.up_blocks = nn.ModuleList()
        for i, out in enumerate(reversed(ch)):
            level = len(ch) - 1 - i
            ins = []
            for _ in range(cfg.layers_per_block + 1):
                ins.append(prev + skips.pop())
                prev = out
            self.up_blocks.append(UNetLevel(cfg, ins, out, cfg.attention_levels[level], "up" if level > 0 else None))
        self.norm_out = nn.GroupNorm(groups, c0, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)
        self.enable_selective_recompute(True)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResBlock+transformers unit (and the mid block) in backward instead of storing it."""
        self.gradient_checkpointing = enabled

    def enable_selective_recompute(self, enabled: bool = True) -> None:
        """Recompute cheap norm / activation / dropout / GEGLU regions in backward instead of storing
        their intermediates (on by default: ~25% less activation memory at no measured time cost on CPU;
        no effect without autograd). See model/recompute.py and model/fused_ops.py."""
        set_recompute_cheap(self, enabled)

    def set_channels_last(self, enabled: bool = True) -> None:
        """Run the frame-folded activations channels-last: frees the permutes around the transformers and
        temporal convs and suits NHWC conv kernels. Off by default: on CPU it measured no faster here
        (bench/model.py `ours-cl`); try it on GPU."""
        self.channels_last = enabled

    def _run(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _check_inputs(self, sample, fps, image_latents, image_embeddings, encoder_hidden_states) -> None:
        cfg = self.cfg
        if sample.ndim != 5 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, F, H, W), got {tuple(sample.shape)}")
        b, _, f, h, w = sample.shape
        needs = {
            "fps": (fps, cfg.use_fps, "use_fps"),
            "image_latents": (image_latents, cfg.use_image_local or cfg.use_image_concat, "use_image_local/use_image_concat"),
            "image_embeddings": (image_embeddings, cfg.use_image_global, "use_image_global"),
            "encoder_hidden_states": (encoder_hidden_states, cfg.use_text, "use_text"),
        }
        for name, (value, used, flag) in needs.items():
            if used and value is None:
                raise ValueError(f"{name} is required: this UNet config has {flag}=True")
            if not used and value is not None:
                raise ValueError(f"{name} was given but this UNet config has {flag}=False (e.g. the refine flavour)")
        if image_latents is not None and tuple(image_latents.shape) != (b, cfg.image_latent_channels, f, h, w):
            raise ValueError(
                f"image_latents must be (B, {cfg.image_latent_channels}, F, H, W) = {(b, cfg.image_latent_channels, f, h, w)}, "
                f"got {tuple(image_latents.shape)}; build it with model.unet.build_image_latents"
            )
        if image_embeddings is not None and tuple(image_embeddings.shape) != (b, cfg.image_embed_dim):
            raise ValueError(f"image_embeddings must be (B, {cfg.image_embed_dim}), got {tuple(image_embeddings.shape)}")
        if encoder_hidden_states is not None and (
            encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
            or encoder_hidden_states.shape[2] != cfg.cross_attention_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must be (B, L, {cfg.cross_attention_dim}), got {tuple(encoder_hidden_states.shape)}"
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        fps=None,
        image_latents: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (B, C_out, F, H, W) from noisy latents and the enabled conditions (see the shape legend)."""
        self._check_inputs(sample, fps, image_latents, image_embeddings, encoder_hidden_states)
        b, _, f, h, w = sample.shape
        dtype, c0 = self.conv_in.weight.dtype, self.cfg.block_out_channels[0]

        # 1. time (+ fps) embedding, one per frame
        t = as_batch_vector(timestep, b, sample.device, "timestep")
        emb = self.time_embed(sinusoidal_embedding(t, c0).to(dtype))
        if self.fps_embed is not None:
            fps = as_batch_vector(fps, b, sample.device, "fps")
            emb = emb + self.fps_embed(sinusoidal_embedding(fps, c0).to(dtype))
        emb = emb.repeat_interleave(f, dim=0)

        # 2. cross-attention context per clip, in diffusers' order: [text | local image | global image]
        parts = []
        if encoder_hidden_states is not None:
            parts.append(encoder_hidden_states.to(dtype))
        if self.image_local is not None:
            parts.append(self.image_local(image_latents[:, :, 0].to(dtype)))
        if self.image_global is not None:
            parts.append(self.image_global(image_embeddings.to(dtype)))
        context = torch.cat(parts, dim=1) if parts else None

        # 3. concat path: image features join the noisy latent's channels (once, as in diffusers)
        x = sample.to(dtype)
        if self.image_concat is not None:
            x = torch.cat([x, self.image_concat(image_latents.to(dtype))], dim=1)

        # 4. stem: fold frames into the batch, conv_in, temporal transformer
        x = x.transpose(1, 2).reshape(b * f, -1, h, w)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.transformer_in(self.conv_in(x), f)

        # 5. encoder: keep every unit output and every downsampled tensor as a skip
        skips = [x]
        for level in self.down_blocks:
            for j in range(len(level.res)):
                x = self._run(level.unit, j, x, emb, context, f)
                skips.append(x)
            if level.downsample is not None:
                x = level.downsample(x)
                skips.append(x)

        # 6. middle
        x = self._run(self.mid_block, x, emb, context, f)

        # 7. decoder: concat the matching skip before each ResBlock; upsample to the next skip's size
        for level in self.up_blocks:
            for j in range(len(level.res)):
                x = self._run(level.unit, j, torch.cat([x, skips.pop()], dim=1), emb, context, f)
            if level.upsample is not None:
                x = level.upsample(x, skips[-1].shape[-2:])

        # 8. head: GroupNorm -> SiLU -> conv_out, unfold frames
        x = self.conv_out(F.silu(self.norm_out(x)))
        return x.view(b, f, -1, h, w).transpose(1, 2)


__all__ = ["I2VGenUNet", "UNetLevel", "MidBlock", "build_image_latents"]
