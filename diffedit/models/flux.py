"""The FLUX.1 transformer, v_theta(x_s, t, c, y, g), in Black Forest Labs' naming (their flux/model.py, layers.py).

Attribute names equal the keys of a BFL single file (``flux1-dev.safetensors``), so it loads with ``strict=True``.
A forward (Black Forest Labs 2024; the MMDiT of Esser et al. 2024 with parallel single-stream blocks):

    packing         the 16-channel latent in 2 x 2 patches: (c, h, w) -> (h/2 * w/2) tokens of 64 = c x 2 x 2
    img_in          tokens -> hidden                          txt_in   T5 states (4096 wide) -> hidden
    time_in         sinusoidal embedding of t = 1000 s     }
    guidance_in     ... of the embedded guidance 1000 g    }  summed: the conditioning vector ``vec``
    vector_in       CLIP-L's pooled text (768)             }  (guidance_in only on guidance-distilled FLUX.1-dev)
    pe_embedder     rotary embedding over 3 axes of position ids: text (0, 0, 0), image (0, row, column)
    double_blocks   per stream (img, txt) adaLN-Zero from vec (6 modulations), one attention over [txt | img] tokens
                    with RMS-normed q, k and RoPE, then separate MLPs
    single_blocks   on [txt | img]: one modulation (shift, scale, gate); linear1 gives q, k, v AND the MLP's input,
                    attention and MLP run in parallel, linear2 maps their concatenation back
    final_layer     adaLN (shift, scale) + linear -> 64 per token -> unpacked latent
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .configs import FluxConfig
from .mmdit import layer_norm, merge_heads, modulate
from .unet import timestep_embedding


# --- positions ------------------------------------------------------------------------------------------------

def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """(h * w, 3) ids of an h x w grid of patches, row-major: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).float()


def text_ids(length: int, device=None) -> torch.Tensor:
    """(length, 3) ids of the text tokens: all zero (no position among them beyond T5's own)."""
    return torch.zeros(length, 3, device=device)


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, head_dim): per axis i, frequencies theta^(-2j / d_i) of position ids[:, i], each
    repeated for the pair of channels (2j, 2j + 1) it rotates. Computed in float64, as BFL's and diffusers'."""
    angles = []
    for i, d in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[:, i].double()[:, None] * freqs[None])
    a = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
    return a.cos().float(), a.sin().float()


def apply_rope(x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate each channel pair (2j, 2j + 1) of x (B, heads, L, head_dim) by its angle; in float32."""
    cos, sin = pe
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def attention(q, k, v, pe) -> torch.Tensor:
    """Scaled dot-product attention with RoPE on q and k; (B, heads, L, d) -> (B, L, heads * d)."""
    return merge_heads(F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v))


# --- layers ---------------------------------------------------------------------------------------------------

STORED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # kept as stored: each call upcasts to the input's dtype


class StoredLinear(nn.Linear):
    """A Linear whose weight (and bias) stay in the dtype they were stored in (float8: one byte a weight) and are
    cast to the input's dtype for each call only, so the math is ``F.linear`` on the weights upcast once. Moving the
    module (``.to``, ``.float()``, ``.cuda()``) moves those tensors but keeps their dtype."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        kept = {n: p for n, p in self._parameters.items() if p is not None and p.dtype in STORED_DTYPES}
        for n in kept:
            del self._parameters[n]
        try:
            super()._apply(fn, recurse)
        finally:
            for n, p in kept.items():
                device = fn(torch.empty(0, dtype=p.dtype, device=p.device)).device  # where fn sends a tensor
                self._parameters[n] = p if device == p.device else nn.Parameter(p.to(device), p.requires_grad)
        return self


def keep_stored(module: nn.Module) -> list[str]:
    """Turn each Linear of ``module`` holding a float8 weight into a ``StoredLinear``; returns their names."""
    names = []
    for name, m in module.named_modules():
        if type(m) is nn.Linear and m.weight.dtype in STORED_DTYPES:
            m.__class__ = StoredLinear
            names.append(name)
        elif type(m) is nn.Linear and m.bias is not None and m.bias.dtype in STORED_DTYPES:
            m.bias = nn.Parameter(m.bias.to(m.weight.dtype), m.bias.requires_grad)  # a float8 bias alone
    return names


class RMSNorm(nn.Module):
    """RMS-norm over the last axis with a learnt ``scale`` (BFL's name for the weight), in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(head_dim), RMSNorm(head_dim)


class SelfAttention(nn.Module):
    """A stream's fused q | k | v projection, its q, k norms and output projection (the attention is joint)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.norm = QKNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def qkv_heads(self, x):
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    """``n`` (shift, scale, gate) groups of hidden-wide modulations from vec, each (B, 1, hidden)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, 3 * n * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None].chunk(3 * self.n, dim=-1)


