"""What diffusers' DiffEdit pipeline takes and gives, read and written without diffusers: schedulers (objects with a
``config``), prompts and their embeddings per batch row, masks, random draws in diffusers' order, output types.

Scripts written for diffusers assign ``pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)``
(and the same for ``inverse_scheduler``). The pipeline runs one schedule, Stable Diffusion's DDIM (``ddim.py``:
scaled_linear betas 0.00085..0.012 over 1000 steps, the "leading" grid with offset 1, alpha_bar below the first
timestep = alphas_cumprod[0]), so a scheduler is accepted when its config describes exactly that schedule, and
refused in one line naming what differs otherwise.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np
import torch
from PIL import Image

from . import ddim
from .settings import UsageError


class _Output:
    """Fields by name or position, as diffusers' outputs (``out.images``, ``out[0]``)."""

    def __getitem__(self, i):
        return astuple(self)[i] if isinstance(i, int) else getattr(self, i)


@dataclass
class DiffEditInversionPipelineOutput(_Output):
    latents: torch.Tensor  # (B, k, C, h, w), most noisy first (recipe "paper": k + 1, x_0 last)
    images: list | np.ndarray | None = None


@dataclass
class StableDiffusionPipelineOutput(_Output):
    images: list | np.ndarray | torch.Tensor
    nsfw_content_detected: list | None = None


# The config of Stable Diffusion's scheduler folder, in diffusers' key names, for ``DDIMScheduler.from_config``.
SD_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               trained_betas=None, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
               prediction_type="epsilon", thresholding=False, timestep_spacing="leading", rescale_betas_zero_snr=False)
# What each setting must be for ddim.py's schedule; keys a config lacks take diffusers' defaults, listed here
# because a DDIMScheduler() built without SD's config has them (linear betas, clip_sample True, offset 0).
_REQUIRED = dict(num_train_timesteps=(1000, 1000), beta_start=(0.00085, 0.0001), beta_end=(0.012, 0.02),
                 beta_schedule=("scaled_linear", "linear"), trained_betas=(None, None), clip_sample=(False, True),
                 set_alpha_to_one=(False, True), steps_offset=(1, 0), thresholding=(False, False),
                 timestep_spacing=("leading", "leading"), rescale_betas_zero_snr=(False, False))
_WHY = dict(clip_sample="clipping x_0 breaks the inversion's exactness",
            set_alpha_to_one="alpha_bar below the first timestep is alphas_cumprod[0] here",
            timestep_spacing="only the 'leading' grid is implemented",
            steps_offset="the grid starts at timestep 1 (1, 21, ..., 981 for 50 steps)")


class DDIMConfig:
    """A scheduler stand-in: ``config`` is Stable Diffusion's DDIM config (``DDIMScheduler.from_config`` reads it)."""

    def __init__(self, prediction_type: str = "epsilon", inverse: bool = False):
        self.config = dict(SD_DDIM, prediction_type=prediction_type,
                           _class_name="DDIMInverseScheduler" if inverse else "DDIMScheduler")
        self.order = 1

    def __repr__(self) -> str:
        return f"{self.config['_class_name']}(config={self.config})"


def check_scheduler(name: str, scheduler, prediction_type: str):
    """``scheduler`` if its config is the schedule this pipeline runs; else a ValueError naming ``name`` and the
    first setting that differs. ``prediction_type`` is the model's (a scheduler cannot change what the UNet
    predicts)."""
    config = getattr(scheduler, "config", None)
    if config is None:
        raise UsageError(f"{name}: expected a DDIM scheduler with a .config, got {type(scheduler).__name__}")
    kind = type(scheduler).__name__ if not isinstance(scheduler, DDIMConfig) else config["_class_name"]
    allowed = ("DDIMScheduler", "DDIMInverseScheduler") if name == "inverse_scheduler" else ("DDIMScheduler",)
    if kind not in allowed:
        raise UsageError(f"{name}: DiffEdit inverts and samples with DDIM ({' or '.join(allowed)}), got {kind}")
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    for key, (want, default) in _REQUIRED.items():
        value = get(key, default)
        if key == "trained_betas" and value is not None:
            raise UsageError(f"{name}: trained_betas are not supported; the schedule is SD's scaled_linear betas")
        if isinstance(want, float) and isinstance(value, (int, float)) and abs(value - want) < 1e-12:
            continue
        if value != want:
            why = _WHY.get(key, "Stable Diffusion's DDIM schedule")
            raise UsageError(f"{name}: {key}={value!r} is not supported ({why}; need {key}={want!r}: "
                             f"build it with DDIMScheduler.from_config(pipeline.scheduler.config))")
    given = get("prediction_type", "epsilon")
    if given != prediction_type:
        raise UsageError(f"{name}: prediction_type={given!r} differs from the model's {prediction_type!r}")
    return scheduler


