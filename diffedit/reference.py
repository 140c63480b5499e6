"""DiffEdit as the paper states it (Couairon et al., ICLR 2023, Sec. 3), for one image and one query: read it
beside the paper.

Nothing else calls it. The front ends run ``engine.Engine``, which does this same work for many images, queries and
settings at once, shares and memoises what they have in common, and is tested equal to this function bit for bit
(fp32, same seeds) for every method and recipe on SD1-, SDXL- and SD3-style models (tests/test_reference.py).

Notation (Sec. 3): x_0 the input's latent, Q the query text, R the reference text, n the number of noises,
s the mask's noise strength, r the encoding ratio, D the difference map, M the mask, x_t the encoded latents,
y_t the decoded ones. Texts come as the model's conditionings (``DiffEdit.encode_prompt``), ``empty`` that of "".
"""
from __future__ import annotations

import torch

from . import masking
from .edit import decode, noised_start
from .inversion import encode
from .settings import METHOD_TABLE, EditSettings, resolve


@torch.no_grad()
def edit(denoiser, x_0: torch.Tensor, Q, R, empty, settings: EditSettings = EditSettings(), M=None):
    """Edit x_0 (1, C, h, w) towards Q against R by ``settings.method``; returns (y_0, D rescaled, M).
    A mask M (h, w) given replaces step 1."""
    method = METHOD_TABLE[settings.method]
    s = resolve(settings, estimates_mask=method.masked and M is None)  # the recipe's grid rounding and rule for D
    D = None

    # Step 1 (Sec. 3.1): noise x_0 n times to strength s; D = mean |eps(x_t, Q) - eps(x_t, R)|; rescale, binarise.
    if method.masked and M is None:
        noised = masking.noised_latents(denoiser, x_0, s.n, s.strength, s.steps, torch.Generator().manual_seed(s.seed))
        x_t, t = noised.x_t[:, 0], noised.t
        eps_Q, eps_R = denoiser(x_t, t, Q), denoiser(x_t, t, R)
        D = masking.normalize(masking.difference_map(eps_Q[:, None], eps_R[:, None]), s.normalization)[0]
        M = masking.dilate(masking.binarize(D, s.threshold), s.dilate)

    # Step 2 (Sec. 3.2): encode x_0 to x_r by DDIM inversion, keeping every x_t; the unconditional model (the paper),
    # or CFG under R (diffusers' recipe). SDEdit's start instead: x_0 noised to r with fresh noise.
    levels = denoiser.levels(s.ratio, s.steps)  # x_0's level, then the grid's levels up to r
    if method.start == "encoding":
        if s.recipe.inversion_guidance:
            x = encode(denoiser, x_0, R, levels, s.steps, s.guidance, empty).latents
        else:
            x = encode(denoiser, x_0, empty, levels, s.steps).latents
        y_r = x[-1]
        keep = x[1:] if s.recipe.blend_late else x  # diffusers blends with x_t of the level before: one step late
    else:
        y_r, keep = noised_start(denoiser, x_0, levels, torch.Generator().manual_seed(s.seed), method.masked)

    # Step 3 (Sec. 3.2): decode y_r with Q (CFG, negative prompt R); after each step to t, y_t = M y_t + (1 - M) x_t.
    if not method.masked:
        return decode(denoiser, y_r, levels, Q, R, s.guidance), D, None
    y_0 = decode(denoiser, y_r, levels, Q, R, s.guidance, keep, M[None, None].to(y_r.dtype))
    return y_0, D, M

