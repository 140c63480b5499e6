"""DDIM (Song et al., 2021) as pure functions: the schedule, the timestep grid, one step and its reverse.

Notation (DiffEdit paper, Sec. 2; DDIM Eq. 12 with eta = 0):
    alpha_bar_t   cumulative product of (1 - beta) up to training timestep t (``alphas_cumprod``)
    x_t           noisy latent at level t:  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    eps           the model's noise estimate eps_theta(x_t, t, text)
    x0_hat        the clean latent predicted from (x_t, eps)
    t, t_prev     two neighbouring timesteps of the sampling grid, t_prev < t
Sampling (decoding) moves from t to t_prev; encoding (DDIM inversion, paper Sec. 3.2) from t_prev to t.
Every function takes the alpha_bar values it needs: there are no step counters and no hidden state.
"""
from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Stable Diffusion's "scaled_linear" schedule: betas linear in sqrt-space; returns alpha_bar_t, t = 0..T-1."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, offset: int = 1) -> torch.Tensor:
    """The "leading" DDIM grid with offset 1, ascending: 1, 21, ..., 981 for 50 steps."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    return torch.arange(steps) * (num_train_timesteps // steps) + offset


def alpha_bar_at(t: torch.Tensor | int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """alpha_bar at timestep t; below t = 0 (the level of x_0 on the grid) it is alpha_bar_0, as in SD."""
    t = torch.as_tensor(t).clamp(min=0)
    if t.device.type == "cpu":
        return alpha_bar[t]
    return alpha_bar[t.reshape(-1)].reshape(t.shape)  # a 0-d device index would be .item(): a host sync per step


def predict_x0(x_t, eps, alpha_bar_t):
    """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDIM Eq. 12, first term)."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev):
    """Deterministic DDIM sampling step t -> t_prev (eta = 0): x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps."""
    return alpha_bar_prev ** 0.5 * predict_x0(x_t, eps, alpha_bar_t) + (1 - alpha_bar_prev) ** 0.5 * eps


def ddim_reverse_step(x_prev, eps, alpha_bar_prev, alpha_bar_t):
    """DDIM encoding step t_prev -> t (paper Sec. 3.2): the sampling step run backwards, eps taken as constant."""
    return ddim_step(x_prev, eps, alpha_bar_prev, alpha_bar_t)


def add_noise(x0, noise, alpha_bar_t):
    """Forward diffusion q(x_t | x_0): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    return alpha_bar_t ** 0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


def v_to_eps(x_t, v, alpha_bar_t):
    """v-prediction (Salimans & Ho, 2022) to noise: eps = sqrt(ab) v + sqrt(1 - ab) x_t."""
    return alpha_bar_t ** 0.5 * v + (1 - alpha_bar_t) ** 0.5 * x_t


def eps_to_v(x_t, eps, alpha_bar_t):
    """Noise to v-prediction: v = (eps - sqrt(1 - ab) x_t) / sqrt(ab)."""
    return (eps - (1 - alpha_bar_t) ** 0.5 * x_t) / alpha_bar_t ** 0.5


def v_target(x0, noise, alpha_bar_t):
    """The v-prediction training target: v = sqrt(ab) noise - sqrt(1 - ab) x0."""
    return alpha_bar_t ** 0.5 * noise - (1 - alpha_bar_t) ** 0.5 * x0
