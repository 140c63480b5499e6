"""The flow-matching denoiser of Stable Diffusion 3 / 3.5: ``denoiser.Denoiser``'s interface on a rectified flow, so
masking, inversion and decoding run on SD3 unchanged (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Notation (flow matching; the DiffEdit paper's x_t becomes x_s):
    s            the level: the noise fraction in [0, 1] (sigma in diffusers); x_0 at s = 0, pure noise at s = 1
    x_s          x_s = (1 - s) x_0 + s e,  e ~ N(0, I)                       (Esser et al., Eq. 2 with t -> s)
    v            the model's output, the velocity v_theta(x_s, t, c) ~ dx_s/ds = e - x_0; called with t = 1000 s
    e_hat        the noise the velocity implies: e_hat = x_s + (1 - s) v
    k            the shift: s' = k s / (1 + (k - 1) s) (Esser et al., Sec. 5.3.2; k = 3 for SD3 / SD3.5)
A step is Euler's, x_b = x_a + (b - a) v, in either direction: b < a samples with v(x_a, a); b > a encodes with
the velocity at x_a given the level b (inversion.py's convention, as diffusers' DDIMInverseScheduler's).

Where DiffEdit's DDIM steps carry over exactly, and where only approximately:
  * the mask (Sec. 3.1): at a fixed x_s, e_hat_Q - e_hat_R = (1 - s) (v_Q - v_R), so the map of velocity differences
    is the paper's D up to the factor (1 - s), which the per-image rescaling cancels: exact;
  * the blend at the same level (Sec. 3.2): the kept latents x_b sit on the same grid as the decoded y_b: exact;
  * the encoding: the Euler step run upwards uses the velocity at the current, cleaner point x_a, not at the x_b it
    is looking for, as DDIM inversion takes eps as constant over a step: an approximation with an O(ds^2) error per
    step, which adds up to a drift of the reconstruction that shrinks with the number of steps.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .denoiser import Denoiser, encoding_steps
from .conditioning import Cond
from .model_call import EpsFn

NUM_TRAIN_TIMESTEPS = 1000


def shift(s, k: float):
    """s' = k s / (1 + (k - 1) s): the resolution shift of SD3's schedule (Esser et al., Sec. 5.3.2)."""
    return k * s / (1 + (k - 1) * s)


def sigmas(steps: int, k: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The sampling grid, descending from 1, without the terminal 0: diffusers' FlowMatchEulerDiscreteScheduler
    (``set_timesteps``): timesteps linspace from T s_max to T s_min, divided by T, shifted, rounded to float32."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    # the scheduler's s_min is the training grid's smallest level, already shifted (in float32): the grid's low end
    # is thus shifted twice, as in diffusers
    s_min = shift(torch.tensor(1.0, dtype=torch.float32) / num_train_timesteps, k).item()
    t = torch.linspace(num_train_timesteps * 1.0, s_min * num_train_timesteps, steps, dtype=torch.float64)
    return shift(t / num_train_timesteps, k).to(torch.float32).to(torch.float64)


def add_noise(x0, noise, s):
    """The forward process x_s = (1 - s) x_0 + s e (diffusers' ``scale_noise``)."""
    return s * noise + (1.0 - s) * x0


def euler_step(x, v, s, s_to):
    """x_b = x_a + (b - a) v: sampling for b < a (diffusers' ``FlowMatchEulerDiscreteScheduler.step``), the
    encoding for b > a with the velocity at the cleaner point."""
    return x + (s_to - s) * v


@dataclass(frozen=True)
class FlowDenoiser:
    """v_theta and SD3's flow schedule behind ``denoiser.Denoiser``'s interface: ``model(x, t, cond)`` returns the
    velocity at t = 1000 s, ``k`` the shift (``cfg.flow_shift``), ``max_batch`` the most rows a model call gets.
    Levels are the s values, float64 on ``device``."""
    model: EpsFn
    k: float = 3.0
    max_batch: int = 64
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.k <= 0:
            raise ValueError(f"the flow shift must be > 0, got {self.k}")

    def with_model(self, model: EpsFn) -> "FlowDenoiser":
        """The same schedule with another model call (a counter, a cancellation check wrapped around it)."""
        return replace(self, model=model)

    # --- the schedule ---------------------------------------------------------------------------------------

    def levels(self, ratio: float, steps: int) -> torch.Tensor:
        """x_0's level 0, then the k = round(r * steps) least noisy grid levels, ascending (ratio 1: up to s = 1)."""
        grid = sigmas(steps, self.k).flip(0)[:encoding_steps(ratio, steps)]
        return torch.cat([grid.new_zeros(1), grid]).to(self.device)

    def strength_level(self, strength: float, steps: int) -> torch.Tensor:
        """The level the mask's noises are drawn at: the last level of an encoding to ratio ``strength``."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return self.levels(strength, steps)[-1]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        """x_s = (1 - s) x_0 + s e."""
        return add_noise(x0, noise, _at(level, x0))

    def step(self, x: torch.Tensor, out: torch.Tensor, level, to) -> torch.Tensor:
        """Euler from s = ``level`` to ``to`` with v = ``out``: sampling when to < level, encoding when to > level."""
        return euler_step(x, out, _at(level, x), _at(to, x))

    # --- the model: DDIM's batching and guidance, at t = 1000 s ------------------------------------------------

    def __call__(self, x: torch.Tensor, level, cond: Cond) -> torch.Tensor:
        """The velocity for N rows (x: (N, C, h, w); cond: (N or 1, ...)), in calls of at most max_batch."""
        # t in float32 as diffusers' pipeline gives it: its timesteps are float32 sigmas times 1000
        t = torch.as_tensor(level, device=x.device).to(torch.float32) * NUM_TRAIN_TIMESTEPS
        return Denoiser.__call__(self, x, t, cond)

    guided = Denoiser.guided  # classifier-free guidance on the velocity: v_u + g (v_c - v_u), as on eps
    guided_rows = Denoiser.guided_rows
    guidance_unused = Denoiser.guidance_unused


def _at(level, like: torch.Tensor) -> torch.Tensor:
    """A level as a scalar of ``like``'s device and dtype (the arithmetic in the latents' dtype, as diffusers')."""
    return torch.as_tensor(level).to(like.device, like.dtype)
