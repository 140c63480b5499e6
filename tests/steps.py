"""The three step functions called as one edit calls them, for tests that check each step alone: the DDIM denoiser
built from an eps function, a trajectory decoded from its end, D of several queries against one reference."""
from __future__ import annotations

import torch

from diffedit import ddim, masking
from diffedit.denoiser import Denoiser
from diffedit.edit import decode
from diffedit.inversion import encode


def ddim_encode(eps, x0, cond, ratio, steps, alpha_bar, **kw):
    """Step 2 to ``ratio`` on the ``steps``-step grid."""
    d = Denoiser(eps, alpha_bar)
    return encode(d, x0, cond, d.levels(ratio, steps), steps, **kw)


def masked_decode(eps, traj, cond, uncond, guidance, alpha_bar, mask=None, blend_late=False, callback=None):
    """Step 3 from the end of ``traj``, keeping its latents outside ``mask`` (one step late: diffusers' recipe)."""
    xs = traj.latents
    return decode(Denoiser(eps, alpha_bar), xs[-1].expand(cond.shape[0], *xs.shape[2:]), traj.timesteps, cond, uncond,
                  guidance, xs[1:] if blend_late else xs, mask, callback)


def noised(x0, n, strength, steps, alpha_bar, gen):
    """Step 1's n noised copies of x_0."""
    return masking.noised_latents(Denoiser(None, alpha_bar), x0, n, strength, steps, gen)


def difference_maps(eps, noises, queries, reference, max_batch=64):
    """D (K, h, w) of each query row against the reference."""
    texts = [reference] + [queries[k:k + 1] for k in range(queries.shape[0])]
    n = noises.x_t.shape[0]
    maps = masking.noise_difference_maps(Denoiser(eps, ddim.alphas_cumprod(dtype=torch.float64), max_batch), noises,
                                         texts, [(k + 1, 0) for k in range(queries.shape[0])], [n])
    return torch.stack([m[n] for m in maps])
