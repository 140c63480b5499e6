"""``StableDiffusionDiffEditPipeline``: the API of diffusers' (deprecated) DiffEdit pipeline, on this package's engine.

    from diffedit import StableDiffusionDiffEditPipeline     # the one line a diffusers script changes
    pipeline = StableDiffusionDiffEditPipeline.from_pretrained("stabilityai/stable-diffusion-2-1")
    mask_image = pipeline.generate_mask(image=raw_image, source_prompt=source_prompt, target_prompt=target_prompt)
    inv_latents = pipeline.invert(prompt=source_prompt, image=raw_image).latents
    image = pipeline(prompt=target_prompt, mask_image=mask_image, image_latents=inv_latents,
                     negative_prompt=source_prompt).images[0]

Argument names, defaults, shapes and output types are diffusers'. ``recipe="diffusers"`` (the default) runs its
choices (``settings.RECIPES``), so a migrated script gets the images it got for the same generator: random numbers
are drawn in diffusers' order (``generate_mask``: one VAE posterior sample per noise map, then the noises;
``invert``: one posterior sample). ``recipe="paper"`` runs the paper's algorithm: the posterior mean (one VAE encode),
unconditional inversion, the blend at the same level ending on x_0; its ``invert`` latents then carry x_0 last.
Every step runs in ``engine.Engine``: this layer translates arguments, draws diffusers' random numbers and formats
outputs. Known differences (docs/migrating-from-diffusers.md): each image's mask is rescaled by its own mean, not the
batch's; negative prompts do not enter the mask; ``invert`` takes no negative prompt.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import astuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import images, masking
from .diffusers_io import (DDIMConfig, DiffEditInversionPipelineOutput, StableDiffusionPipelineOutput,
                           check_output_type, check_scheduler, inverse_v, mask_rows, negative_rows, postprocess,
                           prompt_rows, randn, refuse)
from .engine import Input, Request
from .model_call import EvalCounter
from .inversion import Trajectory
from .pipeline import DiffEdit
from .settings import EditSettings, Recipe, SettingsError, UsageError, recipe, resolve

log = logging.getLogger(__name__)

# diffusers' names for the knobs of ``EditSettings``, for error messages
_NAMES = dict(n="num_maps_per_mask", strength="mask_encode_strength", ratio="inpaint_strength",
              steps="num_inference_steps", guidance="guidance_scale")
# from_pretrained arguments of diffusers that change nothing here (no safety checker; safetensors only)
_IGNORED = ("safety_checker", "feature_extractor", "requires_safety_checker", "use_safetensors", "variant",
            "revision", "cache_dir", "local_files_only", "low_cpu_mem_usage", "token")
_PASSED = ("prediction_type", "max_batch", "compile", "attention_dtype", "channels_last")


def _named(name: str) -> Recipe:
    """The recipe called ``name``, a UsageError naming ``recipe`` if there is none."""
    try:
        return recipe(name)
    except SettingsError as e:
        raise UsageError(e.message_for("recipe")) from None


class StableDiffusionDiffEditPipeline:
    """DiffEdit with diffusers' API on a ``DiffEdit`` (SD 1.x / 2.x / XL)."""

    def __init__(self, diffedit: DiffEdit, recipe: str = "diffusers"):
        self.recipe = _named(recipe)  # each of its choices is read where it applies
        if diffedit.cfg.family == "sd3":
            raise UsageError("diffedit: SD3 is a flow-matching model; diffusers' DiffEdit API is DDIM's (use DiffEdit)")
        self.de = diffedit
        self._scheduler = DDIMConfig(diffedit.prediction_type)
        self._inverse_scheduler = DDIMConfig(diffedit.prediction_type, inverse=True)
        self._progress: dict = {}
        self._hooks: list = []
        self._posteriors: dict = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, device=None, recipe: str = "diffusers",
                        **kwargs) -> "StableDiffusionDiffEditPipeline":
        """A single file, a diffusers folder or a hub id of SD 1.x / 2.x / XL (``DiffEdit.from_pretrained``).
        ``torch_dtype`` None is float32, as in diffusers ("auto": bf16 / fp16 where native); ``device`` None the CPU."""
        ignored = [k for k in kwargs if k in _IGNORED]
        if ignored:
            log.info("from_pretrained: %s change nothing here (ignored)", ", ".join(ignored))
        unknown = [k for k in kwargs if k not in _IGNORED + _PASSED]
        if unknown:
            raise TypeError(f"from_pretrained() got an unexpected keyword argument {unknown[0]!r}")
        passed = {k: v for k, v in kwargs.items() if k in _PASSED}
        _named(recipe)  # a misspelt recipe fails before the model loads
        de = DiffEdit.from_pretrained(str(pretrained_model_name_or_path), device=device or "cpu",
                                      dtype=torch.float32 if torch_dtype is None else torch_dtype, **passed)
        return cls(de, recipe)

    # --- what diffusers' pipeline object offers -----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.de.device

    @property
    def dtype(self) -> torch.dtype:
        return self.de.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.de.cfg.vae.downsampling

    @property
    def scheduler(self):
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value):
        self._scheduler = check_scheduler("scheduler", value, self.de.prediction_type)

    @property
    def inverse_scheduler(self):
        return self._inverse_scheduler

    @inverse_scheduler.setter
    def inverse_scheduler(self, value):
        self._inverse_scheduler = check_scheduler("inverse_scheduler", value, self.de.prediction_type)

    def to(self, torch_device=None, torch_dtype=None) -> "StableDiffusionDiffEditPipeline":
        """The networks on ``torch_device`` (and in ``torch_dtype``); a dtype alone may come first, as in diffusers."""
        if isinstance(torch_device, torch.dtype):
            torch_device, torch_dtype = torch_dtype, torch_device
        self._remove_hooks()
        device = torch.device(torch_device) if torch_device is not None else self.de.device
        self.de = self._rebuilt(self.de.model.to(device), device, torch_dtype)
        return self

    def _rebuilt(self, model, device, dtype=None) -> DiffEdit:
        old, self._posteriors = self.de, {}
        de = DiffEdit(model, device, dtype or old.dtype, old.prediction_type, old.max_batch)
        de.vae_batch = old.vae_batch
        return de

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device="cuda") -> None:
        """Keep the networks on the CPU and move each to the GPU when it runs (text encoder, UNet, VAE), the one
        before back: the GPU holds one network at a time. Without a GPU there is nothing to offload (logged)."""
        if not torch.cuda.is_available():
            log.info("enable_model_cpu_offload(): no GPU here; the networks stay on %s", self.de.device)
            return
        gpu = torch.device(device, gpu_id or 0)
        self._remove_hooks()
        model = self.de.model.to("cpu")
        self.de = self._rebuilt(model, gpu)
        on = [None]

        def bring(group):
            def hook(module, args):
                if on[0] is not group:
                    if on[0] is not None:
                        on[0].to("cpu")
                    group.to(gpu)
                    on[0] = group
            return hook

        text = model.conditioner if hasattr(model, "conditioner") else model.cond_stage_model
        for group in (text, model.model, model.first_stage_model):
            self._hooks += [m.register_forward_pre_hook(bring(group)) for m in group.modules()]

    def _remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def enable_vae_slicing(self) -> None:
        """Decode one image at a time (less memory for large batches)."""
        self.de.vae_batch = 1

    def disable_vae_slicing(self) -> None:
        self.de.vae_batch = 8

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm's options for the bars of the three calls (``disable=True`` hides them)."""
        self._progress = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        return tqdm(iterable, total=total, **self._progress)

    @contextmanager
    def _engine(self, desc: str, convert=None):
        """The DiffEdit's engine, counting UNet rows on a progress bar; ``convert`` wraps the model call first."""
        config = dict(self._progress)
        disable = config.pop("disable", False)
        bar = tqdm(**{"desc": desc, "unit": " UNet rows", **config, "disable": disable})
        wrap = convert if disable else lambda model: EvalCounter(convert(model) if convert else model, bar.update)
        try:
            yield self.de.engine(wrap=wrap)
        finally:
            bar.close()

    # --- texts ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, negative_prompt=None, prompt_embeds=None,
                      negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        """(prompt_embeds, negative_prompt_embeds) as diffusers returns them: (B * num_images_per_prompt, 77, D)
        each, the negative None without guidance; SDXL gives ``Conditioning`` rows (context and pooled + sizes).
        ``device`` is the pipeline's."""
        for name, value in (("lora_scale", lora_scale), ("clip_skip", clip_skip)):
            if value is not None:
                raise UsageError(f"{name}: not supported here (leave it None)")
        rows = prompt_rows("prompt", prompt, prompt_embeds, required=True)
        index = torch.arange(len(rows), device=self.de.device).repeat_interleave(num_images_per_prompt)
        pos = self._embed(rows)[index]
        if not do_classifier_free_guidance:
            return pos, None
        negs = negative_rows("negative_prompt", negative_prompt, negative_prompt_embeds, len(rows))
        return pos, self._embed(negs)[index]

    def _embed(self, rows: list):
        """Rows of texts / given embeddings -> one batch of embeddings, each distinct text encoded once."""
        texts = list(dict.fromkeys(r for r in rows if isinstance(r, str)))
        done = self.de.encode_prompt(texts) if texts else None
        return torch.cat([done[texts.index(r):texts.index(r) + 1] if isinstance(r, str) else r for r in self._on(rows)])

    def _on(self, rows: list) -> list:
        """Texts as they are, given embeddings on the pipeline's device and dtype."""
        return [r if isinstance(r, str) else r.to(self.de.device, self.de.dtype) for r in rows]

    # --- images ---------------------------------------------------------------------------------------------------

    def _pixels(self, image, count: int) -> list[torch.Tensor]:
        """``count`` images (1, 3, H, W) in [-1, 1] from PIL images, arrays or tensors (a tensor or array with no value
        below 0 is read as [0, 1], as diffusers does); fewer images than prompts are repeated, as diffusers does."""
        if image is None:
            raise UsageError("image: an image is needed")
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise UsageError("image: an empty list")
        out = []
        for item in items:
            if isinstance(item, np.ndarray):
                item = torch.from_numpy(item).float().permute(*((0, 3, 1, 2) if item.ndim == 4 else (2, 0, 1)))
            if isinstance(item, torch.Tensor):
                x = (item if item.ndim == 4 else item[None]).float()
                if x.shape[1] != 3 or any(s % self.de.multiple for s in x.shape[-2:]):
                    raise UsageError(f"image: a tensor must be (B, 3, H, W) with sides multiples of "
                                     f"{self.de.multiple}, got {tuple(item.shape)}")
                x = x if x.min() < 0 else 2 * x - 1
                out += [x[i:i + 1].to(self.de.device, self.de.dtype) for i in range(x.shape[0])]
            else:
                out.append(images.to_tensor(images.load_image(item), self.de.multiple, self.de.device, self.de.dtype))
        if len({tuple(x.shape) for x in out}) > 1:
            raise UsageError("image: the images of a batch must have one size")
        if count % len(out):
            raise UsageError(f"image: {len(out)} images cannot be repeated to {count} prompts")
        return out * (count // len(out))

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's (mean, std) of one image, unscaled, in the VAE's dtype. The last few images' are kept
        (by their bytes), so that generate_mask then invert of one image encode it once."""
        key = (tuple(pixels.shape), hashlib.sha1(pixels.detach().float().cpu().numpy().tobytes()).hexdigest())
        if key not in self._posteriors:
            mean, logvar = self.de.model.first_stage_model.encode(pixels.to(self.de.device, self.de.vae_dtype))
            self._posteriors[key] = (mean, torch.exp(0.5 * logvar))
            while len(self._posteriors) > 8:
                self._posteriors.pop(next(iter(self._posteriors)))
        return self._posteriors[key]

    def _latent(self, mean: torch.Tensor, std: torch.Tensor | None, draw: torch.Tensor | None) -> torch.Tensor:
        """x_0: the scaled posterior mean, or a posterior sample mean + std * draw (diffusers' recipe)."""
        z = mean if draw is None else mean + std * draw
        return (z * self.de.cfg.vae.scaling_factor).to(self.de.latent_dtype)

    def _settings(self, **knobs) -> EditSettings:
        try:
            return EditSettings(compat=self.recipe.name, **knobs)
        except SettingsError as e:
            raise UsageError(e.message_for(_NAMES.get(e.field, e.field))) from None

    @staticmethod
    def _resolved(s: EditSettings, estimates_mask: bool) -> EditSettings:
        """``settings.resolve`` (diffusers' recipe floors the grid steps), its errors in diffusers' names."""
        try:
            return resolve(s, estimates_mask)
        except SettingsError as e:
            raise UsageError(e.message_for(_NAMES.get(e.field, e.field))) from None

    # --- the three calls --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_mask(self, image=None, target_prompt=None, target_negative_prompt=None, target_prompt_embeds=None,
                      target_negative_prompt_embeds=None, source_prompt=None, source_negative_prompt=None,
                      source_prompt_embeds=None, source_negative_prompt_embeds=None, num_maps_per_mask: int = 10,
                      mask_encode_strength: float = 0.5, mask_thresholding_ratio: float = 3.0,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5, generator=None,
                      output_type: str = "np", cross_attention_kwargs=None):
        """Step 1: the mask of each image at latent size, (B, h, w) 0 / 1 (np int64; "pt" a tensor; "pil" a list of
        "L" images). Recipe "diffusers": diffusers' random numbers and its clamp rule at ``mask_thresholding_ratio``
        x the mean, per image; "paper": the posterior mean, the 98th-percentile rule, threshold 0.5. The mask needs
        no guidance (it cancels in the rescaling): ``guidance_scale`` and the negative prompts change nothing."""
        refuse(cross_attention_kwargs=cross_attention_kwargs)
        check_output_type(output_type, ("np", "pt", "pil"))
        targets = prompt_rows("target_prompt", target_prompt, target_prompt_embeds, required=True)
        sources = prompt_rows("source_prompt", source_prompt, source_prompt_embeds, required=True)
        if len(sources) != len(targets):
            raise UsageError(f"source_prompt: {len(sources)} rows for {len(targets)} target rows")
        for name, neg, emb in (("target_negative_prompt", target_negative_prompt, target_negative_prompt_embeds),
                               ("source_negative_prompt", source_negative_prompt, source_negative_prompt_embeds)):
            negative_rows(name, neg, emb, len(targets))
        if not isinstance(num_maps_per_mask, int) or isinstance(num_maps_per_mask, bool) or num_maps_per_mask < 1:
            raise UsageError(f"num_maps_per_mask must be a positive integer, got {num_maps_per_mask!r}")
        if not mask_thresholding_ratio or mask_thresholding_ratio <= 0:
            raise UsageError(f"mask_thresholding_ratio must be positive, got {mask_thresholding_ratio!r}")
        # clamp-mean at 3 x mean, thresholded at r / 6, is diffusers' rule at r x mean thresholded at 0.5; the other
        # rules rescale D without the mean and keep their own threshold
        at_mean = self.recipe.normalization == "clamp-mean"
        if at_mean and mask_thresholding_ratio >= 6:
            raise UsageError(f"mask_thresholding_ratio must be below 6 here, got {mask_thresholding_ratio}")
        s = self._settings(n=num_maps_per_mask, strength=mask_encode_strength, steps=num_inference_steps,
                           **(dict(threshold=mask_thresholding_ratio / 6) if at_mean else {}))
        pixels = self._pixels(image, len(targets))
        n, b = num_maps_per_mask, len(pixels)
        denoiser = self.de.denoiser
        level = denoiser.strength_level(self._resolved(s, True).strength, s.steps)
        posts = [self._posterior(x) for x in pixels]
        x0s = [self._latent(m, None, None) for m, _ in posts]
        shape = (b * n, *posts[0][0].shape[1:])
        if self.recipe.posterior_sample:  # B x n posterior samples (image-major), then B x n noises, one generator
            draws = randn(shape, generator, self.de.device, self.de.vae_dtype)
            rows = [self._latent(m, sd, draws[i * n:(i + 1) * n]) for i, (m, sd) in enumerate(posts)]
            noise = randn(shape, generator, self.de.device, self.de.vae_dtype)
        else:  # the posterior mean under n noises per image, drawn as masking.noised_latents draws them
            rows = [x0.expand(n, *x0.shape[1:]) for x0 in x0s]
            noise = randn(shape, generator, self.de.device, torch.float32)
        noise = noise.to(self.de.latent_dtype)
        noises = [masking.Noises(denoiser.add_noise(x, noise[i * n:(i + 1) * n], level)[:, None], level)
                  for i, x in enumerate(rows)]
        inputs = [Input(x0=x0, noises=z) for x0, z in zip(x0s, noises)]
        requests = [Request(i, t, src, s) for i, (t, src) in enumerate(zip(self._on(targets), self._on(sources)))]
        with self._engine("generate_mask") as engine:
            masks = torch.stack([m for _, m in engine.masks(inputs, requests)]).long().cpu()
        if output_type == "pil":
            return [Image.fromarray((m * 255).byte().numpy(), mode="L") for m in masks]
        return masks if output_type == "pt" else masks.numpy()

    @torch.no_grad()
    def invert(self, prompt=None, image=None, num_inference_steps: int = 50, inpaint_strength: float = 0.8,
               guidance_scale: float = 7.5, negative_prompt=None, generator=None, prompt_embeds=None,
               negative_prompt_embeds=None, decode_latents: bool = False, output_type: str = "pil",
               return_dict: bool = True, callback=None, callback_steps: int = 1, cross_attention_kwargs=None,
               lambda_auto_corr: float = 20.0, lambda_kl: float = 20.0, num_reg_steps: int = 0,
               num_auto_corr_rolls: int = 5):
        """Step 2: the DDIM encoding of each image to ``inpaint_strength``; ``.latents`` (B, k, C, h, w), most noisy
        first (diffusers' layout; recipe "paper": k + 1 latents, x_0 last, which its decoding ends on). Recipe
        "diffusers": one posterior sample, CFG under ``prompt`` against ""; "paper": the posterior mean, the
        unconditional model (``prompt`` and ``guidance_scale`` unused). ``decode_latents``: ``.images`` too."""
        refuse(callback=callback, cross_attention_kwargs=cross_attention_kwargs)
        if num_reg_steps:
            raise UsageError("num_reg_steps: the Pix2Pix-Zero regularisation is not supported (0 only)")
        if negative_prompt not in (None, "") or negative_prompt_embeds is not None:
            raise UsageError("negative_prompt: invert's unconditional text is '' here (leave negative_prompt None)")
        check_output_type(output_type, ("pil", "np", "pt"))
        prompts = prompt_rows("prompt", prompt, prompt_embeds, required=True)
        s = self._settings(method="encode-decode", ratio=inpaint_strength, steps=num_inference_steps,
                           guidance=max(guidance_scale, 1.0))  # diffusers runs the conditional model alone at <= 1
        self._resolved(s, False)
        pixels = self._pixels(image, len(prompts))
        posts = [self._posterior(x) for x in pixels]
        if self.recipe.posterior_sample:  # one posterior sample per image, from the generator
            draws = randn((len(posts), *posts[0][0].shape[1:]), generator, self.de.device, self.de.vae_dtype)
            x0s = [self._latent(m, sd, draws[i:i + 1]) for i, (m, sd) in enumerate(posts)]
        else:
            x0s = [self._latent(m, None, None) for m, _ in posts]
        inputs = [Input(x0=x0) for x0 in x0s]
        requests = [Request(i, "", p, s) for i, p in enumerate(self._on(prompts))]
        v_late = self.recipe.inversion_v_late and self.de.prediction_type == "v_prediction"
        with self._engine("invert", inverse_v(self.de.alpha_bar, s.steps) if v_late else None) as engine:
            trajectories = engine.trajectories(inputs, requests)
        first = 1 if self.recipe.blend_late else 0  # a late blend never reads x_0: diffusers' layout leaves it out
        latents = torch.cat([t.latents[first:].flip(0).transpose(0, 1) for t in trajectories])
        pictures = None
        if decode_latents:
            flat = latents.flatten(0, 1)
            b = self.de.vae_batch
            pixels = torch.cat([self.de.decode_latents(flat[i:i + b]) for i in range(0, len(flat), b)])
            pictures = postprocess(pixels, "pil" if output_type == "pil" else "np")
        out = DiffEditInversionPipelineOutput(latents, pictures)
        return out if return_dict else astuple(out)

    @torch.no_grad()
    def __call__(self, prompt=None, mask_image=None, image_latents=None, inpaint_strength: float = 0.8,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, negative_prompt=None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type: str = "pil", return_dict: bool = True, callback=None,
                 callback_steps: int = 1, cross_attention_kwargs=None, clip_skip=None):
        """Step 3: decode ``image_latents`` (``invert``'s) towards ``prompt`` with CFG against ``negative_prompt``
        (diffusers' docs pass the source prompt), keeping the input outside ``mask_image`` (latent size, or pixel
        size, averaged to it). ``.images``: PIL list, "np" (B, H, W, 3) / "pt" (B, 3, H, W) in [0, 1], "latent"."""
        refuse(callback=callback, cross_attention_kwargs=cross_attention_kwargs, latents=latents, clip_skip=clip_skip)
        if eta:
            raise UsageError(f"eta: only deterministic DDIM (eta 0) is supported, got {eta}")
        check_output_type(output_type, ("pil", "np", "pt", "latent"))
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise UsageError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        prompts = prompt_rows("prompt", prompt, prompt_embeds, required=True)
        negatives = negative_rows("negative_prompt", negative_prompt, negative_prompt_embeds, len(prompts))
        s = self._settings(ratio=inpaint_strength, steps=num_inference_steps, guidance=max(guidance_scale, 1.0))
        xs = self._image_latents(image_latents, len(prompts), s)
        masks = mask_rows(mask_image, len(prompts), xs.shape[-2:], self.vae_scale_factor)
        levels = self.de.denoiser.levels(self._resolved(s, False).ratio, s.steps)
        inputs = []
        for x in xs:  # x: (k or k + 1, C, h, w), most noisy first
            up = x.flip(0).to(self.de.device, self.de.latent_dtype)
            # a late blend's layout has no x_0 and never reads that slot (filled with the level-1 latent)
            lat = torch.cat([up[:1], up]) if self.recipe.blend_late else up
            inputs.append(Input(x0=lat[:1], trajectory=Trajectory(lat[:, None], levels, s.steps)))
        requests = [Request(i, p, neg, s, masks[i].to(self.de.device))
                    for i, (p, neg) in enumerate(zip(self._on(prompts), self._on(negatives)))]
        with self._engine("DiffEdit") as engine:
            outs = engine.edits(inputs, requests, decode_pixels=output_type != "latent")
        index = torch.arange(len(outs)).repeat_interleave(num_images_per_prompt)  # eta 0: the copies are equal
        if output_type == "latent":
            result = torch.stack([o.latents for o in outs])[index]
        else:
            result = postprocess(torch.stack([o.pixels for o in outs])[index], output_type)
        return StableDiffusionPipelineOutput(result) if return_dict else (result, None)

    def _image_latents(self, image_latents, batch: int, s: EditSettings) -> torch.Tensor:
        """``invert``'s latents as (B, k, C, h, w) (k + 1 for recipe "paper"), checked against the steps asked for."""
        if image_latents is None:
            raise UsageError("image_latents: give the latents invert() returned (.latents)")
        x = torch.cat(list(image_latents)) if isinstance(image_latents, (list, tuple)) else image_latents
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
            raise UsageError("image_latents must be a (B, k, C, h, w) tensor from invert()")
        k = round(self._resolved(s, False).ratio * s.steps) + (0 if self.recipe.blend_late else 1)
        if x.ndim == 4 and x.shape[0] % batch == 0:
            x = x.reshape(batch, -1, *x.shape[1:])
        if x.ndim != 5 or tuple(x.shape[:2]) != (batch, k) or x.shape[2] != self.de.cfg.unet.in_channels:
            extra = "" if self.recipe.blend_late else f" (recipe {self.recipe.name!r}: x_0 last)"
            raise UsageError(f"image_latents: expected ({batch}, {k}, {self.de.cfg.unet.in_channels}, h, w) for "
                             f"{batch} prompt(s), inpaint_strength {s.ratio} and {s.steps} steps{extra}, got "
                             f"{tuple(x.shape)} (invert with the same strength and steps)")
        return x


DiffEditPipeline = StableDiffusionDiffEditPipeline
