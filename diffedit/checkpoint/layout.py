"""The single-file key layout that every source is mapped onto: the names of ``models.StableDiffusion``
(LDM for SD 1.x/2.x, sgm for SDXL) and of ``models.StableDiffusion3`` (Stability's SD3 / SD3.5 files)."""
from __future__ import annotations

import re
from typing import Callable

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."  # HF CLIP names
SD2_TEXT_PREFIX = "cond_stage_model.model."  # open_clip names
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."  # CLIP ViT-L, HF CLIP names
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG, open_clip names
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."  # the refiner's only tower (bigG): another model
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."  # HF CLIPTextModelWithProjection names
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."      # HF T5EncoderModel names
FLUX_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."  # FLUX.1: HF CLIPTextModel names
FLUX_T5_PREFIX = SD3_T5_PREFIX
FLUX_KEY = "double_blocks.0.img_attn.qkv.weight"        # a BFL transformer's key (bare or under UNET_PREFIX)
SD3_KEY = UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias"  # diffusers' test for SD3 files

Tensors = dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]  # name -> (shape, reader)

# Keys real checkpoints carry that are not network weights: the training schedule (LDM's buffers, sgm's
# denoiser.sigmas), EMA copies, CLIP's position ids and vision tower, T5's tied copy of its token embedding.
_NOT_WEIGHTS = re.compile(r"betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+"
                          r"|lvlb_weights|logvar|model_ema\..*|denoiser\..*|.*\.position_ids"
                          rf"|({re.escape(SD2_TEXT_PREFIX)}|{re.escape(SDXL_TEXT_2_PREFIX)})visual\..*"
                          rf"|{re.escape(SD3_T5_PREFIX)}encoder\.embed_tokens\.weight")
# Unused for conditioning and absent from diffusers folders (and some pruned files): zeros when missing. SDXL's
# text_projection is not here: its pooled output conditions the UNet.
ZERO_FILL = (SD2_TEXT_PREFIX + "text_projection", SD2_TEXT_PREFIX + "logit_scale", SDXL_TEXT_2_PREFIX + "logit_scale")


def weights_only(tensors: Tensors) -> Tensors:
    """``tensors`` without the keys that are not network weights."""
    return {k: v for k, v in tensors.items() if not _NOT_WEIGHTS.fullmatch(k)}
