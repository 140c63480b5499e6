"""Loading Stable Diffusion weights: the one module that knows checkpoint key layouts.

``load_model(source)`` takes
  * ``"toy"``: the packaged toy model ``diffedit/toy/toy.safetensors``;
  * a single file in the LDM names our networks use (``.safetensors``; ``.ckpt`` only through
    ``torch.load(weights_only=True)``). Our exports carry the architecture in their metadata
    (``diffedit_config``); for other files it is read from the tensor shapes, and what shapes cannot tell
    is the originals' choice: 32 norm groups, 8 heads (SD1) or 64-wide heads (SD2), 64-wide text heads;
  * a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``): each ``config.json`` gives
    the architecture, and the diffusers names are mapped onto the LDM ones;
  * a Hugging Face repo id ``org/name[@revision]`` holding a diffusers folder (hub, else the local cache).
The model is built on the meta device and each tensor is read once, straight into the requested dtype.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .models import PRESETS, ModelConfig, StableDiffusion, TextConfig, UNetConfig, VAEConfig

log = logging.getLogger(__name__)
Tensors = dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]  # name -> (shape, reader)

U, V = "model.diffusion_model.", "first_stage_model."
T1, T2 = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."  # SD1 (HF CLIP), SD2 (open_clip)
# Keys real checkpoints carry that are not network weights: the training schedule, EMA copies, CLIP's vision tower.
_IGNORED = re.compile(r"betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|lvlb_weights"
                      r"|logvar|model_ema\..*|.*\.position_ids|cond_stage_model\.model\.visual\..*")
# Unused for conditioning and absent from diffusers folders (and some pruned files): zeros when missing.
_ZERO_FILL = (T2 + "text_projection", T2 + "logit_scale")
_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_HOWTO = "see weights.md, \"Getting the files on a machine without hub access\""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem in one line."""


