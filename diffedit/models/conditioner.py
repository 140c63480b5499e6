"""The multi-tower text conditionings: SDXL's two towers (sgm's ``GeneralConditioner``) with its size
micro-conditioning, and SD3's three (``SD3TextEncoders``).

The UNet cross-attends to the concatenated penultimate layers of CLIP ViT-L (768) and OpenCLIP bigG (1280), and
adds y = [pooled bigG | emb(original h, w) | emb(crop top, left) | emb(target h, w)] to its time embedding
(Podell et al., "SDXL", 2023, Sec. 2.2), each size through the timestep sinusoid ([cos | sin]), height first.

The MMDiT of SD3 attends to [CLIP-L penultimate (768) | CLIP-G penultimate (1280)], zero-padded to T5's width (4096),
followed along the sequence by T5-XXL's last hidden state, or by zeros where T5 is left out (SD3 was trained with
each encoder dropped at random); its pooled vector is [CLIP-L pooled | CLIP-G pooled] (Esser et al., "Scaling
Rectified Flow Transformers", 2024, Sec. 5.2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import T5Config, TextConfig
from .t5 import T5EncoderModel
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


class T5Embedder(nn.Module):
    """``text_encoders.t5xxl``: holds the HF-named T5 encoder under ``transformer``."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.transformer = T5EncoderModel(cfg)

    def forward(self, ids):
        return self.transformer(ids)


class SD3TextEncoders(nn.Module):
    """SD3's ``text_encoders``: ``clip_l``, ``clip_g`` and the optional ``t5xxl``."""

    def __init__(self, clip_l: TextConfig, clip_g: TextConfig, t5: T5Config | None, width: int, t5_tokens: int):
        super().__init__()
        if clip_l.kind != "openai" or clip_g.kind != "openai" or not (clip_l.pooled and clip_g.pooled):
            raise ValueError("SD3's CLIP towers must be kind 'openai' (HF names) with pooled=True")
        if clip_l.width + clip_g.width > width or (t5 is not None and t5.d_model != width):
            raise ValueError(f"SD3's context is {width} wide: CLIP-L + CLIP-G ({clip_l.width} + {clip_g.width}) must "
                             f"fit in it and T5 ({t5 and t5.d_model}) must fill it")
        self.width, self.t5_tokens = width, t5_tokens
        self.clip_l, self.clip_g = FrozenCLIPEmbedder(clip_l), FrozenCLIPEmbedder(clip_g)
        if t5 is not None:
            self.t5xxl = T5Embedder(t5)

    def forward(self, ids_l: torch.Tensor, ids_g: torch.Tensor, ids_t5: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tower's ids (B, 77), T5's (B, t5_tokens) -> (context (B, 77 + t5_tokens, width),
        pooled (B, CLIP-L projection + CLIP-G projection))."""
        (h_l, pooled_l), (h_g, pooled_g) = self.clip_l(ids_l), self.clip_g(ids_g)
        clip = torch.cat([h_l, h_g], dim=-1)
        clip = F.pad(clip, (0, self.width - clip.shape[-1]))
        if hasattr(self, "t5xxl"):
            t5 = self.t5xxl(ids_t5).to(clip.dtype)
        else:
            t5 = clip.new_zeros(clip.shape[0], self.t5_tokens, self.width)
        return torch.cat([clip, t5], dim=1), torch.cat([pooled_l, pooled_g], dim=-1)


class FluxTextEncoders(nn.Module):
    """FLUX.1's ``text_encoders``: ``clip_l`` (only its pooled output: the final layer norm at the end of text, no
    projection, as transformers' CLIPTextModel's pooler_output) and ``t5xxl`` (its last hidden state, the context)."""

    def __init__(self, clip_l: TextConfig, t5: T5Config):
        super().__init__()
        if clip_l.kind != "openai" or clip_l.pooled or clip_l.skip_last_layer:
            raise ValueError("FLUX.1's CLIP-L: kind 'openai', all layers, pooled=False (its pooler output is read)")
        self.clip_l, self.t5xxl = FrozenCLIPEmbedder(clip_l), T5Embedder(t5)

    def forward(self, ids_l: torch.Tensor, ids_t5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's ids (B, 77), T5's (B, t5_tokens) -> (context (B, t5_tokens, d_model), pooled (B, CLIP width))."""
        last = self.clip_l(ids_l)  # final_layer_norm(last layer) for every token
        # the first end of text: the largest id (49407), and argmax returns the first maximum
        pooled = last[torch.arange(ids_l.shape[0], device=ids_l.device), ids_l.argmax(dim=-1)]
        return self.t5xxl(ids_t5).to(pooled.dtype), pooled


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
