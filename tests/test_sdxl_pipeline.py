"""DiffEdit on SDXL end to end, on a tiny random SDXL model: ``generate`` equals diffusers' StableDiffusionXLPipeline
(same weights, same initial noise, DDIM configured as SD's, explicit negative prompt ""), the micro-conditioning of a
non-square image equals the pipeline's, the conditioning travels through the batched passes like a tensor, and an
all-zero mask gives back the VAE reconstruction. fp32 throughout."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import images
from diffedit.conditioning import Conditioning
from diffedit.models import StableDiffusion, preset
from diffedit.pipeline import DiffEdit
from diffedit.settings import KNOBS

from conftest import randomize_, rel_err, report

pytest.importorskip("diffusers")
import oracles  # noqa: E402

KW = dict(steps=4, n=2)
THRESHOLD = KNOBS["threshold"].default  # the binary mask of KW's edits
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def model():
    return randomize_(StableDiffusion(preset("tiny-sdxl")), seed=3).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def de(model):
    return DiffEdit(model)


@pytest.fixture(scope="module")
def pipe(model, tmp_path_factory):
    return oracles.sdxl_pipeline(model, tmp_path_factory.mktemp("sdxl_tokenizers"))


def picture(size=(40, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@torch.no_grad()
def test_generate_from_a_diffusers_sdxl_folder_equals_diffusers_sdxl_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny-sdxl")  # written by diffusers itself; loaded by our loader
    de = DiffEdit.from_pretrained(str(tmp_path / "tiny-sdxl"), dtype=torch.float32)
    px = 32  # the folder's sample_size says 512 px: too slow for a test, and the size is an argument anyway
    side = px // de.cfg.vae.downsampling
    noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(7))
    ours = np.asarray(de.generate(PROMPT, seed=7, steps=5, guidance=5.0, size=px), np.float64) / 255
    theirs = pipe(PROMPT, negative_prompt="", height=px, width=px, num_inference_steps=5,
                  guidance_scale=5.0, latents=noise, output_type="np").images[0].astype(np.float64)
    diff = np.abs(ours - theirs)
    print(f"[parity] sdxl generate vs StableDiffusionXLPipeline: max abs {diff.max():.2e} of [0, 1]")
    assert theirs.std() > 0.05, "the random model's image is flat: the comparison would prove nothing"
    assert diff.max() <= 1 / 255 + 1e-6 and diff.mean() < 1e-3  # uint8 rounding of equal floats


@torch.no_grad()
def test_non_square_micro_conditioning_equals_the_pipelines(de, pipe):
    h, w = 24, 40  # height first: a (width, height) swap changes y
    cond = de.encode_prompt([PROMPT, ""], size=(h, w))
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, negative_prompt="")
    assert rel_err(cond.context[0:1], embeds) < 1e-5 and rel_err(cond.context[1:2], neg) < 1e-5
    proj = pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=torch.float32, text_encoder_projection_dim=proj)
    x = torch.randn(2, 4, h // 2, w // 2)
    t = torch.tensor([501, 501])
    theirs = pipe.unet(x, t, encoder_hidden_states=torch.cat([embeds, neg]),
                       added_cond_kwargs={"text_embeds": torch.cat([pooled, neg_pooled]),
                                          "time_ids": ids.expand(2, -1)}).sample
    err = rel_err(de.eps(x, t, cond), theirs)
    report("sdxl eps at 24 x 40 px vs diffusers UNet with the pipeline's time ids", err)
    assert err < 1e-4
    swapped = de.encode_prompt([PROMPT, ""], size=(w, h))
    assert rel_err(de.eps(x, t, swapped), theirs) > 1e-3


def test_conditioning_rows_index_expand_and_concatenate_like_a_tensor(de):
    c = de.encode_prompt(["a", "b", "c"], size=(32, 32))
    assert isinstance(c, Conditioning) and c.shape == (3, 77, de.cfg.unet.context_dim) and len(c) == 3
    assert c.y.shape == (3, de.cfg.unet.adm_in_channels)
    joined = torch.cat([c[2:3], c[0:1]])
    assert torch.equal(joined.context, torch.cat([c.context[2:3], c.context[0:1]]))
    assert torch.equal(joined.y, torch.cat([c.y[2:3], c.y[0:1]]))
    assert torch.equal(c[1:2].expand(4).y, c.y[1:2].expand(4, -1))
    assert torch.equal(c[0], c[0:1][0]) and not torch.equal(c[0], c[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_list_of_targets_equals_each_target_alone_up_to_rounding(model, dtype):
    """The batch size changes the CPU kernels' summation order, differently on different CPUs: the two agree up to
    the dtype's rounding, and the binary mask may differ only in cells whose map value lies within it of the
    threshold (the latents are compared outside such cells, where the two masks agree)."""
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    de = DiffEdit(copy.deepcopy(model), dtype=dtype)  # a copy: DiffEdit casts the model it is given
    image, targets = picture(), ["a green circle", "a yellow square"]
    both = de.edit(image, targets, source="a red circle", **KW)
    for target, r in zip(targets, both):
        alone = de.edit(image, target, source="a red circle", **KW)
        assert rel_err(r.mask_map, alone.mask_map) < tol
        same = (r.mask_map > THRESHOLD) == (alone.mask_map > THRESHOLD)
        assert same[(alone.mask_map - THRESHOLD).abs() >= tol].all()
        assert rel_err(r.latents * same, alone.latents * same) < tol


def test_an_all_zero_mask_returns_the_vae_reconstruction(de):
    image = picture()
    x0 = de.encode_image(images.to_tensor(images.load_image(image), de.multiple, de.device, de.dtype))
    h, w = x0.shape[-2:]
    r = de.edit(image, "a green circle", mask=torch.zeros(h, w), **KW)
    assert torch.equal(r.latents, x0[0])
    expected = images.to_pil(de.decode_latents(x0)[0], image.size)
    assert np.array_equal(np.asarray(r.image), np.asarray(expected))


def test_every_method_and_the_mask_run_on_sdxl(de):
    image = picture()
    for method in ("diffedit", "sdedit", "encode-decode"):
        r = de.edit(image, "a green circle", method=method, **KW)
        assert r.image.size == image.size and torch.isfinite(r.latents).all()
    m = de.mask(image, "a green circle", n=2, steps=4)
    assert m.binary.shape == m.map.shape and m.image.size == image.size


def test_sdxl_sizes_round_to_multiples_of_32_and_default_to_1024():
    # the VAE's 8 times the UNet's two downsamplings (SD1/2: three, 64)
    sdxl = preset("sdxl")
    assert sdxl.size_multiple == 32 and preset("sd15").size_multiple == 64 and sdxl.resolution == 1024
    assert images.model_size((1000, 1350), sdxl.size_multiple) == (992, 1344)


def test_the_sdxl_vae_runs_in_float32_when_the_networks_are_float16(model):
    half = DiffEdit(StableDiffusion(preset("tiny-sdxl")), dtype=torch.float16)
    assert half.vae_dtype == torch.float32
    assert next(half.model.first_stage_model.parameters()).dtype == torch.float32
    assert next(half.model.unet.parameters()).dtype == torch.float16
    x = images.to_tensor(picture(), half.multiple, half.device, half.dtype)
    assert torch.isfinite(half.decode_latents(half.encode_image(x))).all()


@pytest.fixture(scope="module")
def sdxl_file(model, tmp_path_factory):
    """The tiny SDXL model as one file in single-file (sgm) key names, with our architecture metadata."""
    import json

    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"diffedit_config": json.dumps(model.cfg.to_dict())})
    return path


def test_the_command_line_edits_and_sweeps_with_an_sdxl_file(sdxl_file, tmp_path, capsys):
    from diffedit import cli, sweep
    image = tmp_path / "in.png"
    picture((40, 24)).save(image)
    argv = ["edit", image, "--model", sdxl_file, "--target", "a green circle", "--source", "a red circle",
            "--steps", 4, "--n", 2, "--dtype", "float32", "--out", tmp_path / "out.png", "--mask-out", tmp_path / "m.png"]
    assert cli.main([str(a) for a in argv]) == 0
    assert Image.open(tmp_path / "out.png").size == (40, 24) and Image.open(tmp_path / "m.png").size == (40, 24)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"image": "in.png", "source": "a red circle", "target": "a green circle"}\n')
    out = tmp_path / "sweep"
    argv = ["sweep", "--images", prompts, "--model", sdxl_file, "--steps", 4, "--ratio", "0.5,1", "--n", "1,2",
            "--method", "diffedit,sdedit", "--dtype", "float32", "--out", out, "-q"]
    assert cli.main([str(a) for a in argv]) == 0
    rows = sweep.read_rows(out / "results.jsonl")
    assert len(rows) == 2 * 2 + 2 and all(np.isfinite(r["psnr"]) for r in rows)
