"""The batched noise-estimate pass: every UNet evaluation of an edit goes through here.

An edit needs the noise estimate eps_theta(x_t, t, c) for many rows at once: the n mask noises under the
query and the reference text, the conditional and unconditional halves of classifier-free guidance, and
several targets that share one inversion. Rows are stacked into as few UNet calls as ``max_batch`` allows;
prompt embeddings are computed by the caller once and only indexed here (``expand``, no copies).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import ddim

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def batched_eps(eps: EpsFn, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                max_batch: int = 64) -> torch.Tensor:
    """eps for N rows (x: (N,C,h,w), t: (N,), context: (N,L,D)), in chunks of at most max_batch rows."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
    context = context.expand(x.shape[0], *context.shape[1:])
    return torch.cat([eps(x[i:i + max_batch], t[i:i + max_batch], context[i:i + max_batch])
                      for i in range(0, x.shape[0], max_batch)])


def guided_eps(eps: EpsFn, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, scale: float,
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
