"""The paper's three steps (inversion.py, masking.py, edit.py, denoiser.py) on a tiny random model."""
import numpy as np
import pytest
import torch

from diffedit import ddim, masking, settings
from diffedit.denoiser import Denoiser, encoding_steps
from diffedit.model_call import eps_model
from diffedit.models import StableDiffusion, preset, tokenize
from diffedit.pipeline import DiffEdit
from steps import ddim_encode, difference_maps, masked_decode, noised


@pytest.fixture(scope="module")
def tiny64():
    """A tiny random SD1-like model in fp64, its eps function, two prompt embeddings and an x_0."""
    torch.manual_seed(0)
    model = StableDiffusion(preset("tiny")).double().eval().requires_grad_(False)
    for p in model.unet.parameters():  # keep the random UNet's output moderate so DDIM stays well behaved
        p.mul_(0.5)
    alpha_bar = ddim.alphas_cumprod(dtype=torch.float64)
    eps = eps_model(model.unet, "epsilon", alpha_bar)
    ctx = model.cond_stage_model(tokenize(["", "a red circle", "a blue square"], model.cfg.text)).double()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, eps, alpha_bar, ctx, x0


def reconstruction_error(eps, alpha_bar, ctx, x0, steps, ratio=1.0):
    traj = ddim_encode(eps, x0, ctx[:1], ratio, steps, alpha_bar)
    y0 = masked_decode(eps, traj, ctx[:1], ctx[:1], 1.0, alpha_bar)
    return ((y0 - x0).norm() / x0.norm()).item()


def test_inversion_then_decoding_returns_x0_with_error_shrinking_in_steps(tiny64):
    _, eps, alpha_bar, ctx, x0 = tiny64
    errors = [reconstruction_error(eps, alpha_bar, ctx, x0, s) for s in (10, 25, 50, 100)]
    print("relative reconstruction error at 10/25/50/100 steps:", errors)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02


def test_trajectory_has_one_latent_per_level_up_to_ratio(tiny64):
    _, eps, alpha_bar, ctx, x0 = tiny64
    traj = ddim_encode(eps, x0, ctx[:1], 0.7, 50, alpha_bar)
    assert traj.latents.shape == (36, 1, 4, 8, 8)
    assert traj.timesteps.tolist() == [-1] + list(range(1, 682, 20))
    assert torch.equal(traj.latents[0], x0) and traj.ratio == pytest.approx(0.7)
    short = traj.truncate(0.3)
    assert torch.equal(short.latents, traj.latents[:16]) and short.timesteps[-1] == 281
    with pytest.raises(ValueError, match="beyond"):
        short.truncate(0.5)
    assert encoding_steps(0.001, 50) == 1
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            encoding_steps(bad, 50)


def test_strength_half_noises_at_timestep_481_with_independent_noises(tiny64):
    _, _, alpha_bar, _, x0 = tiny64
    assert Denoiser(None, alpha_bar).strength_level(0.5, 50) == 481
    noises = noised(x0, 10, 0.5, 50, alpha_bar, torch.Generator().manual_seed(0))
    assert noises.x_t.shape == (10, 1, 4, 8, 8) and noises.t == 481
    diffs = noises.x_t[1:] - noises.x_t[:1]
    assert (diffs.flatten(1).norm(dim=1) > 1.0).all()  # no noise is a copy of another


def test_identical_query_and_reference_give_an_empty_mask_not_nan(tiny64):
    _, eps, alpha_bar, ctx, x0 = tiny64
    noises = noised(x0, 3, 0.5, 50, alpha_bar, torch.Generator().manual_seed(0))
    d = difference_maps(eps, noises, ctx[1:2], ctx[1:2])
    for mode in masking.NORMALIZATIONS:
        dn = masking.normalize(d, mode)
        assert torch.equal(dn, torch.zeros_like(dn)), mode
        assert not masking.binarize(dn).any()


