"""``diffedit.StableDiffusionDiffEditPipeline`` against diffusers' deprecated ``StableDiffusionDiffEditPipeline``.

Tiny random SD1 (epsilon, conv projections) and SD2 (v-prediction, linear projections, OpenCLIP-style text) folders are
written by diffusers' / transformers' ``save_pretrained``; diffusers' pipeline runs on those modules, ours loads the
folder. The diffusers docs' example runs on both with only the import changed (same seeds, global RNG as the docs
leave it): masks are the same bits, images within 2/255. fp32 throughout.

The docs' example is run with ``mask_thresholding_ratio=2.0``: on a random tiny UNet the map averaged over 10 noises is
so flat that its maximum stays below 1.5 x its mean, so the default ratio 3 gives both pipelines an empty mask (equal,
but a weak test). SDXL never had a diffusers DiffEdit: there the three calls run, and ``recipe="paper"`` equals
``DiffEdit.edit`` with the same settings.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import randomize_, rel_err, report
from oracles import SD_SCHEDULER, SOURCE, TARGET, astronaut, clip_tokenizer, diffedit_pipeline

from diffedit import DiffEdit, DiffEditPipeline, StableDiffusionDiffEditPipeline, settings
from diffedit.models import StableDiffusion, preset
from diffedit.settings import UsageError

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, EulerDiscreteScheduler,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

SIDE, STEPS, N, RATIO = 32, 10, 2, 0.8
UNET_SD1 = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                attention_head_dim=2, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
UNET_SD2 = dict(UNET_SD1, cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True,
                upcast_attention=True)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT_SD1 = dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408,
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
TEXT_SD2 = dict(TEXT_SD1, hidden_size=48, num_attention_heads=3, hidden_act="gelu", pad_token_id=0)
SPECS = {"sd1": (UNET_SD1, TEXT_SD1, "<|endoftext|>", "epsilon"), "sd2": (UNET_SD2, TEXT_SD2, "!", "v_prediction")}


def build(root: Path, family: str):
    """(diffusers' pipeline on random tiny modules, ours loaded from the folder they were saved to)."""
    unet_spec, text_spec, pad, prediction = SPECS[family]
    torch.manual_seed(0)
    unet = randomize_(UNet2DConditionModel(**unet_spec), seed=1).eval()
    vae = randomize_(AutoencoderKL(**VAE), seed=2).eval()
    text = randomize_(CLIPTextModel(CLIPTextConfig(**text_spec)), seed=3).eval()
    for sub, net in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        net.save_pretrained(root / sub)
    DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction).save_pretrained(root / "scheduler")
    (root / "tokenizer").mkdir()
    tokenizer = clip_tokenizer(root / "tokenizer", pad_token=pad)
    theirs = diffedit_pipeline(unet, vae, text, tokenizer, DDIMScheduler.from_pretrained(root / "scheduler"))
    ours = StableDiffusionDiffEditPipeline.from_pretrained(root, safety_checker=None, use_safetensors=True)
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sd2"), "sd2")


