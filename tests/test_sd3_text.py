"""SD3's text encoders against transformers and diffusers (fp32, relative error < 1e-4), each with a wrong variant
that misses by more than 1e-3: CLIP-L and CLIP-G as CLIPTextModelWithProjection (MLP widths of 37, as in diffusers'
tiny SD3 pipeline), T5EncoderModel and its tokenizer, and the whole conditioning as
StableDiffusion3Pipeline.encode_prompt builds it, with and without T5.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

import oracles
from conftest import randomize_, rel_err, report
from diffedit.models import PRESETS, StableDiffusion3, T5Tokenizer, tokenize
from diffedit.models.t5 import T5Attention, T5EncoderModel
from diffedit.models.text import FrozenCLIPEmbedder

transformers = pytest.importorskip("transformers")

TOL, WRONG = 1e-4, 1e-3
CFG = PRESETS["tiny-sd3"]
LONG = " ".join(["a red cat on a bench with a blue dog"] * 12)  # > 77 CLIP tokens and > 64 T5 tokens
TEXTS = ["a photo of an astronaut riding a horse on the moon", "", LONG]
T5_WORDS = "a photo of an the cat dog on bench red blue green astronaut riding horse moon with".split()


def t5_tokenizer(folder: Path):
    """A SentencePiece-unigram T5 tokenizer (transformers' T5TokenizerFast) saved in ``folder``: <pad> 0, </s> 1,
    <unk> 2, words, then single characters (no hub: T5's own vocabulary cannot be downloaded here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0 - 0.01 * i) for i, w in enumerate(T5_WORDS)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -6.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    hf = transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                      extra_ids=0)
    hf.save_pretrained(folder)
    return transformers.T5TokenizerFast.from_pretrained(folder)


def hf_text_encoders(seed: int = 0) -> dict:
    """transformers' towers at tiny-sd3's sizes, every parameter random. CLIP-L pools at its eos id (49407), CLIP-G
    keeps CLIP's legacy ids (eos 2: transformers then pools at the argmax of the ids)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel as HFT5
    clip = lambda t, act, **ids: CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=t.width, intermediate_size=t.mlp_width, num_attention_heads=t.heads, num_hidden_layers=t.layers,
        projection_dim=t.projection_dim, hidden_act=act, vocab_size=t.vocab_size, **ids))
    t = CFG.text_3
    nets = {"text_encoder": clip(CFG.text, "quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
            "text_encoder_2": clip(CFG.text_2, "gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
            "text_encoder_3": HFT5(T5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff,
                                            num_layers=t.num_layers, num_heads=t.num_heads,
                                            feed_forward_proj="gated-gelu",
                                            relative_attention_num_buckets=t.relative_attention_num_buckets,
                                            relative_attention_max_distance=t.relative_attention_max_distance))}
    return {k: randomize_(net, seed=seed + i).eval() for i, (k, net) in enumerate(nets.items())}


def sd3_pipeline(folder: Path, with_t5: bool, seed: int = 0):
    """diffusers' StableDiffusion3Pipeline of tiny-sd3's sizes, every network random, tokenizers built offline in
    ``folder`` (CLIP-G's pads with "!", as SD3's)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    m, v = CFG.mmdit, CFG.vae
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=CFG.resolution // v.downsampling, patch_size=m.patch_size, in_channels=m.in_channels,
        num_layers=m.depth, attention_head_dim=m.head_dim, num_attention_heads=m.heads,
        joint_attention_dim=m.context_dim,
        caption_projection_dim=m.hidden_size, pooled_projection_dim=m.pooled_dim, out_channels=m.out_channels,
        pos_embed_max_size=m.pos_embed_max_size, dual_attention_layers=m.dual_attention_layers, qk_norm="rms_norm")
    vae = AutoencoderKL(block_out_channels=[v.ch * k for k in v.ch_mult], layers_per_block=v.num_res_blocks,
                        latent_channels=v.z_channels, norm_num_groups=v.norm_groups, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=v.scaling_factor, shift_factor=v.shift_factor,
                        force_upcast=False, down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                        up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult))
    text = hf_text_encoders(seed)
    for sub in ("1", "2", "3"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusion3Pipeline(
        transformer=randomize_(transformer, seed + 10).eval(), vae=randomize_(vae, seed + 11).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=CFG.flow_shift),
        text_encoder=text["text_encoder"], tokenizer=oracles.clip_tokenizer(folder / "1"),
        text_encoder_2=text["text_encoder_2"], tokenizer_2=oracles.clip_tokenizer(folder / "2", pad_token="!"),
        text_encoder_3=text["text_encoder_3"] if with_t5 else None,
        tokenizer_3=t5_tokenizer(folder / "3") if with_t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_from(pipe, with_t5: bool) -> StableDiffusion3:
    """Our SD3 model holding the pipeline's text encoders (the same HF names under Stability's prefixes)."""
    cfg = CFG if with_t5 else dataclasses.replace(CFG, text_3=None)
    model = StableDiffusion3(cfg).eval()
    enc = model.text_encoders
    enc.clip_l.transformer.load_state_dict(pipe.text_encoder.state_dict(), strict=True)
    enc.clip_g.transformer.load_state_dict(pipe.text_encoder_2.state_dict(), strict=True)
    if with_t5:
        t5 = {k: x for k, x in pipe.text_encoder_3.state_dict().items() if k != "encoder.embed_tokens.weight"}
        enc.t5xxl.transformer.load_state_dict(t5, strict=True)
        model.t5_tokenizer = T5Tokenizer(Path(pipe.tokenizer_3.name_or_path) / "tokenizer.json")
    return model


@pytest.fixture(scope="module")
def hf():
    return hf_text_encoders(seed=3)


@pytest.mark.parametrize("sub,name", [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")])
@torch.no_grad()
def test_clip_towers_match_clip_text_model_with_projection(hf, sub, name):
    cfg = CFG.text if name == "clip_l" else CFG.text_2
    ours = FrozenCLIPEmbedder(cfg).eval()
    ours.transformer.load_state_dict(hf[sub].state_dict(), strict=True)
    ids = tokenize(TEXTS, cfg)
    ref = hf[sub](ids, output_hidden_states=True)
    context, pooled = ours(ids)
    errs = rel_err(context, ref.hidden_states[-2]), rel_err(pooled, ref.text_embeds)
    report(f"sd3 {name} context, pooled", max(errs))
    assert max(errs) < TOL, errs
    wrong = FrozenCLIPEmbedder(dataclasses.replace(cfg, final_norm=True)).eval()  # the final norm on the penultimate
    wrong.load_state_dict(ours.state_dict())
    assert rel_err(wrong(ids)[0], ref.hidden_states[-2]) > WRONG


@torch.no_grad()
def test_t5_encoder_matches_transformers_and_needs_its_position_bias(hf, monkeypatch):
    ours = T5EncoderModel(CFG.text_3).eval()
    ours.load_state_dict({k: x for k, x in hf["text_encoder_3"].state_dict().items()
                          if k != "encoder.embed_tokens.weight"}, strict=True)
    ids = torch.randint(0, CFG.text_3.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = hf["text_encoder_3"](input_ids=ids).last_hidden_state
    err = rel_err(ours(ids), ref)
    report("sd3 t5 encoder", err)
    assert err < TOL
    monkeypatch.setattr(T5Attention, "position_bias", lambda self, n, cfg: torch.zeros(1, 1, n, n))
    assert rel_err(ours(ids), ref) > WRONG


def test_t5_tokenizer_matches_transformers_and_warns_once_about_dropped_tokens(tmp_path, caplog):
    hf = t5_tokenizer(tmp_path)
    ours = T5Tokenizer(tmp_path / "tokenizer.json")
    for length in (64, 256):
        ref = hf(TEXTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        with caplog.at_level(logging.WARNING, logger="diffedit.models.text"):
            caplog.clear()
            assert torch.equal(ours(TEXTS, length), ref)
        dropped = len(hf(LONG).input_ids) - length
        warnings = [r.getMessage() for r in caplog.records]
        assert (len(warnings), dropped > 0) in ((1, True), (0, False))
        if warnings:
            assert f"{dropped} tokens dropped from 'a red cat on a bench" in warnings[0]


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
@torch.no_grad()
def test_encode_text_is_stable_diffusion_3_pipeline_encode_prompt(tmp_path, with_t5):
    """context = [CLIP-L | CLIP-G penultimate, zero-padded to T5's width ; T5 or 256 zero tokens], pooled =
    [CLIP-L | CLIP-G]; the 77-token CLIP truncation of the long prompt included."""
    pipe = sd3_pipeline(tmp_path, with_t5)
    model = ours_from(pipe, with_t5)
    context, pooled = model.encode_text(TEXTS)
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(TEXTS, None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=CFG.t5_tokens)
    assert context.shape == (3, 77 + CFG.t5_tokens, CFG.mmdit.context_dim) and pooled.shape == (3, CFG.mmdit.pooled_dim)
    errs = rel_err(context, ref_context), rel_err(pooled, ref_pooled)
    report(f"sd3 encode_text ({'with' if with_t5 else 'without'} T5) context, pooled", max(errs))
    assert max(errs) < TOL, errs
    if not with_t5:
        assert not context[:, 77:].any()
    split = CFG.text.projection_dim
    swapped = torch.cat([pooled[:, split:], pooled[:, :split]], dim=-1)  # [CLIP-G | CLIP-L]
    assert rel_err(swapped, ref_pooled) > WRONG


def test_t5_model_without_its_tokenizer_is_one_clear_error():
    with pytest.raises(ValueError, match="T5-XXL but no T5 tokenizer"):
        StableDiffusion3(CFG).encode_text(["a cat"])