def test_difference_map_equals_plain_reimplementation_of_the_formula(tiny64):
    model, eps, alpha_bar, ctx, x0 = tiny64
    n = 4
    noises = noised(x0, n, 0.5, 50, alpha_bar, torch.Generator().manual_seed(3))
    d = difference_maps(eps, noises, ctx[1:3], ctx[:1], max_batch=5)
    for k, q in enumerate((ctx[1:2], ctx[2:3])):
        acc = torch.zeros(8, 8, dtype=torch.float64)
        for i in range(n):  # D = 1/(n C) sum_i sum_c |eps(x_t^i, Q) - eps(x_t^i, R)|
            x_t = noises.x_t[i]
            acc += (model.unet(x_t, torch.tensor([481]), q) - model.unet(x_t, torch.tensor([481]), ctx[:1])).abs()[0].sum(0)
        expected = acc / (n * 4)
        assert torch.allclose(d[k], expected, rtol=1e-10, atol=0)
        dn = masking.normalize(d[k:k + 1], "clamp")[0]
        hi = min(3 * expected.mean(), expected.max())
        assert torch.allclose(dn, expected.clamp(max=hi) / hi, rtol=1e-10, atol=0)
        assert dn.max() == 1
        mm = masking.normalize(d[k:k + 1], "minmax")[0]
        assert mm.min() == 0 and mm.max() == 1


def test_clamp_normalisation_reaches_one_when_the_edit_covers_most_of_the_image():
    d = torch.ones(1, 8, 8, dtype=torch.float64)
    d[0, :2] = 0.1  # a large region of high difference (a background edit): max(D) < 3 mean(D)
    for mode in ("quantile", "clamp"):
        m = masking.binarize(masking.normalize(d, mode))
        assert m[0, 2:].all() and not m[0, :2].any(), mode


def test_quantile_normalisation_equals_numpy_percentile_clip_and_rescale():
    d = torch.rand(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) ** 3
    for q in (0.98, 0.9, 1.0):
        got = masking.normalize(d, "quantile", quantile=q)
        for i in range(3):
            hi = np.quantile(d[i].numpy(), q)  # numpy's default linear interpolation, as torch.quantile
            assert np.allclose(got[i].numpy(), np.minimum(d[i].numpy(), hi) / hi, rtol=1e-12, atol=0)
        assert (got.flatten(1).amax(1) == 1).all()


def test_quantile_normalisation_keeps_a_broad_edit_whole_despite_a_few_extreme_cells():
    # a new background: D is broad (0.6) but peaks in 4 of 256 cells (1.6 %); clamp divides by the peak and
    # cuts the broad region below the threshold, the 98th percentile ignores the peak
    d = torch.full((1, 16, 16), 0.6, dtype=torch.float64)
    d[0, 6:10, 6:10] = 0.05  # the kept object
    d[0, 0, :4] = 1.5
    broad = d[0] >= 0.6
    assert masking.binarize(masking.normalize(d, "quantile"))[0].eq(broad).all()
    assert not masking.binarize(masking.normalize(d, "clamp"))[0, 8:].any()


def test_quantile_normalisation_of_an_edit_smaller_than_the_clipped_share_falls_back_to_the_maximum():
    d = torch.zeros(1, 16, 16, dtype=torch.float64)
    d[0, 3, 4:6] = torch.tensor([0.2, 0.4])  # 2 cells of 256: the 98th percentile is 0
    got = masking.normalize(d, "quantile")
    assert got[0, 3, 5] == 1 and got[0, 3, 4] == 0.5 and got.sum() == 1.5


def test_unknown_normalisation_or_quantile_is_refused_by_name():
    with pytest.raises(ValueError, match="normalisation mode must be one of quantile, clamp, minmax, clamp-mean"):
        masking.normalize(torch.ones(1, 4, 4), "percentile")
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\], got 1.5"):
        masking.normalize(torch.ones(1, 4, 4), quantile=1.5)


