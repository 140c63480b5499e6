"""The engine's plan: from (inputs, requests) to the named jobs that run them, each with its memo key and its cost.

    inputs    the images (pixels, or their latent x_0 given)
    requests  one edit each: an input, a query Q, a reference R, its settings (already ``settings.resolve``d), a mask

The jobs, one kind per step of the paper, and what they share:
    MaskPass   step 1 on one image: one draw of noises per (strength, seed, steps); one map D per (Q, R, n) from it,
               which every threshold, dilation and rescaling rule reads
    Encoding   step 2: one batched DDIM encoding of the images of one shape, per (steps, ratio's grid steps, way of
               inverting), to the largest ratio any request asks for
    Decoding   step 3: one batched decoding of the requests that share a grid, a guidance scale and a start; those
               that start from fresh noise also share their seed, image and R
Planning is pure: it reads shapes, texts and settings, asks ``held(key)`` whether the memo keeps a result already
(that work then costs nothing), and runs no model. ``Plan.cost`` is the one cost model of the project: the progress
bars, the sweep, the app and the benchmarks read it, and tests compare it with the model calls counted in a run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Callable, Union

import torch

from .conditioning import Conditioning
from .denoiser import encoding_steps
from .inversion import Trajectory
from .masking import Noises
from .settings import METHOD_TABLE, EditSettings, resolve

Text = Union[str, torch.Tensor, Conditioning]  # a text, or what ``encode_prompt`` returns for one text
PHASES = ("mask", "inversion", "decoding")


@dataclass
class Input:
    """One image: its pixels (1, 3, H, W) in [-1, 1] at a size the model takes, or its latent x_0 (1, C, h, w);
    ``key`` names it in the memo (None: nothing of it is memoised); ``trajectory`` an encoding of it already made
    (``DiffEdit.invert``), used instead of encoding again; ``noises`` the mask pass's noised latents given (x_t
    (n, 1, C, h, w) at the strength's level; diffusers' recipe samples the VAE posterior once per noise), used
    instead of drawing them (not memoised: give no ``key`` with them)."""
    pixels: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    key: str | None = None
    trajectory: Trajectory | None = None
    noises: Noises | None = None


@dataclass
class Request:
    """One edit of ``inputs[image]`` towards ``target`` (Q) against ``source`` (R, also decoding's negative prompt),
    with ``settings``; ``mask`` (h, w) bool at latent size replaces step 1 for a masked method."""
    image: int
    target: Text
    source: Text = ""
    settings: EditSettings = field(default_factory=EditSettings)
    mask: torch.Tensor | None = None


def resolved(r: Request, masked: bool = False) -> Request:
    """The request with its settings as the recipe runs them (``settings.resolve``); ``masked``: take it as masked
    whatever its method (a mask asked for alone)."""
    estimates = (masked or METHOD_TABLE[r.settings.method].masked) and r.mask is None
    return Request(r.image, r.target, r.source, resolve(r.settings, estimates), r.mask)


def text_key(text: Text):
    """What identifies a text: the string, or a digest of the embedding's values."""
    if isinstance(text, str):
        return text
    parts = [text.context, text.y] if isinstance(text, Conditioning) else [text]
    h = hashlib.sha1()
    for p in parts:
        h.update(repr((tuple(p.shape), p.dtype)).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return ("embedding", h.hexdigest())


@dataclass(frozen=True)
class Cost:
    """Model rows (sample evaluations) per phase, and VAE images encoded and decoded."""
    mask: int = 0
    inversion: int = 0
    decoding: int = 0
    vae_encodes: int = 0
    vae_decodes: int = 0

    @property
    def rows(self) -> int:
        return self.mask + self.inversion + self.decoding

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def _cfg_rows(guidance: float) -> int:
    return 1 if guidance == 1.0 else 2  # Denoiser.guided runs only the conditional half at scale 1


GuidedRows = Callable[[float], int]  # model rows per guided sample at a scale (the denoiser's ``guided_rows``)


# --- step 1 ---------------------------------------------------------------------------------------------------------

@dataclass
class Map:
    """One map D of a mask pass: Q against R from its first n noises; ``requests`` read it (each with its threshold,
    dilation and rescaling rule); ``run`` is False where the memo holds it under ``key``."""
    target: Text
    source: Text
    n: int
    key: object
    requests: list[int]
    run: bool = True

    @property
    def empty(self) -> bool:
        """Q equals R: D = 0 by definition, no model row is run for it."""
        return text_key(self.target) == text_key(self.source)


@dataclass
class MaskPass:
    """Step 1 (Sec. 3.1) on one image: ``draw`` noises at (strength, seed, steps), and the maps read from them."""
    image: int
    strength: float
    seed: int
    steps: int
    draw: int
    maps: list[Map]

    @property
    def cost(self) -> Cost:
        """Each text of the maps to run, once over the first n noises (n the largest those maps ask for)."""
        todo = [m for m in self.maps if m.run]
        texts = {text_key(t) for m in todo if not m.empty for t in (m.target, m.source)}
        return Cost(mask=len(texts) * max((m.n for m in todo), default=0))


def _map_key(inp: Input, r: Request, draw: int):
    s = r.settings
    return inp.key and ("D", inp.key, text_key(r.target), text_key(r.source), s.n, draw, s.strength, s.seed, s.steps)


def plan_masks(inputs: list[Input], requests: list[Request], held: Callable, n_draw: int | None) -> list[MaskPass]:
    """The mask passes of the requests that estimate a mask (every request given here is a masked one)."""
    by_draw: dict = {}
    for j, r in enumerate(requests):
        if r.mask is None:
            s = r.settings
            by_draw.setdefault((r.image, s.strength, s.seed, s.steps), []).append(j)
    passes = []
    for (i, strength, seed, steps), js in by_draw.items():
        draw = max([requests[j].settings.n for j in js] + [n_draw or 0])
        maps: dict = {}
        for j in js:
            r = requests[j]
            same = (text_key(r.target), text_key(r.source), r.settings.n)
            if same not in maps:
                key = _map_key(inputs[i], r, draw)
                maps[same] = Map(r.target, r.source, r.settings.n, key, [], run=not (key and held(key)))
            maps[same].requests.append(j)
        passes.append(MaskPass(i, strength, seed, steps, draw, list(maps.values())))
    return passes


# --- step 2 ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inversion:
    """How x_0 is encoded: the unconditional model, text "" and no guidance (the paper), or, with ``source`` set,
    classifier-free guidance at ``guidance`` under that text (diffusers' recipe)."""
    source: object = None  # text_key of R
    guidance: float = 1.0

    @staticmethod
    def of(r: Request) -> "Inversion":
        s = r.settings
        return Inversion(text_key(r.source), s.guidance) if s.recipe.inversion_guidance else Inversion()


@dataclass
class Encoded:
    """The encoding one image's requests start from: to ``k`` steps of a ``steps`` grid by ``inversion``; ``given``
    (an input's trajectory) or ``held`` (the memo's, under ``key``) or made by an ``Encoding``."""
    image: int
    steps: int
    k: int
    inversion: Inversion
    source: Text
    key: object
    requests: list[int]
    given: bool = False
    held: bool = False


@dataclass
class Encoding:
    """Step 2 (Sec. 3.2): one batched encoding of images of one ``shape``, the trajectories listed, a row each."""
    shape: tuple
    steps: int
    k: int
    inversion_guidance: float  # 1: no guidance (the paper's unconditional encoding)
    guided: bool               # conditioned on R, with "" as the unconditional half (diffusers' recipe)
    rows: list[Encoded]
    guided_rows: GuidedRows = _cfg_rows

    @property
    def cost(self) -> Cost:
        return Cost(inversion=self.k * len(self.rows) * self.guided_rows(self.inversion_guidance))


def plan_encodings(inputs: list[Input], requests: list[Request], latent_shape: Callable, held: Callable,
                   invert_to: float | None) -> tuple[list[Encoded], list[Encoding]]:
    """The trajectories the requests that start from the encoding need, and the encodings that make them."""
    wanted: dict = {}
    for j, r in enumerate(requests):
        if METHOD_TABLE[r.settings.method].start == "encoding":
            inv, steps = Inversion.of(r), r.settings.steps
            t = wanted.setdefault((r.image, steps, inv), Encoded(r.image, steps, 0, inv, r.source, None, []))
            t.k = max(t.k, encoding_steps(max(r.settings.ratio, invert_to or 0.0), steps))
            t.requests.append(j)
    batches: dict = {}
    for t in wanted.values():
        inp = inputs[t.image]
        t.given = inp.trajectory is not None
        t.key = None if t.given else inp.key and ("trajectory", inp.key, t.steps, t.k, t.inversion)
        t.held = bool(t.key) and held(t.key)
        if not (t.given or t.held):  # images of one shape share the model calls
            group = (latent_shape(inp), t.steps, t.k, t.inversion.source is not None, t.inversion.guidance)
            batches.setdefault(group, []).append(t)
    encodings = [Encoding(shape, steps, k, g, guided, rows) for (shape, steps, k, guided, g), rows in batches.items()]
    return list(wanted.values()), encodings


# --- step 3 ---------------------------------------------------------------------------------------------------------

@dataclass
class Decoding:
    """Step 3 (Sec. 3.2): one batched decoding over k steps of a ``steps`` grid at ``guidance``, a row per request;
    ``start`` "encoding" or "noise" (``settings.Method``), ``blend_late`` the recipe's choice."""
    shape: tuple
    steps: int
    k: int
    guidance: float
    blend_late: bool
    start: str
    requests: list[int]
    guided_rows: GuidedRows = _cfg_rows

    @property
    def cost(self) -> Cost:
        return Cost(decoding=self.k * len(self.requests) * self.guided_rows(self.guidance))


def plan_decodings(inputs: list[Input], requests: list[Request], latent_shape: Callable) -> list[Decoding]:
    groups: dict = {}
    for j, r in enumerate(requests):
        s, start = r.settings, METHOD_TABLE[r.settings.method].start
        group = (latent_shape(inputs[r.image]), s.steps, encoding_steps(s.ratio, s.steps), s.guidance,
                 s.recipe.blend_late, start)
        if start == "noise":  # rows share their noise per seed: decoded as SDEdit always was, per text R
            group += (s.seed, r.image, text_key(r.source))
        groups.setdefault(group, []).append(j)
    return [Decoding(*group[:6], js) for group, js in groups.items()]


# --- the plan -------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The jobs of a run, in the order they run: VAE encodes, mask passes, encodings, decodings, VAE decodes."""
    requests: list[Request]
    encodes: list[int]           # the inputs whose x_0 the VAE encodes
    masks: list[MaskPass]
    trajectories: list[Encoded]
    encodings: list[Encoding]
    decodings: list[Decoding]
    decodes: int                 # images the VAE decodes

    @property
    def cost(self) -> Cost:
        jobs = [*self.masks, *self.encodings, *self.decodings]
        return sum((job.cost for job in jobs), Cost(vae_encodes=len(self.encodes), vae_decodes=self.decodes))


def _needs_x0(inputs, requests, masks, encodings, decodings) -> list[int]:
    """The inputs whose x_0 the run reads: to draw the mask's noises, to encode, to noise afresh (SDEdit's start)."""
    used = {p.image for p in masks if inputs[p.image].noises is None and any(m.run and not m.empty for m in p.maps)}
    used |= {t.image for e in encodings for t in e.rows}
    used |= {requests[j].image for d in decodings if d.start == "noise" for j in d.requests}
    return sorted(used)


def plan_edits(inputs: list[Input], requests: list[Request], latent_shape: Callable[[Input], tuple],
               held: Callable[[object], bool] = lambda key: False, n_draw: int | None = None,
               invert_to: float | None = None, phases=PHASES, decode_pixels: bool = True,
               guided_rows: GuidedRows = _cfg_rows) -> Plan:
    """The plan of ``requests`` (``resolved``) on ``inputs``: the jobs of ``phases``; a request's mask pass is
    planned when its method is masked (with phases ("mask",) alone every request is taken as masked).
    ``latent_shape(input)``: x_0's shape; ``held(key)``: whether the memo keeps that result; ``n_draw``: the noises
    drawn per mask pass (default: the largest n asked for); ``invert_to``: encode at least to this ratio;
    ``guided_rows(scale)``: model rows per guided sample (the denoiser's: 2 with CFG, 1 where guidance is embedded)."""
    masked = [j for j, r in enumerate(requests)
              if "mask" in phases and (phases == ("mask",) or METHOD_TABLE[r.settings.method].masked)]
    masks = plan_masks(inputs, [requests[j] for j in masked], held, n_draw)
    for p in masks:  # back to the indices of ``requests``
        for m in p.maps:
            m.requests = [masked[j] for j in m.requests]
    trajectories, encodings = ([], []) if "inversion" not in phases else plan_encodings(
        inputs, requests, latent_shape, held, invert_to)
    decodings = plan_decodings(inputs, requests, latent_shape) if "decoding" in phases else []
    encodes = [i for i in _needs_x0(inputs, requests, masks, encodings, decodings)
               if inputs[i].x0 is None and not (inputs[i].key and held(("x0", inputs[i].key)))]
    decodes = len(requests) if "decoding" in phases and decode_pixels else 0
    for job in (*encodings, *decodings):
        job.guided_rows = guided_rows
    return Plan(requests, encodes, masks, trajectories, encodings, decodings, decodes)
