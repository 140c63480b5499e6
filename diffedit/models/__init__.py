"""The three networks of Stable Diffusion, assembled under the names of a single-file LDM / sgm checkpoint."""
from __future__ import annotations

import torch
from torch import nn

from .conditioner import GeneralConditioner, size_conditioning
from .configs import PRESETS, ModelConfig, TextConfig, UNetConfig, VAEConfig, preset
from .text import text_encoder, tokenize
from .unet import UNetModel
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    """``model.diffusion_model`` (UNet), ``first_stage_model`` (VAE), and the text encoder: ``cond_stage_model``
    (SD1/2) or ``conditioner`` (SDXL's two towers): exactly the key prefixes of a single-file checkpoint, so it
    loads with strict=True."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if cfg.family == "sdxl":
            self.conditioner = GeneralConditioner(cfg.text, cfg.text_2)
        else:
            self.cond_stage_model = text_encoder(cfg.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    def encode_text(self, texts: list[str], device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Texts -> (context (B, 77, D), pooled (B, P) for SDXL's y, else None); ids go to ``device`` (None: where
        the text encoder's weights are)."""
        xl = self.cfg.family == "sdxl"
        encoder = self.conditioner if xl else self.cond_stage_model
        device = device or next(encoder.parameters()).device
        ids = tokenize(texts, self.cfg.text).to(device)
        if not xl:
            return encoder(ids), None
        return encoder(ids, tokenize(texts, self.cfg.text_2).to(device))


__all__ = ["StableDiffusion", "ModelConfig", "UNetConfig", "VAEConfig", "TextConfig", "PRESETS", "preset",
           "UNetModel", "AutoencoderKL", "GeneralConditioner", "text_encoder", "tokenize", "size_conditioning"]
