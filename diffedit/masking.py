"""Step 1 of DiffEdit (paper Sec. 3.1): the mask, from contrasting noise estimates under two texts.

x_0 is noised n times at strength s (default 0.5) with independent noises; the model predicts the noise
under the query Q and the reference R. Where the texts disagree about the image, so do the estimates:
    D = mean over the n noises and the latent channels of |eps(x_t, Q) - eps(x_t, R)|.
Extreme values (the top 2 % of D) are removed and D rescaled to [0, 1] per image, then binarised at a threshold
(0.5). Not in the paper: ``dilate`` can grow M by whole latent cells afterwards (default 0, off).
No classifier-free guidance is needed: with a shared unconditional branch the guided difference is
g * (eps_Q - eps_R), which the rescaling cancels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .conditioning import Cond
from .settings import NORMALIZATIONS


def difference_map(eps_q: torch.Tensor, eps_r: torch.Tensor) -> torch.Tensor:
    """D = mean over noises and channels of |eps_Q - eps_R| (Sec. 3.1). Inputs (n, B, C, h, w) -> (B, h, w)."""
    return (eps_q - eps_r).abs().mean(dim=(0, 2))


def normalize(d: torch.Tensor, mode: str = "quantile", clamp_ratio: float = 3.0, quantile: float = 0.98) -> torch.Tensor:
    """Remove extreme values and rescale each image's map to [0, 1] (Sec. 3.1).

    ``quantile`` (default): clip at the image's ``quantile``-quantile of D (the top 2 % are the extreme
    values) and divide by it, so the bulk of a broad edit reaches 1 whatever a few outlying cells do;
    ``clamp``: clip at clamp_ratio x the image's mean and divide by the clipped maximum (nothing is removed
    when the mean exceeds max / clamp_ratio, as for a new background, and the mask then depends on its single
    largest cell); ``minmax``: (D - min) / (max - min); ``clamp-mean``: diffusers' rule, divide by
    clamp_ratio x mean even when the maximum is below it (compat="diffusers"; a broad edit's map may then
    never reach the threshold). A map with no spread (D = 0) becomes all zeros, not NaN.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    flat = d.flatten(1)
    tiny = torch.finfo(d.dtype).tiny
    if mode == "quantile":
        hi = torch.quantile(flat, quantile, dim=1, keepdim=True)
        hi = torch.where(hi > 0, hi, flat.amax(dim=1, keepdim=True))  # a change confined to < 2 % of the cells
        out = torch.minimum(flat, hi) / hi.clamp(min=tiny)
    elif mode == "clamp":
        hi = torch.minimum(clamp_ratio * flat.mean(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True))
        out = torch.minimum(flat, hi) / hi.clamp(min=tiny)
    elif mode == "minmax":
        lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
        out = (flat - lo) / (hi - lo).clamp(min=tiny)
    elif mode == "clamp-mean":
        hi = clamp_ratio * flat.mean(dim=1, keepdim=True)
        out = torch.minimum(flat, hi) / hi.clamp(min=tiny)
    else:
        raise ValueError(f"normalisation mode must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")
    return out.reshape(d.shape)


def binarize(d_norm: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """M = 1 where the rescaled map exceeds the threshold (Sec. 3.1)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return d_norm > threshold


def dilate(mask: torch.Tensor, cells: int = 0) -> torch.Tensor:
    """Grow a (..., h, w) bool mask by ``cells``: a (2c+1) x (2c+1) max-pool (not in the paper; 0: unchanged)."""
    if cells < 0:
        raise ValueError(f"dilate must be >= 0 cells, got {cells}")
    if cells == 0:
        return mask
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    grown = torch.nn.functional.max_pool2d(flat, 2 * cells + 1, stride=1, padding=cells)
    return grown.reshape(mask.shape) > 0.5


@dataclass
class Noises:
    """The n noised copies of x_0 at one level, shared by every text contrasted against them."""
    x_t: torch.Tensor  # (n, B, C, h, w)
    t: torch.Tensor    # the denoiser's level


def noised_latents(denoiser: Denoiser, x0: torch.Tensor, n: int, strength: float, steps: int,
                   generator: torch.Generator) -> Noises:
    """n independent noises per image (never one noise broadcast n times) at the strength's level."""
    if n < 1:
        raise ValueError(f"n (number of noise maps) must be >= 1, got {n}")
    t = denoiser.strength_level(strength, steps)
    noise = torch.randn((n, *x0.shape), generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    return Noises(denoiser.add_noise(x0[None], noise, t), t)


@torch.no_grad()
def noise_difference_maps(denoiser: Denoiser, noises: Noises, texts: list[Cond], pairs: list[tuple[int, int]],
                          ns: list[int]) -> list[dict[int, torch.Tensor]]:
    """D (h, w) of each pair (a, b) of ``texts`` for one image (noises.x_t: (n, 1, C, h, w)), from its first n
    noises for each n in ``ns``: [{n: D}] in the order of ``pairs``.

    Each text's n rows are evaluated once, in their own batched pass (chunked by max_batch), so a map never
    depends on the other texts: CPU kernels round differently for other batch sizes. D is symmetric in its texts.
    """
    x = noises.x_t[:, 0]                                   # (n, C, h, w)
    if max(ns) > x.shape[0]:
        raise ValueError(f"n {max(ns)} is more than the {x.shape[0]} noises drawn")
    x = x[:max(ns)]
    estimates: dict[int, torch.Tensor] = {}
    out = []
    for a, b in pairs:
        if a == b:  # D = 0 by definition: no model call
            out.append({n: x.new_zeros(x.shape[-2:]) for n in ns})
            continue
        for i in (a, b):
            if i not in estimates:
                estimates[i] = denoiser(x, noises.t, texts[i])[:, None]
        out.append({n: difference_map(estimates[a][:n], estimates[b][:n])[0] for n in ns})
    return out
