"""Step 3 of DiffEdit (paper Sec. 3.2): mask-guided DDIM decoding, and the baselines built from the same parts.

DiffEdit starts from the encoded latent y_r = x_r and samples with the query Q (classifier-free guidance,
negative prompt R). After each step from t to t_prev it keeps the input outside the mask M by blending
at the SAME level:  y_{t_prev} = M * y_{t_prev} + (1 - M) * x_{t_prev};  the last step blends with x_0.
    SDEdit (Meng et al., 2022): noise x_0 to r with fresh noise, decode with Q, no mask.
    Encode-Decode: DDIM-encode x_0 to r, decode with Q, no mask (DiffEdit with M = 1).
``blend_late=True`` reproduces the diffusers pipeline's blending, one step late: after the step to t_prev it
blends with the encoded latent at t, so the final background is x at the first grid timestep.
"""
from __future__ import annotations

import torch

from . import ddim
from .guidance import EpsFn, guided_eps
from .inversion import Trajectory, num_encoding_steps


def ddim_sample(eps: EpsFn, y: torch.Tensor, levels: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                guidance: float, alpha_bar: torch.Tensor, keep=None, mask=None, max_batch: int = 64,
                callback=None) -> torch.Tensor:
    """Guided DDIM sampling from level ``levels[-1]`` down to ``levels[0]``.

    With ``mask``, after each step to level i the result is blended with ``keep[i]`` outside the mask.
    callback(step_index, y) is called after each step (for progress bars and step-by-step figures).
    """
    for i in range(len(levels) - 1, 0, -1):  # one step from level i to level i - 1
        e = guided_eps(eps, y, levels[i], cond, uncond, guidance, max_batch)
        y = ddim.ddim_step(y, e, ddim.alpha_bar_at(levels[i], alpha_bar).to(y.dtype),
                           ddim.alpha_bar_at(levels[i - 1], alpha_bar).to(y.dtype))
        if mask is not None:
            y = mask * y + (1 - mask) * keep[i - 1]
        if callback is not None:
            callback(len(levels) - 1 - i, y)
    return y


@torch.no_grad()
def masked_decode(eps: EpsFn, trajectory: Trajectory, cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
                  alpha_bar: torch.Tensor, mask: torch.Tensor | None = None, blend_late: bool = False,
                  max_batch: int = 64, callback=None) -> torch.Tensor:
    """DiffEdit decoding of K edits of one image from its trajectory (latents (k+1, 1, C, h, w)) -> (K, C, h, w).

    cond: (K, L, D) query embeddings; uncond: (1 or K, L, D) reference (negative prompt) embeddings;
    mask: (K, 1, h, w) in [0, 1]; None decodes without a mask (Encode-Decode).
    """
    xs = trajectory.latents[:, 0]
    keep = xs[1:] if blend_late else xs
    y = xs[-1].expand(cond.shape[0], *xs.shape[1:])
    return ddim_sample(eps, y, trajectory.timesteps, cond, uncond, guidance, alpha_bar, keep, mask, max_batch,
                       callback)


@torch.no_grad()
def sdedit(eps: EpsFn, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, ratio: float, steps: int,
           guidance: float, alpha_bar: torch.Tensor, generator: torch.Generator, max_batch: int = 64,
           callback=None) -> torch.Tensor:
    """SDEdit: x_r = sqrt(ab_r) x_0 + sqrt(1 - ab_r) noise with fresh noise, then guided DDIM decoding with Q.

    x0: (1, C, h, w); cond: (K, L, D). The K edits share one noise, so each equals editing its target alone.
    """
    k = num_encoding_steps(ratio, steps)
    levels = torch.cat([torch.tensor([-1]), ddim.timesteps(steps)[:k]]).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).expand(cond.shape[0], *x0.shape[1:])
    x_r = ddim.add_noise(x0, noise.to(x0.device, x0.dtype), ddim.alpha_bar_at(levels[-1], alpha_bar).to(x0.dtype))
    return ddim_sample(eps, x_r, levels, cond, uncond, guidance, alpha_bar, max_batch=max_batch, callback=callback)
