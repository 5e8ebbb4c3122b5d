"""XAttnUNet: a small UNet whose transformer blocks attend from image features to text embeddings.

Layout (improved-diffusion / diffusers style): conv_in -> down levels (ResBlocks [+ transformer block],
downsample) -> mid (ResBlock, transformer, ResBlock) -> up levels (ResBlocks over concatenated skips
[+ transformer block], upsample) -> norm, SiLU, conv_out. Where attention lives is configured per
*resolution* of the configured `sample_size`: cross-attention where heatmaps are read, self-attention
only where it is cheap (by default the lowest resolution).

Module names follow diffusers (`down_blocks.1.attentions.0.attn2`, `mid_block...`, `up_blocks...`), so
the attention tools address layers the same way on this UNet and on `UNet2DConditionModel`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from .attention import TransformerBlock


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between (the only layer that takes it)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Level(nn.Module):
    """One resolution of the down or up path: `resnets[i]` each optionally followed by `attentions[i]`."""

    def __init__(self, in_chs: list[int], out_ch: int, temb_dim: int, attention: dict | None, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(c, out_ch, temb_dim) for c in in_chs)
        self.attentions = nn.ModuleList(TransformerBlock(out_ch, **attention) for _ in in_chs) if attention else None
        if resample == "down":
            self.resample = nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1)
        elif resample == "up":
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        else:
            self.resample = None

    def run(self, i: int, h: torch.Tensor, temb: torch.Tensor, context, mask) -> torch.Tensor:
        h = self.resnets[i](h, temb)
        if self.attentions is not None:
            h = self.attentions[i](h, context, mask)
        return h


class XAttnUNet(ModelMixin, ConfigMixin):
    """Text-conditioned UNet with cross-attention at configurable resolutions.

    Example:
        >>> unet = XAttnUNet(sample_size=32, block_out_channels=(32, 64), cross_attention_dim=64)
        >>> eps = unet(x, t, text_emb, encoder_attention_mask=mask).sample  # same call as UNet2DConditionModel
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (32, 64, 96),
        layers_per_block: int | tuple[int, ...] = 2,
        cross_attention_resolutions: tuple[int, ...] = (16, 8),
        self_attention_resolutions: tuple[int, ...] = (8,),
        num_heads: int = 4,
        cross_attention_dim: int = 128,
        gated_cross_attention: bool = False,
        query_pos_embed: bool = True,
        ff_mult: int = 2,
        patch_size: int = 1,
    ):
        super().__init__()
        if len(block_out_channels) < 2:
            raise ValueError(f"block_out_channels needs at least 2 levels, got {tuple(block_out_channels)}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        factor = patch_size * 2 ** (len(block_out_channels) - 1)
        if sample_size % factor:
            raise ValueError(f"sample_size={sample_size} must be divisible by patch_size * 2**(levels-1)={factor}")
        for ch in block_out_channels:
            if ch % num_heads:
                raise ValueError(f"every block_out_channels entry must be divisible by num_heads={num_heads}, got {ch}")
        chs = list(block_out_channels)
        layers = [layers_per_block] * len(chs) if isinstance(layers_per_block, int) else list(layers_per_block)
        if len(layers) != len(chs) or min(layers) < 1:
            raise ValueError(f"layers_per_block={layers_per_block} must be an int >= 1 or one such int per level "
                             f"({len(chs)} levels)")
        resolutions = [sample_size // patch_size // 2**i for i in range(len(chs))]
        known = set(resolutions)
        for name, res in (("cross_attention_resolutions", cross_attention_resolutions),
                          ("self_attention_resolutions", self_attention_resolutions)):
            bad = [r for r in res if r not in known]
            if bad:
                raise ValueError(f"{name} has {bad}, but this UNet's resolutions are {sorted(known, reverse=True)}")

        def attention(res: int) -> dict | None:
            cross, self_ = res in cross_attention_resolutions, res in self_attention_resolutions
            if not (cross or self_):
                return None
            return dict(heads=num_heads, cross_attention_dim=cross_attention_dim if cross else None,
                        self_attention=self_, gated=gated_cross_attention, query_pos_embed=query_pos_embed,
                        ff_mult=ff_mult)

        temb_dim = 4 * chs[0]
        self.time_proj = Timesteps(chs[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim)
        # patch_size p > 1: a p x p patch stem (each patch of pixels becomes one feature vector) and a
        # pixel-shuffle head, so the first level runs at 1/p of the resolution: ~p^2 times less compute there
        p = patch_size
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1) if p == 1 else nn.Conv2d(in_channels, chs[0], p, p)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]
        ch = chs[0]
        for i, (out_ch, res, n) in enumerate(zip(chs, resolutions, layers)):
            last = i == len(chs) - 1
            in_chs = [ch] + [out_ch] * (n - 1)
            self.down_blocks.append(Level(in_chs, out_ch, temb_dim, attention(res), None if last else "down"))
            skip_chs += [out_ch] * n + ([] if last else [out_ch])
            ch = out_ch

        # mid: ResBlock, [transformer block as configured for the lowest resolution], ResBlock
        self.mid_block = Level([ch, ch], ch, temb_dim, None, None)
        mid_attention = attention(resolutions[-1])
        if mid_attention:
            self.mid_block.attentions = nn.ModuleList([TransformerBlock(ch, **mid_attention)])

        self.up_blocks = nn.ModuleList()
        for i, (out_ch, res, n) in enumerate(zip(reversed(chs), reversed(resolutions), reversed(layers))):
            last = i == len(chs) - 1
            in_chs = []
            for _ in range(n + 1):
                in_chs.append(ch + skip_chs.pop())
                ch = out_ch
            self.up_blocks.append(Level(in_chs, out_ch, temb_dim, attention(res), None if last else "up"))

        self.conv_norm_out = group_norm(chs[0])
        self.conv_out = nn.Conv2d(chs[0], out_channels * p * p, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return self.config.patch_size * 2 ** (len(self.config.block_out_channels) - 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """sample (B, C, H, W), timestep scalar or (B,), encoder_hidden_states (B, S, D),
        encoder_attention_mask (B, S) with 1/True = real token, 0/False = padding (gets zero attention)."""
        b, _, height, width = sample.shape
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(
                f"sample size {height}x{width} must be divisible by the UNet's down-sampling factor {self.downsample_factor}"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        ctx = encoder_hidden_states

        h = self.conv_in(sample)
        skips = [h]
        for level in self.down_blocks:
            for i in range(len(level.resnets)):
                h = level.run(i, h, temb, ctx, mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid_block.run(0, h, temb, ctx, mask)
        h = self.mid_block.resnets[1](h, temb)
        for level in self.up_blocks:
            for i in range(len(level.resnets)):
                h = level.run(i, torch.cat([h, skips.pop()], dim=1), temb, ctx, mask)
            if level.resample is not None:
                h = level.resample(h)
        out = self.conv_out(F.silu(self.conv_norm_out(h)))
        if self.config.patch_size > 1:
            out = F.pixel_shuffle(out, self.config.patch_size)  # (B, C*p*p, H/p, W/p) -> (B, C, H, W)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
