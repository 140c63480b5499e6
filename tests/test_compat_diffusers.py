"""``compat="diffusers"`` against diffusers' own (deprecated) ``StableDiffusionDiffEditPipeline``, same weights.

A tiny random SD1-style model is written as a diffusers folder by diffusers' / transformers' ``save_pretrained``;
diffusers' pipeline runs on those modules, ours loads the folder with ``DiffEdit.from_pretrained``.

What compat mode reproduces (and the paper-faithful default does not):
  * inversion with classifier-free guidance (7.5) under the source prompt, negative prompt "";
  * decoding that blends one step late: after the step t -> t_prev it blends with the inverted latent at t, so
    the final background is the inverted latent at the first grid timestep, never x_0;
  * int(fraction * steps) grid steps for the inversion / decoding ratio and for the mask's strength, where the
    default rounds (ratio 0.7 at 5 steps: 3 steps, not 4);
  * the mask's clamp rule: divide by 3 x mean even when the map's maximum is below it ("clamp-mean"); the
    default "quantile" divides by D's 98th percentile (broad edits would otherwise get shrunken or empty masks).
Pitfalls of the diffusers pipeline, documented here and deliberately NOT reproduced:
  * ``generate_mask`` unpacks ``encode_prompt``'s (positive, negative) as (negative, positive), so its "guided"
    estimates are eps_text + g (eps_neg - eps_text). With equal negative prompts the difference of the two is
    (1 - g)(eps_target - eps_source): the mask's CFG (2x the UNet rows) only rescales D (by 6.5, where unswapped
    CFG would give 7.5), which the clamp normalisation cancels; the map equals ours, unguided;
  * it VAE-encodes the image n times (one batch of n) and *samples* the posterior each time (``invert`` samples
    too); ours takes the posterior mean once. Made equal here by patching ``latent_dist.sample`` to the mean,
    after which diffusers' mask noises are the very numbers our generator draws for the same seed;
  * its clamp is at 3 x the mean over the whole batch of maps: one image's mask depends on the other images;
  * ``invert`` and ``__call__`` must be given the same strength and steps (diffusers checks only the count);
  * ``DDIMInverseScheduler`` must be built from SD's scheduler config (scaled_linear, clip_sample False,
    set_alpha_to_one False, steps_offset 1), or its levels are not the sampler's;
  * ``__call__``'s negative prompt defaults to "": its docs pass the source prompt, as compat does.
Tolerances: fp32 throughout; relative errors (||a - b|| / ||b||) below 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_, rel_err, report
from steps import ddim_encode, difference_maps, masked_decode, noised
from oracles import SD_SCHEDULER, SOURCE, TARGET, astronaut, diffedit_pipeline

from diffedit import ddim, images, masking
from diffedit.denoiser import Denoiser
from diffedit.denoiser import encoding_steps as num_encoding_steps
from diffedit.inversion import Trajectory
from measure import ModuleCounter
from diffedit.pipeline import DiffEdit
from diffedit.settings import recipe

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.pipelines.deprecated.stable_diffusion_diffedit import (  # noqa: E402
    pipeline_stable_diffusion_diffedit as dd_module)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

STEPS, RATIO, GUIDANCE, N, STRENGTH, SEED = 10, 0.8, 7.5, 2, 0.5, 0
K = num_encoding_steps(RATIO, STEPS)  # 8 = int(0.8 * 10) too: diffusers' count
SIDE = 32  # image side (a multiple of de.multiple = 4); latents 16 x 16

UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=2, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407)


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_clip_tokenizer):
    """diffusers' pipeline on random tiny modules, and our DiffEdit loaded from the same weights on disk."""
    torch.manual_seed(0)
    unet = randomize_(UNet2DConditionModel(**UNET), seed=1).eval()
    vae = randomize_(AutoencoderKL(**VAE), seed=2).eval()
    text = randomize_(CLIPTextModel(CLIPTextConfig(**TEXT)), seed=3).eval()
    root = tmp_path_factory.mktemp("tiny-sd-diffusers")
    for sub, net in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        net.save_pretrained(root / sub)
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(root / "scheduler")
    pipe = diffedit_pipeline(unet, vae, text, hf_clip_tokenizer, DDIMScheduler.from_pretrained(root / "scheduler"))
    de = DiffEdit.from_pretrained(str(root), dtype=torch.float32)  # the fp32 oracle's precision
    assert SIDE % de.multiple == 0
    return pipe, de


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' ``latent_dist.sample()`` -> the mean, the x_0 we use (it consumes no random numbers then)."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def x0_of(de, pil) -> torch.Tensor:
    return de.encode_image(images.to_tensor(pil, de.multiple, de.device, de.dtype))


