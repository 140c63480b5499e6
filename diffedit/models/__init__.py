"""The networks of Stable Diffusion, assembled under the names of a single file: LDM / sgm (``StableDiffusion``) or
Stability's SD3 / SD3.5 (``StableDiffusion3``)."""
from __future__ import annotations

import torch
from torch import nn

from .conditioner import FluxTextEncoders, GeneralConditioner, SD3TextEncoders, size_conditioning
from .configs import PRESETS, FluxConfig, FluxSchedule, MMDiTConfig, ModelConfig, T5Config, TextConfig, UNetConfig, VAEConfig, preset
from .t5 import T5Tokenizer
from .text import text_encoder, tokenize
from .unet import UNetModel
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: nn.Module):
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


class StableDiffusion3(nn.Module):
    """``model.diffusion_model`` (MMDiT), ``first_stage_model`` (the 16-channel VAE) and ``text_encoders``
    (``clip_l``, ``clip_g``, optional ``t5xxl``): the key prefixes of Stability's SD3 / SD3.5 single files.
    ``t5_tokenizer`` (set by the loader) is needed only with T5."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from .mmdit import MMDiT
        if cfg.family != "sd3":
            raise ValueError(f"StableDiffusion3 needs an SD3 config (mmdit set), got family {cfg.family!r}")
        self.cfg = cfg
        self.model = DiffusionWrapper(MMDiT(cfg.mmdit))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.text_encoders = SD3TextEncoders(cfg.text, cfg.text_2, cfg.text_3, cfg.mmdit.context_dim, cfg.t5_tokens)
        self.t5_tokenizer: T5Tokenizer | None = None

    @property
    def mmdit(self) -> nn.Module:
        return self.model.diffusion_model

    def encode_text(self, texts: list[str], device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (context (B, 77 + t5_tokens, context_dim), pooled (B, pooled_dim)): see ``SD3TextEncoders``."""
        enc = self.text_encoders
        device = device or next(enc.parameters()).device
        ids_t5 = None
        if self.cfg.text_3 is not None:
            if self.t5_tokenizer is None:
                raise ValueError("this SD3 model has T5-XXL but no T5 tokenizer: set model.t5_tokenizer = "
                                 "T5Tokenizer('<a diffusers SD3 folder>/tokenizer_3/tokenizer.json')")
            ids_t5 = self.t5_tokenizer(texts, self.cfg.t5_tokens).to(device)
        return enc(tokenize(texts, self.cfg.text).to(device), tokenize(texts, self.cfg.text_2).to(device), ids_t5)


class FluxModel(nn.Module):
    """``model.diffusion_model`` (the FLUX.1 transformer), ``first_stage_model`` (the 16-channel VAE) and
    ``text_encoders`` (``clip_l``, ``t5xxl``); ``t5_tokenizer`` is set by the loader."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from .flux import Flux
        if cfg.family != "flux" or cfg.text_3 is None:
            raise ValueError(f"FluxModel needs a FLUX.1 config (flux and text_3 set), got family {cfg.family!r}")
        self.cfg = cfg
        self.model = DiffusionWrapper(Flux(cfg.flux))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.text_encoders = FluxTextEncoders(cfg.text, cfg.text_3)
        self.t5_tokenizer: T5Tokenizer | None = None

    @property
    def transformer(self) -> nn.Module:
        return self.model.diffusion_model

    def encode_text(self, texts: list[str], device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (T5 context (B, t5_tokens, 4096), CLIP-L pooled (B, 768)), T5 padded to the schedule's length."""
        enc = self.text_encoders
        device = device or next(enc.parameters()).device
        if self.t5_tokenizer is None:
            raise ValueError("this FLUX.1 model has no T5 tokenizer: set model.t5_tokenizer = "
                             "T5Tokenizer('<a diffusers FLUX.1 folder>/tokenizer_2/tokenizer.json')")
        ids_t5 = self.t5_tokenizer(texts, self.cfg.flux_schedule.t5_tokens).to(device)
        return enc(tokenize(texts, self.cfg.text).to(device), ids_t5)


__all__ = ["FluxModel", "FluxConfig", "FluxSchedule", "FluxTextEncoders", "StableDiffusion", "StableDiffusion3", "ModelConfig", "UNetConfig", "VAEConfig", "TextConfig", "T5Config",
           "MMDiTConfig", "PRESETS", "preset", "UNetModel", "AutoencoderKL", "GeneralConditioner", "SD3TextEncoders",
           "T5Tokenizer", "text_encoder", "tokenize", "size_conditioning"]
