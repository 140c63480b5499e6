"""Diffusers folders: the architecture from each sub-folder's config.json, the weights from its safetensors."""
from __future__ import annotations

import json
from pathlib import Path

from ..models import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .diffusers_names import ldm_names
from .errors import CheckpointError
from .layout import Tensors
from .single_file import open_safetensors

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# Settings of diffusers networks that SD 1.x/2.x never change and our networks do not implement.
_UNET_FIXED = dict(act_fn="silu", flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
                   mid_block_type="UNetMidBlock2DCrossAttn", addition_embed_type=None, class_embed_type=None,
                   encoder_hid_dim=None, only_cross_attention=False, dual_cross_attention=False,
                   resnet_time_scale_shift="default", time_cond_proj_dim=None)
_VAE_FIXED = dict(act_fn="silu", mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True,
                  shift_factor=None, latents_mean=None)


def read_folder(root: Path) -> tuple[ModelConfig, Tensors, bool]:
    """(architecture, tensors under the LDM names, False: nothing is guessed)."""
    missing = [f"{sub}/config.json" for sub in WEIGHTS if not (root / sub / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{root}: not a diffusers folder (nor a file): {', '.join(missing)} missing")
    cfgs = {sub: json.loads((root / sub / "config.json").read_text()) for sub in WEIGHTS}
    tensors = {}
    for sub, stem in WEIGHTS.items():
        files = [root / sub / f"{stem}{v}.safetensors" for v in ("", ".fp16")]
        if not any(f.is_file() for f in files):
            raise CheckpointError(f"{root / sub}: no {files[0].name} (nor {files[1].name}); only safetensors "
                                  "weights are read")
        tensors[sub] = open_safetensors(next(f for f in files if f.is_file()))[1]
    try:
        unet, vae, text = network_configs(root, *cfgs.values())
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{root}: unexpected diffusers config ({e!r} missing or malformed)") from None
    sched = root / "scheduler" / "scheduler_config.json"
    ptype = json.loads(sched.read_text()).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
    cfg = ModelConfig(unet, vae, text, ptype, resolution=cfgs["unet"].get("sample_size", 64) * vae.downsampling)
    return cfg, ldm_names(tensors, unet, vae, text), False


def _check(cfg: dict, where: Path, expected: dict):
    bad = [f"{k}={cfg[k]!r}" for k, v in expected.items() if k in cfg and cfg[k] != v]
    if bad:
        raise CheckpointError(f"{where}: not a Stable Diffusion 1.x/2.x network: {', '.join(bad)}")


def network_configs(root: Path, u: dict, v: dict, t: dict) -> tuple[UNetConfig, VAEConfig, TextConfig]:
    """Our configs from the unet/, vae/ and text_encoder/ config.json files of a diffusers folder."""
    chs, down = u["block_out_channels"], u["down_block_types"]
    mirror = [b.replace("Down", "Up") for b in down[::-1]]
    _check(u, root / "unet/config.json", {**_UNET_FIXED, "up_block_types": mirror})
    _check(v, root / "vae/config.json", _VAE_FIXED)
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)
    heads = [heads] * len(chs) if isinstance(heads, int) else heads
    used = [(chs[i], heads[i]) for i, b in enumerate(down) if b.startswith("CrossAttn")] + [(chs[-1], heads[-1])]
    if len({h for _, h in used}) == 1:  # SD1: a fixed head count ("attention_head_dim": 8)
        num_heads, head_channels = used[0][1], -1
    elif len({ch // h for ch, h in used}) == 1:  # SD2: a fixed head width ("attention_head_dim": [5, 10, 20, 20])
        num_heads, head_channels = 8, used[0][0] // used[0][1]
    else:
        raise CheckpointError(f"{root / 'unet/config.json'}: attention heads {heads} are neither a fixed count "
                              "nor a fixed width")
    unet = UNetConfig(
        in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4), model_channels=chs[0],
        channel_mult=tuple(ch // chs[0] for ch in chs), num_res_blocks=u.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** i for i in reversed(range(len(down))) if down[i].startswith("CrossAttn")),
        num_heads=num_heads, num_head_channels=head_channels, context_dim=u["cross_attention_dim"],
        use_linear_in_transformer=u.get("use_linear_projection", False),
        transformer_depth=u.get("transformer_layers_per_block", 1), norm_groups=u.get("norm_num_groups", 32))
    vch = v["block_out_channels"]
    vae = VAEConfig(in_channels=v.get("in_channels", 3), out_ch=v.get("out_channels", 3), ch=vch[0],
                    ch_mult=tuple(ch // vch[0] for ch in vch), num_res_blocks=v.get("layers_per_block", 1),
                    z_channels=v.get("latent_channels", 4), embed_dim=v.get("latent_channels", 4),
                    norm_groups=v.get("norm_num_groups", 32), scaling_factor=v.get("scaling_factor", 0.18215))
    act, w = t.get("hidden_act", "quick_gelu"), t["hidden_size"]
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{root / 'text_encoder/config.json'}: hidden_act={act!r}, expected quick_gelu (SD1) "
                              "or gelu (SD2)")
    # SD2's diffusers text encoder already stops at the penultimate layer (23 of 24): run all its layers. It has no
    # projection (projection_dim in its config is unused): the zero-filled one is square, as open_clip's ViT-H.
    text = TextConfig(kind="openai" if act == "quick_gelu" else "openclip", vocab_size=t.get("vocab_size", 49408),
                      context_length=t.get("max_position_embeddings", 77), width=w, heads=t["num_attention_heads"],
                      layers=t["num_hidden_layers"], mlp_ratio=t["intermediate_size"] // w, projection_dim=w,
                      skip_last_layer=False)
    return unet, vae, text
