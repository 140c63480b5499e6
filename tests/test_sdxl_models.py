"""Numerical parity of our SDXL networks with diffusers / transformers, through diffusers' own single-file converters.

The UNet (per-level transformer depth, label_emb) and the size micro-conditioning are compared with diffusers'
``UNet2DConditionModel`` (addition_embed_type "text_time") after ``convert_ldm_unet_checkpoint``; the two text
towers with transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` after diffusers' CLIP converters
(``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint``, prefixes of an SDXL single file); the whole
conditioner with ``StableDiffusionXLPipeline.encode_prompt``. Every weight is random (zero-initialised layers
included), everything fp32, tolerance 1e-4 relative. ``slow``: the full-size SDXL UNet (pytest -m slow).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_open_clip_checkpoint, create_unet_diffusers_config_from_ldm)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffedit.models import StableDiffusion, preset, size_conditioning, tokenize
from diffedit.models.conditioner import GeneralConditioner
from diffedit.models.configs import ModelConfig, TextConfig, UNetConfig
from diffedit.models.text import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from diffedit.models.unet import UNetModel

from conftest import randomize_, rel_err, report
from test_models_parity import assert_all_consumed, ldm_checkpoint, ldm_unet_yaml

TOL = 1e-4
# "" and short prompts end well before position 76; the long one is truncated, its end-of-text at 76.
PROMPTS = ["a photo of a cat sitting on a bench", "", "A BOWL of Fruit, with apples & pears!",
           " ".join(["a very long prompt about many red apples"] * 12)]
# diffusers' second tokenizer has "!" as its pad token, so it also turns a "!" in a prompt into id 0, where sgm's
# open_clip tokenizer (and ours) give "!</w>" (256): its prompts avoid "!" (the difference has a test of its own).
PIPE_PROMPTS = [p.replace("!", ".") for p in PROMPTS]
# Non-square, and every value distinct: a height/width or original/target swap changes y.
ORIGINAL, CROP, TARGET = (40, 24), (3, 5), (32, 48)
SDXL_PREFIXES = {"model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                 "conditioner.embedders.1.model."}
# The structural fields of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (transcribed).
SDXL_BASE_DIFFUSERS = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[320, 640, 1280],
    layers_per_block=2, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, class_embed_type=None,
    in_channels=4, out_channels=4, sample_size=128)

logging.getLogger("diffusers").setLevel(logging.ERROR)


# --- helpers --------------------------------------------------------------------------------------------

def sdxl_unet_config(cfg: UNetConfig, checkpoint: dict, size_embed_dim: int) -> dict:
    """diffusers' config derived from our UNet config written as sgm's yaml (num_classes "sequential")."""
    yaml = ldm_unet_yaml(cfg)
    yaml["model"]["params"]["unet_config"]["params"].update(num_classes="sequential",
                                                            adm_in_channels=cfg.adm_in_channels)
    config = create_unet_diffusers_config_from_ldm(yaml, checkpoint)
    config["norm_num_groups"] = cfg.norm_groups
    if cfg.context_dim not in (2048, 1280):  # the converter picks text_time by SDXL's context widths only
        config.update(addition_embed_type="text_time", class_embed_type=None, addition_time_embed_dim=size_embed_dim)
    return config


def build_sdxl_unet_pair(model_cfg: ModelConfig, seed: int = 0, meta: bool = False):
    """(ours, diffusers twin, checkpoint, converted, config); ``meta``: the twin shares our tensors (assign)."""
    ours = randomize_(UNetModel(model_cfg.unet), seed=seed).eval()
    checkpoint = ldm_checkpoint(ours, "model.diffusion_model.")
    config = sdxl_unet_config(model_cfg.unet, checkpoint, model_cfg.size_embed_dim)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta" if meta else "cpu"):
        theirs = UNet2DConditionModel(**config)
    result = theirs.load_state_dict(converted, strict=True, assign=meta)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, theirs.eval(), checkpoint, converted, config


def time_ids(batch: int, original=ORIGINAL, crop=CROP, target=TARGET) -> torch.Tensor:
    """diffusers' add_time_ids: original size + crop top-left + target size, as the SDXL pipeline builds them."""
    return torch.tensor([[*original, *crop, *target]], dtype=torch.float32).expand(batch, -1)