# --- 1. inversion ---------------------------------------------------------------------------------------------------

def test_cfg_inversion_matches_diffusers_invert_at_every_level(models, posterior_mean):
    pipe, de = models
    pil = astronaut(SIDE)
    x0 = x0_of(de, pil)
    with torch.no_grad():  # same x_0: our posterior mean vs diffusers' scaled posterior mean, from the same pixels
        ref_x0 = pipe.vae.encode(pipe.image_processor.preprocess(pil)).latent_dist.mean * pipe.vae.config.scaling_factor
    err_x0 = rel_err(x0, ref_x0)
    report("x_0 (VAE posterior mean, scaled)", err_x0)
    assert err_x0 < 1e-4
    ref = pipe.invert(prompt=SOURCE, image=pil, inpaint_strength=RATIO, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE).latents  # (1, k, C, h, w), most noisy first, x_0 excluded
    ours = ddim_encode(de.eps, x0, de.encode_prompt([SOURCE]), RATIO, STEPS, de.alpha_bar, guidance=GUIDANCE,
                       uncond=de.encode_prompt([""]))
    assert ref.shape == (1, K, *x0.shape[1:]) and ours.latents.shape == (K + 1, *x0.shape)
    ours_in_their_order = ours.latents[1:].flip(0)[:, 0]  # drop x_0, most noisy first
    errs = [rel_err(a, b) for a, b in zip(ours_in_their_order, ref[0])]
    report(f"CFG inversion, per level (t = {ours.timesteps[1:].flip(0).tolist()}), max", max(errs))
    assert max(errs) < 1e-4, errs
    # the paper's unconditional inversion is a different trajectory
    plain = ddim_encode(de.eps, x0, de.encode_prompt([""]), RATIO, STEPS, de.alpha_bar)
    assert rel_err(plain.latents[-1], ref[0, 0]) > 1e-2


# --- 2. decoding ----------------------------------------------------------------------------------------------------

