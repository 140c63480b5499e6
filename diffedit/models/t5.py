"""The T5 v1.1 encoder (Raffel et al., "Exploring the Limits of Transfer Learning", JMLR 2020; v1.1: gated-GELU
feed-forward, untied embeddings), SD3's third text encoder, in HF ``T5EncoderModel`` names, and its tokenizer.

Differences from a CLIP tower: bidirectional attention whose scores are not scaled by 1/sqrt(d) and get a learned
bias per head and relative-position bucket (the first block's table, shared by all blocks); RMS norms without mean
or bias; no position embedding. The tokenizer reads a diffusers folder's ``tokenizer_3/tokenizer.json`` with the
``tokenizers`` package (an optional dependency).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .configs import T5Config
from .text import warn_truncated


class T5LayerNorm(nn.Module):
    """x / rms(x) * weight, in float32 (the variance of a 4096-wide state overflows float16)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional buckets of key - query offsets: half the buckets per direction; in each, exact offsets below a
    quarter of all buckets, then logarithmically wider ones up to ``max_distance`` (beyond it: the last bucket)."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    n = relative.abs()
    exact = half // 2
    log_ratio = torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    wide = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, wide)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.heads, inner = cfg.num_heads, cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, n: int, cfg: T5Config) -> torch.Tensor:
        """(1, heads, n, n) additive scores from the offsets key - query."""
        pos = torch.arange(n, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return rearrange(self.relative_attention_bias(buckets), "q k h -> 1 h q k")

    def forward(self, x, bias):
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5 does not scale
        return self.o(rearrange(y, "b h n d -> b n (h d)"))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0, self.wi_1 = (nn.Linear(cfg.d_model, cfg.d_ff, bias=False) for _ in range(2))
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))  # v1.1's "gelu_new"


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias), T5LayerFF(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """``shared`` (the token embedding) and ``encoder``: the keys of HF's T5EncoderModel (its tied copy
    ``encoder.embed_tokens`` left out)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, n) -> the last hidden state (B, n, d_model), every token attended (as SD3 calls it: no mask)."""
        blocks = self.encoder.block
        bias = blocks[0].layer[0].SelfAttention.position_bias(ids.shape[1], self.cfg)
        x = self.shared(ids)
        for block in blocks:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


class T5Tokenizer:
    """A SentencePiece-unigram tokenizer.json (a diffusers folder's ``tokenizer_3/``): tokens, truncated to leave
    room for the end of sequence ``</s>``, then ``<pad>`` up to the length (HF T5TokenizerFast with
    padding="max_length", truncation=True)."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("SD3's T5 tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(self.path))
        self.eos, self.pad = (self.tokenizer.token_to_id(t) for t in ("</s>", "<pad>"))
        if self.eos is None or self.pad is None:
            raise ValueError(f"{self.path}: not a T5 tokenizer (no </s> or <pad> token)")

    def __call__(self, texts: list[str], length: int) -> torch.Tensor:
        """Texts -> (B, length) ids."""
        ids = torch.full((len(texts), length), self.pad, dtype=torch.long)
        dropped = []
        for row, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            if len(enc.ids) > length - 1:
                dropped.append((texts[row], len(enc.ids) - (length - 1)))
            toks = [*enc.ids[: length - 1], self.eos]
            ids[row, : len(toks)] = torch.tensor(toks)
        warn_truncated(dropped, length)
        return ids
