"""FLUX.1: Black Forest Labs' single files and diffusers folders, onto the names of ``models.FluxModel``.

A BFL single file (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``) holds the transformer alone, its keys
bare (``double_blocks.N...``) or under ``model.diffusion_model.``; as in BFL's repositories, the rest is beside it:
the VAE as ``ae.safetensors`` (LDM names) or a diffusers ``vae/`` folder, CLIP-L in ``text_encoder/``, T5-XXL in
``text_encoder_2/`` and T5's tokenizer in ``tokenizer_2/``. A diffusers folder holds all of them, the transformer
as ``FluxTransformer2DModel`` (its names mapped back here: the inverse of diffusers'
``convert_flux_transformer_checkpoint_to_diffusers``). Whether a model is dev or schnell is the guidance embedding
(``guidance_in``); a folder's scheduler config gives the shift, else the release's values are used.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..models import PRESETS, FluxConfig, FluxSchedule, ModelConfig
from .diffusers_folder import open_weights, text_config, vae_config
from .diffusers_names import _renamed, _vae_names
from .errors import CheckpointError
from .layout import FLUX_CLIP_L_PREFIX, FLUX_KEY, FLUX_T5_PREFIX, UNET_PREFIX, VAE_PREFIX, Tensors, weights_only
from .sd3_folder import _t5
from .single_file import _vae_config, open_safetensors

FLUX_WEIGHTS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def is_flux(shape: dict) -> bool:
    return FLUX_KEY in shape or UNET_PREFIX + FLUX_KEY in shape


def release_defaults(guidance_embed: bool) -> dict:
    """The knob defaults of FLUX.1-dev (guidance embedded) or schnell (``ModelConfig.edit_defaults``)."""
    return PRESETS["flux-dev" if guidance_embed else "flux-schnell"].edit_defaults()


def file_defaults(tensors: Tensors) -> dict:
    """A BFL transformer file's knob defaults, from its keys: dev has ``guidance_in``."""
    key = "guidance_in.in_layer.weight"
    return release_defaults(key in tensors or UNET_PREFIX + key in tensors)


def t5_tokenizer(path: Path) -> Path:
    """FLUX.1's T5 tokenizer: ``tokenizer_2/tokenizer.json`` in the folder or beside the file."""
    file = (path if path.is_dir() else path.parent) / "tokenizer_2" / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no T5 tokenizer at {file}; copy tokenizer_2/ of a diffusers FLUX.1 folder there")
    return file


def _count(shape: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shape if k.startswith(prefix)})


