"""What a row of a model call is conditioned on: a text embedding (B, L, D) for SD1/2, a ``Conditioning`` for SDXL and
SD3, which carries the vector y (pooled text, and SDXL's image sizes) beside it.

Both are indexed, expanded and concatenated alike, so masking, inversion and decoding never tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Conditioning:
    """SDXL's and SD3's conditioning of B rows: ``context`` (B, L, D) for attention, ``y`` (B, adm) added to the time
    embedding (SD3: the pooled text). Rows behave as a tensor's first axis: ``c[i]``, ``c[i:j]``,
    ``c.expand(n, ...)``, ``c.shape``, ``c.ndim``, ``c.to(dtype)``, ``torch.cat`` and ``torch.equal``."""
    context: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.context.shape[:-2] != self.y.shape[:-1]:
            raise ValueError(f"context {tuple(self.context.shape)} and y {tuple(self.y.shape)} have different rows")

    @property
    def shape(self) -> torch.Size:
        return self.context.shape

    @property
    def ndim(self) -> int:
        return self.context.ndim

    def __len__(self) -> int:
        return self.context.shape[0]

    def __getitem__(self, rows) -> "Conditioning":
        return Conditioning(self.context[rows], self.y[rows])

    def expand(self, n: int, *_) -> "Conditioning":
        return Conditioning(self.context.expand(n, *self.context.shape[1:]), self.y.expand(n, *self.y.shape[1:]))

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.context.to(*args, **kwargs), self.y.to(*args, **kwargs))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat:
            parts, rest = args[0], args[1:]
            return Conditioning(torch.cat([p.context for p in parts], *rest, **(kwargs or {})),
                                torch.cat([p.y for p in parts], *rest, **(kwargs or {})))
        if func is torch.equal:
            a, b = args
            return torch.equal(a.context, b.context) and torch.equal(a.y, b.y)
        return NotImplemented


Cond = Union[torch.Tensor, Conditioning]


def mean_embedding(cond: Cond) -> Cond:
    """The mean of several texts' conditionings (rows), as one row: the diffusers docs' recipe of averaging the
    embeddings of many captions into one query or reference."""
    if isinstance(cond, Conditioning):
        return Conditioning(cond.context.mean(0, keepdim=True), cond.y.mean(0, keepdim=True))
    return cond.mean(0, keepdim=True)
