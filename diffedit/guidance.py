"""What a UNet evaluation is called with and how it is counted: the conditioning of a row, the model call that
always returns eps, and the counters that wrap it.

An edit needs the noise estimate eps_theta(x_t, t, c) for many rows at once: the n mask noises under the
query and the reference text, the conditional and unconditional halves of classifier-free guidance, and
several targets that share one inversion. ``denoiser.Denoiser`` stacks them into as few calls as ``max_batch``
allows; prompt embeddings are computed once and only indexed (``expand``, no copies).

A row's conditioning is a text embedding (B, L, D) for SD1/2, and a ``Conditioning`` for SDXL, which carries the
vector y (pooled text and image sizes) beside it; both are indexed, expanded and concatenated alike, so masking,
inversion and decoding never tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from . import ddim


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
EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def mean_embedding(cond: Cond) -> Cond:
    """The mean of several texts' conditionings (rows), as one row: the diffusers docs' recipe of averaging the
    embeddings of many captions into one query or reference."""
    if isinstance(cond, Conditioning):
        return Conditioning(cond.context.mean(0, keepdim=True), cond.y.mean(0, keepdim=True))
    return cond.mean(0, keepdim=True)


def eps_model(unet: Callable, prediction_type: str, alpha_bar: torch.Tensor, dtype: torch.dtype | None = None) -> EpsFn:
    """Wrap the network so it returns what its schedule's denoiser steps with: eps for DDIM (v-prediction models are
    converted with alpha_bar_t), the velocity as it comes for a flow-matching model ("flow_prediction").

    ``dtype``: the network's dtype, if it differs from the latents' (a bf16 UNet under float32 latents): inputs
    are cast to it and the estimate back to the latents' dtype, so the schedule's arithmetic never runs in bf16."""
    if prediction_type not in ("epsilon", "v_prediction", "flow_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'flow_prediction', "
                         f"got {prediction_type!r}")

    def eps(x, t, context):
        if dtype is None or dtype == x.dtype:
            out = unet(x, t, context)
        else:
            out = unet(x.to(dtype), t, context.to(dtype)).to(x.dtype)
        if prediction_type != "v_prediction":
            return out
        ab = ddim.alpha_bar_at(t, alpha_bar).to(x.device, x.dtype).reshape(-1, 1, 1, 1)
        return ddim.v_to_eps(x, out, ab)

    return eps


class Rows:
    """Rows (batch entries; for a UNet, sample evaluations) and calls; ``on_rows(n)`` is told of every call."""

    def __init__(self, on_rows=None):
        self.rows = self.calls = 0
        self.on_rows = on_rows

    def add(self, x) -> None:
        self.rows += x.shape[0]
        self.calls += 1
        if self.on_rows is not None:
            self.on_rows(x.shape[0])

    @property
    def count(self) -> int:
        """Rows so far (for a UNet, sample evaluations)."""
        return self.rows

    @count.setter
    def count(self, value: int) -> None:
        self.rows = value

    def reset(self) -> None:
        self.rows = self.calls = 0

    def get(self) -> dict:
        return {"rows": self.rows, "calls": self.calls}


class EvalCounter(Rows):
    """Wraps an eps function; ``count`` = UNet sample evaluations (batch rows) run through it."""

    def __init__(self, eps, on_rows=None):
        super().__init__(on_rows)
        self.eps = eps

    def around(self, eps) -> "EvalCounter":
        """This counter, now around ``eps`` (an engine's ``wrap``: totals carry over from model to model)."""
        self.eps = eps
        return self

    def __call__(self, x, t, context):
        self.add(x)
        return self.eps(x, t, context)
