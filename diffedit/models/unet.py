"""The Stable Diffusion UNet, eps_theta(x_t, t, c), in the original LDM naming (CompVis openaimodel.py).

Attribute names equal the checkpoint keys under ``model.diffusion_model.``, so a single-file checkpoint
loads with ``strict=True``. For sd15 (channel_mult 1,2,4,4; two ResBlocks per level) the blocks are:

    input_blocks  0: conv_in          1-2: Res+Attn (320)   3: Down
                  4-5: Res+Attn (640) 6: Down               7-8: Res+Attn (1280)  9: Down  10-11: Res (1280)
    middle_block  Res, Attn, Res
    output_blocks 0-2: Res (+Up at 2)  3-5: Res+Attn (+Up at 5)  6-8: Res+Attn (+Up at 8)  9-11: Res+Attn

For sdxl (channel_mult 1,2,4; transformer depth 0, 2, 10 per level, 10 in the middle; Attn(n) = n blocks):

    input_blocks  0: conv_in          1-2: Res (320)        3: Down
                  4-5: Res+Attn(2) (640)  6: Down           7-8: Res+Attn(10) (1280)
    middle_block  Res, Attn(10), Res
    output_blocks 0-2: Res+Attn(10) (+Up at 2)  3-5: Res+Attn(2) (+Up at 5)  6-8: Res

and ``label_emb`` maps y (pooled text and size embeddings, adm_in_channels wide) into the time embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .configs import UNetConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the activations' dtype (as LDM does, for fp16 stability)."""

    def forward(self, x):
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        return super().forward(x)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, [cos | sin] as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    # dtype the attention itself runs in (None: the activations'). SD2 768-v in fp16 needs float32 scores, or its
    # q.k overflow gives NaN / black images (diffusers' ``upcast_attention``); set by the pipeline, not a weight.
    attention_dtype: torch.dtype | None = None

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (rearrange(p(s), "b n (h d) -> b h n d", h=self.heads)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        dtype = self.attention_dtype
        if dtype is not None and dtype != q.dtype:
            out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype)).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Linear(dim, out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # attention to the text
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig, depth: int):
        super().__init__()
        heads, dim_head = cfg.heads(ch)
        inner = heads * dim_head
        self.linear = cfg.use_linear_in_transformer
        self.norm = GroupNorm32(cfg.norm_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if self.linear else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, cfg.context_dim, heads, dim_head) for _ in range(depth))
        self.proj_out = nn.Linear(inner, ch) if self.linear else nn.Conv2d(inner, ch, 1)

    def forward(self, x, context):
        h, w = x.shape[-2:]
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = rearrange(y, "b c h w -> b (h w) c")
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = rearrange(y, "b (h w) c -> b c h w", h=h, w=w)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A block of layers; ResBlocks also take the time embedding, transformers the text context."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def block_index(level: int, layer: int, num_res_blocks: int, num_levels: int, output: bool = False) -> int:
    """The index in ``input_blocks`` (``output_blocks`` if ``output``) of block ``layer`` of resolution level
    ``level`` (0 = full resolution). Input: conv_in, then per level ``num_res_blocks`` blocks and the downsampler
    (layer ``num_res_blocks``); output: from the lowest level up, ``num_res_blocks + 1`` blocks a level."""
    if output:
        return (num_levels - 1 - level) * (num_res_blocks + 1) + layer
    return 1 + level * (num_res_blocks + 1) + layer


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.adm_in_channels > 0:  # sgm's num_classes="sequential": the outer Sequential gives keys label_emb.0.*
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chs, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            attend = ds in cfg.attention_resolutions and cfg.depth(level) > 0
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc, g)]
                ch = mult * mc
                if attend:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_ch, ch, g), SpatialTransformer(ch, cfg, cfg.middle_depth), ResBlock(ch, emb_ch, ch, g))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            attend = ds in cfg.attention_resolutions and cfg.depth(level) > 0
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_ch, mult * mc, g)]
                ch = mult * mc
                if attend:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, h, w) noisy latents; timesteps: (B,) or scalar; context: (B, 77, context_dim);
        y: (B, adm_in_channels) for SDXL (pooled text and size embeddings), None otherwise."""
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        adm = self.cfg.adm_in_channels
        if y is None and adm:
            raise ValueError(f"this UNet needs y of shape (B, {adm}) (adm_in_channels: pooled text and size embeddings)")
        if y is not None:
            if not adm:
                raise ValueError("this UNet has no label_emb (adm_in_channels 0): y must be None")
            if tuple(y.shape) != (x.shape[0], adm):
                raise ValueError(f"y has shape {tuple(y.shape)}, expected ({x.shape[0]}, {adm})")
            emb = emb + self.label_emb(y.to(emb.dtype))
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), emb, context)
        return self.out(x)
