"""FLUX.1's flow schedule and guidance behind ``denoiser.Denoiser``'s interface (``flow.py``'s rectified flow, with
the two things FLUX.1 adds): masking, inversion and decoding run on it unchanged.

The schedule. FLUX.1 shifts its grid by the image's size: sigmas u = linspace(1, 1/N, N) become
    s = e^mu / (e^mu + 1/u - 1),   mu = linear in the image's token count L = h/2 x w/2, from (256, base_shift)
                                        to (4096, max_shift)                     (diffusers' FluxPipeline)
(schnell: no shift). A level here is the unshifted u, which every image shares; the latent the denoiser is handed
(x in ``add_noise``, ``step``, ``__call__``) tells L, hence mu and s. The shift is monotone with s(0) = 0 and
s(1) = 1, so the grid's order, x_0's level 0 and ``levels`` / ``strength_level`` keep their meaning.

Guidance. FLUX.1-dev is guidance-distilled: the scale g is an input of the model (embedded like the timestep), and
a guided estimate is ONE row, v(x, t, Q, g) (``guided`` with ``scale`` = g). The unguided estimates the paper asks for
(the mask's, the encoding's) are the model at g = ``unguided`` (1 by default: the distilled model's own no-guidance
point). True classifier-free guidance, v_R + c (v_Q - v_R) with R as the negative prompt, runs a second row when
``true_cfg`` > 1 (diffusers' true_cfg_scale; off by default). Schnell has no guidance input: one row, g unused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .conditioning import Cond
from .denoiser import Denoiser, encoding_steps
from .flow import NUM_TRAIN_TIMESTEPS, add_noise, euler_step
from .model_call import EpsFn
from .models.configs import FluxSchedule


class Timing(NamedTuple):
    """What a FLUX.1 model call is given besides x and the text: t = 1000 s (N,), and the embedded scale g (N,) or
    None (schnell)."""
    t: torch.Tensor
    guidance: torch.Tensor | None


def mu(tokens: int, sched: FluxSchedule) -> float:
    """The shift exponent for an image of ``tokens`` packed tokens (diffusers' ``calculate_shift``)."""
    m = (sched.max_shift - sched.base_shift) / (sched.max_image_seq_len - sched.base_image_seq_len)
    return tokens * m + sched.base_shift - m * sched.base_image_seq_len


def shifted(u: torch.Tensor, sched: FluxSchedule, tokens: int) -> torch.Tensor:
    """s(u) in float32, as diffusers' scheduler shifts its float32 sigmas: the exponential time shift with mu(tokens)
    when dynamic, else the static shift k u / (1 + (k - 1) u)."""
    u = u.to(torch.float32)
    if sched.dynamic:
        e = math.exp(mu(tokens, sched))
        return e / (e + (1 / u - 1))
    return sched.shift * u / (1 + (sched.shift - 1) * u)


def grid(steps: int) -> torch.Tensor:
    """The unshifted sampling grid, descending: linspace(1, 1/N, N) (FluxPipeline's sigmas), float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)


def tokens_of(x: torch.Tensor) -> int:
    """The packed token count of latents (..., h, w): 2 x 2 patches."""
    return (x.shape[-2] // 2) * (x.shape[-1] // 2)


@dataclass(frozen=True)
class FluxDenoiser:
    """v_theta with FLUX.1's schedule and guidance (see the module's notes): ``model(x, Timing, cond)`` returns the
    velocity; ``embedded``: the model takes g (dev); ``unguided``: g of the unguided estimates; ``true_cfg``: the
    true-CFG scale (1: off). Levels are the unshifted u, float64 on ``device``."""
    model: EpsFn
    schedule: FluxSchedule = FluxSchedule()
    embedded: bool = True
    unguided: float = 1.0
    true_cfg: float = 1.0
    max_batch: int = 64
    device: torch.device = torch.device("cpu")

    # the checks and helpers that do not depend on the schedule: Denoiser's own
    __post_init__ = Denoiser.__post_init__
    with_model = Denoiser.with_model

    # --- the schedule -------------------------------------------------------------------------------------------

    def levels(self, ratio: float, steps: int) -> torch.Tensor:
        """x_0's level 0, then the k = round(r * steps) least noisy grid levels, ascending (unshifted)."""
        g = grid(steps).flip(0)[:encoding_steps(ratio, steps)]
        return torch.cat([g.new_zeros(1), g]).to(self.device)

    strength_level = Denoiser.strength_level

    def s(self, level, like: torch.Tensor) -> torch.Tensor:
        """The noise fraction s of ``level`` for latents shaped as ``like``, a scalar of its device and dtype."""
        u = torch.as_tensor(level, device=like.device)
        return shifted(u, self.schedule, tokens_of(like)).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        return add_noise(x0, noise, self.s(level, x0))

    def step(self, x: torch.Tensor, out: torch.Tensor, level, to) -> torch.Tensor:
        return euler_step(x, out, self.s(level, x), self.s(to, x))

    # --- the model ----------------------------------------------------------------------------------------------

    def _call(self, x: torch.Tensor, level, cond: Cond, g: float | None) -> torch.Tensor:
        """The velocity for N rows at embedded scale ``g`` (None: schnell), in calls of at most max_batch."""
        n = x.shape[0]
        # t in float32 as diffusers' pipeline gives it: its timesteps are float32 sigmas times 1000
        t = (shifted(torch.as_tensor(level, device=x.device), self.schedule, tokens_of(x)) * NUM_TRAIN_TIMESTEPS)
        t = t.expand(n)
        gs = None if g is None or not self.embedded else torch.full((n,), float(g), device=x.device)
        cond = cond.expand(n, *cond.shape[1:])
        b = self.max_batch
        return torch.cat([self.model(x[i:i + b], Timing(t[i:i + b], None if gs is None else gs[i:i + b]), cond[i:i + b])
                          for i in range(0, n, b)])

    def __call__(self, x: torch.Tensor, level, cond: Cond) -> torch.Tensor:
        """The unguided velocity (g = ``unguided`` on dev) for N rows."""
        return self._call(x, level, cond, self.unguided)

    def guided(self, x: torch.Tensor, level, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        """The guided velocity: dev embeds ``scale``; scale 1 is the unguided estimate. With ``true_cfg`` > 1 a second
        row under ``uncond`` (the negative prompt): v_u + true_cfg (v_c - v_u), both at the embedded scale."""
        if scale == 1.0:
            return self(x, level, cond)
        if self.true_cfg <= 1.0:
            return self._call(x, level, cond, scale)
        k = x.shape[0]
        both = self._call(torch.cat([x, x]), level, torch.cat([uncond.expand(k, *uncond.shape[1:]),
                                                               cond.expand(k, *cond.shape[1:])]), scale)
        return both[:k] + self.true_cfg * (both[k:] - both[:k])

    def guided_rows(self, scale: float) -> int:
        """Model rows per sample of ``guided`` at ``scale``: 1, or 2 with true CFG."""
        return 1 if scale == 1.0 or self.true_cfg <= 1.0 else 2

    def guidance_unused(self, scale: float) -> bool:
        """Schnell takes no g: without true CFG, a scale other than 1 gives the unguided estimate."""
        return scale != 1.0 and not self.embedded and self.true_cfg <= 1.0
