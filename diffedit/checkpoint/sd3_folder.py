"""SD3 / SD3.5 diffusers folders: the architecture from each config.json, diffusers' names mapped onto Stability's.

``transformer/`` (SD3Transformer2DModel), ``vae/`` (16 channels, no quant convs), ``text_encoder/`` (CLIP-L) and
``text_encoder_2/`` (CLIP-G), both CLIPTextModelWithProjection, optional ``text_encoder_3/`` (T5EncoderModel, often
sharded), ``tokenizer*/`` (each CLIP tokenizer's padding token) and ``scheduler/`` (the flow shift).
The transformer map is the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: q, k, v fused
into ``qkv``, and the (shift, scale) halves of the pre-only modulations swapped back.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models import MMDiTConfig, ModelConfig, T5Config, TextConfig
from .diffusers_folder import _has, open_weights, text_config, vae_config
from .diffusers_names import _renamed, _vae_names
from .errors import CheckpointError
from .layout import SD3_CLIP_G_PREFIX, SD3_CLIP_L_PREFIX, SD3_T5_PREFIX, UNET_PREFIX, VAE_PREFIX, Tensors, weights_only
from .sd3 import check_widths, refuse_turbo, t5_tokenizer_file

SD3_WEIGHTS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model", "text_encoder_3": "model"}  # the last one optional
_EOT, _BANG = 49407, 0  # ids of CLIP's "<|endoftext|>" and "!", the two padding tokens SD3's tokenizers use


def read_sd3_folder(root: Path) -> tuple[ModelConfig, Tensors, bool]:
    """(architecture, tensors under Stability's single-file names, False: nothing is guessed)."""
    refuse_turbo(root)
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    subs = [s for s in SD3_WEIGHTS if s != "text_encoder_3" or _has(root, index, s)]
    missing = [f"{sub}/config.json" for sub in subs if not (root / sub / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{root}: not an SD3 diffusers folder: {', '.join(missing)} missing")
    c = {sub: json.loads((root / sub / "config.json").read_text()) for sub in subs}
    if c["transformer"].get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise CheckpointError(f"{root / 'transformer/config.json'}: a {c['transformer']['_class_name']}, not SD3's "
                              "SD3Transformer2DModel")
    try:
        mmdit = _mmdit(root, c["transformer"])
        sched = root / "scheduler" / "scheduler_config.json"
        cfg = ModelConfig(
            mmdit=mmdit, vae=vae_config(root, c["vae"], force_upcast=c["vae"].get("force_upcast", True), sd3=True),
            text=_clip(root, c["text_encoder"], "tokenizer"), text_2=_clip(root, c["text_encoder_2"], "tokenizer_2"),
            text_3=_t5(root, c["text_encoder_3"]) if "text_encoder_3" in c else None,
            prediction_type="flow_prediction", resolution=c["transformer"]["sample_size"] * 2 ** (
                len(c["vae"]["block_out_channels"]) - 1),
            flow_shift=float(json.loads(sched.read_text()).get("shift", 1.0)) if sched.is_file() else 3.0)
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{root}: unexpected diffusers config ({e!r} missing or malformed)") from None
    check_widths(root, cfg)
    if cfg.text_3 is not None:
        t5_tokenizer_file(root)
    t = {sub: open_weights(root / sub, SD3_WEIGHTS[sub]) for sub in subs}
    tensors = {**stability_names(t["transformer"], mmdit.depth), **_renamed(t["vae"], VAE_PREFIX, _vae_names(cfg.vae)),
               **{SD3_CLIP_L_PREFIX + k: v for k, v in t["text_encoder"].items()},
               **{SD3_CLIP_G_PREFIX + k: v for k, v in t["text_encoder_2"].items()},
               **{SD3_T5_PREFIX + k: v for k, v in t.get("text_encoder_3", {}).items()}}
    return cfg, weights_only(tensors), False


def _mmdit(root: Path, u: dict) -> MMDiTConfig:
    qk = u.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise CheckpointError(f"{root / 'transformer/config.json'}: qk_norm={qk!r}, expected null or 'rms_norm'")
    heads, head_dim = u["num_attention_heads"], u["attention_head_dim"]
    if u.get("caption_projection_dim", heads * head_dim) != heads * head_dim:
        raise CheckpointError(f"{root / 'transformer/config.json'}: caption_projection_dim is not num_attention_heads "
                              "x attention_head_dim")
    return MMDiTConfig(in_channels=u.get("in_channels", 16), out_channels=u.get("out_channels") or 16,
                       hidden_size=heads * head_dim, depth=u["num_layers"], patch_size=u.get("patch_size", 2),
                       pos_embed_max_size=u["pos_embed_max_size"], context_dim=u["joint_attention_dim"],
                       pooled_dim=u["pooled_projection_dim"], qk_norm=qk == "rms_norm",
                       dual_attention_layers=tuple(u.get("dual_attention_layers") or ()), head_dim=head_dim)


def _pad_id(root: Path, sub: str, default: int) -> int:
    """The padding id of a CLIP tokenizer folder: its pad_token ("<|endoftext|>" or "!") in its vocab.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = root / sub / name
        pad = json.loads(file.read_text()).get("pad_token") if file.is_file() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None:
            vocab = root / sub / "vocab.json"
            ids = json.loads(vocab.read_text()) if vocab.is_file() else {"<|endoftext|>": _EOT, "!": _BANG}
            if pad not in ids:
                raise CheckpointError(f"{file}: pad_token {pad!r} is not in the tokenizer's vocabulary")
            return ids[pad]
    return default


def _clip(root: Path, t: dict, tokenizer: str) -> TextConfig:
    act = t.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{root}: {tokenizer.replace('tokenizer', 'text_encoder')} has hidden_act={act!r}, "
                              "expected quick_gelu or gelu")
    default = _EOT if tokenizer == "tokenizer" else _BANG
    return text_config(t, "openai", projection_dim=t["projection_dim"], hidden_act=act,
                       pad_id=_pad_id(root, tokenizer, default), skip_last_layer=True, final_norm=False, pooled=True)


def _t5(root: Path, t: dict) -> T5Config:
    if t.get("feed_forward_proj", "gated-gelu") != "gated-gelu" or t.get("dense_act_fn", "gelu_new") != "gelu_new":
        raise CheckpointError(f"{root / 'text_encoder_3/config.json'}: not a T5 v1.1 encoder (feed_forward_proj "
                              f"{t.get('feed_forward_proj')!r}, dense_act_fn {t.get('dense_act_fn')!r})")
    return T5Config(vocab_size=t["vocab_size"], d_model=t["d_model"], d_kv=t["d_kv"], d_ff=t["d_ff"],
                    num_layers=t["num_layers"], num_heads=t["num_heads"],
                    relative_attention_num_buckets=t.get("relative_attention_num_buckets", 32),
                    relative_attention_max_distance=t.get("relative_attention_max_distance", 128),
                    layer_norm_epsilon=t.get("layer_norm_epsilon", 1e-6))


# --- the transformer's names --------------------------------------------------------------------------------------

_TOP = [("pos_embed.pos_embed", "pos_embed"), ("pos_embed.proj.", "x_embedder.proj."),
        ("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
        ("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
        ("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
        ("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
        ("context_embedder.", "context_embedder."), ("proj_out.", "final_layer.linear.")]
_BLOCK = [("attn.norm_q.", "x_block.attn.ln_q."), ("attn.norm_k.", "x_block.attn.ln_k."),
          ("attn.norm_added_q.", "context_block.attn.ln_q."), ("attn.norm_added_k.", "context_block.attn.ln_k."),
          ("attn.to_out.0.", "x_block.attn.proj."), ("attn.to_add_out.", "context_block.attn.proj."),
          ("attn2.norm_q.", "x_block.attn2.ln_q."), ("attn2.norm_k.", "x_block.attn2.ln_k."),
          ("attn2.to_out.0.", "x_block.attn2.proj."), ("norm1.linear.", "x_block.adaLN_modulation.1."),
          ("norm1_context.linear.", "context_block.adaLN_modulation.1."),
          ("ff.net.0.proj.", "x_block.mlp.fc1."), ("ff.net.2.", "x_block.mlp.fc2."),
          ("ff_context.net.0.proj.", "context_block.mlp.fc1."), ("ff_context.net.2.", "context_block.mlp.fc2.")]
_QKV = [(("attn.to_q.", "attn.to_k.", "attn.to_v."), "x_block.attn.qkv."),
        (("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."), "context_block.attn.qkv."),
        (("attn2.to_q.", "attn2.to_k.", "attn2.to_v."), "x_block.attn2.qkv.")]


def _swapped(entry):
    """diffusers stores a pre-only modulation as (scale, shift); Stability as (shift, scale)."""
    shape, read = entry
    return shape, lambda: torch.cat(read().chunk(2)[::-1])


def stability_names(src: Tensors, depth: int) -> Tensors:
    """A diffusers SD3Transformer2DModel's tensors under Stability's names (prefixed ``model.diffusion_model.``)."""
    out = {}
    for key, value in src.items():
        hf, ours = next(((h, o) for h, o in _TOP if key.startswith(h)), (None, None))
        if hf is not None:
            out[UNET_PREFIX + ours + key[len(hf):]] = value
        elif key.startswith("norm_out.linear."):
            out[UNET_PREFIX + "final_layer.adaLN_modulation.1." + key[len("norm_out.linear."):]] = _swapped(value)
        elif key.startswith("transformer_blocks."):
            i, rest = key[len("transformer_blocks."):].split(".", 1)
            hf, ours = next(((h, o) for h, o in _BLOCK if rest.startswith(h)), (None, None))
            if hf is None:
                continue  # q, k, v: fused below
            name = f"{UNET_PREFIX}joint_blocks.{i}.{ours}{rest[len(hf):]}"
            last_context = int(i) == depth - 1 and hf == "norm1_context.linear."
            out[name] = _swapped(value) if last_context else value
        else:
            out[UNET_PREFIX + key] = value  # unknown: reported as unexpected by the strict load
    for i in range(depth):
        for parts, ours in _QKV:
            for kind in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.{p}{kind}" for p in parts]
                if all(n in src for n in names):
                    ps = [src[n] for n in names]
                    shape = (sum(s[0] for s, _ in ps), *ps[0][0][1:])
                    out[f"{UNET_PREFIX}joint_blocks.{i}.{ours}{kind}"] = (
                        shape, lambda ps=ps: torch.cat([read() for _, read in ps]))
    return out
