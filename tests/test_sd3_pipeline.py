"""DiffEdit on SD3 / SD3.5 end to end, on tiny random SD3 folders written by diffusers' save_pretrained (CLIP MLPs
37 wide, with and without T5): ``generate`` equals diffusers' StableDiffusion3Pipeline (same weights and initial
noise, negative prompt "", its FlowMatchEulerDiscreteScheduler; guidance 7.5 and 1.0); ``edit`` with an all-zero
mask gives back the VAE reconstruction, with an all-ones mask Encode-Decode, with a list of targets each target alone;
every method runs; the command line edits and sweeps with an SD3 single file in Stability's key layout. fp32."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_edit_and_sweep, randomize_, rel_err, report
from diffedit import images
from diffedit.conditioning import Conditioning
from diffedit.pipeline import DiffEdit
from diffedit.settings import KNOBS

pytest.importorskip("diffusers")
from test_sd3_text import sd3_pipeline  # noqa: E402

KW = dict(steps=4, n=2)
THRESHOLD = KNOBS["threshold"].default
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no-t5"])
def sd3(request, tmp_path_factory):
    """(diffusers' pipeline, our DiffEdit loaded from the folder the pipeline saved, with T5)."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = sd3_pipeline(root / "tokenizers", with_t5=request.param)
    pipe.save_pretrained(root / "pipeline")
    return pipe, DiffEdit.from_pretrained(str(root / "pipeline"), dtype=torch.float32), request.param


@pytest.fixture(scope="module")
def de(tmp_path_factory):
    """DiffEdit on a tiny SD3 folder without T5 (the edits' tests: T5 changes only the text)."""
    root = tmp_path_factory.mktemp("sd3_edit")
    sd3_pipeline(root / "tokenizers", with_t5=False, seed=2).save_pretrained(root / "pipeline")
    return DiffEdit.from_pretrained(str(root / "pipeline"), dtype=torch.float32)


def picture(size=(40, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@torch.no_grad()
def test_generate_equals_stable_diffusion_3_pipeline(sd3, guidance):
    pipe, de, with_t5 = sd3
    px, steps, seed = 32, 5, 7
    side = px // de.cfg.vae.downsampling
    noise = torch.randn((1, de.latent_channels, side, side), generator=torch.Generator().manual_seed(seed))
    args = dict(prompt=PROMPT, negative_prompt="", height=px, width=px, num_inference_steps=steps,
                guidance_scale=guidance, latents=noise)
    latents = de.engine().generate(noise, PROMPT, steps, guidance)
    err = rel_err(latents, pipe(**args, output_type="latent").images)
    ours = np.asarray(de.generate(PROMPT, seed=seed, steps=steps, guidance=guidance, size=px), np.float64) / 255
    theirs = pipe(**args, output_type="np").images[0].astype(np.float64)
    diff = np.abs(ours - theirs)
    t5 = "with" if with_t5 else "without"
    report(f"sd3 generate ({t5} T5, guidance {guidance}) latents vs StableDiffusion3Pipeline", err)
    print(f"[parity] sd3 generate ({t5} T5, guidance {guidance}) image: max abs {diff.max():.2e} of [0, 1]")
    assert theirs.std() > 0.05, "the random model's image is flat: the comparison would prove nothing"
    assert err < 1e-4
    assert diff.max() <= 2 / 255


def test_conditioning_is_context_and_pooled_text_whatever_the_size(de):
    c = de.encode_prompt(["a", "b"], size=(24, 40))
    assert isinstance(c, Conditioning) and c.y.shape == (2, de.cfg.mmdit.pooled_dim)
    assert c.context.shape == (2, 77 + de.cfg.t5_tokens, de.cfg.mmdit.context_dim)
    d = de.encode_prompt(["a", "b"])
    assert torch.equal(c.context, d.context) and torch.equal(c.y, d.y)


def x0_of(de, image) -> torch.Tensor:
    return de.encode_image(images.to_tensor(images.load_image(image), de.multiple, de.device, de.dtype))


def test_the_latent_is_the_shifted_and_scaled_posterior_mean(de):
    image = images.to_tensor(picture(), de.multiple, de.device, de.dtype)
    mean = de.model.first_stage_model.encode(image)[0]
    v = de.cfg.vae
    assert (v.shift_factor, v.scaling_factor) == (0.0609, 1.5305)
    assert torch.allclose(de.encode_image(image), (mean - v.shift_factor) * v.scaling_factor, rtol=0, atol=1e-6)


def test_an_all_zero_mask_returns_the_vae_reconstruction(de):
    image = picture()
    x0 = x0_of(de, image)
    r = de.edit(image, "a green circle", mask=torch.zeros(x0.shape[-2:]), **KW)
    assert torch.equal(r.latents, x0[0])
    expected = images.to_pil(de.decode_latents(x0)[0], image.size)
    assert np.array_equal(np.asarray(r.image), np.asarray(expected))


def test_an_all_ones_mask_equals_encode_decode(de):
    image = picture()
    h, w = x0_of(de, image).shape[-2:]
    masked = de.edit(image, "a green circle", source="a red circle", mask=torch.ones(h, w), **KW)
    plain = de.edit(image, "a green circle", source="a red circle", method="encode-decode", **KW)
    err = rel_err(masked.latents, plain.latents)
    report("sd3 diffedit with an all-ones mask vs encode-decode", err)
    assert err < 1e-6


def test_a_list_of_targets_equals_each_target_alone_up_to_rounding(de):
    """As on SDXL: the batch size changes the CPU kernels' summation order; masks may differ only in cells whose map
    value lies within rounding of the threshold (latents compared where the two masks agree)."""
    tol = 1e-4
    image, targets = picture(), ["a green circle", "a yellow square"]
    both = de.edit(image, targets, source="a red circle", **KW)
    for target, r in zip(targets, both):
        alone = de.edit(image, target, source="a red circle", **KW)
        assert rel_err(r.mask_map, alone.mask_map) < tol
        same = (r.mask_map > THRESHOLD) == (alone.mask_map > THRESHOLD)
        assert same[(alone.mask_map - THRESHOLD).abs() >= tol].all()
        err = rel_err(r.latents * same, alone.latents * same)
        report(f"sd3 list of targets vs {target!r} alone", err)
        assert err < tol


def test_every_method_and_the_mask_run_on_sd3(de):
    image = picture()
    for method in ("diffedit", "sdedit", "encode-decode", "masked-sdedit"):
        r = de.edit(image, "a green circle", source="a red circle", method=method, **KW)
        assert r.image.size == image.size and torch.isfinite(r.latents).all(), method
        assert (r.mask is None) == (method in ("sdedit", "encode-decode")), method
    m = de.mask(image, "a green circle", source="a red circle", n=2, steps=4)
    assert m.binary.shape == m.map.shape == x0_of(de, image).shape[-2:] and m.image.size == image.size
    assert 0 < m.binary.float().mean() < 1


@pytest.fixture(scope="module")
def sd3_file(de, tmp_path_factory):
    """The tiny SD3 model as one file in Stability's key layout (text encoders inside, no T5)."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("sd3_file") / "sd3_tiny.safetensors"
    state = {k: v.contiguous() for k, v in de.model.state_dict().items()}
    state["text_encoders.clip_l.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(path))
    return path


def test_the_command_line_edits_and_sweeps_with_an_sd3_file(sd3_file, tmp_path):
    cli_edit_and_sweep(sd3_file, tmp_path, picture((40, 24)))


@torch.no_grad()
def test_generate_equals_the_sd3_pipeline_built_on_our_weights(de, tmp_path):
    """The oracle the full-size test uses (diffusers' pipeline around our model's own tensors) agrees with us on the
    tiny model too."""
    import oracles
    pipe = oracles.sd3_pipeline(de.model, tmp_path)
    noise = torch.randn((1, de.latent_channels, 8, 8), generator=torch.Generator().manual_seed(3))
    ours = de.engine().generate(noise, PROMPT, 3, 7.5)
    theirs = pipe(PROMPT, negative_prompt="", height=16, width=16, num_inference_steps=3, guidance_scale=7.5,
                  latents=noise, output_type="latent").images
    err = rel_err(ours, theirs)
    report("sd3 generate vs StableDiffusion3Pipeline on our own weights", err)
    assert err < 1e-4


def available_memory() -> int:
    """Bytes the kernel says are available (0 where /proc/meminfo is absent)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd35_medium_mmdit_equals_diffusers_transformer_inside_both_pipelines(tmp_path):
    """SD3.5 Medium's MMDiT at full size (24 MMDiT-X blocks of 1536, qk-norm, dual attention in 0-12; random weights,
    fp32, 9 GB shared with diffusers' transformer) with tiny text towers of SD3's pooled widths (768 + 1280) and a
    tiny VAE, 8 x 8 latents: ``generate`` equals StableDiffusion3Pipeline around it, and ``edit`` with our MMDiT
    equals ``edit`` with diffusers' transformer as the velocity model."""
    import oracles
    from diffedit.models import PRESETS, StableDiffusion3
    from diffedit.models.configs import MMDIT_PRESETS
    if available_memory() < 14 * 2 ** 30:
        pytest.skip("needs 14 GiB of free memory (the 9 GB MMDiT, shared with diffusers', and working space)")
    tiny = PRESETS["tiny-sd3"]
    cfg = dataclasses.replace(tiny, mmdit=MMDIT_PRESETS["sd35-medium"], text_3=None,
                              text=dataclasses.replace(tiny.text, projection_dim=768),
                              text_2=dataclasses.replace(tiny.text_2, projection_dim=1280))
    with torch.device("meta"):
        model = StableDiffusion3(cfg)
    model.to_empty(device="cpu")
    randomize_(model, seed=5)
    model.mmdit.pos_embed.normal_(generator=torch.Generator().manual_seed(6))
    de = DiffEdit(model, dtype=torch.float32, max_batch=4)
    pipe = oracles.sd3_pipeline(model, tmp_path / "tokenizers")
    noise = torch.randn((1, de.latent_channels, 8, 8), generator=torch.Generator().manual_seed(7))
    ours = de.engine().generate(noise, PROMPT, 2, 7.5)
    theirs = pipe(PROMPT, negative_prompt="", height=16, width=16, num_inference_steps=2, guidance_scale=7.5,
                  latents=noise, output_type="latent").images
    err = rel_err(ours, theirs)
    report("sd3.5 medium (full-size MMDiT) generate vs StableDiffusion3Pipeline", err)
    assert err < 1e-4
    image, kw = picture((16, 16)), dict(steps=4, n=2, ratio=0.5)
    mine = de.edit(image, "a green circle", source="a red circle", **kw)
    t = pipe.transformer
    de.eps = lambda x, ts, c: t(hidden_states=x, timestep=ts, encoder_hidden_states=c.context,
                                pooled_projections=c.y).sample
    theirs = de.edit(image, "a green circle", source="a red circle", **kw)
    errs = rel_err(mine.mask_map, theirs.mask_map), rel_err(mine.latents, theirs.latents)
    report("sd3.5 medium (full-size MMDiT) edit: map D, latents with diffusers' transformer", max(errs))
    assert max(errs) < 1e-4


def test_the_app_edits_on_sd3_at_its_working_size_and_equals_the_api(de):
    """The app's work (engine + session cache) on SD3: mask and edit equal the API's; a threshold change reuses D."""
    from diffedit import app_state
    from diffedit.settings import EditSettings
    image = picture()
    s = EditSettings(ratio=0.5, steps=4, n=2, seed=0)
    api = de.edit(image, "a green circle", source="a red circle", ratio=0.5, steps=4, n=2)
    engine = app_state.AppModel(de)
    work = engine.work(app_state.Session())
    pic = work.picture(image)
    d, m = work.mask(pic, "a red circle", "a green circle", s)
    edited = work.edit(pic, "a red circle", "a green circle", s, m)
    assert torch.equal(d, api.mask_map) and np.array_equal(np.asarray(edited), np.asarray(api.image))
    before = engine.evals.count
    work.mask(pic, "a red circle", "a green circle", s.replace(threshold=0.3))
    assert engine.evals.count == before  # a new threshold: no model call
