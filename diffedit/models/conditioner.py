"""SDXL's conditioning: the two text towers (sgm's ``GeneralConditioner``) and the size micro-conditioning.

The UNet cross-attends to the concatenated penultimate layers of CLIP ViT-L (768) and OpenCLIP bigG (1280), and
adds y = [pooled bigG | emb(original h, w) | emb(crop top, left) | emb(target h, w)] to its time embedding
(Podell et al., "SDXL", 2023, Sec. 2.2), each size through the timestep sinusoid ([cos | sin]), height first.
"""
from __future__ import annotations

import torch
from torch import nn

from .configs import TextConfig
from .text import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from .unet import timestep_embedding


class GeneralConditioner(nn.Module):
    """``conditioner.embedders.0`` (CLIP ViT-L, HF names) and ``.1`` (OpenCLIP bigG, open_clip names)."""

    def __init__(self, text: TextConfig, text_2: TextConfig):
        super().__init__()
        if text.kind != "openai" or text_2.kind != "openclip" or not text_2.pooled:
            raise ValueError("SDXL's text towers: text must be kind 'openai', text_2 kind 'openclip' with pooled=True")
        self.embedders = nn.ModuleList([FrozenCLIPEmbedder(text), FrozenOpenCLIPEmbedder(text_2)])

    def forward(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tower's ids (B, 77) -> (context (B, 77, width + width_2), pooled (B, projection_dim_2))."""
        h, (h_2, pooled) = self.embedders[0](ids), self.embedders[1](ids_2)
        return torch.cat([h, h_2], dim=-1), pooled


def _pair(name: str, value) -> tuple[float, float]:
    """A (height, width)-like pair of numbers, or a one-line error naming the argument."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (height first), got {value!r}") from None
    return a, b


def size_conditioning(pooled: torch.Tensor, original_size, crop_top_left, target_size, dim: int) -> torch.Tensor:
    """y (B, P + 6 dim) = [pooled | emb(orig h) | emb(orig w) | emb(crop top) | emb(crop left) | emb(target h) |
    emb(target w)]: the same sizes for every row of ``pooled`` (B, P); ``dim`` = ModelConfig.size_embed_dim."""
    if pooled.ndim != 2:
        raise ValueError(f"pooled must be (B, P), got shape {tuple(pooled.shape)}")
    if dim <= 0 or dim % 2:
        raise ValueError(f"the size embedding width must be even and positive, got {dim}")
    sizes = [*_pair("original_size", original_size), *_pair("crop_top_left", crop_top_left),
             *_pair("target_size", target_size)]
    emb = timestep_embedding(torch.tensor(sizes, device=pooled.device), dim)  # (6, dim)
    return torch.cat([pooled, emb.reshape(1, -1).to(pooled.dtype).expand(pooled.shape[0], -1)], dim=-1)