def test_dilate_grows_by_whole_cells_clipped_at_the_borders_and_zero_is_the_identity():
    m = torch.zeros(5, 6, dtype=torch.bool)
    m[0, 0] = m[3, 3] = True
    grown = torch.tensor([[1, 1, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [0, 0, 1, 1, 1, 0],
                          [0, 0, 1, 1, 1, 0],
                          [0, 0, 1, 1, 1, 0]], dtype=torch.bool)  # by hand: a 3 x 3 square around each cell
    assert torch.equal(masking.dilate(m, 1), grown)
    assert masking.dilate(m, 0) is m
    assert masking.dilate(m, 6).all() and not masking.dilate(torch.zeros(4, 4, dtype=torch.bool), 2).any()
    with pytest.raises(ValueError, match="dilate"):
        masking.dilate(m, -1)


@pytest.mark.parametrize("cells", [1, 2, 3])
def test_dilate_equals_a_reference_max_filter_on_batched_masks(cells):
    m = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(cells)) > 0.9
    ref = np.zeros(m.shape, dtype=bool)  # any cell within `cells` (Chebyshev distance) of a masked cell
    for *lead, i, j in np.argwhere(m.numpy()):
        ref[(*lead, slice(max(i - cells, 0), i + cells + 1), slice(max(j - cells, 0), j + cells + 1))] = True
    got = masking.dilate(m, cells)
    assert got.dtype == torch.bool and got.shape == m.shape and np.array_equal(got.numpy(), ref)


def test_normalisation_is_per_image_so_masks_do_not_depend_on_the_batch():
    d = torch.rand(3, 8, 8, dtype=torch.float64)
    alone = torch.cat([masking.normalize(d[i:i + 1]) for i in range(3)])
    d_scaled = d.clone()
    d_scaled[2] *= 100.0  # a wildly different neighbour must not change the others
    batch = masking.normalize(d_scaled)
    assert torch.equal(batch[:2], alone[:2])
    assert torch.allclose(batch[2], alone[2], rtol=1e-12)


def test_mask_of_one_query_does_not_depend_on_the_other_queries(tiny64):
    _, eps, alpha_bar, ctx, x0 = tiny64
    noises = noised(x0, 3, 0.5, 50, alpha_bar, torch.Generator().manual_seed(5))
    both = difference_maps(eps, noises, ctx[1:3], ctx[:1])
    alone = difference_maps(eps, noises, ctx[2:3], ctx[:1])
    assert torch.allclose(both[1], alone[0], rtol=1e-12, atol=0)


def test_all_zero_mask_returns_exactly_x0_and_all_one_mask_equals_encode_decode(tiny64):
    _, eps, alpha_bar, ctx, x0 = tiny64
    traj = ddim_encode(eps, x0, ctx[:1], 0.6, 20, alpha_bar)
    zeros = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    out = masked_decode(eps, traj, ctx[1:2], ctx[:1], 7.5, alpha_bar, zeros)
    assert torch.equal(out, x0)
    ones = masked_decode(eps, traj, ctx[1:2], ctx[:1], 7.5, alpha_bar, torch.ones_like(zeros))
    plain = masked_decode(eps, traj, ctx[1:2], ctx[:1], 7.5, alpha_bar, None)
    assert torch.equal(ones, plain)


def test_blending_happens_at_the_same_level_and_one_step_late_in_the_diffusers_recipe(tiny64):
    _, eps, alpha_bar, ctx, x0 = tiny64
    traj = ddim_encode(eps, x0, ctx[:1], 0.5, 10, alpha_bar)
    half = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    half[..., :4] = 1
    seen = {}
    masked_decode(eps, traj, ctx[1:2], ctx[:1], 7.5, alpha_bar, half,
                  callback=lambda i, y: seen.setdefault(i, y.clone()))
    # after step i (from level L - i to L - i - 1) the background equals the encoded latent at level L - i - 1
    last = len(traj.timesteps) - 1
    for i, y in seen.items():
        assert torch.equal(y[..., 4:], traj.latents[last - i - 1][..., 4:])
    late = {}
    out = masked_decode(eps, traj, ctx[1:2], ctx[:1], 7.5, alpha_bar, half,
                        blend_late=settings.recipe("diffusers").blend_late, callback=lambda i, y: late.setdefault(i, y.clone()))
    for i, y in late.items():
        assert torch.equal(y[..., 4:], traj.latents[last - i][..., 4:])
    assert torch.equal(out[..., 4:], traj.latents[1][..., 4:])  # diffusers never puts x_0 back
    with pytest.raises(ValueError, match="compat"):
        settings.recipe("a1111")