class MLPEmbedder(nn.Module):
    """A vector (timestep / guidance embedding, pooled text) -> hidden: in_layer, SiLU, out_layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


def _mlp(cfg: FluxConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.hidden_size, cfg.mlp_width), nn.GELU(approximate="tanh"),
                         nn.Linear(cfg.mlp_width, cfg.hidden_size))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        for s in ("img", "txt"):
            self.add_module(f"{s}_mod", Modulation(h, 2))
            self.add_module(f"{s}_norm1", layer_norm(h))
            self.add_module(f"{s}_attn", SelfAttention(cfg))
            self.add_module(f"{s}_norm2", layer_norm(h))
            self.add_module(f"{s}_mlp", _mlp(cfg))

    def forward(self, img, txt, vec, pe):
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        i_qkv = self.img_attn.qkv_heads(modulate(self.img_norm1(img), i_shift, i_scale))
        t_qkv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift, t_scale))
        # one attention over [txt | img] tokens
        out = attention(*(torch.cat(pair, dim=2) for pair in zip(t_qkv, i_qkv)), pe)
        t_attn, i_attn = out.split([txt.shape[1], img.shape[1]], dim=1)
        img = img + i_gate * self.img_attn.proj(i_attn)
        img = img + i_gate2 * self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate * self.txt_attn.proj(t_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel from one modulated input (Dehghani et al. 2023's parallel layers)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.hidden, self.mlp_width = cfg.heads, h, cfg.mlp_width
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_width)
        self.linear2 = nn.Linear(h + cfg.mlp_width, h)
        self.norm = QKNorm(cfg.head_dim)
        self.pre_norm = layer_norm(h)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(h, 1)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([3 * self.hidden, self.mlp_width], -1)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.heads)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm_final = layer_norm(h)
        self.linear = nn.Linear(h, cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(256, h)
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg)

    def conditioning_vector(self, t, y, guidance, dtype) -> torch.Tensor:
        """vec = time_in(emb(t)) [+ guidance_in(emb(1000 g))] + vector_in(y)."""
        vec = self.time_in(timestep_embedding(t, 256).to(dtype))
        if self.cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 model embeds the guidance scale (guidance_in): pass guidance")
            g = torch.as_tensor(guidance, device=y.device).to(dtype).expand(y.shape[0]) * 1000
            vec = vec + self.guidance_in(timestep_embedding(g, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, y: torch.Tensor, guidance=None) -> torch.Tensor:
        """x: (B, C, h, w) latents (C = in_channels / 4); t: (B,) or scalar, s x 1000; context: (B, L, 4096) T5
        states; y: (B, 768) CLIP-L's pooled text; guidance: the embedded scale g, (B,) or scalar (dev only; the
        model sees 1000 g). Returns the velocity (B, C, h, w)."""
        hp, wp = x.shape[-2] // 2, x.shape[-1] // 2
        if hp * 2 != x.shape[-2] or wp * 2 != x.shape[-1]:
            raise ValueError(f"latent sides {tuple(x.shape[-2:])} must be even (2 x 2 patches)")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        vec = self.conditioning_vector(t, y, guidance, x.dtype)
        img = self.img_in(rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2))
        txt = self.txt_in(context.to(x.dtype))
        ids = torch.cat([text_ids(txt.shape[1], x.device), image_ids(hp, wp, x.device)])
        pe = rope(ids, self.cfg.axes_dim, self.cfg.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        tokens = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            tokens = block(tokens, vec, pe)
        out = self.final_layer(tokens[:, txt.shape[1]:], vec)
        return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=hp, p=2, q=2)