def load_hf(net, state: dict):
    """Load by name (transformers >= 5.6 flattens CLIPTextModel, dropping ``text_model.``); only the position_ids
    buffer may be missing."""
    if not any(k.startswith("text_model.") for k in net.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    result = net.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all("position_ids" in k for k in result.missing_keys), result.missing_keys
    return net.eval()


def hf_config(cfg: TextConfig, act: str) -> CLIPTextConfig:
    """The hub configs' ids (bos 0, eos 2, pad 1, CLIP's legacy values): transformers then pools at the argmax id."""
    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
                          num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers, vocab_size=cfg.vocab_size,
                          max_position_embeddings=cfg.context_length, projection_dim=cfg.projection_dim,
                          hidden_act=act, layer_norm_eps=1e-5)


def hf_clip_l(embedder: FrozenCLIPEmbedder) -> CLIPTextModel:
    """transformers' CLIP-L twin, via diffusers' converter of ``conditioner.embedders.0.transformer.`` keys."""
    ckpt = ldm_checkpoint(embedder, "conditioner.embedders.0.")
    return load_hf(CLIPTextModel(hf_config(embedder.transformer.cfg, "quick_gelu")), convert_ldm_clip_checkpoint(ckpt))


def hf_big_g(embedder: FrozenOpenCLIPEmbedder) -> CLIPTextModelWithProjection:
    """transformers' bigG twin, via diffusers' converter of ``conditioner.embedders.1.model.`` keys (it splits the
    fused in_proj and transposes text_projection)."""
    prefix = "conditioner.embedders.1.model."
    ckpt = ldm_checkpoint(embedder.model, prefix)
    hf = CLIPTextModelWithProjection(hf_config(embedder.model.cfg, "gelu"))
    return load_hf(hf, convert_open_clip_checkpoint(hf, ckpt, prefix=prefix))


# --- UNet -------------------------------------------------------------------------------------------------

def test_tiny_sdxl_unet_with_label_emb_and_size_conditioning_matches_diffusers_text_time():
    cfg = preset("tiny-sdxl")
    ours, theirs, checkpoint, converted, config = build_sdxl_unet_pair(cfg)
    assert_all_consumed(checkpoint, converted)
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert config["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    assert config["projection_class_embeddings_input_dim"] == 80 and config["addition_time_embed_dim"] == 8
    assert len(theirs.mid_block.attentions[0].transformer_blocks) == cfg.unet.middle_depth == 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 12, generator=gen)
    t = torch.tensor([999, 17])
    context = torch.randn(2, 77, 48, generator=gen)
    pooled = torch.randn(2, 32, generator=gen)
    y = size_conditioning(pooled, ORIGINAL, CROP, TARGET, cfg.size_embed_dim)
    added = {"text_embeds": pooled, "time_ids": time_ids(2)}
    with torch.no_grad():
        a = ours(x, t, context, y)
        b = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        swapped = ours(x, t, context, size_conditioning(pooled, ORIGINAL[::-1], CROP, TARGET, cfg.size_embed_dim))
        swapped_ref = theirs(x, t, encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(2, original=ORIGINAL[::-1])}).sample
    err = rel_err(a, b)
    report("unet tiny-sdxl with y", err)
    assert y.shape == (2, 80) and b.std() > 1e-2
    assert err < TOL
    # the comparison sees the size embedding: a height/width swap on either side moves the output
    assert rel_err(swapped, b) > 1e-3 and rel_err(a, swapped_ref) > 1e-3