def box_mask(h: int, w: int) -> torch.Tensor:
    """A binary (h, w) mask at latent size: an off-centre box, so both regions are large."""
    m = torch.zeros(h, w)
    m[h // 4: 3 * h // 4, w // 8: w // 2 + 2] = 1
    return m


def test_compat_decoding_matches_diffusers_call_and_default_decoding_ends_on_x0(models, posterior_mean):
    pipe, de = models
    pil = astronaut(SIDE)
    x0 = x0_of(de, pil)
    inv = pipe.invert(prompt=SOURCE, image=pil, inpaint_strength=RATIO, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE).latents
    mask = box_mask(*x0.shape[-2:])
    ref = pipe(prompt=TARGET, mask_image=mask[None, None].clone(),  # (preprocess_mask binarises in place)
               image_latents=inv, inpaint_strength=RATIO, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               negative_prompt=SOURCE, output_type="latent").images
    # diffusers' inverted latents as our trajectory: x_0 first, then the levels -1 < 1 < 101 < ... ascending
    levels = torch.cat([torch.tensor([-1]), ddim.timesteps(STEPS)[:K]])
    traj = Trajectory(torch.cat([x0[None], inv[0].flip(0)[:, None]]), levels, STEPS)
    cond, ref_emb = de.encode_prompt([TARGET]), de.encode_prompt([SOURCE])
    blend = mask[None, None]
    ours = masked_decode(de.eps, traj, cond, ref_emb, GUIDANCE, de.alpha_bar, blend,
                         blend_late=recipe("diffusers").blend_late)
    err = rel_err(ours, ref)
    report("compat masked decoding vs diffusers __call__ (output_type='latent')", err)
    assert ours.shape == ref.shape == x0.shape and err < 1e-4
    # The background: diffusers' is the inverted latent at the first grid timestep (t = 1), never x_0.
    out = (1 - mask).bool().expand_as(ref)
    assert torch.equal(ref[out], inv[0, -1][out[0]])
    bg_gap = rel_err(ref[out], x0[out])
    report("diffusers' background vs x_0 (the one-step-late blend)", bg_gap)
    assert bg_gap > 1e-3
    # The paper-faithful default blends at the same level: its background is x_0 exactly, so it differs.
    paper = masked_decode(de.eps, traj, cond, ref_emb, GUIDANCE, de.alpha_bar, blend)
    assert torch.equal(paper[out], x0[out])
    assert rel_err(paper, ref) > 1e-3
    assert rel_err(paper[~out], ref[~out]) > 1e-4  # the edited region differs too (different last blend)
    # The same through the public API, the mask given as a latent-size tensor (our own CFG inversion included)
    api = de.edit(pil, TARGET, SOURCE, ratio=RATIO, steps=STEPS, guidance=GUIDANCE, mask=mask, compat="diffusers")
    err_api = rel_err(api.latents[None], ref)
    report("DiffEdit.edit(mask=..., compat='diffusers') vs diffusers __call__", err_api)
    assert err_api < 1e-4
    api_paper = de.edit(pil, TARGET, SOURCE, ratio=RATIO, steps=STEPS, guidance=GUIDANCE, mask=mask)
    assert torch.equal(api_paper.latents[None][out], x0[out]) and rel_err(api_paper.latents[None], ref) > 1e-3


# --- 3. mask ----------------------------------------------------------------------------------------------------

class TorchSpy:
    """Stands in for ``torch`` inside diffusers' pipeline module: records what ``torch.abs`` is applied to
    (|eps_target_guided - eps_source_guided|, per noise map), passes everything else through."""

    def __init__(self):
        self.abs_inputs = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def abs(self, x, *args, **kwargs):
        self.abs_inputs.append(x.detach().clone())
        return torch.abs(x, *args, **kwargs)


@pytest.fixture
def spies(monkeypatch, posterior_mean):
    """Record diffusers' mask noises and |guided difference|; the noises come from the generator we pass."""
    spy, noises = TorchSpy(), []

    def recording_randn(*args, **kwargs):
        out = randn_tensor(*args, **kwargs)
        noises.append(out.clone())
        return out

    randn_tensor = dd_module.randn_tensor
    monkeypatch.setattr(dd_module, "torch", spy)
    monkeypatch.setattr(dd_module, "randn_tensor", recording_randn)
    return spy, noises


def diffusers_mask(pipe, image, source=SOURCE, target=TARGET, seed=SEED):
    return pipe.generate_mask(image=image, source_prompt=source, target_prompt=target, num_maps_per_mask=N,
                              mask_encode_strength=STRENGTH, mask_thresholding_ratio=3.0,
                              num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              generator=torch.Generator().manual_seed(seed))


def our_raw_map(de, pil, seed=SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Our standard-normal draws (as masking.noised_latents draws them) and our raw map D (h, w)."""
    x0 = x0_of(de, pil)
    draws = torch.randn((N, *x0.shape), generator=torch.Generator().manual_seed(seed))
    noises = noised(x0, N, STRENGTH, STEPS, de.alpha_bar, torch.Generator().manual_seed(seed))
    d = difference_maps(de.eps, noises, de.encode_prompt([TARGET]), de.encode_prompt([SOURCE]))
    return draws[:, 0], d[0]


def test_mask_matches_diffusers_generate_mask_with_the_same_noises(models, spies):
    """Equal randomness: diffusers' ``latent_dist.sample`` patched to the mean (ours is the mean), and the same
    seeded generator: with sampling off, diffusers' one ``randn_tensor`` call draws the numbers ours does."""
    pipe, de = models
    spy, their_noises = spies
    pil = astronaut(SIDE)
    ref_binary = torch.from_numpy(diffusers_mask(pipe, pil))[0]  # (h, w) ints 0 / 1
    draws, d = our_raw_map(de, pil)
    assert len(their_noises) == 1 and torch.equal(their_noises[0], draws)
    # Their raw map: mean over noises and channels of |guided target - guided source|. Because of the swapped
    # unpacking it is (g - 1) |eps_T - eps_S| = 6.5 D, where correctly unpacked CFG would give g D = 7.5 D.
    (diff,) = spy.abs_inputs
    their_d = diff.abs().reshape(N, -1, *d.shape).mean((0, 1))
    scale = ((their_d * d).sum() / (d * d).sum()).item()
    err_raw = rel_err(their_d, (GUIDANCE - 1) * d)
    report(f"diffusers' raw map vs (g - 1) x ours (fitted factor {scale:.6f})", err_raw)
    assert scale == pytest.approx(GUIDANCE - 1, rel=1e-4) and err_raw < 1e-4
    # after the clamp normalisation the factor is gone: the continuous maps agree, the binary masks are equal.
    # Compat uses diffusers' rule, "clamp-mean": clip at 3 x mean and divide by 3 x mean.
    hi = 3.0 * their_d.mean()
    their_map = their_d.clamp(0, hi) / hi  # generate_mask's step 8 on its own raw map
    ours = de.mask(pil, TARGET, SOURCE, n=N, strength=STRENGTH, seed=SEED, steps=STEPS, normalization="clamp-mean")
    err = rel_err(ours.map, their_map)
    report("clamp-normalised mask map vs diffusers'", err)
    assert err < 1e-4
    margin = (ours.map - 0.5).abs().min().item()
    assert torch.equal(ours.binary, ref_binary.bool()), f"closest value to the threshold is {margin:.2e} away"
    assert 0 < ours.binary.sum() < ours.binary.numel()  # a real mask: neither empty nor full
    # Where the map's maximum is below clamp_ratio x mean (broad edits) diffusers' rule never reaches 1 and its
    # mask shrinks, possibly to nothing; our "clamp" divides by the maximum there instead. Compat must
    # follow diffusers: a clamp ratio 1.5 x max / mean puts this image in that regime.
    ratio = 1.5 * (d.max() / d.mean()).item()
    wide = torch.from_numpy(pipe.generate_mask(image=pil, source_prompt=SOURCE, target_prompt=TARGET,
                                               num_maps_per_mask=N, mask_encode_strength=STRENGTH,
                                               mask_thresholding_ratio=ratio, num_inference_steps=STEPS,
                                               guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED))
                            )[0].bool()
    compat_rule = masking.binarize(masking.normalize(d[None], "clamp-mean", ratio))[0]
    default_rule = masking.binarize(masking.normalize(d[None], "clamp", ratio))[0]
    print(f"[compat] clamp ratio {ratio:.2f}: diffusers' mask {int(wide.sum())} pixels, clamp-mean "
          f"{int(compat_rule.sum())}, our clamp {int(default_rule.sum())}")
    assert torch.equal(compat_rule, wide) and not torch.equal(default_rule, wide)


def test_diffusers_mask_of_an_image_depends_on_the_rest_of_the_batch_ours_does_not(models, spies):
    """generate_mask clamps at 3 x the mean of ALL maps of the batch: with a second image beside it, the first
    image's mask changes although its own map D does not. masking.normalize clamps each image at its own mean."""
    pipe, de = models
    spy, _ = spies
    first, second = astronaut(SIDE), astronaut(SIDE, crop=(256, 256, 512, 512))  # the face; the bottom-right quarter
    alone = torch.from_numpy(diffusers_mask(pipe, first))[0]
    batch = pipe.generate_mask(image=[first, second], source_prompt=[SOURCE] * 2, target_prompt=[TARGET] * 2,
                               num_maps_per_mask=N, mask_encode_strength=STRENGTH, mask_thresholding_ratio=3.0,
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                               generator=torch.Generator().manual_seed(SEED))
    d_alone = spy.abs_inputs[0].abs().mean((0, 1))                                       # (h, w)
    d_batch = spy.abs_inputs[1].abs().reshape(2, N, *spy.abs_inputs[1].shape[1:]).mean((1, 2))  # (2, h, w)
    err = rel_err(d_batch[0], d_alone)
    report("first image's raw map, in the batch vs alone", err)
    assert err < 1e-5  # the same noises (a prefix of the same generator's draws): the same map D ...
    assert d_batch[1].mean() != d_alone.mean()
    changed = int((torch.from_numpy(batch[0]) != alone).sum())
    print(f"[compat] clamp at 3 x {d_alone.mean():.5f} alone, 3 x {d_batch.mean():.5f} in the batch: "
          f"{changed} of {alone.numel()} mask pixels of the first image change")
    assert changed > 0  # ... but a different mask
    # ours: per-image clamp (compat's diffusers rule and the default alike), so the first image's mask is the
    # same with or without the second, and equals diffusers' mask of the image alone
    for mode in ("clamp-mean", "clamp"):
        ours_batch = masking.binarize(masking.normalize(d_batch, mode))[0]
        ours_alone = masking.binarize(masking.normalize(d_alone[None], mode))[0]
        assert torch.equal(ours_batch, ours_alone)
    assert torch.equal(masking.binarize(masking.normalize(d_batch, "clamp-mean"))[0], alone.bool())


# --- 4. a whole edit: equal results, and the cost ------------------------------------------------------------------

def diffusers_edit(pipe, pil, steps=STEPS, ratio=RATIO, strength=STRENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole diffusers edit as its docs chain it (generate_mask -> invert -> __call__), all else default
    (guidance 7.5 everywhere, clamp ratio 3); returns the binary latent mask and the edited latent."""
    mask = pipe.generate_mask(image=pil, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=N,
                              mask_encode_strength=strength, num_inference_steps=steps,
                              generator=torch.Generator().manual_seed(SEED))
    inv = pipe.invert(prompt=SOURCE, image=pil, inpaint_strength=ratio, num_inference_steps=steps).latents
    latents = pipe(prompt=TARGET, mask_image=mask, image_latents=inv, inpaint_strength=ratio,
                   num_inference_steps=steps, negative_prompt=SOURCE, output_type="latent").images[0]
    return torch.from_numpy(mask)[0].bool(), latents


def our_edit(de, pil, compat, steps=STEPS, ratio=RATIO, strength=STRENGTH):
    return de.edit(pil, TARGET, SOURCE, ratio=ratio, n=N, strength=strength, steps=steps, guidance=GUIDANCE,
                   seed=SEED, compat=compat)


@pytest.fixture(scope="module")
def whole_edits(models):
    """One default diffusers edit, our compat edit and our paper-faithful edit, with every UNet evaluation and
    VAE encoding counted (sum of batch sizes, and calls: ``measure.ModuleCounter`` on the UNets and VAE encoders)."""
    pipe, de = models
    pil = astronaut(SIDE)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
        with ModuleCounter(pipe.unet) as unet, ModuleCounter(pipe.vae.encoder) as vae:
            mask, latents = diffusers_edit(pipe, pil)
        out["diffusers"] = dict(mask=mask, latents=latents, unet=unet.rows, vae_calls=vae.calls, vae_rows=vae.rows)
    for compat in ("diffusers", None):
        with pytest.MonkeyPatch.context() as mp, ModuleCounter(de.model.unet) as unet, \
                ModuleCounter(de.model.first_stage_model.encoder) as vae:
            modes, normalize = [], masking.normalize
            mp.setattr(masking, "normalize", lambda d, mode="clamp", *a: modes.append(mode) or normalize(d, mode, *a))
            r = our_edit(de, pil, compat)
            out[f"ours-{compat}"] = dict(mask=r.mask_map > 0.5, latents=r.latents, unet=unet.rows,
                                         vae_calls=vae.calls, vae_rows=vae.rows, normalization=modes)
    return out


def test_compat_edit_equals_a_whole_diffusers_edit_with_its_defaults(whole_edits):
    ref, ours = whole_edits["diffusers"], whole_edits["ours-diffusers"]
    assert ours["normalization"] == ["clamp-mean"] and whole_edits["ours-None"]["normalization"] == ["quantile"]
    assert torch.equal(ours["mask"], ref["mask"]) and 0 < ref["mask"].sum() < ref["mask"].numel()
    # here max D < 3 mean D: the default "clamp" rule gives another mask, so compat needs diffusers' rule
    paper_mask = whole_edits["ours-None"]["mask"]
    print(f"[compat] mask pixels: diffusers {int(ref['mask'].sum())}, compat {int(ours['mask'].sum())}, "
          f"default {int(paper_mask.sum())}")
    assert not torch.equal(paper_mask, ref["mask"])
    err = rel_err(ours["latents"], ref["latents"])
    report("whole compat edit (mask, CFG inversion, late blend) vs diffusers, edited latent", err)
    assert err < 1e-4
    paper = whole_edits["ours-None"]
    gap = rel_err(paper["latents"], ref["latents"])
    report("paper-faithful default vs diffusers, edited latent", gap)
    assert gap > 1e-3


def unet_rows(n, k, who):
    """UNet rows (images through the UNet) of one edit with k = round(r * steps) encoding steps."""
    return {"ours-None": 2 * n + k + 2 * k,        # mask: n noises x (query, reference); plain inversion; CFG decode
            "ours-diffusers": 2 * n + 2 * k + 2 * k,  # compat: CFG inversion
            "diffusers": 4 * n + 2 * k + 2 * k}[who]   # mask with CFG: 4 rows per noise


def test_unet_and_vae_cost_of_an_edit_ours_vs_diffusers(whole_edits):
    for who, counts in whole_edits.items():
        assert counts["unet"] == unet_rows(N, K, who), (who, counts["unet"])
        print(f"[compat] {who}: {counts['unet']} UNet rows, {counts['vae_calls']} VAE encode calls "
              f"({counts['vae_rows']} images) at steps={STEPS}, n={N}, r={RATIO}")
    # the paper's setting, by the formulas just checked: 50 steps, n = 10, r = 0.8 -> k = 40
    k50 = num_encoding_steps(0.8, 50)
    assert (unet_rows(10, k50, "ours-None"), unet_rows(10, k50, "ours-diffusers"),
            unet_rows(10, k50, "diffusers")) == (140, 180, 200)
    # VAE: ours encodes the image once per edit; diffusers n times for the mask (one batch) and once to invert
    assert [(whole_edits[w]["vae_calls"], whole_edits[w]["vae_rows"]) for w in ("ours-None", "ours-diffusers")] \
        == [(1, 1), (1, 1)]
    assert (whole_edits["diffusers"]["vae_calls"], whole_edits["diffusers"]["vae_rows"]) == (2, N + 1)


def test_compat_counts_grid_steps_as_diffusers_does_int_not_round(models, posterior_mean):
    """diffusers takes int(r * steps) grid steps for the inversion and decoding and int(s * steps) for the mask
    level; the paper-faithful path rounds. With r * steps = 3.5 and s * steps = 1.5 they disagree: compat floors."""
    pipe, de = models
    pil = astronaut(SIDE)
    steps, ratio, strength = 5, 0.7, 0.3
    ref_mask, ref = diffusers_edit(pipe, pil, steps, ratio, strength)
    ours = our_edit(de, pil, "diffusers", steps, ratio, strength)
    assert ours.trajectory.timesteps.tolist() == [-1, 1, 201, 401]  # int(3.5) = 3 encoding steps
    assert torch.equal(ours.mask_map > 0.5, ref_mask)
    err = rel_err(ours.latents, ref)
    report("compat edit at r * steps = 3.5, s * steps = 1.5 vs diffusers", err)
    assert err < 1e-4
    # the default keeps rounding: 4 encoding steps, mask level 201 (diffusers: 1)
    assert num_encoding_steps(ratio, steps) == 4 and Denoiser(None, de.alpha_bar).strength_level(strength, steps) == 201
    assert our_edit(de, pil, None, steps, ratio, strength).trajectory.timesteps.tolist() == [-1, 1, 201, 401, 601]
    with pytest.raises(ValueError, match="diffusers"):  # int(0.1 * 5) = 0 steps: diffusers cannot run it either
        our_edit(de, pil, "diffusers", steps, 0.1, strength)
