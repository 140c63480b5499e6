"""SD3 / SD3.5: Stability's single files and diffusers folders, onto the names of ``models.StableDiffusion3``.

Single files (``sd3_medium_incl_clips*.safetensors``, ``sd3.5_{medium,large}.safetensors``) hold
``model.diffusion_model.`` (the MMDiT), ``first_stage_model.`` (the VAE, LDM names) and, in some releases,
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (HF names). Files without text encoders take them from the
``text_encoders/`` folder beside them (``clip_l``, ``clip_g``, ``t5xxl_fp16`` or ``t5xxl`` ``.safetensors``, as in
Stability's SD3.5 repositories). T5's tokenizer is ``tokenizer_3/tokenizer.json`` beside the file or in the folder.

What shapes cannot tell is the originals' choice: 64-wide heads (CLIP and MMDiT without qk-norm), CLIP-L with
QuickGELU padding with end-of-text, CLIP-G with GELU padding with "!" (id 0), T5's max distance 128, the VAE's scale
and shift, the flow shift 3.0, 1024 px. CLIP-L's pooled text is not projected in Stability's reference code
(``return_projected_pooled=False``; diffusers' single-file loader puts the identity there): a single file's CLIP-L
projection is the identity, whatever the file holds. A timestep-distilled Turbo model is refused (``refuse_turbo``).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..models import PRESETS, MMDiTConfig, ModelConfig, T5Config, TextConfig
from .errors import CheckpointError
from .layout import SD3_CLIP_G_PREFIX, SD3_CLIP_L_PREFIX, SD3_KEY, SD3_T5_PREFIX, UNET_PREFIX, Tensors

TURBO = ("a timestep-distilled Turbo model (a few-step sampler, trained without classifier-free guidance): DiffEdit's "
         "inversion and mask need the full model's velocity at every level; use stable-diffusion-3.5-large or -medium")
_HOWTO_TEXT = ("put Stability's clip_l.safetensors and clip_g.safetensors (and optionally t5xxl_fp16.safetensors) "
               "in a text_encoders/ folder beside it, as in the stabilityai/stable-diffusion-3.5-* repositories, or "
               "load the diffusers folder / hub id instead")


def is_sd3(shape: dict) -> bool:
    return SD3_KEY in shape


def refuse_turbo(path: Path, metadata: dict | None = None) -> None:
    """Refuse a Turbo model: "turbo" in the file or folder name, in the hub cache's repo folder
    (``models--stabilityai--stable-diffusion-3.5-large-turbo``) or in the file's ``modelspec.*`` metadata. The
    weights cannot tell: SD3.5 Large Turbo has SD3.5 Large's shapes and the same scheduler config."""
    names = [path.name, *(p.name for p in path.parents if p.name.startswith("models--"))]
    names += [str(v) for k, v in (metadata or {}).items() if k.startswith("modelspec.")]
    hit = next((n for n in names if "turbo" in n.lower()), None)
    if hit is not None:
        raise CheckpointError(f"{path}: {TURBO} (turbo in {hit!r})")


def t5_tokenizer_file(path: Path) -> Path:
    """Where T5's tokenizer is for a folder or file ``path``; a one-line error if it is not there."""
    file = (path if path.is_dir() else path.parent) / "tokenizer_3" / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: has T5-XXL weights but no T5 tokenizer at {file}; copy tokenizer_3/ of a "
                              "diffusers SD3 folder there")
    return file


# --- single files ---------------------------------------------------------------------------------------------

def complete_file(path: Path, tensors: Tensors, open_safetensors) -> Tensors:
    """``tensors`` with the text encoders of ``text_encoders/`` beside ``path`` where the file has none, and
    CLIP-L's projection set to the identity."""
    has = lambda prefix: any(k.startswith(prefix) for k in tensors)
    folder = path.parent / "text_encoders"
    for prefix, names in ((SD3_CLIP_L_PREFIX, ["clip_l"]), (SD3_CLIP_G_PREFIX, ["clip_g"]),
                          (SD3_T5_PREFIX, ["t5xxl_fp16", "t5xxl"])):
        if has(prefix):
            continue
        file = next((folder / f"{n}.safetensors" for n in names if (folder / f"{n}.safetensors").is_file()), None)
        if file is None and prefix != SD3_T5_PREFIX:  # T5 is optional
            raise CheckpointError(f"{path}: an SD3 file without its text encoders ({prefix}*, nor {folder / names[0]}"
                                  f".safetensors): {_HOWTO_TEXT}")
        if file is not None:
            tensors = {**tensors, **{prefix + k: v for k, v in open_safetensors(file)[1].items()}}
    width = tensors[SD3_CLIP_L_PREFIX + "text_model.final_layer_norm.weight"][0][0]
    return {**tensors, SD3_CLIP_L_PREFIX + "text_projection.weight": ((width, width), lambda: torch.eye(width))}


