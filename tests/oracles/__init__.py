"""The reference implementations the tests and the benchmark compare against (never imported by ``diffedit``).

One copy each of: SD's DDIM scheduler config, the astronaut photograph and its edit's captions, transformers' CLIP
tokenizer built offline, diffusers' DiffEdit pipeline on given modules, and the "twin": that pipeline on a DiffEdit's
own weights; diffusers' SDXL and SD3 pipelines on our models' weights.
diffusers, transformers, open_clip and skimage are imported inside the functions that need them.
"""
from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import torch

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)
SOURCE, TARGET = "a photo of an astronaut", "a photo of a robot in a spacesuit"  # the astronaut's edit


def astronaut(side: int, crop=(0, 0, 512, 512)):
    """skimage's astronaut (a real 512 px photograph: structure at every scale, not noise), cropped, resized to
    side x side; without skimage a synthetic stand-in (rings and a gradient)."""
    import numpy as np
    from PIL import Image
    try:
        from skimage import data
        pil = Image.fromarray(data.astronaut())
    except ImportError:
        yy, xx = np.mgrid[0:512, 0:512] / 512.0
        rgb = np.stack([np.sin(20 * np.hypot(xx - .5, yy - .5)), xx, yy], -1) * 127.5 + 127.5
        pil = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    return pil.crop(crop).resize((side, side), Image.LANCZOS)


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer (SD1's) built offline in ``folder`` from open_clip's copy of the OpenAI BPE, the
    way the HF CLIP tokenizer files were made: 256 bytes, the same with </w>, the merges, start and end of text.
    ``pad_token`` "!" (id 0) gives SDXL's second tokenizer."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=77)


def diffedit_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    """diffusers' (deprecated) StableDiffusionDiffEditPipeline on these modules, the inverse scheduler built from
    the sampler's config (SD_SCHEDULER unless given), no safety checker, no progress bars."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_diffedit import StableDiffusionDiffEditPipeline
    scheduler = scheduler or DDIMScheduler(**SD_SCHEDULER)
    pipe = StableDiffusionDiffEditPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ldm_yaml(cfg) -> dict:
    """The parts of an LDM yaml config diffusers' single-file converters read, from our ModelConfig."""
    u, v = cfg.unet, cfg.vae
    heads = {"num_head_channels": u.num_head_channels} if u.num_head_channels > 0 else {"num_heads": u.num_heads}
    depth = u.transformer_depth if isinstance(u.transformer_depth, int) else list(u.transformer_depth)
    adm = {"num_classes": "sequential", "adm_in_channels": u.adm_in_channels} if u.adm_in_channels else {}
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
                channel_mult=list(u.channel_mult), transformer_depth=depth, context_dim=u.context_dim,
                use_linear_in_transformer=u.use_linear_in_transformer, **heads, **adm)
    ddconfig = dict(in_channels=v.in_channels, out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult),
                    num_res_blocks=v.num_res_blocks, z_channels=v.z_channels, attn_resolutions=[])
    return {"model": {"params": {"scale_factor": v.scaling_factor, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}}}}}


