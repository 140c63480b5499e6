"""Step 2 of DiffEdit (paper Sec. 3.2): encoding the input latent x_0 up to the encoding ratio r.

The encoding uses the unconditional model (text "", no guidance) and keeps every latent on the grid: the
decoding step blends with them, and a sweep over ratios reuses one trajectory. The schedule is the denoiser's
(DDIM inversion for Stable Diffusion 1.x / 2.x / XL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import Denoiser, encoding_steps
from .conditioning import Cond


@dataclass
class Trajectory:
    """Encoded latents: ``latents[0]`` is x_0 and ``latents[i]`` is x at level ``timesteps[i]``.

    ``timesteps`` are the denoiser's levels, ascending; ``timesteps[0]`` is x_0's (-1 for DDIM: below the first
    grid timestep, where alpha_bar = alpha_bar_0).
    """
    latents: torch.Tensor    # (k + 1, B, C, h, w)
    timesteps: torch.Tensor  # (k + 1,) ascending: x_0's level, grid[0], ..., grid[k - 1]
    steps: int               # size of the full grid the levels belong to

    @property
    def ratio(self) -> float:
        return (len(self.timesteps) - 1) / self.steps

    def truncate(self, ratio: float) -> "Trajectory":
        """The same trajectory stopped at a smaller ratio (a sweep over r needs one encoding)."""
        k = encoding_steps(ratio, self.steps)
        if k > len(self.timesteps) - 1:
            raise ValueError(f"ratio {ratio} is beyond this trajectory's ratio {self.ratio}")
        return Trajectory(self.latents[: k + 1], self.timesteps[: k + 1], self.steps)

    def rows(self, index) -> "Trajectory":
        """The trajectory of some of its images (``latents[:, index]``)."""
        return Trajectory(self.latents[:, index], self.timesteps, self.steps)


@torch.no_grad()
def encode(denoiser: Denoiser, x0: torch.Tensor, cond: Cond, levels: torch.Tensor, steps: int,
           guidance: float = 1.0, uncond: Cond | None = None) -> Trajectory:
    """Inversion x_0 -> x_r over ``levels`` (Sec. 3.2): each step from level a to b uses the model's estimate at
    (x_a, b), the usual convention (as diffusers' DDIMInverseScheduler). x0: (B, C, h, w), one image a row.
    ``guidance`` > 1 with ``uncond`` gives the CFG inversion of diffusers' pipeline (its recipe only; the paper
    inverts without guidance)."""
    latents, x = [x0], x0
    for a, b in zip(levels[:-1], levels[1:]):
        out = denoiser.guided(x, b, cond, cond if uncond is None else uncond, guidance)
        x = denoiser.step(x, out, a, b)
        latents.append(x)
    return Trajectory(torch.stack(latents), levels, steps)
