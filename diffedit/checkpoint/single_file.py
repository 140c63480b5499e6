"""Single files: reading ``.safetensors`` / ``.ckpt`` and, without our metadata, the architecture from the shapes.

What shapes cannot tell is the originals' choice: 32 norm groups, 8 heads (SD1) or 64-wide heads (SD2),
64-wide text heads.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..models import PRESETS, ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..models.unet import block_index
from .errors import CheckpointError
from .layout import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, Tensors, weights_only

log = logging.getLogger(__name__)


def open_safetensors(path: Path) -> tuple[dict, Tensors]:
    """(metadata, tensors) of a safetensors file; each tensor is read only when its reader is called."""
    try:
        f = safe_open(str(path), framework="pt")
        return f.metadata() or {}, {k: (tuple(f.get_slice(k).get_shape()), lambda k=k: f.get_tensor(k))
                                    for k in f.keys()}
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
    if "diffedit_config" not in meta:
        return infer_config(path, {k: shape for k, (shape, _) in tensors.items()}), tensors, True
    try:
        return ModelConfig.from_dict(json.loads(meta["diffedit_config"])), tensors, False
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable diffedit_config metadata: {e!r}") from None


def infer_config(path: Path, shape: dict[str, tuple[int, ...]]) -> ModelConfig:
    """The architecture of an LDM single file from its tensor shapes."""
    sd1 = any(k.startswith(SD1_TEXT_PREFIX) for k in shape)
    if not (UNET_PREFIX + "input_blocks.0.0.weight" in shape and VAE_PREFIX + "encoder.conv_in.weight" in shape
            and (sd1 or any(k.startswith(SD2_TEXT_PREFIX) for k in shape))):
        found = ", ".join(sorted({k.split(".")[0] for k in shape})[:8]) or "nothing"
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint: expected {UNET_PREFIX}*, "
                              f"{VAE_PREFIX}* and {SD1_TEXT_PREFIX}* (SD1) or {SD2_TEXT_PREFIX}* (SD2) keys; "
                              f"top-level names found: {found}")
    try:
        cfg = ModelConfig(unet=_unet_config(shape, sd1), vae=_vae_config(shape), text=_text_config(shape, sd1))
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint: cannot read its architecture "
                              f"({type(e).__name__}: {e})") from None
    like = [name for name, p in PRESETS.items() if (p.unet, p.vae, p.text) == (cfg.unet, cfg.vae, cfg.text)]
    log.info("%s: %s architecture read from the tensor shapes (%s)", path.name, cfg.family,
             f"as {like[0]}" if like else "not a preset's")
    return cfg


def _count(shape: dict, prefix: str) -> int:
    """How many numbered children ``prefix`` has."""
    return len({k[len(prefix):].split(".")[0] for k in shape if k.startswith(prefix)})


def _unet_config(shape: dict, sd1: bool) -> UNetConfig:
    blocks, mid = UNET_PREFIX + "input_blocks.", UNET_PREFIX + "middle_block.1."
    in_channels, mc = shape[blocks + "0.0.weight"][1], shape[blocks + "0.0.weight"][0]
    levels = 1 + sum(k.startswith(blocks) and k.endswith(".0.op.weight") for k in shape)
    n = (_count(shape, blocks) - levels) // levels  # conv_in, n blocks a level, a downsampler between levels
    first = [block_index(i, 0, n, levels) for i in range(levels)]  # the first block of each level
    return UNetConfig(
        in_channels=in_channels, out_channels=shape[UNET_PREFIX + "out.2.weight"][0], model_channels=mc,
        num_res_blocks=n, channel_mult=tuple(shape[f"{blocks}{b}.0.out_layers.3.weight"][0] // mc for b in first),
        attention_resolutions=tuple(2 ** i for i in reversed(range(levels))
                                    if f"{blocks}{first[i]}.1.proj_in.weight" in shape),
        num_heads=8, num_head_channels=-1 if sd1 else 64,
        context_dim=shape[mid + "transformer_blocks.0.attn2.to_k.weight"][1],
        use_linear_in_transformer=len(shape[mid + "proj_in.weight"]) == 2,
        transformer_depth=_count(shape, mid + "transformer_blocks."))


def _vae_config(shape: dict) -> VAEConfig:
    enc, dec = VAE_PREFIX + "encoder.", VAE_PREFIX + "decoder."
    ch, levels = shape[enc + "conv_in.weight"][0], _count(shape, enc + "down.")
    return VAEConfig(
        in_channels=shape[enc + "conv_in.weight"][1], out_ch=shape[dec + "conv_out.weight"][0], ch=ch,
        ch_mult=tuple(shape[f"{enc}down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels)),
        num_res_blocks=_count(shape, enc + "down.0.block."), z_channels=shape[dec + "conv_in.weight"][1],
        embed_dim=shape[VAE_PREFIX + "post_quant_conv.weight"][1])


def _text_config(shape: dict, sd1: bool) -> TextConfig:
    if sd1:  # HF CLIP names
        p = SD1_TEXT_PREFIX
        tok, pos, layers, fc1 = (p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight",
                                 p + "encoder.layers.", "mlp.fc1.weight")
    else:  # open_clip names
        p = SD2_TEXT_PREFIX
        tok, pos, layers, fc1 = (p + "token_embedding.weight", p + "positional_embedding",
                                 p + "transformer.resblocks.", "mlp.c_fc.weight")
    vocab, w = shape[tok]
    return TextConfig(kind="openai" if sd1 else "openclip", vocab_size=vocab, context_length=shape[pos][0],
                      width=w, heads=max(1, w // 64), layers=_count(shape, layers),
                      mlp_ratio=shape[f"{layers}0.{fc1}"][0] // w,
                      projection_dim=shape.get(SD2_TEXT_PREFIX + "text_projection", (w, w))[1], skip_last_layer=not sd1)