def iou(a, b) -> float:
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def docs_example(pipeline, raw_image, offload: bool):
    """The diffusers docs' DiffEdit example (seeded global RNG before each call, as a script would)."""
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.inverse_scheduler = DDIMInverseScheduler.from_config(pipeline.scheduler.config)
    if offload:  # diffusers' needs accelerate and a GPU; ours is a logged no-op on a CPU
        pipeline.enable_model_cpu_offload()
        pipeline.enable_vae_slicing()
    torch.manual_seed(0)
    mask_image = pipeline.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET,
                                        mask_thresholding_ratio=2.0)
    torch.manual_seed(1)
    inv_latents = pipeline.invert(prompt=SOURCE, image=raw_image).latents
    image = pipeline(prompt=TARGET, mask_image=mask_image, image_latents=inv_latents, negative_prompt=SOURCE).images[0]
    return mask_image, inv_latents, image


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_the_docs_example_with_the_import_changed_gives_diffusers_masks_and_images(family, request, caplog):
    theirs, ours = request.getfixturevalue(family)
    raw_image = astronaut(SIDE)
    ref_mask, ref_inv, ref_image = docs_example(theirs, raw_image, offload=False)
    with caplog.at_level(logging.INFO, logger="diffedit"):
        mask, inv, image = docs_example(ours, raw_image, offload=True)
    assert "no GPU" in caplog.text and ours.de.vae_batch == 1
    assert type(mask) is type(ref_mask) and mask.dtype == ref_mask.dtype and mask.shape == ref_mask.shape
    assert 0 < ref_mask.sum() < ref_mask.size  # a real mask
    print(f"[diffusers api] {family}: mask IoU {iou(mask, ref_mask):.4f}, bitwise {np.array_equal(mask, ref_mask)}")
    assert np.array_equal(mask, ref_mask)
    assert inv.shape == ref_inv.shape
    report(f"{family}: inverted latents vs diffusers", rel_err(inv, ref_inv))
    assert rel_err(inv, ref_inv) < 1e-4
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(ref_image, dtype=int)).max()
    print(f"[diffusers api] {family}: image max diff {diff}/255")
    assert image.size == ref_image.size and diff <= 2


def test_the_embeddings_form_equals_the_text_form_and_diffusers_given_the_same_embeddings(sd1):
    theirs, ours = sd1
    raw_image = astronaut(SIDE)
    common = dict(num_inference_steps=STEPS)
    # encode_prompt: diffusers' signature and return, with CFG and copies per prompt
    pos, neg = ours.encode_prompt([SOURCE, TARGET], "cpu", 2, True, negative_prompt=["blurry", ""])
    ref_pos, ref_neg = theirs.encode_prompt([SOURCE, TARGET], "cpu", 2, True, negative_prompt=["blurry", ""])
    assert pos.shape == ref_pos.shape == neg.shape and rel_err(pos, ref_pos) < 1e-4 and rel_err(neg, ref_neg) < 1e-4
    # the docs' recipe: several captions embedded, averaged into one row
    source_embeds = ours.encode_prompt([SOURCE, "an astronaut"], "cpu", 1, False)[0].mean(dim=0).unsqueeze(0)
    target_embeds = ours.encode_prompt([TARGET, "a robot"], "cpu", 1, False)[0].mean(dim=0).unsqueeze(0)
    outs = {}
    for name, p in (("theirs", theirs), ("ours", ours)):
        mask = p.generate_mask(image=raw_image, source_prompt_embeds=source_embeds, target_prompt_embeds=target_embeds,
                               num_maps_per_mask=N, generator=torch.Generator().manual_seed(0), **common)
        inv = p.invert(prompt_embeds=source_embeds, image=raw_image, generator=torch.Generator().manual_seed(1),
                       **common).latents
        images = p(mask_image=mask, image_latents=inv, prompt_embeds=target_embeds,
                   negative_prompt_embeds=source_embeds, output_type="np", **common).images
        outs[name] = mask, inv, images
    assert np.array_equal(outs["ours"][0], outs["theirs"][0]) and 0 < outs["ours"][0].sum()
    assert rel_err(outs["ours"][1], outs["theirs"][1]) < 1e-4
    assert np.abs(outs["ours"][2] - outs["theirs"][2]).max() <= 2 / 255
    # one caption's embedding is the caption
    text = ours.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=N,
                              generator=torch.Generator().manual_seed(0), **common)
    embedded = ours.generate_mask(image=raw_image, source_prompt_embeds=ours.encode_prompt(SOURCE, None, 1, False)[0],
                                  target_prompt_embeds=ours.encode_prompt(TARGET, None, 1, False)[0],
                                  num_maps_per_mask=N, generator=torch.Generator().manual_seed(0), **common)
    assert np.array_equal(text, embedded)
    inv_text = ours.invert(prompt=SOURCE, image=raw_image, generator=torch.Generator().manual_seed(1), **common).latents
    inv_emb = ours.invert(prompt_embeds=ours.encode_prompt(SOURCE, None, 1, False)[0], image=raw_image,
                          generator=torch.Generator().manual_seed(1), **common).latents
    assert rel_err(inv_emb, inv_text) < 1e-6


