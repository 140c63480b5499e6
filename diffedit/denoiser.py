"""The denoiser: the model's noise estimate and its noise schedule behind one object (k-diffusion's
``sample(model, x, sigmas)``: the step functions see the paper's variables, never a step counter).

A schedule is indexed by *levels*: a level names how noisy a latent is. For DDIM (Stable Diffusion 1.x / 2.x / XL)
the level is the training timestep t, and x_0 sits at level -1, below the first grid timestep (alpha_bar there is
alpha_bar_0). ``levels(ratio, steps)`` gives the ascending levels an encoding to ``ratio`` visits, x_0's first;
``step(x, out, a, b)`` moves a latent from level a to level b with the model's output ``out`` at (x, a), in either
direction: a < b is the encoding (inversion), a > b the sampling. ``add_noise`` is the forward process q(x | x_0).
Another schedule (flow matching) provides the same methods, so masking, inversion and decoding are written once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import ddim
from .conditioning import Cond
from .model_call import EpsFn


def encoding_steps(ratio: float, steps: int) -> int:
    """k = round(r * steps) grid steps for encoding ratio r in (0, 1]; at least one."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, round(ratio * steps))


@dataclass(frozen=True)
class Denoiser:
    """eps_theta and the DDIM schedule: ``model(x, t, cond)`` returns eps (v-prediction already converted),
    ``alpha_bar`` the training schedule's cumulative products, ``max_batch`` the most rows a model call gets."""
    model: EpsFn
    alpha_bar: torch.Tensor
    max_batch: int = 64

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    def with_model(self, model: EpsFn) -> "Denoiser":
        """The same schedule with another model call (a counter, a cancellation check wrapped around it)."""
        return replace(self, model=model)

    # --- the schedule ---------------------------------------------------------------------------------------

    def levels(self, ratio: float, steps: int) -> torch.Tensor:
        """x_0's level, then the first k = round(r * steps) timesteps of the leading grid: (-1, 1, 21, ...)."""
        grid = ddim.timesteps(steps)[:encoding_steps(ratio, steps)]
        return torch.cat([grid.new_tensor([-1]), grid]).to(self.alpha_bar.device)

    def strength_level(self, strength: float, steps: int) -> torch.Tensor:
        """The level the mask's noises are drawn at: the last level of an encoding to ratio ``strength``."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return self.levels(strength, steps)[-1]

    def _ab(self, level, like: torch.Tensor) -> torch.Tensor:
        return ddim.alpha_bar_at(level, self.alpha_bar).to(like.device, like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        """q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return ddim.add_noise(x0, noise, self._ab(level, x0))

    def step(self, x: torch.Tensor, out: torch.Tensor, level, to) -> torch.Tensor:
        """DDIM (eta = 0) from ``level`` to ``to`` with eps = ``out``: sampling when to < level, encoding when
        to > level (Sec. 3.2: the sampling step run backwards, eps taken as constant)."""
        return ddim.ddim_step(x, out, self._ab(level, x), self._ab(to, x))

    # --- the model --------------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, level, cond: Cond) -> torch.Tensor:
        """The model's output for N rows (x: (N, C, h, w); cond: (N or 1, ...)), in calls of at most max_batch."""
        level = torch.as_tensor(level, device=x.device).expand(x.shape[0])
        cond = cond.expand(x.shape[0], *cond.shape[1:])
        return torch.cat([self.model(x[i:i + self.max_batch], level[i:i + self.max_batch], cond[i:i + self.max_batch])
                          for i in range(0, x.shape[0], self.max_batch)])

    def guided(self, x: torch.Tensor, level, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans, 2022): out_u + s (out_c - out_u), both halves in one pass.
        x: (K, C, h, w); cond, uncond: K rows or one. With scale 1 only the conditional half runs."""
        k = x.shape[0]
        if scale == 1.0:
            return self(x, level, cond)
        both = self(torch.cat([x, x]), level,
                    torch.cat([uncond.expand(k, *uncond.shape[1:]), cond.expand(k, *cond.shape[1:])]))
        out_u, out_c = both[:k], both[k:]
        return out_u + scale * (out_c - out_u)

    def guided_rows(self, scale: float) -> int:
        """Model rows per sample of ``guided`` at ``scale`` (the plan counts with it)."""
        return 1 if scale == 1.0 else 2

    def guidance_unused(self, scale: float) -> bool:
        """Whether ``guided`` at ``scale`` is the unguided estimate whatever the scale (a model without guidance)."""
        return False