def test_sdxl_preset_unet_has_sdxl_base_diffusers_structure_and_keys():
    cfg = preset("sdxl")
    with torch.device("meta"):
        ours = UNetModel(cfg.unet)
    checkpoint = ldm_checkpoint(ours, "model.diffusion_model.")
    checkpoint["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = torch.empty(0)  # xl_base
    config = sdxl_unet_config(cfg.unet, checkpoint, cfg.size_embed_dim)
    for key, value in SDXL_BASE_DIFFUSERS.items():
        got = config[key][1:] if key == "transformer_layers_per_block" else config[key]  # level 0 has no attention
        want = value[1:] if key == "transformer_layers_per_block" else value
        assert got == want, (key, config[key], value)
    del checkpoint["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"]
    converted = convert_ldm_unet_checkpoint(checkpoint, SDXL_BASE_DIFFUSERS | {"norm_num_groups": 32})
    with torch.device("meta"):
        real = UNet2DConditionModel(**SDXL_BASE_DIFFUSERS)
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes
    assert len(checkpoint) == len(converted)
    assert len(ours.middle_block[1].transformer_blocks) == 10
    assert len(ours.input_blocks[1]) == 1 and len(ours.input_blocks[4][1].transformer_blocks) == 2
    assert len(ours.output_blocks[2]) == 3 and len(ours.output_blocks[6]) == 1  # Res+Attn+Up at .2.2; Res only
    assert sum(v.numel() for v in converted.values()) == pytest.approx(2.567e9, rel=1e-3)


def test_unet_rejects_missing_extra_or_misshapen_y_with_one_line_errors():
    sdxl = UNetModel(preset("tiny-sdxl").unet)
    sd1 = UNetModel(preset("tiny").unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(1)
    with pytest.raises(ValueError, match=r"needs y of shape \(B, 80\)"):
        sdxl(x, t, torch.randn(2, 77, 48))
    with pytest.raises(ValueError, match=r"y has shape \(2, 79\), expected \(2, 80\)"):
        sdxl(x, t, torch.randn(2, 77, 48), torch.randn(2, 79))
    with pytest.raises(ValueError, match="no label_emb"):
        sd1(x, t, torch.randn(2, 77, 32), torch.randn(2, 80))


def test_explicit_middle_depth_and_zero_depth_levels_build_the_blocks_they_name():
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                     num_head_channels=8, context_dim=16, use_linear_in_transformer=True, transformer_depth=(0, 1),
                     transformer_depth_middle=3, norm_groups=8)
    unet = UNetModel(cfg)
    assert len(unet.input_blocks[1]) == 1 and len(unet.output_blocks[2]) == 1      # level 0: depth 0, no attention
    assert len(unet.input_blocks[3][1].transformer_blocks) == 1
    assert len(unet.middle_block[1].transformer_blocks) == 3


# --- text towers ------------------------------------------------------------------------------------------

def test_clip_l_tower_penultimate_without_final_norm_matches_transformers_hidden_states_minus_2():
    cfg = TextConfig(width=16, heads=2, layers=3, projection_dim=16, skip_last_layer=True, final_norm=False)
    enc = FrozenCLIPEmbedder(cfg)
    randomize_(enc, seed=0).eval()
    assert "transformer.text_model.encoder.layers.2.mlp.fc2.weight" in enc.state_dict()  # last layer kept
    hf = hf_clip_l(enc)
    ids = tokenize(PROMPTS, cfg)
    with torch.no_grad():
        a = enc(ids)
        states = hf(input_ids=ids, output_hidden_states=True).hidden_states
        normed = FrozenCLIPEmbedder(dataclasses.replace(cfg, final_norm=True))
        normed.load_state_dict(enc.state_dict())
        c = normed(ids)
    err, err_norm = rel_err(a, states[-2]), rel_err(c, getattr(hf, "text_model", hf).final_layer_norm(states[-2]))
    report("text clip-l penultimate, no final norm", err)
    report("text clip-l penultimate + final norm", err_norm)
    assert a.shape == (len(PROMPTS), 77, 16)
    assert err < TOL and err_norm < TOL
    assert rel_err(a, states[-1]) > 1e-2  # the last layer would differ


def test_big_g_tower_context_and_pooled_match_transformers_with_projection():
    cfg = TextConfig(kind="openclip", width=32, heads=2, layers=3, projection_dim=24, skip_last_layer=True,
                     final_norm=False, pooled=True)  # a non-square projection: its orientation must be right
    enc = FrozenOpenCLIPEmbedder(cfg)
    randomize_(enc, seed=3).eval()
    hf = hf_big_g(enc)
    ids = tokenize(PROMPTS, cfg)
    eot = ids.argmax(-1)
    assert (ids[:, -1] == 0).sum() == 3 and eot[-1] == 76 and (eot[:3] < 76).all()
    with torch.no_grad():
        context, pooled = enc(ids)
        out = hf(input_ids=ids, output_hidden_states=True)
        plain = enc.model(ids)
    errs = {"context": rel_err(context, out.hidden_states[-2]), "pooled": rel_err(pooled, out.text_embeds),
            "forward": rel_err(plain, out.hidden_states[-2])}
    for k, e in errs.items():
        report(f"text bigG {k}", e)
    assert context.shape == (len(PROMPTS), 77, 32) and pooled.shape == (len(PROMPTS), 24)
    assert max(errs.values()) < TOL, errs
    # pooling the padding's last position instead of end-of-text would not match
    wrong = enc.model.ln_final(out.hidden_states[-1])[:, -1] @ enc.model.text_projection
    assert rel_err(wrong, out.text_embeds) > 1e-2


# --- the conditioner and the whole model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_tokenizers(tmp_path_factory):
    """SDXL's two tokenizers, offline: the first pads with end-of-text, the second with "!" (id 0)."""
    import oracles
    folder = tmp_path_factory.mktemp("sdxl_tokenizer")
    tok = oracles.clip_tokenizer(folder)
    tok_2 = CLIPTokenizer.from_pretrained(str(folder), pad_token="!", model_max_length=77)
    assert tok.pad_token_id == 49407 and tok_2.pad_token_id == 0
    return tok, tok_2


def test_conditioner_matches_sdxl_pipeline_encode_prompt_with_explicit_empty_negative(sdxl_tokenizers):
    cfg = preset("tiny-sdxl")
    sd = StableDiffusion(cfg)
    randomize_(sd, seed=5).eval()
    cond = sd.conditioner
    unet = UNet2DConditionModel(**sdxl_unet_config(cfg.unet, ldm_checkpoint(sd.unet, "model.diffusion_model."), 8))
    vae = DiffusersAutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=hf_clip_l(cond.embedders[0]),
                                     text_encoder_2=hf_big_g(cond.embedders[1]), tokenizer=sdxl_tokenizers[0],
                                     tokenizer_2=sdxl_tokenizers[1], unet=unet,
                                     scheduler=DDIMScheduler(beta_schedule="scaled_linear"), add_watermarker=False)
    with torch.no_grad():
        pe, npe, pooled_ref, npooled_ref = pipe.encode_prompt(PIPE_PROMPTS, device=torch.device("cpu"),
                                                              do_classifier_free_guidance=True,
                                                              negative_prompt=[""] * len(PIPE_PROMPTS))
        context, pooled = sd.encode_text(PIPE_PROMPTS)
        ncontext, npooled = sd.encode_text([""] * len(PIPE_PROMPTS))
    errs = {"prompt_embeds": rel_err(context, pe), "pooled_prompt_embeds": rel_err(pooled, pooled_ref),
            "negative_prompt_embeds": rel_err(ncontext, npe), "negative_pooled": rel_err(npooled, npooled_ref)}
    for k, e in errs.items():
        report(f"conditioner vs encode_prompt {k}", e)
    assert context.shape == (len(PIPE_PROMPTS), 77, 48) and pooled.shape == (len(PIPE_PROMPTS), 32)
    assert max(errs.values()) < TOL, errs
    assert npooled.abs().min() > 0  # an encoded "", not force_zeros_for_empty_prompt's zeros
    assert rel_err(torch.cat([context[..., 16:], context[..., :16]], -1), pe) > 1e-2  # [CLIP-L | bigG] order