def _count(shape: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shape if k.startswith(prefix)})


def _mmdit_from_shapes(shape: dict) -> MMDiTConfig:
    p = UNET_PREFIX
    hidden, cin, patch, _ = shape[p + "x_embedder.proj.weight"]
    depth, ln_q = _count(shape, p + "joint_blocks."), p + "joint_blocks.0.x_block.attn.ln_q.weight"
    table = shape[p + "pos_embed"][1]
    if math.isqrt(table) ** 2 != table:
        raise ValueError(f"{p}pos_embed holds {table} positions, not a square table")
    return MMDiTConfig(
        in_channels=cin, out_channels=shape[p + "final_layer.linear.weight"][0] // patch ** 2, hidden_size=hidden,
        depth=depth, patch_size=patch, pos_embed_max_size=math.isqrt(table),
        context_dim=shape[p + "context_embedder.weight"][1], pooled_dim=shape[p + "y_embedder.mlp.0.weight"][1],
        qk_norm=ln_q in shape, head_dim=shape[ln_q][0] if ln_q in shape else 64,
        dual_attention_layers=tuple(i for i in range(depth)
                                    if f"{p}joint_blocks.{i}.x_block.attn2.qkv.weight" in shape),
        mlp_width=shape[p + "joint_blocks.0.x_block.mlp.fc1.weight"][0])


def _clip_from_shapes(shape: dict, prefix: str, **choice) -> TextConfig:
    p = prefix + "text_model."
    vocab, w = shape[p + "embeddings.token_embedding.weight"]
    return TextConfig(vocab_size=vocab, context_length=shape[p + "embeddings.position_embedding.weight"][0], width=w,
                      heads=max(1, w // 64), layers=_count(shape, p + "encoder.layers."),
                      mlp_width=shape[p + "encoder.layers.0.mlp.fc1.weight"][0],
                      projection_dim=shape[prefix + "text_projection.weight"][0], skip_last_layer=True,
                      final_norm=False, pooled=True, **choice)


def _t5_from_shapes(shape: dict) -> T5Config | None:
    p = SD3_T5_PREFIX
    if p + "shared.weight" not in shape:
        return None
    attn = p + "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shape[attn + "relative_attention_bias.weight"]
    vocab, d_model = shape[p + "shared.weight"]
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=shape[attn + "q.weight"][0] // heads,
                    d_ff=shape[p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                    num_layers=_count(shape, p + "encoder.block."), num_heads=heads,
                    relative_attention_num_buckets=buckets)


def config_from_shapes(shape: dict, vae) -> ModelConfig:
    """The SD3 architecture of a single file (completed by ``complete_file``); ``vae``: its VAE config read from
    the shapes. KeyError / ValueError where a part is missing or malformed."""
    sd3 = PRESETS["sd3-medium"]
    vae = dataclasses.replace(vae, scaling_factor=sd3.vae.scaling_factor, shift_factor=sd3.vae.shift_factor)
    return dataclasses.replace(
        sd3, mmdit=_mmdit_from_shapes(shape), vae=vae, text=_clip_from_shapes(shape, SD3_CLIP_L_PREFIX),
        text_2=_clip_from_shapes(shape, SD3_CLIP_G_PREFIX, hidden_act="gelu", pad_id=0), text_3=_t5_from_shapes(shape))


def check_widths(where: Path, cfg: ModelConfig) -> None:
    """The towers must fit the MMDiT: pooled [CLIP-L | CLIP-G] is y, the CLIP states fit in the context width, which
    is T5's."""
    m, l, g, t5 = cfg.mmdit, cfg.text, cfg.text_2, cfg.text_3
    if l.projection_dim + g.projection_dim != m.pooled_dim:
        raise CheckpointError(f"{where}: CLIP-L's and CLIP-G's pooled widths ({l.projection_dim} + {g.projection_dim}) "
                              f"are not the {m.pooled_dim} inputs of {UNET_PREFIX}y_embedder")
    if l.width + g.width > m.context_dim or (t5 is not None and t5.d_model != m.context_dim):
        raise CheckpointError(f"{where}: the text widths (CLIP-L {l.width} + CLIP-G {g.width}, T5 "
                              f"{t5.d_model if t5 else 'absent'}) do not fit the {m.context_dim} inputs of "
                              f"{UNET_PREFIX}context_embedder")
