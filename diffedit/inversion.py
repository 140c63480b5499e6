"""Step 2 of DiffEdit (paper Sec. 3.2): DDIM encoding of the input latent x_0 up to the encoding ratio r.

The encoding uses the unconditional model (text "", no guidance) and keeps every latent on the grid: the
decoding step blends with them, and a sweep over ratios reuses one trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ddim
from .guidance import EpsFn, guided_eps


@dataclass
class Trajectory:
    """DDIM-encoded latents: ``latents[0]`` is x_0 and ``latents[i]`` is x at timestep ``timesteps[i]``.

    ``timesteps[0]`` is -1, the level of x_0 below the first grid timestep (alpha_bar there = alpha_bar_0).
    """
    latents: torch.Tensor    # (k + 1, B, C, h, w)
    timesteps: torch.Tensor  # (k + 1,) ascending: -1, grid[0], ..., grid[k - 1]
    steps: int               # size of the full grid the levels belong to

    @property
    def ratio(self) -> float:
        return (len(self.timesteps) - 1) / self.steps

    def truncate(self, ratio: float) -> "Trajectory":
        """The same trajectory stopped at a smaller ratio (a sweep over r needs one encoding)."""
        k = num_encoding_steps(ratio, self.steps)
        if k > len(self.timesteps) - 1:
            raise ValueError(f"ratio {ratio} is beyond this trajectory's ratio {self.ratio}")
        return Trajectory(self.latents[: k + 1], self.timesteps[: k + 1], self.steps)


def num_encoding_steps(ratio: float, steps: int) -> int:
    """k = round(r * steps) grid steps for encoding ratio r in (0, 1]; at least one."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, round(ratio * steps))


@torch.no_grad()
def ddim_encode(eps: EpsFn, x0: torch.Tensor, context: torch.Tensor, ratio: float, steps: int,
                alpha_bar: torch.Tensor, guidance: float = 1.0, uncond: torch.Tensor | None = None,
                max_batch: int = 64) -> Trajectory:
    """DDIM inversion x_0 -> x_r (Sec. 3.2). Each step from level t_prev to t evaluates eps at (x_prev, t),
    the usual convention (as diffusers' DDIMInverseScheduler). ``guidance`` > 1 with ``uncond`` gives the
    CFG inversion of diffusers' pipeline (its recipe only; the paper inverts without guidance)."""
    k = num_encoding_steps(ratio, steps)
    grid = ddim.timesteps(steps)[:k].to(x0.device)
    levels = torch.cat([grid.new_tensor([-1]), grid])
    latents = [x0]
    x = x0
    for t_prev, t in zip(levels[:-1], levels[1:]):
        e = guided_eps(eps, x, t, context, context if uncond is None else uncond, guidance, max_batch)
        ab_prev = ddim.alpha_bar_at(t_prev, alpha_bar).to(x.dtype)
        ab_t = ddim.alpha_bar_at(t, alpha_bar).to(x.dtype)
        x = ddim.ddim_reverse_step(x, e, ab_prev, ab_t)
        latents.append(x)
    return Trajectory(torch.stack(latents), levels, steps)
