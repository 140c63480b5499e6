"""The Stable Diffusion autoencoder (LDM ``AutoencoderKL``, CompVis model.py naming).

Attribute names equal the checkpoint keys under ``first_stage_model.``. The decoder's ``up`` list is
indexed by resolution level (0 = full resolution) although it runs from the lowest level up. SD3's VAE is the same
network with 16 latent channels and without the 1x1 quant_conv / post_quant_conv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .configs import VAEConfig


def Normalize(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = Normalize(ch, groups), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_ch, groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs in the checkpoints."""

    # At most this many attention scores at once (not a weight): the one 512-wide head falls outside flash
    # attention, and at 2048 px the mid block attends over 256 x 256 pixels, a 4.3e9-entry score matrix. Longer
    # inputs are split over queries (each query row is independent: the same result, bounded memory).
    max_scores: int = 2 ** 28

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = Normalize(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (rearrange(p(y), "b c h w -> b 1 (h w) c") for p in (self.q, self.k, self.v))
        n = q.shape[2]
        chunk = max(1, self.max_scores // (q.shape[0] * n))
        if chunk >= n:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v) for i in range(0, n, chunk)], 2)
        return x + self.proj_out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in LDM


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (empty in SD) and a resampler."""

    def __init__(self, blocks, resample=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample is not None:
            setattr(self, "downsample" if isinstance(resample, Downsample) else "upsample", resample)


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, ch = nn.ModuleList(), cfg.ch
        for i, out in enumerate(chs):
            blocks = [ResnetBlock(ch if j == 0 else out, out, g) for j in range(cfg.num_res_blocks)]
            self.down.append(Level(blocks, Downsample(out) if i != len(chs) - 1 else None))
            ch = out
        self.mid = Mid(ch, g)
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        ch = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        levels = []
        for i in reversed(range(len(chs))):
            blocks = [ResnetBlock(ch if j == 0 else chs[i], chs[i], g) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, Upsample(chs[i]) if i != 0 else None))
            ch = chs[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior (unscaled)."""
        h = self.encoder(x)
        mean, logvar = (self.quant_conv(h) if self.cfg.use_quant_conv else h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z) if self.cfg.use_quant_conv else z)

    def scale(self, mean: torch.Tensor) -> torch.Tensor:
        """Posterior mean -> the diffusion model's latent: (mean - shift_factor) x scaling_factor."""
        return (mean - self.cfg.shift_factor) * self.cfg.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latent -> what ``decode`` takes: the inverse of ``scale``."""
        return latents / self.cfg.scaling_factor + self.cfg.shift_factor