def flux_from_shapes(shape: dict) -> FluxConfig:
    """The transformer's architecture from its tensors' shapes (keys under ``model.diffusion_model.``)."""
    p = UNET_PREFIX
    hidden, cin = shape[p + "img_in.weight"]
    head_dim = shape[p + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    axes = _axes(head_dim)
    return FluxConfig(in_channels=cin, hidden_size=hidden, mlp_width=shape[p + "double_blocks.0.img_mlp.0.weight"][0],
                      num_heads=hidden // head_dim, depth=_count(shape, p + "double_blocks."),
                      depth_single_blocks=_count(shape, p + "single_blocks."), axes_dim=axes,
                      context_in_dim=shape[p + "txt_in.weight"][1], vec_in_dim=shape[p + "vector_in.in_layer.weight"][1],
                      guidance_embed=p + "guidance_in.in_layer.weight" in shape)


def _axes(head_dim: int) -> tuple[int, int, int]:
    """The RoPE channels per id axis, which the shapes cannot tell: FLUX.1's split of its 128-wide heads (16, 56,
    56), an eighth and then half the rest each, at this head width; each must be even (channel pairs)."""
    first = head_dim // 8
    axes = (first, (head_dim - first) // 2, (head_dim - first) // 2)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise ValueError(f"heads {head_dim} wide cannot be split into FLUX.1's RoPE axes (1/8, 7/16, 7/16, even)")
    return axes


def _schedule(root: Path | None, guidance_embed: bool) -> FluxSchedule:
    """The folder's scheduler config (dev: dynamic shifting; schnell: none), else the release's values."""
    base = PRESETS["flux-dev" if guidance_embed else "flux-schnell"].flux_schedule
    sched = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if sched is None or not sched.is_file():
        return base
    s = json.loads(sched.read_text())
    return dataclasses.replace(base, base_shift=s.get("base_shift", 0.5), max_shift=s.get("max_shift", 1.15),
                               base_image_seq_len=s.get("base_image_seq_len", 256),
                               max_image_seq_len=s.get("max_image_seq_len", 4096),
                               dynamic=bool(s.get("use_dynamic_shifting", False)), shift=float(s.get("shift", 1.0)))


def _text(root: Path, where: Path) -> tuple[dict, Tensors]:
    """CLIP-L's and T5's configs and tensors (under our prefixes) from ``root``'s text_encoder{,_2}/ folders."""
    missing = [s for s in ("text_encoder", "text_encoder_2") if not (root / s / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{where}: FLUX.1's text encoders are not beside it ({', '.join(missing)}/config.json "
                              f"missing in {root}); put the diffusers folder's text_encoder/, text_encoder_2/ and "
                              "tokenizer_2/ there")
    c = {s: json.loads((root / s / "config.json").read_text()) for s in ("text_encoder", "text_encoder_2")}
    act = c["text_encoder"].get("hidden_act", "quick_gelu")
    cfgs = dict(text=text_config(c["text_encoder"], "openai", hidden_act=act), text_3=_t5(root, c["text_encoder_2"]))
    # transformers 5 saves CLIPTextModel without its ``text_model.`` prefix
    clip = {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in open_weights(root / "text_encoder", "model").items() if not k.startswith("text_projection")}
    tensors = {**{FLUX_CLIP_L_PREFIX + k: v for k, v in clip.items()},
               **{FLUX_T5_PREFIX + k: v for k, v in open_weights(root / "text_encoder_2", "model").items()}}
    return cfgs, tensors


def read_flux_folder(root: Path) -> tuple[ModelConfig, Tensors, bool]:
    """(architecture, tensors under the BFL single-file names, False: nothing is guessed)."""
    missing = [f"{s}/config.json" for s in ("transformer", "vae") if not (root / s / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{root}: not a FLUX.1 diffusers folder: {', '.join(missing)} missing")
    u, v = (json.loads((root / s / "config.json").read_text()) for s in ("transformer", "vae"))
    try:
        if u.get("patch_size", 1) != 1:
            raise CheckpointError(f"{root / 'transformer/config.json'}: patch_size {u['patch_size']}, expected 1")
        heads, head_dim = u["num_attention_heads"], u["attention_head_dim"]
        flux = FluxConfig(in_channels=u.get("in_channels", 64), hidden_size=heads * head_dim,
                          mlp_width=4 * heads * head_dim, num_heads=heads, depth=u["num_layers"],
                          depth_single_blocks=u["num_single_layers"], axes_dim=tuple(u.get("axes_dims_rope", (16, 56, 56))),
                          context_in_dim=u["joint_attention_dim"], vec_in_dim=u["pooled_projection_dim"],
                          guidance_embed=bool(u.get("guidance_embeds", False)))
        text, text_tensors = _text(root, root)
        vae = vae_config(root, v, force_upcast=False, sd3=True)
        cfg = ModelConfig(flux=flux, flux_schedule=_schedule(root, flux.guidance_embed), vae=vae, **text,
                          prediction_type="flow_prediction",
                          resolution=128 * 2 ** (len(v["block_out_channels"]) - 1))  # FluxPipeline: 1024 px
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{root}: unexpected diffusers config ({e!r} missing or malformed)") from None
    t5_tokenizer(root)
    src = open_weights(root / "transformer", FLUX_WEIGHTS["transformer"])
    tensors = {**bfl_names(src, flux.depth, flux.depth_single_blocks),
               **_renamed(open_weights(root / "vae", "diffusion_pytorch_model"), VAE_PREFIX, _vae_names(vae)),
               **text_tensors}
    return cfg, weights_only(tensors), False


def flux_file_tensors(path: Path) -> Tensors | None:
    """The tensors of ``path`` if it is a BFL FLUX.1 transformer file (safetensors, no diffedit metadata), else None."""
    if path.suffix != ".safetensors":
        return None
    meta, tensors = open_safetensors(path)
    return tensors if "diffedit_config" not in meta and is_flux(tensors) else None


def read_flux_file(path: Path, tensors: Tensors) -> tuple[ModelConfig, Tensors, bool]:
    """A BFL single file's transformer, completed by the VAE and text encoders beside it."""
    tensors = {(k if k.startswith(UNET_PREFIX) else UNET_PREFIX + k): v for k, v in tensors.items()}
    try:
        flux = flux_from_shapes({k: s for k, (s, _) in tensors.items()})
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a FLUX.1 transformer: cannot read its architecture ({e!r})") from None
    root, schedule = path.parent, _schedule(path.parent, flux.guidance_embed)
    base = PRESETS["flux-dev"].vae
    if (root / "ae.safetensors").is_file():
        vae_tensors = {VAE_PREFIX + k: v for k, v in open_safetensors(root / "ae.safetensors")[1].items()}
        vae = dataclasses.replace(_vae_config({k: s for k, (s, _) in vae_tensors.items()}),
                                  scaling_factor=base.scaling_factor, shift_factor=base.shift_factor)
    elif (root / "vae" / "config.json").is_file():
        vae = vae_config(root, json.loads((root / "vae" / "config.json").read_text()), force_upcast=False, sd3=True)
        vae_tensors = _renamed(open_weights(root / "vae", "diffusion_pytorch_model"), VAE_PREFIX, _vae_names(vae))
    else:
        raise CheckpointError(f"{path}: a FLUX.1 transformer without its VAE: put BFL's ae.safetensors (or the "
                              "diffusers folder's vae/) beside it")
    text, text_tensors = _text(root, path)
    t5_tokenizer(path)
    cfg = ModelConfig(flux=flux, flux_schedule=schedule, vae=vae, **text, prediction_type="flow_prediction",
                      resolution=1024)
    return cfg, weights_only({**tensors, **vae_tensors, **text_tensors}), True


# --- the transformer's names --------------------------------------------------------------------------------------

_TOP = [("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
        ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
        ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
        ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
        ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
        ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
        ("context_embedder.", "txt_in."), ("x_embedder.", "img_in."), ("proj_out.", "final_layer.linear.")]
_DOUBLE = [("norm1.linear.", "img_mod.lin."), ("norm1_context.linear.", "txt_mod.lin."),
           ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"), ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
           ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
           ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
           ("ff.net.0.proj.", "img_mlp.0."), ("ff.net.2.", "img_mlp.2."), ("ff_context.net.0.proj.", "txt_mlp.0."),
           ("ff_context.net.2.", "txt_mlp.2."), ("attn.to_out.0.", "img_attn.proj."), ("attn.to_add_out.", "txt_attn.proj.")]
_SINGLE = [("norm.linear.", "modulation.lin."), ("attn.norm_q.weight", "norm.query_norm.scale"),
           ("attn.norm_k.weight", "norm.key_norm.scale"), ("proj_out.", "linear2.")]
_FUSED = [("double_blocks", "transformer_blocks", ("attn.to_q.", "attn.to_k.", "attn.to_v."), "img_attn.qkv."),
          ("double_blocks", "transformer_blocks", ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
           "txt_attn.qkv."),
          ("single_blocks", "single_transformer_blocks", ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp."),
           "linear1.")]


def _swapped(entry):
    """diffusers stores the final layer's modulation as (scale, shift); BFL as (shift, scale)."""
    shape, read = entry
    return shape, lambda: torch.cat(read().chunk(2)[::-1])


def _fuse(parts: list):
    shape = (sum(s[0] for s, _ in parts), *parts[0][0][1:])
    return shape, lambda: torch.cat([read() for _, read in parts])


def bfl_names(src: Tensors, depth: int, depth_single: int) -> Tensors:
    """A diffusers FluxTransformer2DModel's tensors under BFL's names (prefixed ``model.diffusion_model.``)."""
    out, fused = {}, {p for _, _, parts, _ in _FUSED for p in parts}
    for key, value in src.items():
        top = next(((h, o) for h, o in _TOP if key.startswith(h)), None)
        if top is not None:
            out[UNET_PREFIX + top[1] + key[len(top[0]):]] = value
        elif key.startswith("norm_out.linear."):
            out[UNET_PREFIX + "final_layer.adaLN_modulation.1." + key[len("norm_out.linear."):]] = _swapped(value)
        elif key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            group, i, rest = key.split(".", 2)
            table, ours = (_DOUBLE, "double_blocks") if group == "transformer_blocks" else (_SINGLE, "single_blocks")
            hit = next(((h, o) for h, o in table if rest.startswith(h)), None)
            if hit is not None:
                out[f"{UNET_PREFIX}{ours}.{i}.{hit[1]}{rest[len(hit[0]):]}"] = value
            elif not rest.startswith(tuple(fused)):
                out[UNET_PREFIX + key] = value  # unknown: reported as unexpected by the strict load
        else:
            out[UNET_PREFIX + key] = value
    for ours, theirs, parts, name in _FUSED:
        for i in range(depth if ours == "double_blocks" else depth_single):
            for kind in ("weight", "bias"):
                names = [f"{theirs}.{i}.{p}{kind}" for p in parts]
                if all(n in src for n in names):
                    out[f"{UNET_PREFIX}{ours}.{i}.{name}{kind}"] = _fuse([src[n] for n in names])
    return out