def test_the_mask_with_equal_negative_prompts_or_without_guidance_is_diffusers(sd1):
    """diffusers' mask map is (g - 1) |eps_T - eps_S| with equal negative prompts: the clamp rule cancels the factor,
    so ours (no guidance, negatives unused) gives its masks. Without guidance (g <= 1) diffusers' generate_mask fails;
    ours gives the same mask as with it."""
    theirs, ours = sd1
    raw_image = astronaut(SIDE)

    def mask(p, **extra):
        return p.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=N,
                               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **extra)

    negatives = dict(target_negative_prompt="blurry", source_negative_prompt="blurry")
    ref = mask(theirs, **negatives)
    assert np.array_equal(mask(ours, **negatives), ref) and 0 < ref.sum()
    with pytest.raises(TypeError):
        mask(theirs, guidance_scale=1.0)
    assert np.array_equal(mask(ours, guidance_scale=1.0), mask(ours))


@pytest.mark.parametrize("recipe", ["diffusers", "paper"])
def test_a_batch_of_two_images_gives_each_images_edit_alone(sd1, recipe):
    ours = StableDiffusionDiffEditPipeline(sd1[1].de, recipe=recipe)
    ours.set_progress_bar_config(disable=True)
    pics = [astronaut(SIDE), astronaut(SIDE, crop=(256, 256, 512, 512))]
    common = dict(num_inference_steps=STEPS)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    def edit(idx):
        mask = ours.generate_mask(image=[pics[i] for i in idx], source_prompt=[SOURCE] * len(idx),
                                  target_prompt=[TARGET] * len(idx), num_maps_per_mask=N,
                                  generator=gens(*[10 * i + j for i in idx for j in range(N)]), **common)
        inv = ours.invert(prompt=[SOURCE] * len(idx), image=[pics[i] for i in idx], generator=gens(*idx),
                          **common).latents
        return mask, ours(prompt=[TARGET] * len(idx), mask_image=mask, image_latents=inv,
                          negative_prompt=[SOURCE] * len(idx), output_type="np", **common).images

    mask, both = edit([0, 1])
    assert both.shape == (2, SIDE, SIDE, 3) and mask.shape[0] == 2
    for i in (0, 1):
        alone_mask, alone = edit([i])
        assert np.array_equal(mask[i], alone_mask[0])
        err = rel_err(torch.from_numpy(both[i]), torch.from_numpy(alone[0]))
        report(f"{recipe}: image {i} of a batch of 2 vs alone", err)
        assert err < 1e-4