def inverse_v(alpha_bar: torch.Tensor, steps: int):
    """A model-call wrapper (``Engine(wrap=...)``) for diffusers' inversion of v-prediction models: its
    DDIMInverseScheduler turns v into eps with alpha_bar of the level a step starts from, where the UNet was given
    the level it goes to (``ddim.py`` uses the latter, the model's own parametrisation). Recipe "diffusers" wraps the
    inversion with it, so that v-prediction models (SD 2.x 768) invert as they did there."""
    gap = ddim.NUM_TRAIN_TIMESTEPS // steps

    def wrap(eps):
        def converted(x, t, context):
            def at(level):
                return ddim.alpha_bar_at(level, alpha_bar).to(x.device, x.dtype).reshape(-1, 1, 1, 1)
            return ddim.v_to_eps(x, ddim.eps_to_v(x, eps(x, t, context), at(t)), at(t - gap))
        return converted
    return wrap


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal draws as diffusers makes them: on the generator's device, one row per generator of a list."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise UsageError(f"generator: a list needs one generator per row ({shape[0]}), got {len(generator)}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def prompt_rows(name: str, prompt, embeds, required: bool = False) -> list | None:
    """One text per batch row, from ``name`` (a str or a list of str) or ``name``_embeds ((B, L, D)), not both."""
    if prompt is not None and embeds is not None:
        raise UsageError(f"{name}: give {name} or {name}_embeds, not both")
    if embeds is not None:
        embeds = embeds[None] if len(embeds.shape) == 2 else embeds
        if len(embeds.shape) != 3:
            raise UsageError(f"{name}_embeds must be (B, L, D), got {tuple(embeds.shape)}")
        return [embeds[i:i + 1] for i in range(embeds.shape[0])]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt is None and not required:
        return None
    raise UsageError(f"{name} must be a str or a non-empty list of str (or give {name}_embeds), got {prompt!r}")


def negative_rows(name: str, prompt, embeds, batch: int) -> list:
    """The negative text of each row: "" when none is given, as diffusers."""
    rows = prompt_rows(name, prompt, embeds) or [""]
    if len(rows) == 1:
        return rows * batch
    if len(rows) != batch:
        raise UsageError(f"{name}: {len(rows)} rows for {batch} prompt rows")
    return rows


def mask_rows(mask_image, batch: int, latent_size, factor: int) -> torch.Tensor:
    """(B, h, w) bool from what diffusers' ``__call__`` takes (PIL, arrays, tensors, lists; one for all or one per
    row, values in [0, 1]); a mask at pixel size is averaged over each latent cell. Binarised at 0.5."""
    if mask_image is None:
        raise UsageError("mask_image: give a mask (generate_mask() computes one)")
    m = [mask_image] if isinstance(mask_image, (Image.Image, np.ndarray)) else mask_image
    if isinstance(m, (list, tuple)):
        if not m:
            raise UsageError("mask_image: an empty list")
        m = [torch.from_numpy(np.asarray(x.convert("L"), dtype=np.float32) / 255) if isinstance(x, Image.Image)
             else torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x) for x in m]
        m = torch.stack(m) if m[0].ndim < 3 else torch.cat(m)
    m = torch.as_tensor(m).float().cpu()
    m = m[:, 0] if m.ndim == 4 and m.shape[1] == 1 else m[None] if m.ndim == 2 else m
    if m.ndim != 3:
        raise UsageError(f"mask_image must be (B, 1, h, w), (B, h, w) or (h, w), got {tuple(m.shape)}")
    if m.shape[0] not in (1, batch):
        raise UsageError(f"mask_image: {m.shape[0]} masks for {batch} prompt rows")
    if m.min() < 0 or m.max() > 1:
        raise UsageError("mask_image must be in [0, 1]")
    h, w = latent_size
    if tuple(m.shape[-2:]) == (h * factor, w * factor) and factor > 1:
        m = torch.nn.functional.avg_pool2d(m[:, None], factor)[:, 0]
    if tuple(m.shape[-2:]) != (h, w):
        raise UsageError(f"mask_image must be at latent size ({h}, {w}) or pixel size, got {tuple(m.shape[-2:])}")
    return (m >= 0.5).expand(batch, h, w)


def postprocess(pixels: torch.Tensor, output_type: str):
    """Pixels (B, 3, H, W) in [-1, 1] -> diffusers' outputs: "pt" in [0, 1], "np" (B, H, W, 3), "pil" a list."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x
    arr = x.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def check_output_type(value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise UsageError(f"output_type must be one of {', '.join(allowed)}, got {value!r}")


def refuse(**values) -> None:
    for name, value in values.items():
        if value is not None:
            raise UsageError(f"{name}: not supported here (leave it None)")
