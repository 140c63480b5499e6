"""diffedit.flow, SD3's flow-matching schedule, against diffusers' FlowMatchEulerDiscreteScheduler: the shifted
sigma grid (shift 3.0 and 1.0) bit for bit, a sampling step and the forward process (``scale_noise``) to float32
rounding, the strength's level as SD3's img2img pipeline starts; the model gets t = 1000 s in chunks; the mask of
velocity differences equals the mask of the implied noises' differences (the paper's D up to a scale); the
Euler inversion's round trip on a random tiny MMDiT shrinks with the number of steps."""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_
from diffedit import masking
from diffedit.edit import decode
from diffedit.flow import FlowDenoiser, sigmas
from diffedit.conditioning import Conditioning
from diffedit.inversion import encode
from diffedit.models import PRESETS, StableDiffusion3

diffusers = pytest.importorskip("diffusers")


def scheduler(k: float, steps: int):
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift=k)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("k", [3.0, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50, 100])
def test_sigma_grid_and_timesteps_equal_diffusers_scheduler(k, steps):
    ref = scheduler(k, steps)
    grid = sigmas(steps, k)
    assert torch.equal(grid.float(), ref.sigmas[:-1]) and ref.sigmas[-1] == 0
    assert torch.equal(grid.float() * 1000, ref.timesteps)
    levels = FlowDenoiser(None, k).levels(1.0, steps)  # x_0's 0, then the grid ascending: the sampling path reversed
    assert torch.equal(levels.flip(0).float(), ref.sigmas)


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_strength_level_is_where_sd3_img2img_starts(strength):
    """StableDiffusion3Img2ImgPipeline.get_timesteps: the first t_start = steps - steps * strength grid steps are
    skipped; encoding to ratio ``strength`` reaches the level it starts from."""
    steps = 20
    ref = scheduler(3.0, steps)
    t_start = int(steps - steps * strength)
    assert FlowDenoiser(None).strength_level(strength, steps).float() == ref.sigmas[t_start]


def test_sampling_steps_equal_flow_match_euler_step():
    steps, gen = 6, torch.Generator().manual_seed(0)
    ref, d = scheduler(3.0, steps), FlowDenoiser(None, 3.0)
    levels = d.levels(1.0, steps)
    x = torch.randn(2, 16, 8, 8, generator=gen)
    y = x.clone()
    for i, t in enumerate(ref.timesteps):  # from s = 1 down to 0, the scheduler's counter advancing
        v = torch.randn(2, 16, 8, 8, generator=gen)
        x = ref.step(v, t, x).prev_sample
        a = len(levels) - 1 - i
        y = d.step(y, v, levels[a], levels[a - 1])
        assert torch.allclose(y, x, rtol=0, atol=1e-6), i


def test_add_noise_equals_scale_noise():
    gen = torch.Generator().manual_seed(1)
    ref, d = scheduler(3.0, 10), FlowDenoiser(None, 3.0)
    x0, noise = torch.randn(3, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    for level in d.levels(1.0, 10)[1:]:
        t = (level.float() * 1000).reshape(1)
        assert torch.equal(d.add_noise(x0, noise, level), ref.scale_noise(x0, t, noise)), level


def test_the_model_gets_t_1000_s_in_chunks_of_max_batch():
    seen = []

    def model(x, t, cond):
        seen.append((x.shape[0], t.tolist()))
        return x * t[:, None, None, None]
    d = FlowDenoiser(model, 3.0, max_batch=2)
    x, level = torch.ones(5, 1, 1, 1), d.levels(0.5, 10)[-1]
    out = d(x, level, torch.zeros(1, 3, 4))
    assert [n for n, _ in seen] == [2, 2, 1]
    assert torch.equal(out.flatten(), torch.full((5,), level.float().item() * 1000))


def tiny_mmdit(seed: int = 0):
    net = randomize_(StableDiffusion3(PRESETS["tiny-sd3"]).mmdit, seed=seed).double().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    m = net.cfg
    texts = [Conditioning(torch.randn(1, 7, m.context_dim, generator=gen, dtype=torch.float64),
                          torch.randn(1, m.pooled_dim, generator=gen, dtype=torch.float64)) for _ in range(2)]
    x0 = torch.randn(1, m.in_channels, 8, 8, generator=gen, dtype=torch.float64)
    return FlowDenoiser(lambda x, t, c: net(x, t, c.context, c.y), PRESETS["tiny-sd3"].flow_shift), x0, texts


def test_velocity_difference_mask_equals_the_implied_noise_difference_mask():
    """e_hat = x_s + (1 - s) v, so at a fixed x_s the maps differ by the factor (1 - s): the rescaled maps agree,
    masking.py unchanged."""
    d, x0, texts = tiny_mmdit()
    implied = d.with_model(lambda x, t, c: x + (1 - t.double()[:, None, None, None] / 1000) * d.model(x, t, c))
    noises = masking.noised_latents(d, x0, 4, 0.5, 10, torch.Generator().manual_seed(0))
    s = noises.t.item()
    (d_v,), (d_e,) = (masking.noise_difference_maps(den, noises, texts, [(0, 1)], [4])[0].values()
                      for den in (d, implied))
    # s is read back from the float32 timestep the model gets: equal to float32 rounding
    assert torch.allclose(d_e, (1 - s) * d_v, rtol=1e-6, atol=0)
    assert torch.allclose(masking.normalize(d_e[None]), masking.normalize(d_v[None]), rtol=0, atol=1e-6)


@torch.no_grad()
def test_euler_inversion_round_trip_error_shrinks_with_steps():
    """Encode to ratio 1 (s = 1) with the text, decode with the same text and no guidance: the Euler inversion's
    O(ds^2) errors per step add up to a drift that halves, about, each time the steps double (first order)."""
    d, x0, (text, _) = tiny_mmdit()
    errors = []
    for steps in (5, 10, 20):
        levels = d.levels(1.0, steps)
        y = decode(d, encode(d, x0, text, levels, steps).latents[-1], levels, text, text, 1.0)
        errors.append(((y - x0).norm() / x0.norm()).item())
    print(f"[round trip] sd3 euler, tiny MMDiT, 5/10/20 steps: {errors}")
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 2
