"""The DiffEdit object: the three networks plus the algorithm's steps, behind the public API.

    de = DiffEdit.from_pretrained("toy")
    result = de.edit("cat.png", target="a photo of a dog", source="a photo of a cat")
    result.image.save("dog.png"); result.mask.save("mask.png")
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm import tqdm

from . import ddim, images, masking, precision
from .edit import ddim_sample, masked_decode, sdedit
from .guidance import Conditioning, eps_model
from .inversion import Trajectory, ddim_encode, num_encoding_steps
from .models import ModelConfig, StableDiffusion
from .models.conditioner import size_conditioning
from .models.unet import CrossAttention
from .settings import METHODS, EditSettings

log = logging.getLogger(__name__)


@dataclass
class MaskResult:
    map: torch.Tensor     # (h, w) float in [0, 1]: the rescaled difference map D, latent resolution
    binary: torch.Tensor  # (h, w) bool: the mask M
    image: Image.Image    # M as PIL "L" at the input size


@dataclass
class EditResult:
    image: Image.Image                    # the edit, at the input size
    mask: Image.Image | None              # the mask used (PIL "L", input size); None for the baselines
    mask_map: torch.Tensor | None         # D rescaled to [0, 1], latent resolution; None if not estimated
    trajectory: Trajectory | None         # the DDIM encoding (None for SDEdit)
    latents: torch.Tensor = field(repr=False, default=None)  # the edited latent y_0, (C, h, w)


class DiffEdit:
    """DiffEdit on a Stable Diffusion model (or the embedded toy model)."""

    def __init__(self, model: StableDiffusion, device="cpu", dtype=None, prediction_type=None,
                 max_batch: int = 64, compile: bool = False, attention_dtype="auto", channels_last="auto"):
        """``dtype``: the networks' dtype (None: the model's own; "auto": ``precision.resolve_dtype``); the
        model is cast to it.
        Latents and the DDIM arithmetic stay in ``latent_dtype`` (float32; float64 for float64 networks).
        ``attention_dtype``: the dtype the UNet's attention runs in; "auto" is float32 for an SD2 or
        v-prediction model in float16 (SD2.1 768-v overflows in fp16 attention: NaN, black images), else
        the activations' dtype. ``channels_last``: the UNet's weights in channels-last layout; "auto" is on for
        bf16 on a CPU, where oneDNN's convolutions run faster in it (1.17x per SD1.5 UNet row; 0.90x in fp32).
        ``compile``: ``torch.compile`` the UNet (see ``compile()``)."""
        if dtype == "auto":
            log.info("networks in %s (dtype auto: %s; dtype float32 forces fp32)",
                     *(str(v).removeprefix("torch.") for v in precision.auto_dtype(device)))
        dtype = next(model.parameters()).dtype if dtype is None else precision.resolve_dtype(dtype, device)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.cfg: ModelConfig = model.cfg
        self.device, self.dtype = torch.device(device), dtype
        # SDXL's VAE gives NaN in float16, in encoding too: it runs in float32 there from the start.
        self.vae_dtype = torch.float32 if dtype == torch.float16 and self.cfg.vae.force_upcast else dtype
        self.model.first_stage_model.to(self.vae_dtype)
        self.latent_dtype = precision.latent_dtype(dtype)
        self.prediction_type = prediction_type or self.cfg.prediction_type
        self.max_batch = max_batch
        self.alpha_bar = ddim.alphas_cumprod(dtype=torch.float64).to(self.device)
        self.eps = eps_model(self.unet, self.prediction_type, self.alpha_bar, dtype)
        self.multiple = self.cfg.size_multiple  # image sides must be multiples of this
        if attention_dtype == "auto":
            fp16_overflows = dtype == torch.float16 and (self.cfg.family == "sd2" or self.prediction_type == "v_prediction")
            attention_dtype = torch.float32 if fp16_overflows else None
        self.attention_dtype = attention_dtype
        for m in self.model.unet.modules():
            if isinstance(m, CrossAttention):
                m.attention_dtype = attention_dtype
        if channels_last == "auto":
            channels_last = dtype == torch.bfloat16 and self.device.type == "cpu"
        if channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
        self._vae32 = None  # a float32 copy of the VAE, made the first time float16 overflows
        if compile:
            self.compile()

    @classmethod
    def from_pretrained(cls, source: str = "toy", device="cpu", dtype="auto", prediction_type=None,
                        max_batch: int = 64, compile: bool = False, attention_dtype="auto",
                        channels_last="auto") -> "DiffEdit":
        """Load a single file (.safetensors / .ckpt), a diffusers folder, a hub repo id, or "toy"."""
        from .checkpoint import load_model
        model, cfg = load_model(source, device=device, dtype=precision.resolve_dtype(dtype, device),
                                prediction_type=prediction_type)
        return cls(model, device, dtype, cfg.prediction_type, max_batch, compile, attention_dtype, channels_last)

    def compile(self, **options) -> "DiffEdit":
        """``torch.compile`` the UNet in place (``nn.Module.compile``: parameter names stay the checkpoint's);
        ``options`` go to ``torch.compile``. The first edit pays the compilation, once per batch shape (mask pass,
        CFG pair, inversion row). Meant for GPUs: on the 2-core CPU it made one SD1.5 UNet forward (16 x 16
        latents, fp32) slower, 0.71x eager, and 0.70x with inductor's ``freezing`` (interleaved timings)."""
        self.model.unet.compile(**options)
        return self

    # --- the networks --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, texts: list[str], size: tuple[int, int] | None = None) -> torch.Tensor | Conditioning:
        """Texts -> what the UNet is conditioned on: (B, 77, D) for SD1/2. For SDXL a ``Conditioning``: the two
        towers' (B, 77, 2048) and y = the pooled text with the micro-conditioning of an image of ``size`` (H, W)
        (None: the model's resolution, square): original size (H, W), crop (0, 0), target size (H, W)."""
        if isinstance(texts, str):
            texts = [texts]
        context, pooled = self.model.encode_text(list(texts), self.device)
        if pooled is None:
            return context.to(self.dtype)
        h, w = size or (self.cfg.resolution, self.cfg.resolution)
        y = size_conditioning(pooled, (h, w), (0, 0), (h, w), self.cfg.size_embed_dim)
        return Conditioning(context.to(self.dtype), y.to(self.dtype))

    def _embed(self, *groups: list[str], size: tuple[int, int] | None = None) -> list[torch.Tensor | Conditioning]:
        """The embeddings of several lists of texts from one text-encoder call, each distinct text once."""
        unique = list(dict.fromkeys(t for g in groups for t in g))
        e, at = self.encode_prompt(unique, size), {t: i for i, t in enumerate(unique)}
        return [torch.cat([e[at[t]:at[t] + 1] for t in g]) for g in groups]

    def image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """(H, W) in pixels of the image that ``latents`` (..., h, w) encode."""
        return tuple(s * self.cfg.vae.downsampling for s in latents.shape[-2:])

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled posterior mean (B, 4, H/f, W/f): x_0 of the paper."""
        x = images.to(self.device, self.vae_dtype)
        mean, _ = self.model.first_stage_model.encode(x)
        if self._overflowed(mean):
            mean = self._vae_float32().encode(images.to(self.device, torch.float32))[0]
        return mean.to(self.latent_dtype) * self.cfg.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        z = latents.to(self.vae_dtype) / self.cfg.vae.scaling_factor
        out = self.model.first_stage_model.decode(z)
        if self._overflowed(out):
            out = self._vae_float32().decode(latents.float() / self.cfg.vae.scaling_factor).to(self.dtype)
        return out

    def _overflowed(self, out: torch.Tensor) -> bool:
        """SD VAEs can overflow in float16 (large images, unusual latents): then they are run again in float32."""
        if self.vae_dtype != torch.float16 or torch.isfinite(out).all():
            return False
        log.warning("the VAE overflowed in float16 (non-finite output); running it in float32 instead")
        return True

    def _vae_float32(self):
        if self._vae32 is None:
            self._vae32 = copy.deepcopy(self.model.first_stage_model).float()
        return self._vae32

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, timesteps, context: torch.Tensor | Conditioning) -> torch.Tensor:
        """The model output: epsilon or v, as ``self.prediction_type`` says."""
        if isinstance(context, Conditioning):
            return self.model.unet(latents, timesteps, context.context, context.y)
        return self.model.unet(latents, timesteps, context)

    # --- the algorithm -------------------------------------------------------------------------------

    def _prepare(self, image):
        pil = images.load_image(image)
        return pil, self.encode_image(images.to_tensor(pil, self.multiple, self.device, self.dtype))

    def invert(self, image, ratio: float = 0.7, steps: int = 50) -> Trajectory:
        """DDIM-encode an image to ratio r with the unconditional model (Sec. 3.2)."""
        _, x0 = self._prepare(image)
        return ddim_encode(self.eps, x0, self.encode_prompt([""], self.image_size(x0)), ratio, steps, self.alpha_bar,
                           max_batch=self.max_batch)

    def _masks(self, x0, queries, reference, s: EditSettings):
        gen = torch.Generator().manual_seed(s.seed)
        noises = masking.noised_latents(x0, s.n, s.strength, s.steps, self.alpha_bar, gen)
        d = masking.noise_difference_maps(self.eps, noises, queries, reference, self.max_batch)
        d = masking.normalize(d.float(), s.mask_normalization)
        return d, masking.dilate(masking.binarize(d, s.threshold), s.dilate)

    def mask(self, image, target, source: str = "", n: int = 10, strength: float = 0.5, threshold: float = 0.5,
             seed: int = 0, steps: int = 50, normalization: str = "quantile", dilate: int = 0):
        """Step 1 alone: the mask for ``target`` against ``source`` (a list of targets gives a list).
        ``dilate``: grow the binary mask by this many latent cells (not in the paper); the map D is unchanged."""
        targets = _targets(target)
        s = EditSettings(n=n, strength=strength, threshold=threshold, seed=seed, steps=steps,
                         normalization=normalization, dilate=dilate)
        pil, x0 = self._prepare(image)
        cond, ref = self._embed(targets, [source], size=self.image_size(x0))
        d, m = self._masks(x0, cond, ref, s)
        out = [MaskResult(d[i].cpu(), m[i].cpu(), images.mask_to_pil(m[i], pil.size)) for i in range(len(targets))]
        return out if isinstance(target, (list, tuple)) else out[0]

    def edit(self, image, target, source: str = "", ratio: float = 0.7, threshold: float = 0.5, n: int = 10,
             strength: float = 0.5, steps: int = 50, guidance: float = 7.5, seed: int = 0, method: str = "diffedit",
             mask=None, normalization: str | None = None, compat: str | None = None, progress: bool = False,
             dilate: int = 0):
        """Edit ``image`` towards ``target`` (a list of targets shares one inversion and the reference half
        of the mask pass). ``mask``: a PIL mask at image size or a (h, w) tensor at latent size; skips step 1.
        ``dilate``: grow the estimated mask by this many latent cells (not in the paper; a given ``mask`` is used
        as it is). ``compat``: a recipe name of ``settings.RECIPES`` (None: the paper's)."""
        targets = _targets(target)
        s = EditSettings(method=method, ratio=ratio, steps=steps, guidance=guidance, threshold=threshold, n=n,
                         strength=strength, normalization=normalization, dilate=dilate, seed=seed, compat=compat)
        if mask is not None and s.method != "diffedit":
            raise ValueError(f"mask= is used by method 'diffedit' only; {s.method!r} edits without a mask")
        recipe = s.recipe
        if recipe.floor_grid:  # diffusers takes int(r * steps) grid steps where we round: 3.5 -> 3, not 4
            s = s.replace(ratio=_floor_fraction("ratio", s.ratio, s.steps))
            if s.method == "diffedit" and mask is None:  # the level of the mask's noises
                s = s.replace(strength=_floor_fraction("strength", s.strength, s.steps))
        pil, x0 = self._prepare(image)
        cond, ref, empty = self._embed(targets, [source], [""], size=self.image_size(x0))  # each text once
        k = num_encoding_steps(s.ratio, s.steps)
        inversion = 0 if s.method == "sdedit" else k * (2 if recipe.inversion_guidance else 1)  # CFG: 2 rows a step
        bar = tqdm(total=inversion + k, desc=s.method, disable=not progress, leave=False)
        step = lambda *_: bar.update(1)
        d = m = None
        if s.method == "sdedit":
            y0 = sdedit(self.eps, x0, cond, ref, s.ratio, s.steps, s.guidance, self.alpha_bar,
                        torch.Generator().manual_seed(s.seed), self.max_batch, step)
            trajectory = None
        else:
            if recipe.inversion_guidance:  # CFG under the source prompt
                trajectory = ddim_encode(self.eps, x0, ref, s.ratio, s.steps, self.alpha_bar, s.guidance, empty,
                                         self.max_batch)
            else:
                trajectory = ddim_encode(self.eps, x0, empty, s.ratio, s.steps, self.alpha_bar,
                                         max_batch=self.max_batch)
            bar.update(inversion)
            if s.method == "diffedit":
                if mask is None:
                    d, m = self._masks(x0, cond, ref, s)
                else:
                    m = self._external_mask(mask, x0.shape[-2:]).expand(len(targets), -1, -1)
            blend = None if m is None else m[:, None].to(x0.dtype)
            y0 = masked_decode(self.eps, trajectory, cond, ref, s.guidance, self.alpha_bar, blend, recipe.blend_late,
                               self.max_batch, step)
        bar.close()
        decoded = self.decode_latents(y0)
        results = [EditResult(images.to_pil(decoded[i], pil.size),
                              None if m is None else images.mask_to_pil(m[i], pil.size),
                              None if d is None else d[i].cpu(), trajectory, y0[i])
                   for i in range(len(targets))]
        return results if isinstance(target, (list, tuple)) else results[0]

    def _external_mask(self, mask, latent_size) -> torch.Tensor:
        if isinstance(mask, Image.Image):
            return images.mask_from_pil(mask, tuple(latent_size)).to(self.device)
        mask = torch.as_tensor(mask)
        if mask.shape != tuple(latent_size):
            raise ValueError(f"a tensor mask must have the latent size {tuple(latent_size)}, got {tuple(mask.shape)}")
        return (mask > 0.5).to(self.device)

    @torch.no_grad()
    def generate(self, prompt: str, seed: int = 0, steps: int = 50, guidance: float = 7.5,
                 size: int | None = None) -> Image.Image:
        """Plain text-to-image with classifier-free guidance (DDIM from pure noise)."""
        side = (size or self.cfg.resolution) // self.cfg.vae.downsampling
        shape = (1, self.cfg.unet.in_channels, side, side)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.device, self.latent_dtype)
        levels = torch.cat([torch.tensor([-1]), ddim.timesteps(steps)]).to(self.device)
        cond, uncond = self._embed([prompt], [""], size=self.image_size(noise))
        y0 = ddim_sample(self.eps, noise, levels, cond, uncond, guidance, self.alpha_bar, max_batch=self.max_batch)
        return images.to_pil(self.decode_latents(y0)[0])


def _floor_fraction(name: str, fraction: float, steps: int) -> float:
    """The fraction of the grid diffusers' ``get_timesteps`` uses: int(fraction * steps) / steps (ours rounds)."""
    k = int(fraction * steps)
    if k < 1:
        raise ValueError(f"{name} {fraction} x {steps} steps is below one grid step: diffusers runs no step (compat)")
    return k / steps


def _targets(target) -> list[str]:
    targets = [target] if isinstance(target, str) else list(target)
    if not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
        raise ValueError("target must be a non-empty text (or a list of them)")
    return targets
