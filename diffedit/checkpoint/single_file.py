"""Single files: reading ``.safetensors`` / ``.ckpt`` and, without our metadata, the architecture from the shapes.

The family comes from the key prefixes (SDXL base: both of sgm's conditioner towers; SD3: the MMDiT's joint blocks,
see sd3.py). What shapes cannot tell is the originals' choice: 32 norm groups, 8 heads (SD1) or 64-wide heads (SD2,
SDXL), 64-wide text heads, and for SDXL its VAE's scaling factor 0.13025 with float32 upcasting and 1024 px.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..models import PRESETS, ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..models.unet import block_index
from . import sd3
from .errors import CheckpointError
from .layout import (SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_REFINER_TEXT_PREFIX, SDXL_TEXT_2_PREFIX,
                     SDXL_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, Tensors, weights_only)

log = logging.getLogger(__name__)


def open_safetensors(path: Path) -> tuple[dict, Tensors]:
    """(metadata, tensors) of a safetensors file; each tensor is read only when its reader is called. A reader's
    ``dtype`` attribute is the stored dtype's safetensors name ("BF16", "F8_E4M3", ...)."""
    try:
        f = safe_open(str(path), framework="pt")
        tensors = {}
        for k in f.keys():
            read, part = (lambda k=k: f.get_tensor(k)), f.get_slice(k)
            read.dtype = part.get_dtype()
            tensors[k] = (tuple(part.get_shape()), read)
        return f.metadata() or {}, tensors
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or another format?): {e}") from None


def _read_ckpt(path: Path) -> Tensors:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(f"{path}: holds pickled objects besides tensors ({what[1] if what else 'unknown'}), "
                              "which weights_only loading refuses since unpickling can run code; convert it to "
                              ".safetensors with a tool you trust or use the model's safetensors release") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated?): {first}") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return {k: (tuple(v.shape), lambda v=v: v) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_file(path: Path) -> tuple[ModelConfig, Tensors, bool]:
    """(architecture, tensors, whether the architecture was guessed from shapes)."""
    meta, tensors = ({}, _read_ckpt(path)) if path.suffix in (".ckpt", ".pt", ".pth") else open_safetensors(path)
    tensors = weights_only(tensors)
    if "diffedit_config" not in meta and sd3.is_sd3(tensors):
        sd3.refuse_turbo(path, meta)
        tensors = weights_only(sd3.complete_file(path, tensors, open_safetensors))
    if "diffedit_config" not in meta:
        return infer_config(path, {k: shape for k, (shape, _) in tensors.items()}), tensors, True
    try:
        return ModelConfig.from_dict(json.loads(meta["diffedit_config"])), tensors, False
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable diffedit_config metadata: {e!r}") from None


_NAMES = {"sd1": "Stable Diffusion 1.x/2.x", "sd2": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL base",
          "sd3": "Stable Diffusion 3 / 3.5"}
REFINER = ("an SDXL refiner (OpenCLIP bigG alone, conditioned on an aesthetic score): another model than SDXL base, "
           "which diffedit does not load; use the SDXL base model")


def family_of(path: Path, shape: dict[str, tuple[int, ...]]) -> str:
    """"sd1", "sd2", "sdxl" or "sd3" from the key prefixes; the SDXL refiner and other models are refused in one
    line."""
    # by prefix, where diffusers tests one key each (...embedders.1.model.transformer.resblocks.9...): small too
    has = lambda prefix: any(k.startswith(prefix) for k in shape)
    if has(SDXL_REFINER_TEXT_PREFIX):
        raise CheckpointError(f"{path}: {REFINER} (its keys {SDXL_REFINER_TEXT_PREFIX}* are the refiner's)")
    if sd3.is_sd3(shape) and VAE_PREFIX + "encoder.conv_in.weight" in shape:
        return "sd3"
    core = UNET_PREFIX + "input_blocks.0.0.weight" in shape and VAE_PREFIX + "encoder.conv_in.weight" in shape
    family = next((f for f, ps in (("sdxl", (SDXL_TEXT_PREFIX, SDXL_TEXT_2_PREFIX)), ("sd1", (SD1_TEXT_PREFIX,)),
                                   ("sd2", (SD2_TEXT_PREFIX,))) if all(has(p) for p in ps)), None)
    if not (core and family):
        found = ", ".join(sorted({k.split(".")[0] for k in shape})[:8]) or "nothing"
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint nor an SDXL base one: expected "
                              f"{UNET_PREFIX}*, {VAE_PREFIX}* and {SD1_TEXT_PREFIX}* (SD1), {SD2_TEXT_PREFIX}* (SD2) "
                              f"or {SDXL_TEXT_PREFIX}* with {SDXL_TEXT_2_PREFIX}* (SDXL) keys; top-level names "
                              f"found: {found}")
    return family


