"""The LDM single-file key layout that every source is mapped onto: the names of ``models.StableDiffusion``."""
from __future__ import annotations

import re
from typing import Callable

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."  # HF CLIP names
SD2_TEXT_PREFIX = "cond_stage_model.model."  # open_clip names

Tensors = dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]  # name -> (shape, reader)

# Keys real checkpoints carry that are not network weights: the training schedule, EMA copies, CLIP's vision tower.
_NOT_WEIGHTS = re.compile(r"betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+"
                          r"|lvlb_weights|logvar|model_ema\..*|.*\.position_ids|" + re.escape(SD2_TEXT_PREFIX)
                          + r"visual\..*")
# Unused for conditioning and absent from diffusers folders (and some pruned files): zeros when missing.
ZERO_FILL = (SD2_TEXT_PREFIX + "text_projection", SD2_TEXT_PREFIX + "logit_scale")


def weights_only(tensors: Tensors) -> Tensors:
    """``tensors`` without the keys that are not network weights."""
    return {k: v for k, v in tensors.items() if not _NOT_WEIGHTS.fullmatch(k)}
