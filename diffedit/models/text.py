"""CLIP text encoders, tau_theta(y) of the LDM paper, and the tokenizer.

SD1 conditions on OpenAI CLIP ViT-L/14's last hidden state (HF ``CLIPTextModel`` names, under
``cond_stage_model.transformer.``); SD2 on OpenCLIP ViT-H/14's penultimate layer followed by
``ln_final`` (open_clip names, under ``cond_stage_model.model.``). SDXL on both CLIP ViT-L's and OpenCLIP
bigG's penultimate layers without a final norm, plus bigG's pooled, projected end-of-text vector (under
``conditioner.embedders.{0,1}.``, see conditioner.py). SD3 on CLIP-L's and CLIP-G's penultimate layers without a
final norm, and both pooled, projected end-of-text vectors (HF ``CLIPTextModelWithProjection`` names, under
``text_encoders.{clip_l,clip_g}.transformer.``). All are causal pre-LN transformers.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .configs import TextConfig

SOT, EOT = 49406, 49407
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer  # open_clip ships the BPE vocabulary offline
    return SimpleTokenizer()


def warn_truncated(dropped: list[tuple[str, int]], limit: int) -> None:
    """One warning for the (text, tokens dropped) pairs of one call, each text shortened to 40 characters."""
    if dropped:
        short = lambda t: repr(t if len(t) <= 40 else t[:37] + "...")
        log.warning("text longer than the encoder's %d tokens: %s", limit,
                    "; ".join(f"{n} token{'s' * (n > 1)} dropped from {short(t)}" for t, n in dropped))


def tokenize(texts: list[str], cfg: TextConfig) -> torch.Tensor:
    """Texts -> (B, context_length) ids: start, BPE tokens (truncated, with a warning), end, then padding."""
    n = cfg.context_length
    ids = torch.full((len(texts), n), cfg.pad_id, dtype=torch.long)
    dropped = []
    for row, text in enumerate(texts):
        bpe = _bpe().encode(text)
        if len(bpe) > n - 2:
            dropped.append((text, len(bpe) - (n - 2)))
        toks = [SOT, *bpe[: n - 2], EOT]
        ids[row, : len(toks)] = torch.tensor(toks)
    warn_truncated(dropped, n)
    return ids


def _causal_attention(x, qkv, out, heads):
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in qkv(x).chunk(3, dim=-1))
    return out(rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=True), "b h n d -> b n (h d)"))


# --- SD1: OpenAI CLIP in HF transformers naming --------------------------------------------------

class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        qkv = lambda y: torch.cat([self.q_proj(y), self.k_proj(y), self.v_proj(y)], dim=-1)
        return _causal_attention(x, qkv, self.out_proj, self.heads)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIP activation must be 'quick_gelu' or 'gelu', got {act!r}")
        self.quick = act == "quick_gelu"
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_width, cfg.hidden_act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings, self.encoder = CLIPEmbeddings(cfg), CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class OpenAICLIPText(nn.Module):
    """A CLIP text encoder in HF names: SD1 reads the last hidden state after the final layer norm, SDXL and SD3 the
    penultimate one without it (``skip_last_layer``, ``final_norm``); SD3 also pools (``CLIPTextModelWithProjection``:
    ``text_projection``, a Linear without bias)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.pooled:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids (B, n) -> the conditioning (B, n, width), and with ``pooled`` the pooled text (B, projection_dim)."""
        m, layers = self.text_model, self.text_model.encoder.layers
        n_context = len(layers) - 1 if self.cfg.skip_last_layer else len(layers)
        x = m.embeddings(ids)
        for layer in layers[:n_context]:
            x = layer(x)
        context = m.final_layer_norm(x) if self.cfg.final_norm else x
        if not self.cfg.pooled:
            return context
        for layer in layers[n_context:]:
            x = layer(x)
        # the first end of text: the largest id (49407), and argmax returns the first maximum
        eot = m.final_layer_norm(x)[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return context, self.text_projection(eot)


# --- SD2: OpenCLIP naming ------------------------------------------------------------------------

class MultiheadSelfAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention's parameter names (fused in_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):
        return _causal_attention(x, lambda y: F.linear(y, self.in_proj_weight, self.in_proj_bias), self.out_proj, self.heads)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        w = cfg.width
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(w), MultiheadSelfAttention(w, cfg.heads), nn.LayerNorm(w)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(w, cfg.mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_width, w))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPText(nn.Module):
    """OpenCLIP's text encoder: SD2 reads the penultimate layer through ``ln_final``; SDXL (bigG) the penultimate
    layer without it, and the pooled vector ln_final(last layer)[end of text] @ text_projection."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        # Stored (width, proj) for x @ W as in open_clip; SDXL's pooled vector uses it, SD2 only loads it.
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.projection_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, n) -> the conditioning (B, n, width)."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        blocks = self.transformer.resblocks
        for block in blocks[: len(blocks) - 1] if self.cfg.skip_last_layer else blocks:
            x = block(x)
        return self.ln_final(x) if self.cfg.final_norm else x

    def context_and_pooled(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, n) -> (the conditioning (B, n, width), the pooled text (B, proj)), running the layers once."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        blocks = self.transformer.resblocks
        n_context = len(blocks) - 1 if self.cfg.skip_last_layer else len(blocks)
        for i, block in enumerate(blocks):
            x = block(x)
            if i == n_context - 1:
                context = self.ln_final(x) if self.cfg.final_norm else x
        # end of text (49407) is the largest id and padding is 0, so argmax finds it
        eot = self.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return context, eot @ self.text_projection


class FrozenCLIPEmbedder(nn.Module):
    """SD1 ``cond_stage_model`` / SDXL ``conditioner.embedders.0`` / SD3 ``text_encoders.clip_{l,g}``: holds the
    HF-named model under ``transformer``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transformer = OpenAICLIPText(cfg)

    def forward(self, ids):
        return self.transformer(ids)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2 ``cond_stage_model`` / SDXL ``conditioner.embedders.1``: holds the open_clip-named model under ``model``;
    returns the conditioning, or (conditioning, pooled) if ``cfg.pooled``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = OpenCLIPText(cfg)

    def forward(self, ids):
        return self.model.context_and_pooled(ids) if self.model.cfg.pooled else self.model(ids)


def text_encoder(cfg: TextConfig) -> nn.Module:
    return FrozenCLIPEmbedder(cfg) if cfg.kind == "openai" else FrozenOpenCLIPEmbedder(cfg)
