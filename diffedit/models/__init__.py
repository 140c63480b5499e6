"""The three networks of Stable Diffusion, assembled under the names of a single-file LDM checkpoint."""
from __future__ import annotations

from torch import nn

from .configs import PRESETS, ModelConfig, TextConfig, UNetConfig, VAEConfig, preset
from .text import text_encoder, tokenize
from .unet import UNetModel
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    """``model.diffusion_model`` (UNet), ``first_stage_model`` (VAE), ``cond_stage_model`` (text):
    exactly the key prefixes of an LDM single-file checkpoint, so it loads with strict=True."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = text_encoder(cfg.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model


__all__ = ["StableDiffusion", "ModelConfig", "UNetConfig", "VAEConfig", "TextConfig", "PRESETS", "preset",
           "UNetModel", "AutoencoderKL", "text_encoder", "tokenize"]
