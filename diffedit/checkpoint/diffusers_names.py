"""The diffusers -> single-file key map: the inverse of diffusers' single-file converters."""
from __future__ import annotations

import re

import torch

from ..models import TextConfig, UNetConfig, VAEConfig
from ..models.unet import block_index
from .layout import (SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT_2_PREFIX, SDXL_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX,
                     Tensors, weights_only)

_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."),
             ("query.", "q."), ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out."))  # new and old names
# HF CLIPTextModel -> open_clip names, applied in order (q/k/v are fused afterwards).
_OPENCLIP_NAMES = [(r"^text_model\.", ""), (r"^embeddings\.token_embedding\.", "token_embedding."),
                   (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
                   (r"^final_layer_norm\.", "ln_final."), (r"^encoder\.layers\.", "transformer.resblocks."),
                   (r"\.self_attn\.", ".attn."), (r"\.layer_norm1\.", ".ln_1."), (r"\.layer_norm2\.", ".ln_2."),
                   (r"\.mlp\.fc1\.", ".mlp.c_fc."), (r"\.mlp\.fc2\.", ".mlp.c_proj."),
                   (r"^text_projection\.weight$", "text_projection")]  # CLIPTextModelWithProjection (SDXL's bigG)


def ldm_names(t: dict[str, Tensors], unet: UNetConfig, vae: VAEConfig, text: TextConfig,
              text_2: TextConfig | None = None) -> Tensors:
    """The tensors of a diffusers folder's sub-folders under the single-file names (SDXL's if ``text_2``)."""
    if text_2 is not None:  # SDXL: CLIP ViT-L keeps the HF names, bigG gets open_clip's
        clip = {**_renamed(t["text_encoder"], SDXL_TEXT_PREFIX, [("text_model.", "")]),
                **_openclip(t["text_encoder_2"], SDXL_TEXT_2_PREFIX)}
    elif text.kind == "openai":  # HF names, with or without the text_model. prefix
        clip = _renamed(t["text_encoder"], SD1_TEXT_PREFIX, [("text_model.", "")])
    else:
        clip = _openclip(t["text_encoder"], SD2_TEXT_PREFIX)
    return weights_only({**_renamed(t["unet"], UNET_PREFIX, _unet_names(unet)),
                         **_renamed(t["vae"], VAE_PREFIX, _vae_names(vae)), **clip})


def _openclip(src: Tensors, prefix: str) -> Tensors:
    """A transformers CLIP text model under open_clip names: q, k, v fused, text_projection transposed."""
    out = _renamed(src, prefix, rules=_OPENCLIP_NAMES)
    proj = prefix + "text_projection"
    if proj in out:  # a Linear holds W.T of open_clip's x @ W (square in SDXL: only the values tell)
        shape, read = out[proj]
        out[proj] = (shape[::-1], lambda: read().T.contiguous())
    return out


def _resnet(hf: str, ours: str) -> list[tuple[str, str]]:
    return [(hf + a, ours + b) for a, b in _RESNET]


def _unet_names(c: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs: the inverse of diffusers' convert_ldm_unet_checkpoint."""
    n, L = c.num_res_blocks, len(c.channel_mult)
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),  # SDXL y
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1."), *_resnet("mid_block.resnets.0.", "middle_block.0."),
             *_resnet("mid_block.resnets.1.", "middle_block.2.")]
    for level in range(L):  # down_blocks.{level}, up_blocks.{L - 1 - level}
        down, up = f"down_blocks.{level}.", f"up_blocks.{L - 1 - level}."
        for j in range(n):
            b = block_index(level, j, n, L)
            pairs += [*_resnet(f"{down}resnets.{j}.", f"input_blocks.{b}.0."),
                      (f"{down}attentions.{j}.", f"input_blocks.{b}.1.")]
        for j in range(n + 1):
            b = block_index(level, j, n, L, output=True)
            pairs += [*_resnet(f"{up}resnets.{j}.", f"output_blocks.{b}.0."),
                      (f"{up}attentions.{j}.", f"output_blocks.{b}.1.")]
        if level < L - 1:
            pairs.append((f"{down}downsamplers.0.conv.", f"input_blocks.{block_index(level, n, n, L)}.0.op."))
        if level > 0:
            attends = 2 ** level in c.attention_resolutions and c.depth(level) > 0
            up_at = 2 if attends else 1  # after the attention, if any
            pairs.append((f"{up}upsamplers.0.", f"output_blocks.{block_index(level, n, n, L, output=True)}.{up_at}."))
    return pairs


def _vae_names(c: VAEConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs: the inverse of diffusers' convert_ldm_vae_checkpoint."""
    L, pairs = len(c.ch_mult), []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out.", f"{part}.norm_out."),
                  *((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in (0, 1))]
        pairs += [(f"{part}.mid_block.attentions.0.{a}", f"{part}.mid.attn_1.{b}") for a, b in _VAE_ATTN]
    for i in range(L):
        for part, hf, ours, n in (("encoder", f"down_blocks.{i}", f"down.{i}", c.num_res_blocks),
                                  ("decoder", f"up_blocks.{i}", f"up.{L - 1 - i}", c.num_res_blocks + 1)):
            pairs += [(f"{part}.{hf}.downsamplers.0.", f"{part}.{ours}.downsample."),
                      (f"{part}.{hf}.upsamplers.0.", f"{part}.{ours}.upsample.")]
            for j in range(n):
                pairs += [(f"{part}.{hf}.resnets.{j}.conv_shortcut.", f"{part}.{ours}.block.{j}.nin_shortcut."),
                          (f"{part}.{hf}.resnets.{j}.", f"{part}.{ours}.block.{j}.")]
    return pairs


def _renamed(src: Tensors, prefix: str, pairs=(), rules=()) -> Tensors:
    """``prefix`` + the name after the first matching (diffusers prefix, ours) pair and then every regex rule."""
    out = {}
    for key, value in src.items():
        hf, ours = next(((h, o) for h, o in pairs if key.startswith(h)), ("", ""))
        name = ours + key[len(hf):]
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        out[prefix + name] = value
    for q in [k for k in out if k.endswith((".attn.q_proj.weight", ".attn.q_proj.bias"))]:  # open_clip fuses q, k, v
        names = [q.replace(".q_proj.", p) for p in (".q_proj.", ".k_proj.", ".v_proj.")]
        if all(k in out for k in names):
            parts = [out.pop(k) for k in names]
            shape = (sum(s[0] for s, _ in parts), *parts[0][0][1:])
            out[q.replace(".q_proj.", ".in_proj_")] = (shape, lambda ps=parts: torch.cat([read() for _, read in ps]))
    return out