def test_second_tokenizer_differs_from_diffusers_only_on_exclamation_marks_where_we_follow_open_clip(sdxl_tokenizers):
    cfg = preset("tiny-sdxl").text_2
    hf = lambda texts: sdxl_tokenizers[1](texts, padding="max_length", max_length=77, truncation=True,
                                          return_tensors="pt").input_ids
    assert torch.equal(hf(PIPE_PROMPTS), tokenize(PIPE_PROMPTS, cfg))
    ours, theirs = tokenize(["pears!"], cfg)[0], hf(["pears!"])[0]
    assert ours[2] == 256 and theirs[2] == 0 and ours[3] == theirs[3] == 49407  # "!</w>" vs the pad token "!"


def test_tiny_sdxl_state_dict_has_exactly_the_four_sdxl_single_file_prefixes():
    keys = set(StableDiffusion(preset("tiny-sdxl")).state_dict())
    assert all(any(k.startswith(p) for p in SDXL_PREFIXES) for k in keys), \
        sorted(k for k in keys if not any(k.startswith(p) for p in SDXL_PREFIXES))[:5]
    assert all(any(k.startswith(p) for k in keys) for p in SDXL_PREFIXES)
    assert "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys and "model.diffusion_model.label_emb.0.2.bias" in keys
    assert not any("position_ids" in k for k in keys)