def load_model(source: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
               prediction_type: str | None = None) -> tuple[StableDiffusion, ModelConfig]:
    """Load ``source`` (see the module docstring) as an eval-mode, frozen model; ``prediction_type``
    ("epsilon" or "v_prediction") overrides what the checkpoint says or what is detected."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise CheckpointError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    path = _resolve(str(source))
    cfg, tensors, guessed = _read_folder(path) if path.is_dir() else _read_file(path)
    cfg = dataclasses.replace(cfg, prediction_type=prediction_type or cfg.prediction_type)
    model = _build(cfg, tensors, str(path), torch.device(device), dtype)
    if guessed and cfg.family == "sd2":  # 512 px epsilon and 768 px v models have identical shapes
        if prediction_type is None:
            prediction_type, stat = detect_prediction_type(model.unet, cfg.unet.context_dim, cfg.unet.in_channels)
            log.info("%s: an SD2 file that does not say its prediction type; the UNet test (mean(out - x) = %.2f at "
                     "t=999, v if below -1) chose %r. If that is wrong pass prediction_type= (CLI: --prediction-type)",
                     path.name, stat, prediction_type)
        cfg = dataclasses.replace(cfg, prediction_type=prediction_type,
                                  resolution=768 if prediction_type == "v_prediction" else 512)
        model.cfg = cfg
    return model, cfg


@torch.no_grad()
def detect_prediction_type(unet: Callable, context_dim: int, in_channels: int = 4) -> tuple[str, float]:
    """Epsilon or v prediction, from one UNet evaluation: the empirical test of AUTOMATIC1111's web UI
    (``is_using_v_parameterization_for_sd2``). At t = 999 a latent is nearly pure noise, so on a constant
    x = 0.5 an epsilon model returns about x itself, while a v model (v = sqrt(ab) eps - sqrt(1 - ab) x0,
    about -x0 there) returns far less: v if mean(out - x) < -1. Returns (type, mean(out - x))."""
    p = next(unet.parameters()) if isinstance(unet, torch.nn.Module) else torch.empty(())
    x = torch.full((1, in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, context_dim), 0.5, device=p.device, dtype=p.dtype)
    stat = (unet(x, torch.tensor([999], device=p.device), context) - x).float().mean().item()
    return ("v_prediction" if stat < -1 else "epsilon"), stat


# --- where the files are ----------------------------------------------------------------------------------

def _toy_path() -> Path:
    return Path(str(importlib.resources.files("diffedit.toy"))) / "toy.safetensors"


def _resolve(source: str) -> Path:
    if source == "toy":
        if not _toy_path().is_file():
            raise CheckpointError(f"the toy model {_toy_path()} is not built yet: run "
                                  "python scripts/train_toy.py --export diffedit/toy/toy.safetensors")
        return _toy_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", source) and path.suffix not in (".safetensors", ".ckpt"):
        return _from_hub(source)
    raise CheckpointError(f"no such file or folder: {source}")


def _from_hub(spec: str) -> Path:
    """A diffusers folder from the hub, or from the local cache when the hub cannot be reached."""
    from huggingface_hub import constants, snapshot_download
    repo_id, _, revision = spec.partition("@")

    def fetch(patterns):
        try:
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
        except Exception as online:  # no network, offline mode, hub down, unknown repo: try the cache alone
            try:
                return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                              local_files_only=True))
            except Exception:
                reason = f"{type(online).__name__}: {str(online).splitlines()[0] if str(online) else ''}"
                raise CheckpointError(f"{spec!r} is not a local file or folder, nor a Hugging Face repo in the cache "
                                      f"({constants.HF_HUB_CACHE}) or downloadable now ({reason}); {_HOWTO}") from None

    root = fetch(["model_index.json", "scheduler/scheduler_config.json", *(f"{s}/config.json" for s in _WEIGHTS),
                  *(f"{s}/{w}.safetensors" for s, w in _WEIGHTS.items())])
    fp16 = [f"{s}/{w}.fp16.safetensors" for s, w in _WEIGHTS.items() if not (root / s / f"{w}.safetensors").exists()]
    return fetch(fp16) if fp16 else root  # a repo with fp16 variants only


# --- single files -------------------------------------------------------------------------------------------

def _open_safetensors(path: Path) -> tuple[dict, Tensors]:
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


def _read_file(path: Path) -> tuple[ModelConfig, Tensors, bool]:
    """(architecture, tensors, whether the architecture was guessed from shapes)."""
    meta, tensors = ({}, _read_ckpt(path)) if path.suffix in (".ckpt", ".pt", ".pth") else _open_safetensors(path)
    tensors = {k: v for k, v in tensors.items() if not _IGNORED.fullmatch(k)}
    if "diffedit_config" not in meta:
        return _infer_config(path, {k: shape for k, (shape, _) in tensors.items()}), tensors, True
    try:
        return ModelConfig.from_dict(json.loads(meta["diffedit_config"])), tensors, False
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable diffedit_config metadata: {e!r}") from None


def _infer_config(path: Path, shape: dict[str, tuple[int, ...]]) -> ModelConfig:
    """The architecture of an LDM single file from its tensor shapes."""
    sd1 = any(k.startswith(T1) for k in shape)
    if not (U + "input_blocks.0.0.weight" in shape and V + "encoder.conv_in.weight" in shape
            and (sd1 or any(k.startswith(T2) for k in shape))):
        found = ", ".join(sorted({k.split(".")[0] for k in shape})[:8]) or "nothing"
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint: expected {U}*, {V}* and {T1}* (SD1) "
                              f"or {T2}* (SD2) keys; top-level names found: {found}")
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in shape if k.startswith(prefix)})
    try:
        mc, mid, E = shape[U + "input_blocks.0.0.weight"][0], U + "middle_block.1.", V + "encoder."
        levels = 1 + sum(k.startswith(U + "input_blocks.") and k.endswith(".0.op.weight") for k in shape)
        n = (count(U + "input_blocks.") - levels) // levels  # conv_in, n blocks a level, a downsampler between levels
        first = [1 + i * (n + 1) for i in range(levels)]  # the first block of each level
        unet = UNetConfig(
            in_channels=shape[U + "input_blocks.0.0.weight"][1], out_channels=shape[U + "out.2.weight"][0],
            model_channels=mc, num_res_blocks=n,
            channel_mult=tuple(shape[f"{U}input_blocks.{b}.0.out_layers.3.weight"][0] // mc for b in first),
            attention_resolutions=tuple(2 ** i for i in reversed(range(levels))
                                        if f"{U}input_blocks.{first[i]}.1.proj_in.weight" in shape),
            num_heads=8, num_head_channels=-1 if sd1 else 64,
            context_dim=shape[mid + "transformer_blocks.0.attn2.to_k.weight"][1],
            use_linear_in_transformer=len(shape[mid + "proj_in.weight"]) == 2,
            transformer_depth=count(mid + "transformer_blocks."))
        ch = shape[E + "conv_in.weight"][0]
        vae = VAEConfig(
            in_channels=shape[E + "conv_in.weight"][1], out_ch=shape[V + "decoder.conv_out.weight"][0], ch=ch,
            ch_mult=tuple(shape[f"{E}down.{i}.block.0.conv2.weight"][0] // ch for i in range(count(E + "down."))),
            num_res_blocks=count(E + "down.0.block."), z_channels=shape[V + "decoder.conv_in.weight"][1],
            embed_dim=shape[V + "post_quant_conv.weight"][1])
        tok, pos, layers, fc1 = ((T1 + "embeddings.token_embedding.weight", T1 + "embeddings.position_embedding.weight",
                                  T1 + "encoder.layers.", "mlp.fc1.weight") if sd1 else
                                 (T2 + "token_embedding.weight", T2 + "positional_embedding",
                                  T2 + "transformer.resblocks.", "mlp.c_fc.weight"))
        vocab, w = shape[tok]
        text = TextConfig(kind="openai" if sd1 else "openclip", vocab_size=vocab, context_length=shape[pos][0],
                          width=w, heads=max(1, w // 64), layers=count(layers),
                          mlp_ratio=shape[f"{layers}0.{fc1}"][0] // w,
                          projection_dim=shape.get(T2 + "text_projection", (w, w))[1], skip_last_layer=not sd1)
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint: cannot read its architecture "
                              f"({type(e).__name__}: {e})") from None
    cfg = ModelConfig(unet=unet, vae=vae, text=text)
    like = [name for name, p in PRESETS.items() if (p.unet, p.vae, p.text) == (unet, vae, text)]
    log.info("%s: %s architecture read from the tensor shapes (%s)", path.name, cfg.family,
             f"as {like[0]}" if like else "not a preset's")
    return cfg


# --- diffusers folders --------------------------------------------------------------------------------------

_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."),
             ("query.", "q."), ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out."))  # new and old names


def _resnet(hf: str, ours: str) -> list[tuple[str, str]]:
    return [(hf + a, ours + b) for a, b in _RESNET]


def _unet_names(c: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs: the inverse of diffusers' convert_ldm_unet_checkpoint."""
    n, L = c.num_res_blocks, len(c.channel_mult)
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1."), *_resnet("mid_block.resnets.0.", "middle_block.0."),
             *_resnet("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(L):  # down_blocks.i is level i; up_blocks.i is level L-1-i
        for j in range(n):
            pairs += [*_resnet(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (n + 1) + j}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (n + 1) + j}.1.")]
        for j in range(n + 1):
            pairs += [*_resnet(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (n + 1) + j}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (n + 1) + j}.1.")]
        if i < L - 1:
            up_at = 2 if 2 ** (L - 1 - i) in c.attention_resolutions else 1  # after the attention, if any
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op."),
                      (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (n + 1) + n}.{up_at}.")]
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


# HF CLIPTextModel -> open_clip names, applied in order (q/k/v are fused afterwards).
_OPENCLIP_NAMES = [(r"^text_model\.", ""), (r"^embeddings\.token_embedding\.", "token_embedding."),
                   (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
                   (r"^final_layer_norm\.", "ln_final."), (r"^encoder\.layers\.", "transformer.resblocks."),
                   (r"\.self_attn\.", ".attn."), (r"\.layer_norm1\.", ".ln_1."), (r"\.layer_norm2\.", ".ln_2."),
                   (r"\.mlp\.fc1\.", ".mlp.c_fc."), (r"\.mlp\.fc2\.", ".mlp.c_proj.")]


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


# Settings of diffusers networks that SD 1.x/2.x never change and our networks do not implement.
_UNET_FIXED = dict(act_fn="silu", flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
                   mid_block_type="UNetMidBlock2DCrossAttn", addition_embed_type=None, class_embed_type=None,
                   encoder_hid_dim=None, only_cross_attention=False, dual_cross_attention=False,
                   resnet_time_scale_shift="default", time_cond_proj_dim=None)
_VAE_FIXED = dict(act_fn="silu", mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True,
                  shift_factor=None, latents_mean=None)


def _check(cfg: dict, where: Path, expected: dict):
    bad = [f"{k}={cfg[k]!r}" for k, v in expected.items() if k in cfg and cfg[k] != v]
    if bad:
        raise CheckpointError(f"{where}: not a Stable Diffusion 1.x/2.x network: {', '.join(bad)}")


def _configs(root: Path, u: dict, v: dict, t: dict) -> tuple[UNetConfig, VAEConfig, TextConfig]:
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


def _read_folder(root: Path) -> tuple[ModelConfig, Tensors, bool]:
    missing = [f"{sub}/config.json" for sub in _WEIGHTS if not (root / sub / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{root}: not a diffusers folder (nor a file): {', '.join(missing)} missing")
    cfgs = {sub: json.loads((root / sub / "config.json").read_text()) for sub in _WEIGHTS}
    tensors = {}
    for sub, stem in _WEIGHTS.items():
        files = [root / sub / f"{stem}{v}.safetensors" for v in ("", ".fp16")]
        if not any(f.is_file() for f in files):
            raise CheckpointError(f"{root / sub}: no {files[0].name} (nor {files[1].name}); only safetensors "
                                  "weights are read")
        tensors[sub] = _open_safetensors(next(f for f in files if f.is_file()))[1]
    try:
        unet, vae, text = _configs(root, *cfgs.values())
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{root}: unexpected diffusers config ({e!r} missing or malformed)") from None
    sched = root / "scheduler" / "scheduler_config.json"
    ptype = json.loads(sched.read_text()).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
    cfg = ModelConfig(unet, vae, text, ptype, resolution=cfgs["unet"].get("sample_size", 64) * vae.downsampling)
    return cfg, _ldm_names(tensors, unet, vae, text), False


def _ldm_names(t: dict[str, Tensors], unet: UNetConfig, vae: VAEConfig, text: TextConfig) -> Tensors:
    """The tensors of a diffusers folder's sub-folders under the LDM names."""
    clip = (_renamed(t["text_encoder"], T1, [("text_model.", "")]) if text.kind == "openai"  # both HF layouts
            else _renamed(t["text_encoder"], T2, rules=_OPENCLIP_NAMES))
    tensors = {**_renamed(t["unet"], U, _unet_names(unet)), **_renamed(t["vae"], V, _vae_names(vae)), **clip}
    return {k: v for k, v in tensors.items() if not _IGNORED.fullmatch(k)}


# --- building the model -------------------------------------------------------------------------------------

def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _build(cfg: ModelConfig, tensors: Tensors, where: str, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    with torch.device("meta"):  # no memory: every parameter is assigned from the checkpoint below
        model = StableDiffusion(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k in _ZERO_FILL:
        if k in expected and k not in tensors:
            tensors[k] = (expected[k], lambda shape=expected[k]: torch.zeros(shape))
    missing, unexpected = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected]
    if missing or unexpected:
        problems = [f"{len(ks)} {what} key{'s' * (len(ks) > 1)} ({_few(ks)})"
                    for what, ks in (("missing", missing), ("unexpected", unexpected)) if ks]
        raise CheckpointError(f"{where}: {' and '.join(problems)} for the {cfg.family} architecture it describes")
    state = {}
    for k, want in expected.items():
        found, read = tensors[k]
        if found != want and not (k.startswith(V) and found + (1, 1) == want):  # VAE attention as linear: reshape
            raise CheckpointError(f"{where}: {k} has shape {list(found)}, expected {list(want)}")
        try:
            t = read()
        except SafetensorError as e:
            raise CheckpointError(f"{where}: cannot read {k}: {e}") from None
        state[k] = t.reshape(want).to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {len(left)} tensors of the model were not loaded ({_few(left)})")
    return model.eval().requires_grad_(False)