def _text_twin(de):
    """transformers' CLIPTextModel with our SD1 text encoder's weights (loaded by name)."""
    from transformers import CLIPTextModel
    text = CLIPTextModel(_clip_config(de.cfg.text, "quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                      pad_token_id=49407))
    return _load_by_name(text, de.model.cond_stage_model.transformer.state_dict()).to(de.device, de.dtype)


def _networks(model, dtype=None) -> dict:
    """diffusers' UNet and VAE holding ``model``'s weights, through diffusers' single-file converters (tensors
    shared with ours, ``assign=True``: no second copy). SDXL's UNet gets the text_time embedding of its y."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    cfg = model.cfg
    yaml, ckpt = _ldm_yaml(cfg), dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ucfg = create_unet_diffusers_config_from_ldm(yaml, ckpt)
        vcfg = create_vae_diffusers_config_from_ldm(yaml, ckpt, image_size=cfg.resolution)
    ucfg["norm_num_groups"], vcfg["norm_num_groups"] = cfg.unet.norm_groups, cfg.vae.norm_groups
    if cfg.unet.adm_in_channels:  # the converter decides text_time from SDXL's context widths only
        ucfg.update(addition_embed_type="text_time", class_embed_type=None,
                    addition_time_embed_dim=cfg.size_embed_dim)
    vcfg["scaling_factor"], vcfg["force_upcast"] = cfg.vae.scaling_factor, cfg.vae.force_upcast
    nets = {}
    for key, cls, config, sd in (("unet", UNet2DConditionModel, ucfg, convert_ldm_unet_checkpoint(ckpt, ucfg)),
                                 ("vae", AutoencoderKL, vcfg, convert_ldm_vae_checkpoint(ckpt, vcfg))):
        with torch.device("meta"):
            net = cls(**config)
        net.load_state_dict({k: t if dtype is None else t.to(dtype) for k, t in sd.items()}, strict=True, assign=True)
        left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"diffusers {key}: tensors left on meta: {left[:3]}")
        nets[key] = net.eval().requires_grad_(False)
    return nets


def _load_by_name(net, state: dict):
    """Load ``state`` into a transformers text model, with or without its ``text_model.`` prefix (5.x drops it
    for CLIPTextModel only); position_ids may be missing."""
    if not any(k.startswith("text_model.") for k in net.state_dict()):
        state = {k.removeprefix("text_model."): x for k, x in state.items()}
    res = net.load_state_dict(state, strict=False)
    if res.unexpected_keys or any("position_ids" not in k for k in res.missing_keys):
        raise RuntimeError(f"text encoder keys: {res}")
    return net.eval().requires_grad_(False)


def _clip_config(t, act: str, **ids):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(hidden_size=t.width, intermediate_size=t.mlp_width, num_attention_heads=t.heads,
                          num_hidden_layers=t.layers, vocab_size=t.vocab_size, max_position_embeddings=t.context_length,
                          projection_dim=t.projection_dim, hidden_act=act, **ids)


@torch.no_grad()
def sdxl_pipeline(model, tok_dir: Path):
    """diffusers' StableDiffusionXLPipeline on an SDXL ``StableDiffusion``'s own weights (fp32, SD's DDIM
    scheduler): the UNet and VAE through diffusers' converters, CLIP-L by name, bigG through
    ``convert_open_clip_checkpoint`` (which transposes text_projection); ``tok_dir`` receives the tokenizer files."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    cfg = model.cfg
    if cfg.family != "sdxl":
        raise ValueError("sdxl_pipeline needs an SDXL model")
    nets = _networks(model)
    emb = model.conditioner.embedders
    clip_l = _load_by_name(CLIPTextModel(_clip_config(cfg.text, "quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                                      pad_token_id=49407)), emb[0].transformer.state_dict())
    # SDXL's second config keeps CLIP's legacy ids (eos 2): transformers then pools at the argmax of the ids.
    big_g = CLIPTextModelWithProjection(_clip_config(cfg.text_2, "gelu", bos_token_id=0, eos_token_id=2,
                                                     pad_token_id=1))
    prefix = "conditioner.embedders.1.model."
    ours = {prefix + k: x for k, x in emb[1].model.state_dict().items()}
    big_g = _load_by_name(big_g, convert_open_clip_checkpoint(big_g, ours, prefix=prefix))
    tok_dir = Path(tok_dir)
    (tok_dir / "1").mkdir(parents=True, exist_ok=True)
    (tok_dir / "2").mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionXLPipeline(vae=nets["vae"], text_encoder=clip_l, text_encoder_2=big_g,
                                     tokenizer=clip_tokenizer(tok_dir / "1"),
                                     tokenizer_2=clip_tokenizer(tok_dir / "2", pad_token="!"), unet=nets["unet"],
                                     scheduler=DDIMScheduler(**SD_SCHEDULER), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _on_meta(cls, config: dict, state: dict, **kwargs):
    """A diffusers model built on the meta device, then given ``state``'s tensors themselves (assign=True)."""
    with torch.device("meta"):
        net = cls(**config, **kwargs)
    net.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers {cls.__name__}: tensors left on meta: {left[:3]}")
    return net.eval().requires_grad_(False)


def sd3_transformer(mmdit, sample_size: int | None = None):
    """diffusers' SD3Transformer2DModel holding an ``MMDiT``'s tensors, through diffusers' own
    ``convert_sd3_transformer_checkpoint_to_diffusers`` (which must use every key) onto a model built on meta: tensors
    the converter passes through are shared, not copied. ``sample_size``: its config's (default: the table's side)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    m = mmdit.cfg
    single_file = {f"model.diffusion_model.{k}": v for k, v in mmdit.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(single_file)
    if single_file:
        raise RuntimeError(f"keys diffusers' converter did not use: {sorted(single_file)[:5]}")
    return _on_meta(SD3Transformer2DModel, dict(
        sample_size=sample_size or 2 * m.pos_embed_max_size, patch_size=m.patch_size, in_channels=m.in_channels,
        num_layers=m.depth, attention_head_dim=m.head_dim, num_attention_heads=m.heads,
        joint_attention_dim=m.context_dim, caption_projection_dim=m.hidden_size, pooled_projection_dim=m.pooled_dim,
        out_channels=m.out_channels, pos_embed_max_size=m.pos_embed_max_size,
        dual_attention_layers=m.dual_attention_layers, qk_norm="rms_norm" if m.qk_norm else None), converted)


@torch.no_grad()
def sd3_pipeline(model, tok_dir: Path):
    """diffusers' StableDiffusion3Pipeline on an SD3 ``StableDiffusion3``'s own weights, without T5 (fp32, its
    FlowMatchEulerDiscreteScheduler with the model's shift): the MMDiT through diffusers' own
    ``convert_sd3_transformer_checkpoint_to_diffusers`` and the VAE through ``convert_ldm_vae_checkpoint`` (tensors
    shared with ours where the converters pass them through), the CLIP towers by name; ``tok_dir`` receives the
    tokenizer files."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextModelWithProjection
    cfg = model.cfg
    if cfg.family != "sd3" or cfg.text_3 is not None:
        raise ValueError("sd3_pipeline needs an SD3 model without T5")
    v, state = cfg.vae, model.state_dict()
    transformer = sd3_transformer(model.mmdit, sample_size=cfg.resolution // v.downsampling)
    vae_config = dict(block_out_channels=[v.ch * k for k in v.ch_mult], layers_per_block=v.num_res_blocks,
                      latent_channels=v.z_channels, norm_num_groups=v.norm_groups, use_quant_conv=False,
                      use_post_quant_conv=False, scaling_factor=v.scaling_factor, shift_factor=v.shift_factor,
                      force_upcast=False, down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                      up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult))
    vae = _on_meta(AutoencoderKL, vae_config, convert_ldm_vae_checkpoint(state, vae_config))
    enc = model.text_encoders
    # CLIP-G keeps CLIP's legacy ids (eos 2): transformers then pools at the argmax of the ids, its end of text.
    clip_l = _load_by_name(CLIPTextModelWithProjection(_clip_config(
        cfg.text, cfg.text.hidden_act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)),
        enc.clip_l.transformer.state_dict())
    clip_g = _load_by_name(CLIPTextModelWithProjection(_clip_config(
        cfg.text_2, cfg.text_2.hidden_act, bos_token_id=0, eos_token_id=2, pad_token_id=1)),
        enc.clip_g.transformer.state_dict())
    tok_dir = Path(tok_dir)
    for sub in ("1", "2"):
        (tok_dir / sub).mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift),
        text_encoder=clip_l, tokenizer=clip_tokenizer(tok_dir / "1"),
        text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(tok_dir / "2", pad_token="!"),
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def diffusers_twin(de, tok_dir: Path):
    """diffusers' DiffEdit pipeline on a DiffEdit's OWN weights: the UNet and VAE state dicts through diffusers'
    single-file converters (tensors shared with ours, ``assign=True``: no second copy), the SD1 text encoder by
    name; ``tok_dir`` receives the tokenizer files."""
    if de.cfg.text.kind != "openai":
        raise ValueError("the twin is built for SD1-style (OpenAI CLIP) models only")
    nets = _networks(de.model, de.dtype)
    return diffedit_pipeline(nets["unet"], nets["vae"], _text_twin(de), clip_tokenizer(tok_dir))