def test_encode_text_for_sd1_and_sd2_is_bit_identical_to_cond_stage_model_on_tokenize():
    sd2_text = TextConfig(kind="openclip", width=32, heads=2, layers=2, projection_dim=32, skip_last_layer=True)
    for cfg in (preset("tiny"), ModelConfig(unet=preset("tiny").unet, vae=preset("tiny").vae, text=sd2_text)):
        sd = StableDiffusion(cfg)
        randomize_(sd.cond_stage_model, seed=2).eval()
        with torch.no_grad():
            context, pooled = sd.encode_text(PROMPTS)
            ref = sd.cond_stage_model(tokenize(PROMPTS, cfg.text))
        assert pooled is None and torch.equal(context, ref), cfg.family


def test_size_conditioning_and_conditioner_reject_bad_input_with_one_line_errors():
    pooled = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="original_size must be a pair"):
        size_conditioning(pooled, (40,), CROP, TARGET, 8)
    with pytest.raises(ValueError, match=r"pooled must be \(B, P\)"):
        size_conditioning(torch.zeros(32), ORIGINAL, CROP, TARGET, 8)
    with pytest.raises(ValueError, match="even and positive"):
        size_conditioning(pooled, ORIGINAL, CROP, TARGET, 7)
    with pytest.raises(ValueError, match="pooled=True"):
        GeneralConditioner(preset("tiny-sdxl").text, TextConfig(kind="openclip", width=32, heads=2, layers=2))


# --- full size (by hand: pytest -m slow) --------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_sdxl_unet_matches_diffusers_at_32x32_latents():
    cfg = preset("sdxl")
    ours, theirs, checkpoint, converted, _ = build_sdxl_unet_pair(cfg, meta=True)  # one copy of the weights
    assert_all_consumed(checkpoint, converted)
    n_params = sum(p.numel() for p in ours.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 32, 32, generator=gen)
    t = torch.tensor([321])
    context = torch.randn(1, 77, 2048, generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    y = size_conditioning(pooled, (1024, 768), (0, 0), (1024, 768), cfg.size_embed_dim)
    added = {"text_embeds": pooled, "time_ids": time_ids(1, (1024, 768), (0, 0), (1024, 768))}
    with torch.no_grad():
        start = time.perf_counter()
        a = ours(x, t, context, y)
        mid = time.perf_counter()
        b = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        end = time.perf_counter()
    assert b.std() > 1e-2
    err = rel_err(a, b)
    report(f"unet full-size sdxl ({n_params / 1e6:.0f}M params); ours {mid - start:.1f} s, diffusers {end - mid:.1f} s",
           err)
    assert err < TOL
