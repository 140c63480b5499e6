"""ddim.py against diffusers' DDIMScheduler / DDIMInverseScheduler configured as Stable Diffusion's."""
import pytest
import torch

from diffedit import ddim
from oracles import SD_SCHEDULER

diffusers = pytest.importorskip("diffusers")



def test_schedule_and_grid_equal_diffusers_sd_config():
    sched = diffusers.DDIMScheduler(**SD_SCHEDULER)
    sched.set_timesteps(50)
    assert torch.equal(ddim.timesteps(50).flip(0), sched.timesteps)
    assert ddim.timesteps(50)[0] == 1 and ddim.timesteps(50)[-1] == 981
    assert torch.allclose(ddim.alphas_cumprod(dtype=torch.float32), sched.alphas_cumprod, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_step_equals_diffusers_at_every_step(dtype, prediction_type, steps):
    sched = diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    alpha_bar = ddim.alphas_cumprod(dtype=dtype)
    grid = ddim.timesteps(steps)
    levels = torch.cat([torch.tensor([-1]), grid])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    for i in range(len(levels) - 1, 0, -1):
        out = torch.randn(x.shape, generator=g, dtype=dtype)
        ref = sched.step(out, int(levels[i]), x).prev_sample
        ab_t, ab_prev = ddim.alpha_bar_at(levels[i], alpha_bar), ddim.alpha_bar_at(levels[i - 1], alpha_bar)
        eps = out if prediction_type == "epsilon" else ddim.v_to_eps(x, out, ab_t)
        ours = ddim.ddim_step(x, eps, ab_t, ab_prev)
        tol = 1e-5 if dtype == torch.float32 else 1e-6  # diffusers keeps alphas_cumprod in fp32
        assert ((ours - ref).norm() / ref.norm()) < tol, f"step at t={int(levels[i])}"
        x = ref


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_reverse_step_equals_diffusers_inverse_scheduler(prediction_type):
    sched = diffusers.DDIMInverseScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    sched.set_timesteps(50)
    assert torch.equal(sched.timesteps, ddim.timesteps(50))
    alpha_bar = ddim.alphas_cumprod(dtype=torch.float32)
    levels = torch.cat([torch.tensor([-1]), ddim.timesteps(50)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for i in range(1, len(levels)):
        out = torch.randn(x.shape, generator=g)
        ref = sched.step(out, int(levels[i]), x).prev_sample
        # diffusers evaluates the model at the destination timestep and reads the output there
        ab_prev, ab_t = ddim.alpha_bar_at(levels[i - 1], alpha_bar), ddim.alpha_bar_at(levels[i], alpha_bar)
        eps = out if prediction_type == "epsilon" else ddim.v_to_eps(x, out, ab_prev)
        ours = ddim.ddim_reverse_step(x, eps, ab_prev, ab_t)
        assert ((ours - ref).norm() / ref.norm()) < 1e-5, f"level {int(levels[i])}"
        x = ref


def test_reverse_step_inverts_step_for_constant_eps():
    alpha_bar = ddim.alphas_cumprod()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    ab_t, ab_prev = alpha_bar[501], alpha_bar[481]
    back = ddim.ddim_step(ddim.ddim_reverse_step(x, eps, ab_prev, ab_t), eps, ab_t, ab_prev)
    assert torch.allclose(back, x, rtol=0, atol=1e-12)


def test_v_and_eps_conversions_are_inverse_and_match_training_target():
    ab = ddim.alphas_cumprod()[300]
    x0, noise = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    x_t = ddim.add_noise(x0, noise, ab)
    v = ddim.v_target(x0, noise, ab)
    assert torch.allclose(ddim.v_to_eps(x_t, v, ab), noise, atol=1e-12)
    assert torch.allclose(ddim.eps_to_v(x_t, noise, ab), v, atol=1e-12)
    assert torch.allclose(ddim.predict_x0(x_t, noise, ab), x0, atol=1e-12)


def test_timesteps_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="steps"):
        ddim.timesteps(0)
    with pytest.raises(ValueError, match="steps"):
        ddim.timesteps(1001)
