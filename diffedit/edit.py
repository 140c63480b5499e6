"""Step 3 of DiffEdit (paper Sec. 3.2): mask-guided decoding.

DiffEdit starts from the encoded latent y_r = x_r and samples with the query Q (classifier-free guidance,
negative prompt R). After each step from t to t_prev it keeps the input outside the mask M by blending
at the SAME level:  y_{t_prev} = M * y_{t_prev} + (1 - M) * x_{t_prev};  the last step blends with x_0.
The baselines and ablations differ only in where decoding starts and what is kept (``settings.METHOD_TABLE``):
    SDEdit (Meng et al., 2022): start from x_0 noised to r with fresh noise, no mask.
    Encode-Decode: start from the encoding, no mask (DiffEdit with M = 1).
    masked SDEdit: start from fresh noise; outside the mask keep x_0 noised to each level with fresh noise
    (Blended Latent Diffusion's rule), x_0 itself at the end.
"""
from __future__ import annotations

import torch

from .denoiser import Denoiser
from .conditioning import Cond


@torch.no_grad()
def decode(denoiser: Denoiser, y: torch.Tensor, levels: torch.Tensor, cond: Cond, uncond: Cond, guidance: float,
           keep: torch.Tensor | None = None, mask: torch.Tensor | None = None, callback=None) -> torch.Tensor:
    """Guided sampling of K rows y (K, C, h, w) from level ``levels[-1]`` down to ``levels[0]``.

    With ``mask`` (K or 1, 1, h, w) in [0, 1], after each step to level i the rows are blended with ``keep[i]``
    ((k + 1, K or 1, C, h, w): the latents to keep at each level) outside the mask. cond, uncond: K rows or one.
    callback(step_index, y) is called after each step (progress bars, step-by-step figures).
    """
    for i in range(len(levels) - 1, 0, -1):  # one step from level i to level i - 1
        out = denoiser.guided(y, levels[i], cond, uncond, guidance)
        y = denoiser.step(y, out, levels[i], levels[i - 1])
        if mask is not None:
            y = mask * y + (1 - mask) * keep[i - 1]
        if callback is not None:
            callback(len(levels) - 1 - i, y)
    return y


def noised_start(denoiser: Denoiser, x0: torch.Tensor, levels: torch.Tensor, generator: torch.Generator,
                 masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDEdit's start (Meng et al., 2022): y_r = x_0 noised to ``levels[-1]`` with fresh noise; for a masked
    decoding also what is kept outside the mask, (k + 1, B, C, h, w): x_0 noised to each level with fresh noise
    (Blended Latent Diffusion), x_0 itself at the end. Noise is drawn in float32 on the CPU from ``generator``."""
    def draw(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    y = denoiser.add_noise(x0, draw(x0.shape), levels[-1])
    if not masked:
        return y, None
    fresh = draw((len(levels) - 1, *x0.shape))
    return y, torch.stack([x0] + [denoiser.add_noise(x0, fresh[i - 1], levels[i]) for i in range(1, len(levels))])
