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

from . import ddim
from .guidance import EpsFn, batched_eps
from .settings import NORMALIZATIONS


def strength_timestep(strength: float, steps: int) -> int:
    """The grid timestep reached by encoding ratio ``strength`` (481 for 0.5 on the 50-step grid)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return int(ddim.timesteps(steps)[max(1, round(strength * steps)) - 1])


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
    t: int


def noised_latents(x0: torch.Tensor, n: int, strength: float, steps: int, alpha_bar: torch.Tensor,
                   generator: torch.Generator) -> Noises:
    """n independent noises per image (never one noise broadcast n times) at the strength's timestep."""
    if n < 1:
        raise ValueError(f"n (number of noise maps) must be >= 1, got {n}")
    t = strength_timestep(strength, steps)
    noise = torch.randn((n, *x0.shape), generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    ab = ddim.alpha_bar_at(t, alpha_bar).to(x0.dtype)
    return Noises(ddim.add_noise(x0[None], noise, ab), t)


@torch.no_grad()
def noise_difference_maps(eps: EpsFn, noises: Noises, queries: torch.Tensor, reference: torch.Tensor,
                          max_batch: int = 64, ns: list[int] | None = None) -> torch.Tensor | dict[int, torch.Tensor]:
    """D for K queries against one reference, for one image (noises.x_t: (n, 1, C, h, w)).

    queries: (K, L, D) text embeddings, reference: (1, L, D); the reference's rows are shared by the K queries.
    Each text's rows get their own batched pass (chunked by max_batch), so a query's D does not depend on the
    other queries: CPU kernels round differently for other batch sizes. Returns (K, h, w); with ``ns``,
    {n: (K, h, w)} for each n in ``ns``, D from the first n noises (max(ns) rows per text are evaluated).
    """
    x = noises.x_t[:, 0]                                   # (n, C, h, w)
    n_max = x.shape[0] if ns is None else max(ns)
    if n_max > x.shape[0]:
        raise ValueError(f"n {n_max} is more than the {x.shape[0]} noises drawn")
    x = x[:n_max]
    d = {n: x.new_zeros(queries.shape[0], *x.shape[-2:]) for n in (ns or [n_max])}
    # A query equal to the reference has D = 0 by definition; evaluating it would only add rounding noise,
    # which the rescaling would blow up into a random mask.
    differ = [j for j in range(queries.shape[0]) if not torch.equal(queries[j], reference[0])]
    if differ:
        e_r = batched_eps(eps, x, noises.t, reference, max_batch)[:, None]
        for j in differ:
            e_q = batched_eps(eps, x, noises.t, queries[j:j + 1], max_batch)[:, None]
            for n, dn in d.items():
                dn[j] = difference_map(e_q[:n], e_r[:n])[0]
    return d[n_max] if ns is None else d