def infer_config(path: Path, shape: dict[str, tuple[int, ...]]) -> ModelConfig:
    """The architecture of a single file from its tensor shapes."""
    family = family_of(path, shape)
    try:
        if family == "sd3":
            cfg = sd3.config_from_shapes(shape, _vae_config(shape))
        elif family == "sdxl":  # the scaling factor, the upcast and the resolution are SDXL base's
            xl = PRESETS["sdxl"]
            vae = dataclasses.replace(_vae_config(shape), scaling_factor=xl.vae.scaling_factor,
                                      force_upcast=xl.vae.force_upcast)
            cfg = ModelConfig(unet=_unet_config(shape, family), text=_text_config(shape, SDXL_TEXT_PREFIX, "openai"),
                              vae=vae, text_2=_text_config(shape, SDXL_TEXT_2_PREFIX, "openclip", pooled=True),
                              resolution=xl.resolution)
        else:
            prefix, kind = (SD1_TEXT_PREFIX, "openai") if family == "sd1" else (SD2_TEXT_PREFIX, "openclip")
            cfg = ModelConfig(unet=_unet_config(shape, family), vae=_vae_config(shape),
                              text=_text_config(shape, prefix, kind, skip_last_layer=family == "sd2", final_norm=True))
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: not a {_NAMES[family]} checkpoint: cannot read its architecture "
                              f"({type(e).__name__}: {e})") from None
    if family == "sdxl":
        _check_y(path, cfg.unet.adm_in_channels, cfg.text_2.projection_dim)
    if family == "sd3":
        sd3.check_widths(path, cfg)
    if family == "sd3" and cfg.text_3 is not None:
        sd3.t5_tokenizer_file(path)
    like = [name for name, p in PRESETS.items() if p.family == family and (p.unet, p.vae, p.text, p.text_2, p.mmdit)
            == (cfg.unet, cfg.vae, cfg.text, cfg.text_2, cfg.mmdit)]
    log.info("%s: %s architecture read from the tensor shapes (%s)", path.name, cfg.family,
             f"as {like[0]}" if like else "not a preset's")
    return cfg


def _check_y(path: Path, adm: int, pooled: int):
    """SDXL's y is the pooled text and six equal, even-width size embeddings: the widths must add up."""
    if adm <= pooled or (adm - pooled) % 12:
        raise CheckpointError(f"{path}: {UNET_PREFIX}label_emb.0.0.weight takes {adm} inputs, which is not the "
                              f"pooled text ({pooled}, {SDXL_TEXT_2_PREFIX}text_projection) plus six even-width size "
                              "embeddings")


def _count(shape: dict, prefix: str) -> int:
    """How many numbered children ``prefix`` has."""
    return len({k[len(prefix):].split(".")[0] for k in shape if k.startswith(prefix)})


def _unet_config(shape: dict, family: str) -> UNetConfig:
    blocks, mid = UNET_PREFIX + "input_blocks.", UNET_PREFIX + "middle_block.1."
    in_channels, mc = shape[blocks + "0.0.weight"][1], shape[blocks + "0.0.weight"][0]
    levels = 1 + sum(k.startswith(blocks) and k.endswith(".0.op.weight") for k in shape)
    n = (_count(shape, blocks) - levels) // levels  # conv_in, n blocks a level, a downsampler between levels
    first = [block_index(i, 0, n, levels) for i in range(levels)]  # the first block of each level
    # transformer blocks under each level's first attention (0: the level has none) and in the middle
    depths = tuple(_count(shape, f"{blocks}{b}.1.transformer_blocks.") for b in first)
    middle = _count(shape, mid + "transformer_blocks.")
    # SD1/2 use one depth everywhere (an int, as their presets); SDXL one per level
    uniform = family != "sdxl" and len({d for d in depths if d} | {middle}) == 1
    return UNetConfig(
        in_channels=in_channels, out_channels=shape[UNET_PREFIX + "out.2.weight"][0], model_channels=mc,
        num_res_blocks=n, channel_mult=tuple(shape[f"{blocks}{b}.0.out_layers.3.weight"][0] // mc for b in first),
        attention_resolutions=tuple(2 ** i for i in reversed(range(levels)) if depths[i]),
        num_heads=8, num_head_channels=-1 if family == "sd1" else 64,
        context_dim=shape[mid + "transformer_blocks.0.attn2.to_k.weight"][1],
        use_linear_in_transformer=len(shape[mid + "proj_in.weight"]) == 2,
        transformer_depth=middle if uniform else depths,
        transformer_depth_middle=None if uniform or middle == depths[-1] else middle,
        adm_in_channels=shape[UNET_PREFIX + "label_emb.0.0.weight"][1] if family == "sdxl" else 0)


def _vae_config(shape: dict) -> VAEConfig:
    enc, dec = VAE_PREFIX + "encoder.", VAE_PREFIX + "decoder."
    ch, levels = shape[enc + "conv_in.weight"][0], _count(shape, enc + "down.")
    return VAEConfig(
        in_channels=shape[enc + "conv_in.weight"][1], out_ch=shape[dec + "conv_out.weight"][0], ch=ch,
        ch_mult=tuple(shape[f"{enc}down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels)),
        num_res_blocks=_count(shape, enc + "down.0.block."), z_channels=shape[dec + "conv_in.weight"][1],
        embed_dim=shape.get(VAE_PREFIX + "post_quant_conv.weight", shape[dec + "conv_in.weight"])[1],
        use_quant_conv=VAE_PREFIX + "post_quant_conv.weight" in shape)  # SD3's VAE has none


def _text_config(shape: dict, p: str, kind: str, skip_last_layer: bool = True, final_norm: bool = False,
                 pooled: bool = False) -> TextConfig:
    """The text tower under prefix ``p``, HF CLIP names (``openai``) or open_clip names; SDXL's defaults."""
    if kind == "openai":
        tok, pos, layers, fc1 = (p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight",
                                 p + "encoder.layers.", "mlp.fc1.weight")
    else:
        tok, pos, layers, fc1 = (p + "token_embedding.weight", p + "positional_embedding",
                                 p + "transformer.resblocks.", "mlp.c_fc.weight")
    vocab, w = shape[tok]
    # the pooled tower needs its projection; elsewhere it is unused and zero-filled when absent
    projection = shape[p + "text_projection"] if pooled else shape.get(p + "text_projection", (w, w))
    return TextConfig(kind=kind, vocab_size=vocab, context_length=shape[pos][0], width=w, heads=max(1, w // 64),
                      layers=_count(shape, layers), mlp_width=shape[f"{layers}0.{fc1}"][0],
                      projection_dim=projection[1], skip_last_layer=skip_last_layer, final_norm=final_norm,
                      pooled=pooled)
