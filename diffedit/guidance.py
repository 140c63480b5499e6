"""The batched noise-estimate pass: every UNet evaluation of an edit goes through here.

An edit needs the noise estimate eps_theta(x_t, t, c) for many rows at once: the n mask noises under the
query and the reference text, the conditional and unconditional halves of classifier-free guidance, and
several targets that share one inversion. Rows are stacked into as few UNet calls as ``max_batch`` allows;
prompt embeddings are computed by the caller once and only indexed here (``expand``, no copies).

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
    """SDXL's conditioning of B rows: ``context`` (B, L, D) for cross-attention, ``y`` (B, adm) added to the time
    embedding. Rows behave as a tensor's first axis: ``c[i]``, ``c[i:j]``, ``c.expand(n, ...)``, ``c.shape``,
    ``c.to(dtype)``, ``torch.cat`` and ``torch.equal``."""
    context: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.context.shape[:-2] != self.y.shape[:-1]:
            raise ValueError(f"context {tuple(self.context.shape)} and y {tuple(self.y.shape)} have different rows")

    @property
    def shape(self) -> torch.Size:
        return self.context.shape

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


def eps_model(unet: Callable, prediction_type: str, alpha_bar: torch.Tensor, dtype: torch.dtype | None = None) -> EpsFn:
    """Wrap the UNet so it always returns eps: v-prediction models are converted with alpha_bar_t.

    ``dtype``: the UNet's dtype, if it differs from the latents' (a bf16 UNet under float32 latents): inputs
    are cast to it and the estimate back to the latents' dtype, so the DDIM arithmetic never runs in bf16."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")

    def eps(x, t, context):
        if dtype is None or dtype == x.dtype:
            out = unet(x, t, context)
        else:
            out = unet(x.to(dtype), t, context.to(dtype)).to(x.dtype)
        if prediction_type == "epsilon":
            return out
        ab = ddim.alpha_bar_at(t, alpha_bar).to(x.device, x.dtype).reshape(-1, 1, 1, 1)
        return ddim.v_to_eps(x, out, ab)

    return eps


def batched_eps(eps: EpsFn, x: torch.Tensor, t: torch.Tensor, context: Cond,
                max_batch: int = 64) -> torch.Tensor:
    """eps for N rows (x: (N,C,h,w), t: (N,), context: (N,L,D)), in chunks of at most max_batch rows."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
    context = context.expand(x.shape[0], *context.shape[1:])
    return torch.cat([eps(x[i:i + max_batch], t[i:i + max_batch], context[i:i + max_batch])
                      for i in range(0, x.shape[0], max_batch)])


def guided_eps(eps: EpsFn, x: torch.Tensor, t, cond: Cond, uncond: Cond, scale: float,
               max_batch: int = 64) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): eps_u + s (eps_c - eps_u), both halves in one pass.

    x: (K,C,h,w); cond, uncond: (K,L,D) or (1,L,D). With scale 1 only the conditional half is evaluated.
    """
    k = x.shape[0]
    if scale == 1.0:
        return batched_eps(eps, x, t, cond, max_batch)
    ctx = torch.cat([uncond.expand(k, *uncond.shape[1:]), cond.expand(k, *cond.shape[1:])])
    e = batched_eps(eps, torch.cat([x, x]), t, ctx, max_batch)
    e_u, e_c = e[:k], e[k:]
    return e_u + scale * (e_c - e_u)
