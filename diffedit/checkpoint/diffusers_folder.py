"""Diffusers folders: the architecture from each sub-folder's config.json, the weights from its safetensors.

SDXL pipeline folders (``text_encoder_2/`` in model_index.json, or on disk) carry CLIP ViT-L in ``text_encoder/``
and OpenCLIP bigG with its projection in ``text_encoder_2/``; their UNet adds the text_time embedding.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..models import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .diffusers_names import ldm_names
from .errors import CheckpointError
from .layout import Tensors
from .single_file import REFINER, open_safetensors

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
           "text_encoder_2": "model"}  # the last one: SDXL only
# Settings of diffusers networks that SD 1.x/2.x and SDXL never change and our networks do not implement.
_UNET_FIXED = dict(act_fn="silu", flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
                   mid_block_type="UNetMidBlock2DCrossAttn", class_embed_type=None, encoder_hid_dim=None,
                   only_cross_attention=False, dual_cross_attention=False, resnet_time_scale_shift="default",
                   time_cond_proj_dim=None, reverse_transformer_layers_per_block=None)
_VAE_FIXED = dict(act_fn="silu", mid_block_add_attention=True, latents_mean=None)
_VAE_QUANT = dict(use_quant_conv=True, use_post_quant_conv=True, shift_factor=None)  # SD 1.x/2.x/XL: not SD3


def _has(root: Path, index: dict, sub: str) -> bool:
    """Whether the pipeline has component ``sub``: model_index.json says so (a null entry: no), else the disk."""
    if sub in index:
        return isinstance(index[sub], list) and index[sub][0] is not None
    return (root / sub / "config.json").is_file()


def read_folder(root: Path) -> tuple[ModelConfig, Tensors, bool]:
    """(architecture, tensors under the single-file names, False: nothing is guessed)."""
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    xl = _has(root, index, "text_encoder_2")
    if index.get("requires_aesthetics_score") or (xl and not _has(root, index, "text_encoder")):
        raise CheckpointError(f"{root}: {REFINER} (requires_aesthetics_score, text_encoder_2 without text_encoder)")
    subs = [s for s in WEIGHTS if xl or s != "text_encoder_2"]
    missing = [f"{sub}/config.json" for sub in subs if not (root / sub / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{root}: not a diffusers folder (nor a file): {', '.join(missing)} missing")
    cfgs = {sub: json.loads((root / sub / "config.json").read_text()) for sub in subs}
    tensors = {sub: open_weights(root / sub, WEIGHTS[sub]) for sub in subs}
    try:
        nets = sdxl_configs(root, *cfgs.values()) if xl else (*network_configs(root, *cfgs.values()), None)
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{root}: unexpected diffusers config ({e!r} missing or malformed)") from None
    unet, vae, text, text_2 = nets
    sched = root / "scheduler" / "scheduler_config.json"
    ptype = json.loads(sched.read_text()).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
    cfg = ModelConfig(unet=unet, vae=vae, text=text, text_2=text_2, prediction_type=ptype,
                      resolution=cfgs["unet"].get("sample_size", 128 if xl else 64) * vae.downsampling)
    return cfg, ldm_names(tensors, unet, vae, text, text_2), False


def open_weights(folder: Path, stem: str) -> Tensors:
    """The tensors of ``folder/stem.safetensors``, else of its shards (``stem.safetensors.index.json``), else of the
    fp16 variant of either."""
    for variant in ("", ".fp16"):
        file, index = folder / f"{stem}{variant}.safetensors", folder / f"{stem}.safetensors.index{variant}.json"
        if file.is_file():
            return open_safetensors(file)[1]
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            return {k: v for shard in shards for k, v in open_safetensors(folder / shard)[1].items()}
    raise CheckpointError(f"{folder}: no {stem}.safetensors (nor its shards or fp16 variant); only safetensors "
                          "weights are read")


def _check(cfg: dict, where: Path, expected: dict, what: str = "Stable Diffusion 1.x/2.x"):
    bad = [f"{k}={cfg[k]!r}" for k, v in expected.items() if k in cfg and cfg[k] != v]
    if bad:
        raise CheckpointError(f"{where}: not a {what} network: {', '.join(bad)}")


def network_configs(root: Path, u: dict, v: dict, t: dict) -> tuple[UNetConfig, VAEConfig, TextConfig]:
    """Our SD 1.x/2.x configs from the unet/, vae/ and text_encoder/ config.json files of a diffusers folder."""
    _check(u, root / "unet/config.json", {**_UNET_FIXED, "addition_embed_type": None})
    act = t.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{root / 'text_encoder/config.json'}: hidden_act={act!r}, expected quick_gelu (SD1) "
                              "or gelu (SD2)")
    # SD2's diffusers text encoder already stops at the penultimate layer (23 of 24): run all its layers. It has no
    # projection (projection_dim in its config is unused): the zero-filled one is square, as open_clip's ViT-H.
    text = text_config(t, "openai" if act == "quick_gelu" else "openclip", skip_last_layer=False, final_norm=True)
    # diffusers' VAE config says force_upcast (its default, true) for every VAE; SD 1.x/2.x run theirs in any dtype
    return _unet(root, u, prefer_width=False, adm=0), vae_config(root, v, force_upcast=False), text


def sdxl_configs(root: Path, u: dict, v: dict, t: dict, t2: dict
                 ) -> tuple[UNetConfig, VAEConfig, TextConfig, TextConfig]:
    """Our SDXL configs from the unet/, vae/, text_encoder/ and text_encoder_2/ config.json files."""
    _check(u, root / "unet/config.json", {**_UNET_FIXED, "addition_embed_type": "text_time"}, "SDXL base")
    for sub, cfg, act in (("text_encoder", t, "quick_gelu"), ("text_encoder_2", t2, "gelu")):
        _check(cfg, root / sub / "config.json", {"hidden_act": act}, "SDXL base")
    adm, pooled, size = u["projection_class_embeddings_input_dim"], t2["projection_dim"], u["addition_time_embed_dim"]
    if adm == pooled + 5 * size:  # one embedding less than the base: the refiner's aesthetic score instead of a size
        raise CheckpointError(f"{root}: {REFINER} (projection_class_embeddings_input_dim {adm})")
    if adm != pooled + 6 * size or size <= 0 or size % 2:
        raise CheckpointError(f"{root / 'unet/config.json'}: projection_class_embeddings_input_dim {adm} is not "
                              f"text_encoder_2's projection_dim {pooled} + 6 x addition_time_embed_dim {size} "
                              f"(a positive even width): the folder's numbers do not add up")
    context = t["hidden_size"] + t2["hidden_size"]
    if u["cross_attention_dim"] != context:
        raise CheckpointError(f"{root / 'unet/config.json'}: cross_attention_dim {u['cross_attention_dim']} is not "
                              f"the two text encoders' hidden sizes together ({context})")
    # both towers hold all their layers and SDXL reads the penultimate one of each, without the final norm
    return (_unet(root, u, prefer_width=True, adm=adm), vae_config(root, v, force_upcast=v.get("force_upcast", True)),
            text_config(t, "openai", skip_last_layer=True, final_norm=False),
            text_config(t2, "openclip", skip_last_layer=True, final_norm=False, pooled=True,
                  projection_dim=t2["projection_dim"]))


def _unet(root: Path, u: dict, prefer_width: bool, adm: int) -> UNetConfig:
    """The UNet config, y ``adm`` wide; ``prefer_width``: heads that are both a fixed count and a fixed width are
    read as the width (SD2, SDXL convention) rather than the count (SD1)."""
    chs, down = u["block_out_channels"], u["down_block_types"]
    _check(u, root / "unet/config.json", {"up_block_types": [b.replace("Down", "Up") for b in down[::-1]]})
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)  # diffusers: head COUNTS either way
    heads = [heads] * len(chs) if isinstance(heads, int) else heads
    attends = [b.startswith("CrossAttn") for b in down]
    used = [(chs[i], heads[i]) for i in range(len(chs)) if attends[i]] + [(chs[-1], heads[-1])]
    fixed_count, fixed_width = len({h for _, h in used}) == 1, len({ch // h for ch, h in used}) == 1
    if fixed_width and (prefer_width or not fixed_count):  # SD2 "attention_head_dim": [5, 10, 20, 20]
        num_heads, head_channels = 8, used[0][0] // used[0][1]
    elif fixed_count:  # SD1: "attention_head_dim": 8
        num_heads, head_channels = used[0][1], -1
    else:
        raise CheckpointError(f"{root / 'unet/config.json'}: attention heads {heads} are neither a fixed count "
                              "nor a fixed width")
    layers = u.get("transformer_layers_per_block", 1)
    if isinstance(layers, int):
        depth, middle = layers, None
    else:  # per level (SDXL [1, 2, 10]: level 0 has no attention), the middle block the last level's
        depth = tuple(n if a else 0 for n, a in zip(layers, attends))
        middle = None if layers[-1] == depth[-1] else layers[-1]
    return UNetConfig(
        in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4), model_channels=chs[0],
        channel_mult=tuple(ch // chs[0] for ch in chs), num_res_blocks=u.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** i for i in reversed(range(len(down))) if attends[i]),
        num_heads=num_heads, num_head_channels=head_channels, context_dim=u["cross_attention_dim"],
        use_linear_in_transformer=u.get("use_linear_projection", False), transformer_depth=depth,
        transformer_depth_middle=middle, norm_groups=u.get("norm_num_groups", 32),
        adm_in_channels=adm)


def vae_config(root: Path, v: dict, force_upcast: bool, sd3: bool = False) -> VAEConfig:
    """The VAE config (SD's architecture for all four families; SD3's without quant convs, with a shift)."""
    _check(v, root / "vae/config.json", {**_VAE_FIXED, **({} if sd3 else _VAE_QUANT)})
    vch = v["block_out_channels"]
    quant = v.get("use_quant_conv", True)
    if quant != v.get("use_post_quant_conv", True):
        raise CheckpointError(f"{root / 'vae/config.json'}: use_quant_conv and use_post_quant_conv differ")
    return VAEConfig(in_channels=v.get("in_channels", 3), out_ch=v.get("out_channels", 3), ch=vch[0],
                     ch_mult=tuple(ch // vch[0] for ch in vch), num_res_blocks=v.get("layers_per_block", 1),
                     z_channels=v.get("latent_channels", 4), embed_dim=v.get("latent_channels", 4),
                     norm_groups=v.get("norm_num_groups", 32), scaling_factor=v.get("scaling_factor", 0.18215),
                     shift_factor=v.get("shift_factor") or 0.0, use_quant_conv=quant, force_upcast=force_upcast)


def text_config(t: dict, kind: str, projection_dim: int | None = None, **reading) -> TextConfig:
    """A text tower's config from a transformers CLIPTextConfig; ``reading``: which layer conditions, and how."""
    w = t["hidden_size"]
    return TextConfig(kind=kind, vocab_size=t.get("vocab_size", 49408), width=w,
                      context_length=t.get("max_position_embeddings", 77), heads=t["num_attention_heads"],
                      layers=t["num_hidden_layers"], mlp_width=t["intermediate_size"],
                      projection_dim=projection_dim or w, **reading)