def test_ddim_schedulers_from_sd_configs_are_accepted_and_others_refused(sd1):
    _, ours = sd1
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    ours.inverse_scheduler = DDIMInverseScheduler.from_config(ours.scheduler.config)
    for bad, match in ((DDIMScheduler(), "beta_start"),
                       (DDIMScheduler(**{**SD_SCHEDULER, "clip_sample": True}), "clip"),
                       (DDIMScheduler(**SD_SCHEDULER, timestep_spacing="trailing"), "leading"),
                       (DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction"), "prediction_type"),
                       (EulerDiscreteScheduler.from_config(ours.scheduler.config), "DDIM"), ("ddim", "config")):
        with pytest.raises(ValueError, match=f"^scheduler: .*{match}") as e:
            ours.scheduler = bad
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^inverse_scheduler: set_alpha_to_one"):
        ours.inverse_scheduler = DDIMInverseScheduler.from_config({**SD_SCHEDULER, "set_alpha_to_one": True})


def test_output_types_and_shapes_are_diffusers(sd1):
    theirs, ours = sd1
    raw_image = astronaut(SIDE)
    kw = dict(num_inference_steps=5)
    for p in (theirs, ours):
        p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
    got = {}
    for name, p in (("theirs", theirs), ("ours", ours)):
        g = torch.Generator().manual_seed(0)
        masks = {"np": p.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, generator=g,
                                       output_type="np", **kw)}
        inv = p.invert(prompt=SOURCE, image=raw_image, generator=g, decode_latents=True, **kw)
        inv_np = p.invert(prompt=SOURCE, image=raw_image, generator=g, decode_latents=True, output_type="np",
                          return_dict=False, **kw)
        calls = {t: p(prompt=TARGET, mask_image=masks["np"], image_latents=inv.latents, output_type=t, **kw).images
                 for t in ("pil", "np", "pt", "latent")}
        two = p(prompt=TARGET, mask_image=masks["np"], image_latents=inv.latents, num_images_per_prompt=2,
                output_type="np", return_dict=False, **kw)
        got[name] = masks, inv, inv_np, calls, two

    def describe(x):
        if x is None:
            return None
        if isinstance(x, list):
            return ("list", len(x), describe(x[0]))
        if isinstance(x, Image.Image):
            return ("PIL", x.mode, x.size)
        if isinstance(x, tuple):
            return tuple(describe(v) for v in x)
        return (type(x).__name__, tuple(x.shape), str(x.dtype).replace("torch.", ""))

    for part in range(5):
        a, b = got["ours"][part], got["theirs"][part]
        if isinstance(a, dict):
            assert {k: describe(v) for k, v in a.items()} == {k: describe(v) for k, v in b.items()}
        elif part == 1:
            assert (describe(a.latents), describe(a.images)) == (describe(b.latents), describe(b.images))
        else:
            assert describe(a) == describe(b)
    assert np.array_equal(got["ours"][4][0][0], got["ours"][4][0][1])  # num_images_per_prompt: equal copies
    # output_type="pil" masks: diffusers' numpy_to_pil fails on its (B, h, w) array; ours gives "L" images
    with pytest.raises(TypeError):
        theirs.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, output_type="pil", **kw)
    pil = ours.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, output_type="pil", **kw)
    assert describe(pil) == ("list", 1, ("PIL", "L", (SIDE // 2, SIDE // 2)))


def test_the_paper_recipe_keeps_the_input_outside_the_mask_and_the_diffusers_recipe_does_not(sd1):
    _, ours = sd1
    paper = StableDiffusionDiffEditPipeline(ours.de, recipe="paper")
    paper.set_progress_bar_config(disable=True)
    raw_image = astronaut(SIDE)
    x0 = ours.de.encode_image(torch.from_numpy(np.asarray(raw_image, dtype=np.float32)).permute(2, 0, 1)[None]
                              / 127.5 - 1)
    out = {}
    for name, p in (("paper", paper), ("diffusers", ours)):
        mask = p.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=N,
                               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt")
        inv = p.invert(prompt=SOURCE, image=raw_image, num_inference_steps=STEPS,
                       generator=torch.Generator().manual_seed(1)).latents
        latents = p(prompt=TARGET, mask_image=mask, image_latents=inv, negative_prompt=SOURCE,
                    num_inference_steps=STEPS, output_type="latent").images
        out[name] = mask, inv, latents
    k = round(RATIO * STEPS)
    assert out["paper"][1].shape[1] == k + 1 and torch.equal(out["paper"][1][0, -1], x0[0])  # x_0 last
    assert out["diffusers"][1].shape[1] == k
    for name, (mask, _, latents) in out.items():
        keep = ~mask[0].bool().expand_as(latents[0])
        assert 0 < keep[0].sum() < keep[0].numel()
        same = torch.equal(latents[0][keep], x0[0][keep])
        assert same == (name == "paper"), name
    # the same edit as DiffEdit.edit with the mask given
    mask = out["paper"][0][0]
    ref = paper.de.edit(raw_image, TARGET, SOURCE, ratio=RATIO, steps=STEPS, mask=mask)
    assert rel_err(out["paper"][2][0], ref.latents) < 1e-5


def test_each_recipe_choice_is_read_from_its_field_not_the_recipes_name(sd1, monkeypatch):
    """A recipe that is diffusers' but for the late blend: invert then keeps x_0 (last), after diffusers' latents
    for the same generator, and the decoding keeps the input outside the mask, as the paper's blend does."""
    _, ours = sd1
    monkeypatch.setitem(settings.RECIPES, "on-time", replace(settings.RECIPES["diffusers"], name="on-time",
                                                             blend_late=False))
    on_time = StableDiffusionDiffEditPipeline(ours.de, recipe="on-time")
    on_time.set_progress_bar_config(disable=True)
    raw_image = astronaut(SIDE)
    inv = {name: p.invert(prompt=SOURCE, image=raw_image, num_inference_steps=STEPS,
                          generator=torch.Generator().manual_seed(1)).latents for name, p in (("late", ours),
                                                                                            ("on-time", on_time))}
    k = round(RATIO * STEPS)
    assert inv["late"].shape[1] == k and inv["on-time"].shape[1] == k + 1
    assert torch.equal(inv["on-time"][:, :-1], inv["late"])  # the same posterior sample and guided inversion
    mask = torch.zeros(1, SIDE // 2, SIDE // 2)
    mask[:, 4:12, 4:12] = 1
    latents = on_time(prompt=TARGET, mask_image=mask, image_latents=inv["on-time"], negative_prompt=SOURCE,
                      num_inference_steps=STEPS, output_type="latent").images
    keep = ~mask.bool().expand_as(latents[0])
    assert torch.equal(latents[0][keep], inv["on-time"][0, -1][keep])  # x_0 outside the mask
    with pytest.raises(UsageError, match=r"image_latents: .*\(recipe 'on-time': x_0 last\)"):
        on_time(prompt=TARGET, mask_image=mask, image_latents=inv["late"], num_inference_steps=STEPS)


def test_argument_errors_are_usage_errors_and_a_misspelt_recipe_fails_before_loading(sd1, tmp_path):
    _, ours = sd1
    raw_image = astronaut(SIDE)
    with pytest.raises(UsageError, match="^recipe must be one of paper, diffusers"):
        StableDiffusionDiffEditPipeline.from_pretrained(tmp_path / "never-read", recipe="papr")
    with pytest.raises(UsageError, match="^num_maps_per_mask"):
        ours.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=0)
    with pytest.raises(UsageError, match="^mask_encode_strength"):
        ours.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, mask_encode_strength=1.5)
    with pytest.raises(UsageError, match="^inpaint_strength .* below one grid step"):
        ours.invert(prompt=SOURCE, image=raw_image, num_inference_steps=5, inpaint_strength=0.1)
    with pytest.raises(UsageError, match="^eta"):
        ours(prompt=TARGET, mask_image=np.ones((1, 4, 4)), image_latents=torch.zeros(1, 8, 4, 4, 4), eta=0.5)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """A tiny random SDXL model as one file in single-file (sgm) key names, with our architecture metadata."""
    model = randomize_(StableDiffusion(preset("tiny-sdxl")), seed=3).eval()
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"diffedit_config": json.dumps(model.cfg.to_dict())})
    return path