def test_batched_pass_equals_row_by_row_and_cfg_combines_both_halves():
    torch.manual_seed(0)
    model = StableDiffusion(preset("tiny")).eval().requires_grad_(False)
    eps = eps_model(model.unet, "epsilon", ddim.alphas_cumprod())
    x = torch.randn(5, 4, 8, 8)
    t = torch.tensor([1, 101, 481, 481, 981])
    ctx = torch.randn(5, 77, 32)
    with torch.no_grad():
        batched = Denoiser(eps, ddim.alphas_cumprod(), max_batch=64)(x, t, ctx)
        chunked = Denoiser(eps, ddim.alphas_cumprod(), max_batch=2)(x, t, ctx)
        rows = torch.cat([model.unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]) for i in range(5)])
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()
        assert rel(batched, rows) < 1e-5 and rel(chunked, rows) < 1e-5
        d = Denoiser(eps, ddim.alphas_cumprod())
        g = d.guided(x[:2], 481, ctx[:2], ctx[2:3], 7.5)
        e_c, e_u = d(x[:2], 481, ctx[:2]), d(x[:2], 481, ctx[2:3])
        assert rel(g, e_u + 7.5 * (e_c - e_u)) < 1e-5
    with pytest.raises(ValueError, match="max_batch"):
        Denoiser(eps, ddim.alphas_cumprod(), max_batch=0)


def test_v_prediction_wrapper_returns_eps():
    alpha_bar = ddim.alphas_cumprod()
    x0, noise = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([100, 700])
    ab = alpha_bar[t].reshape(-1, 1, 1, 1)
    x_t = ddim.add_noise(x0, noise, ab)
    oracle_v = lambda x, tt, c: ddim.v_target(x0, noise, ab)  # a perfect v-model
    assert torch.allclose(eps_model(oracle_v, "v_prediction", alpha_bar)(x_t, t, None), noise, atol=1e-10)
    with pytest.raises(ValueError, match="prediction_type"):
        eps_model(oracle_v, "sample", alpha_bar)


@pytest.fixture(scope="module")
def tiny_de():
    torch.manual_seed(0)
    return DiffEdit(StableDiffusion(preset("tiny")))


def picture(seed=0):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def test_sdedit_starts_from_fresh_noise_at_the_ratio_and_is_seeded(tiny_de):
    run = lambda seed: tiny_de.edit(picture(), "a red circle", method="sdedit", ratio=0.5, steps=10, seed=seed).latents
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_masked_sdedit_keeps_x0_outside_the_mask_and_equals_sdedit_under_an_all_ones_mask(tiny_de):
    kw = dict(ratio=0.5, steps=10, seed=3)
    x0 = tiny_de.encode_image(images_tensor(tiny_de, picture()))[0]
    h, w = x0.shape[-2:]
    zero = tiny_de.edit(picture(), "a red circle", method="masked-sdedit", mask=torch.zeros(h, w), **kw)
    assert torch.equal(zero.latents, x0)  # the last step puts x_0 itself back
    ones = tiny_de.edit(picture(), "a red circle", method="masked-sdedit", mask=torch.ones(h, w), **kw)
    sd = tiny_de.edit(picture(), "a red circle", method="sdedit", **kw)
    assert torch.equal(ones.latents, sd.latents)  # the same fresh noise: only the mask differs
    own = tiny_de.edit(picture(), "a red circle", method="masked-sdedit", source="a blue square", **kw)
    ref = tiny_de.mask(picture(), "a red circle", source="a blue square", steps=10, seed=3)
    assert torch.equal(own.mask_map, ref.map)  # DiffEdit's own mask (step 1) when none is given


def images_tensor(de, pil):
    from diffedit import images
    return images.to_tensor(pil, de.multiple, de.device, de.dtype)
