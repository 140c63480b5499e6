"""The SD3 / SD3.5 MMDiT, v_theta(x_s, t, c, y), in Stability's naming (the sd3.5 reference mmditx.py).

Attribute names equal the checkpoint keys under ``model.diffusion_model.``, so a single file loads with
``strict=True``. A forward (Esser et al. 2024, "Scaling Rectified Flow Transformers", Fig. 2):

    x_embedder      2 x 2 patches -> tokens, plus the centre crop of the fixed position table ``pos_embed``
    t_embedder      sinusoidal embedding of t = s x 1000 (256 wide) -> MLP  }  summed: the conditioning vector c
    y_embedder      pooled text [CLIP-L | CLIP-G] (2048) -> MLP             }
    context_embedder  text tokens (4096 wide) -> hidden
    joint_blocks    per stream (x_block: image, context_block: text) adaLN-Zero from c, one attention over
                    [context | image] tokens, then separate MLPs. The last block's context stream is "pre-only":
                    it only supplies keys and values (2 modulations, no attn.proj, no MLP). SD3.5 MMDiT-X blocks
                    (dual_attention_layers) add ``x_block.attn2``, an image-only attention (9 modulations).
    final_layer     adaLN (shift, scale) + linear -> patches -> unpatchify

Modulation order in ``adaLN_modulation.1``: shift, scale, gate (attention), shift, scale, gate (MLP), then shift,
scale, gate of attn2. Pre-only streams and the final layer: shift, scale (diffusers stores these two as scale, shift).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .configs import MMDiTConfig
from .unet import timestep_embedding


def layer_norm(dim: int) -> nn.LayerNorm:
    """The affine-free LayerNorm every adaLN applies before its own shift and scale."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, width)
        self.fc2 = nn.Linear(width, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Fused q, k, v projection (q | k | v along the output), per-head RMS-norm on q and k (SD3.5), output
    projection (absent in a pre-only stream). The attention itself runs in the joint block."""

    def __init__(self, dim: int, head_dim: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """(q, k, v), each (B, heads, L, head_dim)."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.ln_q(q), self.ln_k(k), v


def merge_heads(x):
    return rearrange(x, "b h l d -> b l (h d)")


class DismantledBlock(nn.Module):
    """One stream of a joint block, split around the attention it shares with the other stream."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        h = cfg.hidden_size
        self.pre_only, self.dual = pre_only, dual
        self.n_mod = 2 if pre_only else 9 if dual else 6
        self.norm1 = layer_norm(h)
        self.attn = Attention(h, cfg.head_dim, cfg.qk_norm, pre_only)
        if dual:
            self.attn2 = Attention(h, cfg.head_dim, cfg.qk_norm)
        if not pre_only:
            self.norm2 = layer_norm(h)
            self.mlp = Mlp(h, cfg.mlp_width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, self.n_mod * h))

    def pre_attention(self, x, c):
        """The modulations from c, and q, k, v of the joint attention from the modulated, normalised stream."""
        mods = self.adaLN_modulation(c)[:, None].chunk(self.n_mod, dim=-1)
        x_norm = self.norm1(x)
        return mods, x_norm, self.attn.qkv_heads(modulate(x_norm, mods[0], mods[1]))

    def post_attention(self, x, attn, mods, x_norm):
        """Gated residual updates: the joint attention's output, attn2 (its own modulation of the same x_norm)
        for MMDiT-X, then the MLP."""
        x = x + mods[2] * self.attn.proj(attn)
        if self.dual:
            x = x + mods[8] * self.attn2.proj(merge_heads(
                F.scaled_dot_product_attention(*self.attn2.qkv_heads(modulate(x_norm, mods[6], mods[7])))))
        return x + mods[5] * self.mlp(modulate(self.norm2(x), mods[3], mods[4]))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, dual=index in cfg.dual_attention_layers)

    def forward(self, context, x, c):
        c_mods, c_norm, c_qkv = self.context_block.pre_attention(context, c)
        x_mods, x_norm, x_qkv = self.x_block.pre_attention(x, c)
        # one attention over [context | image] tokens
        out = merge_heads(F.scaled_dot_product_attention(*(torch.cat(pair, dim=2) for pair in zip(c_qkv, x_qkv))))
        c_attn, x_attn = out.split([context.shape[1], x.shape[1]], dim=1)
        x = self.x_block.post_attention(x, x_attn, x_mods, x_norm)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, c_attn, c_mods, c_norm), x


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


class MLPEmbedder(nn.Module):
    """A vector (timestep embedding or pooled text) -> hidden, through Linear, SiLU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        return self.mlp(x)


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm_final = layer_norm(h)
        self.linear = nn.Linear(h, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg)
        # the position table is part of the checkpoint (a fixed 2D sin-cos table there), not computed here
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, h))
        self.t_embedder = MLPEmbedder(256, h)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, h)
        self.context_embedder = nn.Linear(cfg.context_dim, h)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The (1, h * w, hidden) centre crop of the position table for an h x w grid of patches."""
        m = self.cfg.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"a latent of {h} x {w} patches exceeds the position table's {m} x {m}")
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(m, m, -1)[top:top + h, left:left + w]
        return table.reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) latents; t: (B,) or scalar, s x 1000 in [0, 1000]; context: (B, L, context_dim) text
        tokens; y: (B, pooled_dim) pooled text. Returns the velocity (B, out_channels, h, w)."""
        p = self.cfg.patch_size
        hp, wp = x.shape[-2] // p, x.shape[-1] // p
        if hp * p != x.shape[-2] or wp * p != x.shape[-1]:
            raise ValueError(f"latent sides {tuple(x.shape[-2:])} must be multiples of the patch size {p}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        c = self.t_embedder(timestep_embedding(t, 256).to(x.dtype)) + self.y_embedder(y.to(x.dtype))
        tokens = self.x_embedder(x) + self.cropped_pos_embed(hp, wp).to(x.dtype)
        context = self.context_embedder(context.to(x.dtype))
        for block in self.joint_blocks:
            context, tokens = block(context, tokens, c)
        out = self.final_layer(tokens, c)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=hp, p=p, q=p)
