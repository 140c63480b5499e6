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

from . import ddim, images, precision
from .denoiser import Denoiser
from .engine import Engine
from .flow import FlowDenoiser
from .flux_flow import FluxDenoiser, Timing
from .conditioning import Conditioning
from .model_call import EvalCounter, eps_model
from .images import load_image
from .inversion import Trajectory
from .models import ModelConfig, StableDiffusion
from .models.conditioner import size_conditioning
from .models.flux import STORED_DTYPES
from .models.unet import CrossAttention
from .plan import Input, Request
from .settings import KNOBS, EditSettings, UsageError

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
        bf16 on a CPU, where oneDNN's convolutions run faster in it (and slower in fp32: docs/results/bench_cpu*.json).
        ``compile``: ``torch.compile`` the UNet (see ``compile()``)."""
        if dtype == "auto":
            log.info("networks in %s (dtype auto: %s; dtype float32 forces fp32)",
                     *(str(v).removeprefix("torch.") for v in precision.auto_dtype(device)))
        # None: the model's own, its first parameter not kept in float8 (models.flux.StoredLinear)
        dtype = (next(p.dtype for p in model.parameters() if p.dtype not in STORED_DTYPES) if dtype is None
                 else precision.resolve_dtype(dtype, device))
        self.model = model.to(dtype).eval().requires_grad_(False)
        # the low-memory mode of FLUX.1 and SD3 with T5 (checkpoint.build.Swap): T5 and the transformer take turns,
        # read in this dtype
        self.swap = getattr(model, "swap", None)
        if self.swap is not None:
            self.swap.dtype = dtype
        self.cfg: ModelConfig = model.cfg
        self.device, self.dtype = torch.device(device), dtype
        # SDXL's VAE gives NaN in float16, in encoding too: it runs in float32 there from the start.
        self.vae_dtype = torch.float32 if dtype == torch.float16 and self.cfg.vae.force_upcast else dtype
        self.model.first_stage_model.to(self.vae_dtype)
        self.latent_dtype = precision.latent_dtype(dtype)
        self.prediction_type = prediction_type or self.cfg.prediction_type
        self.max_batch = max_batch
        self.alpha_bar = ddim.alphas_cumprod(dtype=torch.float64).to(self.device)
        self.flow = self.cfg.family in ("sd3", "flux")  # a flow-matching transformer in place of the UNet
        self.flux = self.cfg.family == "flux"
        # FLUX.1: the true-CFG scale (R as the negative prompt; 1: off) and the embedded g of the unguided estimates
        # (mask, encoding): the default decoding's, whose velocity field the Euler encoding then retraces (a round
        # trip encoded at g = 1 and decoded at 3.5 keeps an error that more steps do: docs/results/flux_roundtrip.json)
        self.true_cfg_scale = 1.0
        self.unguided_guidance = self.cfg.flux_schedule.guidance if self.flux else 1.0
        self.eps = eps_model(self.unet, self.prediction_type, self.alpha_bar, dtype)
        self.vae_batch = 8  # images per VAE decoder call
        self.multiple = self.cfg.size_multiple  # image sides must be multiples of this
        self.latent_channels = (self.cfg.flux.in_channels // 4 if self.flux else self.cfg.mmdit.in_channels
                                if self.flow else self.cfg.unet.in_channels)
        if attention_dtype == "auto":
            fp16_overflows = dtype == torch.float16 and (self.cfg.family == "sd2" or self.prediction_type == "v_prediction")
            attention_dtype = torch.float32 if fp16_overflows else None
        self.attention_dtype = attention_dtype
        for m in self.network.modules():
            if isinstance(m, CrossAttention):
                m.attention_dtype = attention_dtype
        if channels_last == "auto":
            channels_last = dtype == torch.bfloat16 and self.device.type == "cpu"
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        self._vae32 = None  # a float32 copy of the VAE, made the first time float16 overflows
        if compile:
            self.compile()

    @classmethod
    def from_pretrained(cls, source: str = "toy", device="cpu", dtype="auto", prediction_type=None,
                        max_batch: int = 64, compile: bool = False, attention_dtype="auto",
                        channels_last="auto", low_memory="auto") -> "DiffEdit":
        """Load a single file (.safetensors / .ckpt), a diffusers folder, a hub repo id, or "toy". ``low_memory``
        (FLUX.1, SD3 with T5): free T5 before the transformer is read, and swap them when a new text needs T5 (True,
        False, or "auto": when the machine has less memory than the weights; see ``checkpoint.load_model``)."""
        from .checkpoint import load_model
        model, cfg = load_model(source, device=device, dtype=precision.resolve_dtype(dtype, device),
                                prediction_type=prediction_type, low_memory=low_memory)
        return cls(model, device, dtype, cfg.prediction_type, max_batch, compile, attention_dtype, channels_last)

    def compile(self, **options) -> "DiffEdit":
        """``torch.compile`` the UNet in place (``nn.Module.compile``: parameter names stay the checkpoint's);
        ``options`` go to ``torch.compile``. The first edit pays the compilation, once per batch shape (mask pass,
        CFG pair, inversion row). Meant for GPUs: on a 2-core CPU it made the UNet slower than eager
        (docs/results/bench_cpu_compile.json)."""
        self.network.compile(**options)
        return self

    # --- the networks --------------------------------------------------------------------------------

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network: the UNet, SD3's MMDiT or the FLUX.1 transformer."""
        if self.flux:
            return self.model.transformer
        return self.model.mmdit if self.flow else self.model.unet

    @torch.no_grad()
    def encode_prompt(self, texts: list[str], size: tuple[int, int] | None = None) -> torch.Tensor | Conditioning:
        """Texts -> what the UNet is conditioned on: (B, 77, D) for SD1/2. For SDXL a ``Conditioning``: the two
        towers' (B, 77, 2048) and y = the pooled text with the micro-conditioning of an image of ``size`` (H, W)
        (None: the model's resolution, square): original size (H, W), crop (0, 0), target size (H, W).
        For SD3 a ``Conditioning`` of the text tokens (B, 77 + t5_tokens, 4096) and y = the pooled CLIP-L and CLIP-G
        text (B, 2048); for FLUX.1 one of T5's states (B, t5_tokens, 4096) and y = CLIP-L's pooled text (B, 768);
        ``size`` is unused."""
        if isinstance(texts, str):
            texts = [texts]
        if self.swap is not None:
            self.swap.hold("text")
        context, pooled = self.model.encode_text(list(texts), self.device)
        if pooled is None:
            return context.to(self.dtype)
        if self.flow:
            return Conditioning(context.to(self.dtype), pooled.to(self.dtype))
        h, w = size or (self.cfg.resolution, self.cfg.resolution)
        y = size_conditioning(pooled, (h, w), (0, 0), (h, w), self.cfg.size_embed_dim)
        return Conditioning(context.to(self.dtype), y.to(self.dtype))

    def _embed(self, *groups: list[str], size: tuple[int, int] | None = None) -> list[torch.Tensor | Conditioning]:
        """The embeddings of several lists of texts from one text-encoder call, each distinct text once."""
        unique = list(dict.fromkeys(t for g in groups for t in g))
        e, at = self.encode_prompt(unique, size), {t: i for i, t in enumerate(unique)}
        return [torch.cat([e[at[t]:at[t] + 1] for t in g]) for g in groups]

    def latent_shape(self, pixels: torch.Tensor) -> tuple:
        """The shape of x_0 for images ``pixels`` (B, 3, H, W): (B, C, H/f, W/f)."""
        f = self.cfg.vae.downsampling
        return (pixels.shape[0], self.latent_channels, pixels.shape[-2] // f, pixels.shape[-1] // f)

    def image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """(H, W) in pixels of the image that ``latents`` (..., h, w) encode."""
        return tuple(s * self.cfg.vae.downsampling for s in latents.shape[-2:])

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled posterior mean (B, C, H/f, W/f): x_0 of the paper (SD3's latent
        is shifted, then scaled)."""
        x = images.to(self.device, self.vae_dtype)
        mean, _ = self.model.first_stage_model.encode(x)
        if self._overflowed(mean):
            mean = self._vae_float32().encode(images.to(self.device, torch.float32))[0]
        return self.model.first_stage_model.scale(mean.to(self.latent_dtype))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        vae = self.model.first_stage_model
        out = vae.decode(vae.unscale(latents.to(self.vae_dtype)))
        if self._overflowed(out):
            out = self._vae_float32().decode(vae.unscale(latents.float())).to(self.dtype)
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
        """The model output: epsilon or v, as ``self.prediction_type`` says (SD3: the flow's velocity, at
        timesteps t = 1000 s)."""
        if self.swap is not None:
            self.swap.hold("transformer")
        if isinstance(timesteps, Timing):  # FLUX.1: t and the embedded guidance
            return self.network(latents, timesteps.t, context.context, context.y, timesteps.guidance)
        if isinstance(context, Conditioning):
            return self.network(latents, timesteps, context.context, context.y)
        return self.network(latents, timesteps, context)

    # --- the algorithm (composed in engine.py) -------------------------------------------------------------

    @property
    def denoiser(self) -> Denoiser | FlowDenoiser:
        """The model call (``eps``) with the DDIM schedule and ``max_batch`` (see ``denoiser.Denoiser``); for SD3 the
        flow schedule with the model's shift (``flow.FlowDenoiser``); for FLUX.1 its resolution-dependent shift and
        guidance (``flux_flow.FluxDenoiser``: ``guidance`` is the embedded scale on dev, ``true_cfg_scale`` > 1 adds
        true CFG with R as the negative prompt)."""
        if self.flux:
            return FluxDenoiser(self.eps, self.cfg.flux_schedule, self.cfg.flux.guidance_embed, self.unguided_guidance,
                                self.true_cfg_scale, self.max_batch, self.device)
        if self.flow:
            return FlowDenoiser(self.eps, self.cfg.flow_shift, self.max_batch, self.device)
        return Denoiser(self.eps, self.alpha_bar, self.max_batch)

    def engine(self, memo=None, wrap=None, on_phase=None) -> Engine:
        """The engine that runs this model's edits (``memo``, ``wrap``, ``on_phase``: see ``engine.Engine``)."""
        return Engine(self, memo, wrap, on_phase)

    def _inputs(self, image) -> tuple[list[Image.Image], list[Input], bool]:
        """(PIL images, engine inputs, whether a list was given) from one image or a list of them."""
        many = isinstance(image, (list, tuple))
        pils = [load_image(im) for im in (image if many else [image])]
        if not pils:
            raise UsageError("images must be an image or a non-empty list of images")
        return pils, [Input(images.to_tensor(p, self.multiple, self.device, self.dtype)) for p in pils], many

    def _requests(self, count: int, many: bool, target, source, settings: EditSettings, mask=None, latent_sizes=None):
        """The engine's requests for ``count`` images: one target for all or one per image; for one image,
        several targets. Returns (requests, whether a list comes out)."""
        targets, many_targets = _texts("target", target)
        sources, many_sources = _texts("source", source, empty_ok=True)
        if many and many_targets and len(targets) != count:
            raise UsageError(f"target: give one text for all {count} images or one per image, got {len(targets)}")
        if many_sources and len(sources) != count:
            raise UsageError(f"source: give one text for all images or one per image ({count}), got {len(sources)}")
        masks = mask if isinstance(mask, (list, tuple)) else [mask] * count
        if len(masks) != count:
            raise UsageError(f"mask: give one mask for all {count} images or one per image, got {len(masks)}")
        masks = [None if m is None else self._external_mask(m, latent_sizes[i]) for i, m in enumerate(masks)]
        if many:
            pairs = [(i, targets[i] if many_targets else targets[0]) for i in range(count)]
        else:
            pairs = [(0, t) for t in targets]
        reqs = [Request(i, t, sources[i] if many_sources else sources[0], settings, masks[i]) for i, t in pairs]
        return reqs, many or many_targets

    def _latent_sizes(self, inputs: list[Input]) -> list[tuple[int, int]]:
        f = self.cfg.vae.downsampling
        return [tuple(s // f for s in inp.pixels.shape[-2:]) for inp in inputs]

    def defaults(self, **given) -> dict:
        """``given`` knobs with each None replaced by this model's default (``ModelConfig.edit_defaults``: FLUX.1's
        steps and guidance), else the knob's (``settings.KNOBS``)."""
        own = self.cfg.edit_defaults()
        return {k: own.get(k, KNOBS[k].default) if v is None else v for k, v in given.items()}

    def invert(self, image, ratio: float = 0.7, steps: int | None = None, source="", guidance: float | None = None,
               compat: str | None = None) -> Trajectory | list[Trajectory]:
        """Step 2 alone (Sec. 3.2): the encoding of an image (or a list) to ratio r, every latent on the grid, for
        ``edit(..., trajectory=...)``. The paper's recipe inverts with the unconditional model (``source`` and
        ``guidance`` unused); ``compat="diffusers"`` with CFG under ``source``. ``steps`` / ``guidance`` None: the
        model's defaults (``defaults``)."""
        s = EditSettings(method="encode-decode", ratio=ratio, compat=compat,
                         **self.defaults(steps=steps, guidance=guidance))
        _, inputs, many = self._inputs(image)
        sources, many_sources = _texts("source", source, empty_ok=True)
        if many_sources and len(sources) != len(inputs):
            raise UsageError(f"source: give one text for all images or one per image ({len(inputs)}), "
                             f"got {len(sources)}")
        reqs = [Request(i, "", sources[i] if many_sources else sources[0], s) for i in range(len(inputs))]
        out = self.engine().trajectories(inputs, reqs)
        return out if many else out[0]

    def mask(self, image, target, source="", n: int = 10, strength: float = 0.5, threshold: float = 0.5,
             seed: int = 0, steps: int | None = None, normalization: str | None = None, dilate: int = 0,
             compat: str | None = None):
        """Step 1 alone (Sec. 3.1): the mask of ``target`` against ``source``, with the defaults of ``edit``.
        ``image``, ``target`` and ``source`` as in ``edit``; a list in gives a list out.
        ``dilate``: grow the binary mask by this many latent cells (not in the paper); the map D is unchanged."""
        s = EditSettings(n=n, strength=strength, threshold=threshold, seed=seed, normalization=normalization,
                         dilate=dilate, compat=compat, **self.defaults(steps=steps))
        pils, inputs, many = self._inputs(image)
        reqs, listed = self._requests(len(inputs), many, target, source, s)
        out = [MaskResult(d.cpu(), m.cpu(), images.mask_to_pil(m, pils[r.image].size))
               for r, (d, m) in zip(reqs, self.engine().masks(inputs, reqs))]
        return out if listed else out[0]

    def edit(self, image, target, source="", ratio: float = 0.7, threshold: float = 0.5, n: int = 10,
             strength: float = 0.5, steps: int | None = None, guidance: float | None = None, seed: int = 0,
             method: str = "diffedit",
             mask=None, normalization: str | None = None, compat: str | None = None, progress: bool = False,
             dilate: int = 0, trajectory=None):
        """Edit ``image`` (one image, or a list of images) towards ``target``.

        ``target`` / ``source``: a text, or what ``encode_prompt`` returns (one row; e.g. the mean of several
        captions' embeddings, ``conditioning.mean_embedding``); one for all images or a list with one per image. For
        one image, a list of targets gives one edit each (sharing the encoding and the reference's mask rows).
        A list in (images or targets) gives a list of ``EditResult`` out, else one.
        ``mask``: a PIL mask at image size or a (h, w) tensor at latent size (one, or one per image): replaces
        step 1. ``dilate``: grow the estimated mask by this many latent cells (not in the paper).
        ``trajectory``: what ``invert`` returned for these images (one, or one per image): no second encoding.
        ``compat``: a recipe name of ``settings.RECIPES`` (None: the paper's).
        ``steps`` / ``guidance`` None: the model's defaults (``defaults``): 50 and 7.5, but FLUX.1-dev 28 steps at
        embedded guidance 3.5 and schnell 4 steps without guidance."""
        s = EditSettings(method=method, ratio=ratio, threshold=threshold, n=n, strength=strength,
                         normalization=normalization, dilate=dilate, seed=seed, compat=compat,
                         **self.defaults(steps=steps, guidance=guidance))
        pils, inputs, many = self._inputs(image)
        if trajectory is not None:
            given = list(trajectory) if isinstance(trajectory, (list, tuple)) else [trajectory]
            if len(given) != len(inputs):
                raise UsageError(f"trajectory: give one per image ({len(inputs)}), got {len(given)}")
            for inp, t in zip(inputs, given):
                inp.trajectory, inp.x0 = t, t.latents[0].to(self.device)
        reqs, listed = self._requests(len(inputs), many, target, source, s, mask, self._latent_sizes(inputs))
        bar = None
        engine = self.engine(wrap=(lambda model: EvalCounter(model, lambda rows: bar.update(rows))) if progress else None)
        bar = tqdm(total=engine.plan(inputs, reqs).cost.rows, desc=s.method, unit="row", disable=not progress,
                   leave=False)
        out = engine.edits(inputs, reqs)
        bar.close()
        results = [EditResult(images.to_pil(o.pixels, pils[r.image].size),
                              None if o.mask is None else images.mask_to_pil(o.mask, pils[r.image].size),
                              None if o.map is None else o.map.cpu(), o.trajectory, o.latents)
                   for r, o in zip(reqs, out)]
        return results if listed else results[0]

    def _external_mask(self, mask, latent_size) -> torch.Tensor:
        if isinstance(mask, Image.Image):
            return images.mask_from_pil(mask, tuple(latent_size)).to(self.device)
        mask = torch.as_tensor(mask)
        if mask.shape != tuple(latent_size):
            raise UsageError(f"a tensor mask must have the latent size {tuple(latent_size)}, got {tuple(mask.shape)}")
        return (mask > 0.5).to(self.device)

    @torch.no_grad()
    def generate(self, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 size: int | None = None) -> Image.Image:
        """Plain text-to-image with classifier-free guidance (sampling from pure noise over the whole grid);
        ``steps`` / ``guidance`` None: the model's defaults."""
        steps, guidance = self.defaults(steps=steps, guidance=guidance).values()
        side = (size or self.cfg.resolution) // self.cfg.vae.downsampling
        shape = (1, self.latent_channels, side, side)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.device, self.latent_dtype)
        y0 = self.engine().generate(noise, prompt, steps, guidance)
        return images.to_pil(self.decode_latents(y0)[0])


def _texts(name: str, value, empty_ok: bool = False) -> tuple[list, bool]:
    """A text argument as a list of texts (a string, an embedding of one row, or a list of them; an embedding of
    K rows is K texts), and whether it was a list."""
    if isinstance(value, (torch.Tensor, Conditioning)):
        if value.ndim == 2:
            return [value[None]], False
        if value.ndim != 3:
            raise UsageError(f"{name}: an embedding must be (rows, tokens, width), got {tuple(value.shape)}")
        rows = [value[i:i + 1] for i in range(value.shape[0])]
        return rows, len(rows) > 1
    many = isinstance(value, (list, tuple))
    items = list(value) if many else [value]
    if not items:
        raise UsageError(f"{name} must be a text, an embedding or a non-empty list of them")
    out = []
    for t in items:
        if isinstance(t, (torch.Tensor, Conditioning)):
            rows, listed = _texts(name, t)
            if listed:
                raise UsageError(f"{name}: each embedding in a list must have one row, got {len(rows)}")
            out += rows
        elif not isinstance(t, str) or (not empty_ok and not t.strip()):
            raise UsageError(f"{name} must be a non-empty text, an embedding or a list of them, got {t!r}")
        else:
            out.append(t)
    return out, many