def test_sdxl_runs_the_three_calls_and_the_paper_recipe_equals_diffedit_edit(sdxl_file):
    de = DiffEdit.from_pretrained(str(sdxl_file), dtype=torch.float32)
    pic = astronaut(SIDE)
    kw = dict(num_inference_steps=STEPS)
    for recipe in ("diffusers", "paper"):
        p = DiffEditPipeline.from_pretrained(sdxl_file, recipe=recipe)
        p.set_progress_bar_config(disable=True)
        mask = p.generate_mask(image=pic, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=N,
                               generator=torch.Generator().manual_seed(0), **kw)
        inv = p.invert(prompt=SOURCE, image=pic, generator=torch.Generator().manual_seed(1), **kw).latents
        out = p(prompt=TARGET, mask_image=mask, image_latents=inv, negative_prompt=SOURCE, output_type="latent", **kw)
        assert mask.shape == (1, SIDE // 2, SIDE // 2) and out.images.shape == (1, 4, SIDE // 2, SIDE // 2)
        embeds = p.encode_prompt(TARGET, None, 1, False)[0]  # SDXL: Conditioning rows, usable as embeddings
        by_embeds = p(prompt_embeds=embeds, mask_image=mask, image_latents=inv, negative_prompt=SOURCE,
                      output_type="latent", **kw).images
        assert rel_err(by_embeds, out.images) < 1e-5
    ref = de.edit(pic, TARGET, SOURCE, ratio=RATIO, n=N, steps=STEPS, seed=0)
    assert np.array_equal(mask[0], (ref.mask_map > 0.5).long().numpy())
    err = rel_err(out.images[0], ref.latents)
    report("SDXL recipe='paper' vs DiffEdit.edit", err)
    assert err < 1e-4


def test_bad_arguments_fail_in_one_line_naming_the_argument(sd1):
    _, ours = sd1
    raw_image = astronaut(SIDE)
    inv = ours.invert(prompt=SOURCE, image=raw_image, num_inference_steps=STEPS).latents
    mask = np.ones((1, SIDE // 2, SIDE // 2))
    cases = [
        (lambda: ours.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET,
                                    num_maps_per_mask=0), "num_maps_per_mask"),
        (lambda: ours.generate_mask(image=raw_image, source_prompt=SOURCE), "target_prompt"),
        (lambda: ours.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET,
                                    mask_encode_strength=1.5), "mask_encode_strength"),
        (lambda: ours.invert(prompt=SOURCE, image=raw_image, negative_prompt="x"), "negative_prompt"),
        (lambda: ours.invert(prompt=SOURCE, prompt_embeds=inv[0, :1, 0], image=raw_image), "prompt"),
        (lambda: ours(prompt=TARGET, mask_image=mask, image_latents=inv), "image_latents"),  # 50 steps, invert ran 10
        (lambda: ours(prompt=TARGET, mask_image=mask[:, :4], image_latents=inv, num_inference_steps=STEPS),
         "mask_image"),
        (lambda: ours(prompt=TARGET, mask_image=mask, image_latents=inv, num_inference_steps=STEPS,
                      output_type="jpg"), "output_type"),
        (lambda: ours(prompt=TARGET, mask_image=mask, image_latents=inv, num_inference_steps=STEPS,
                      inpaint_strength=0), "inpaint_strength"),
        (lambda: StableDiffusionDiffEditPipeline.from_pretrained("x", torch_dtyp=torch.float16), "torch_dtyp"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError), match=name) as e:
            call()
        assert "\n" not in str(e.value), name


def test_to_keeps_the_results_and_the_progress_bar_counts_unet_rows(sd1, capsys):
    _, ours = sd1
    raw_image = astronaut(SIDE)

    def mask():
        return ours.generate_mask(image=raw_image, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=N,
                                  num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))

    before = mask()
    assert ours.to("cpu") is ours and ours.to(torch.float32).dtype == torch.float32
    ours.set_progress_bar_config(disable=False)
    try:
        assert np.array_equal(mask(), before)
    finally:
        ours.set_progress_bar_config(disable=True)
    assert f"generate_mask: {2 * N} UNet rows" in capsys.readouterr().err
