"""The one place DiffEdit's three steps are composed: any number of images x targets x settings, sharing work.

    inputs    the images (pixels, or their latent x_0 given), each VAE-encoded once
    requests  one edit each: an input, a target Q, a reference R, its settings, optionally a given mask

Shared across requests, as far as the paper's algorithm allows:
  * texts: each distinct text encoded once per image size (an embedding given for a text is used as it is);
  * step 1 (mask): per (image, strength, seed) one draw of the noises; each text's rows evaluated once in their own
    batched pass, so an image's map D never depends on what else is edited with it; the first n noises serve every
    n, one D every threshold and dilate;
  * step 2 (encoding): per (image, steps, inversion recipe) one encoding to the largest ratio asked for, batched
    across images;
  * step 3 (decoding): one batched decoding per (ratio, steps, guidance, recipe) of every row that starts from the
    encoding, across images and masks; rows that start from fresh noise per (seed, reference) as well.
Methods dispatch through ``settings.METHOD_TABLE`` (masked or not; started from the encoding or from fresh noise)
and the recipe (``settings.Recipe``: the paper's or diffusers') is applied in ``resolve`` only.

Rows of different images share model calls in steps 2 and 3, where CPU kernels may round differently for another
batch size: a batch equals each image edited alone to float rounding; masks, drawn from each image's own seeded
generator and evaluated per image, are the same bits.

Optional: a ``memo`` (``cached(key, make)``, ``has(key)``, ``get(key)``; the app's per-session cache) keeps x_0,
texts, D and trajectories across calls, for inputs that have a ``key``; ``wrap`` wraps the model call (counting,
cancelling); ``on_phase(name)`` hears "encode" before each VAE encode and "mask", "inversion", "decoding" before
each phase.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from . import masking
from .denoiser import encoding_steps
from .edit import decode
from .conditioning import Cond, Conditioning
from .inversion import Trajectory, encode
from .settings import METHOD_TABLE, EditSettings

log = logging.getLogger(__name__)

Text = Union[str, torch.Tensor, Conditioning]  # a text, or what ``encode_prompt`` returns for one text


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
    noises: masking.Noises | None = None


@dataclass
class Request:
    """One edit of ``inputs[image]`` towards ``target`` (Q) against ``source`` (R, also decoding's negative prompt),
    with ``settings``; ``mask`` (h, w) bool at latent size replaces step 1 for a masked method."""
    image: int
    target: Text
    source: Text = ""
    settings: EditSettings = field(default_factory=EditSettings)
    mask: torch.Tensor | None = None


@dataclass
class Output:
    latents: torch.Tensor | None               # y_0 (C, h, w)
    pixels: torch.Tensor | None                # y_0 decoded: (3, H, W) in [-1, 1]
    map: torch.Tensor | None = None            # D rescaled to [0, 1] (h, w), when step 1 ran
    mask: torch.Tensor | None = None           # M (h, w) bool, for a masked method
    trajectory: Trajectory | None = None       # the encoding the decoding started from (truncated to r)


def resolve(s: EditSettings, estimates_mask: bool) -> EditSettings:
    """The settings as the recipe runs them: the paper's as given; diffusers' takes int(f * steps) grid steps for
    the ratio and the mask's strength (ours rounds: 3.5 -> 3, not 4) and its own rule for D's extremes."""
    r = s.recipe
    if r.floor_grid:
        s = s.replace(ratio=_floor_fraction("ratio", s.ratio, s.steps))
        if estimates_mask:
            s = s.replace(strength=_floor_fraction("strength", s.strength, s.steps))
    return s.replace(normalization=s.mask_normalization)


def _floor_fraction(name: str, fraction: float, steps: int) -> float:
    k = int(fraction * steps)
    if k < 1:
        raise ValueError(f"{name} {fraction} x {steps} steps is below one grid step: diffusers runs no step (compat)")
    return k / steps


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


class Engine:
    """Runs requests on ``models`` (a ``DiffEdit``: ``denoiser``, ``encode_image``, ``decode_latents``,
    ``encode_prompt``, ``image_size``, ``vae_batch``)."""

    def __init__(self, models, memo=None, wrap: Callable | None = None, on_phase: Callable[[str], None] | None = None):
        self.models, self.memo = models, memo
        d = models.denoiser
        self.denoiser = d if wrap is None else d.with_model(wrap(d.model))
        self.on_phase = on_phase or (lambda phase: None)
        self._conds: dict = {}  # this engine's texts and latents, memo or not
        self._x0s: dict = {}

    def _cached(self, key, make):
        if self.memo is None or key is None:
            return make()
        return self.memo.cached(key, make)

    def _held(self, key) -> bool:
        return bool(key) and self.memo is not None and self.memo.has(key)

    # --- inputs and texts -----------------------------------------------------------------------------------

    def x0(self, inp: Input) -> torch.Tensor:
        if inp.x0 is not None:
            return inp.x0
        if inp.pixels is None:
            raise ValueError("an input needs its pixels or its latent x0")

        def make():
            self.on_phase("encode")
            return self.models.encode_image(inp.pixels)
        if id(inp) not in self._x0s:
            self._x0s[id(inp)] = (inp, self._cached(inp.key and ("x0", inp.key), make))  # inp kept: ids stay unique
        return self._x0s[id(inp)][1]

    def cond(self, text: Text, size: tuple[int, int]) -> Cond:
        """The conditioning of one text for an image of ``size`` (H, W) px (SDXL's carries the size)."""
        if isinstance(text, str):
            key = ("text", text, *size)
            if key not in self._conds:
                self._conds[key] = self._cached(key, lambda: self.models.encode_prompt([text], size))
            return self._conds[key]
        rows = text.shape[0] if text.ndim == 3 else 1
        if rows != 1:
            raise ValueError(f"an embedding given for one text must have one row, got {rows}")
        return text if text.ndim == 3 else text[None]

    # --- step 1 ---------------------------------------------------------------------------------------------

    def masks(self, inputs: list[Input], requests: list[Request], n_draw: int | None = None) -> list[tuple]:
        """(D rescaled to [0, 1], M) of each request, (h, w) each (Sec. 3.1); a given mask is used as it is.
        ``n_draw``: the number of noises drawn per (image, strength, seed) (default: the largest n asked for)."""
        return self._masks(inputs, [self._checked(r, len(inputs), masked=True) for r in requests], n_draw)

    def has_map(self, inp: Input, r: Request, n_draw: int | None = None) -> bool:
        """Whether the memo holds the map D of ``r`` on ``inp`` (then ``masks`` runs no model call for it)."""
        key = self._map_key(inp, self._checked(r, 1, masked=True), max(r.settings.n, n_draw or 0))
        return self._held(key)

    @staticmethod
    def _map_key(inp: Input, r: Request, draw: int):
        s = r.settings
        return inp.key and ("D", inp.key, text_key(r.target), text_key(r.source), s.n, draw, s.strength, s.seed,
                            s.steps)

    def _masks(self, inputs: list[Input], requests: list[Request], n_draw: int | None) -> list[tuple]:
        out: list = [None] * len(requests)
        groups: dict = {}
        for j, r in enumerate(requests):
            if r.mask is not None:
                out[j] = (None, r.mask.bool())
            else:
                s = r.settings
                groups.setdefault((r.image, s.strength, s.seed, s.steps), []).append(j)
        if groups:
            self.on_phase("mask")
        for (i, strength, seed, steps), js in groups.items():
            inp, x0 = inputs[i], self.x0(inputs[i])
            draw = max([requests[j].settings.n for j in js] + [n_draw or 0])
            # one map D per (target, source, n): every threshold, dilate and normalisation shares it
            same = {}
            for j in js:
                r = requests[j]
                same.setdefault((text_key(r.target), text_key(r.source), r.settings.n), []).append(j)
            firsts = [group[0] for group in same.values()]
            keys = {j: self._map_key(inp, requests[j], draw) for j in firsts}
            todo = [j for j in firsts if not self._held(keys[j])]
            raw = dict(zip(todo, self._difference_maps(x0, [requests[j] for j in todo], draw, strength, seed, steps,
                                                       inp.noises)))
            for group in same.values():
                j0 = group[0]
                d = self._cached(keys[j0], lambda j0=j0: raw[j0] if j0 in raw else self._difference_maps(
                    x0, [requests[j0]], draw, strength, seed, steps)[0])
                rescaled = {}
                for j in group:
                    s = requests[j].settings
                    if s.normalization not in rescaled:
                        rescaled[s.normalization] = masking.normalize(d[None], s.normalization)[0]
                    d_norm = rescaled[s.normalization]
                    out[j] = (d_norm, masking.dilate(masking.binarize(d_norm, s.threshold), s.dilate))
        return out

    def _difference_maps(self, x0, requests: list[Request], draw: int, strength: float, seed: int,
                         steps: int, given: masking.Noises | None = None) -> list[torch.Tensor]:
        """The raw maps D (h, w) of requests on one image, from one draw of ``draw`` noises at ``strength`` (or the
        noises ``given``)."""
        if not requests:
            return []
        size = self.models.image_size(x0)
        texts, index = [], {}
        for r in requests:
            for t in (r.target, r.source):
                if text_key(t) not in index:
                    index[text_key(t)] = len(texts)
                    texts.append(self.cond(t, size))
        pairs = [(index[text_key(r.target)], index[text_key(r.source)]) for r in requests]
        if any(a == b or torch.equal(texts[a], texts[b]) for a, b in pairs):
            log.warning("the target equals the source: D = 0, so the mask is empty and the input comes back")
        if given is None:
            noises = masking.noised_latents(self.denoiser, x0, draw, strength, steps,
                                            torch.Generator().manual_seed(seed))
        elif float(given.t) != float(self.denoiser.strength_level(strength, steps)) or given.x_t.shape[0] < draw:
            raise ValueError(f"the noises given are {given.x_t.shape[0]} at level {float(given.t):g}; this mask needs "
                             f"{draw} at level {float(self.denoiser.strength_level(strength, steps)):g}")
        else:
            noises = given
        ns = sorted({r.settings.n for r in requests})
        maps = masking.noise_difference_maps(self.denoiser, noises, texts, pairs, ns)
        return [d[r.settings.n].float() for d, r in zip(maps, requests)]

    # --- step 2 ---------------------------------------------------------------------------------------------

    def _inversion(self, r: Request, size) -> tuple:
        """How a request's input is encoded: the paper's unconditional model (text "", no guidance), or diffusers'
        CFG under the source text; returned as (a hashable name, cond, uncond, guidance)."""
        s = r.settings
        empty = self.cond("", size)
        if s.recipe.inversion_guidance:
            return ("cfg", text_key(r.source), s.guidance), self.cond(r.source, size), empty, s.guidance
        return ("unconditional",), empty, None, 1.0

    def trajectories(self, inputs: list[Input], requests: list[Request], invert_to: float | None = None) -> list:
        """The encoding (Sec. 3.2) each request's decoding starts from, truncated to its ratio (None for a request
        that starts from fresh noise). Per (image, steps, recipe) one encoding, to the largest ratio asked for (or
        ``invert_to``), of every image at once."""
        return self._trajectories(inputs, [self._checked(r, len(inputs)) for r in requests], invert_to)

    def _trajectories(self, inputs: list[Input], requests: list[Request], invert_to: float | None) -> list:
        wanted: dict = {}
        for j, r in enumerate(requests):
            if METHOD_TABLE[r.settings.method].start == "encoding":
                size = self.models.image_size(self.x0(inputs[r.image]))
                name, cond, uncond, g = self._inversion(r, size)
                entry = wanted.setdefault((r.image, r.settings.steps, name), [cond, uncond, g, invert_to or 0.0, []])
                entry[3] = max(entry[3], r.settings.ratio)
                entry[4].append(j)
        found = {}
        batches: dict = {}
        for (i, steps, name), (cond, uncond, g, ratio, js) in wanted.items():
            inp = inputs[i]
            given = inp.trajectory
            if given is not None:
                if given.steps != steps or given.ratio < ratio - 1e-9:
                    raise ValueError(f"the trajectory given reaches ratio {given.ratio:g} on a {given.steps}-step "
                                     f"grid; this edit needs ratio {ratio:g} on a {steps}-step grid (invert with the "
                                     "same steps and at least that ratio)")
                found[(i, steps, name)] = given
                continue
            k = encoding_steps(ratio, steps)
            key = inp.key and ("trajectory", inp.key, steps, k, name)
            held = self.memo.get(key) if key and self.memo is not None else None
            if held is not None:
                found[(i, steps, name)] = held
            else:
                shape = tuple(self.x0(inp).shape)  # images of one size share the model calls
                batches.setdefault((shape, steps, k, name[0], g), []).append((i, name, cond, uncond, key))
        if batches:
            self.on_phase("inversion")
        for (_, steps, k, _, g), members in batches.items():
            x0 = torch.cat([self.x0(inputs[i]) for i, *_ in members])
            cond = torch.cat([m[2] for m in members])
            uncond = None if members[0][3] is None else torch.cat([m[3] for m in members])
            levels = self.denoiser.levels(k / steps, steps)
            both = encode(self.denoiser, x0, cond, levels, steps, g, uncond)
            for row, (i, name, _, _, key) in enumerate(members):
                found[(i, steps, name)] = self._cached(key, lambda row=row: both.rows(slice(row, row + 1)))
        out: list = [None] * len(requests)
        for (i, steps, name), (_, _, _, _, js) in wanted.items():
            for j in js:
                out[j] = found[(i, steps, name)].truncate(requests[j].settings.ratio)
        return out

    # --- step 3 ---------------------------------------------------------------------------------------------

    def edits(self, inputs: list[Input], requests: list[Request], n_draw: int | None = None,
              invert_to: float | None = None, decode_pixels: bool = True) -> list[Output]:
        """Each request edited by its method (``settings.METHOD_TABLE``); results in the order of ``requests``.
        ``n_draw``: the number of mask noises drawn per (image, strength, seed) (default: the largest n asked for);
        ``invert_to``: encode at least to this ratio (the app keeps one encoding for every ratio)."""
        requests = [self._checked(r, len(inputs)) for r in requests]
        masked = [j for j, r in enumerate(requests) if METHOD_TABLE[r.settings.method].masked]
        mask_of = dict(zip(masked, self._masks(inputs, [requests[j] for j in masked], n_draw)))
        trajectories = self._trajectories(inputs, requests, invert_to)
        rows: dict = {}
        for j, r in enumerate(requests):
            s, method = r.settings, METHOD_TABLE[r.settings.method]
            shape = tuple(self.x0(inputs[r.image]).shape)
            group = (shape, s.steps, encoding_steps(s.ratio, s.steps), s.guidance, s.recipe.blend_late, method.start)
            if method.start == "noise":  # rows share their noise per seed: decoded as SDEdit always was, per text R
                group += (s.seed, r.image, text_key(r.source))
            rows.setdefault(group, []).append(j)
        latents: dict = {}
        if rows:
            self.on_phase("decoding")
        for (_, steps, k, guidance, blend_late, start, *_), js in rows.items():
            parts = [self._row(inputs, requests[j], trajectories[j], mask_of.get(j), blend_late) for j in js]
            levels = parts[0][3]
            y = torch.cat([p[0] for p in parts])
            any_mask = any(p[2] is not None for p in parts)
            keep = torch.cat([p[1] for p in parts], dim=1) if any_mask else None
            ones = torch.ones_like(y[:1, :1])  # an unmasked row among masked ones: M = 1 keeps y exactly
            mask = torch.cat([ones if p[2] is None else p[2] for p in parts]) if any_mask else None
            size = self.models.image_size(y)
            cond = torch.cat([self.cond(requests[j].target, size) for j in js])
            uncond = torch.cat([self.cond(requests[j].source, size) for j in js])
            y0 = decode(self.denoiser, y, levels, cond, uncond, guidance, keep, mask)
            latents.update(zip(js, y0))
        y = [latents[j] for j in range(len(requests))]
        pixels: list = [None] * len(y)
        if decode_pixels:
            by_shape: dict = {}
            for j, yj in enumerate(y):
                by_shape.setdefault(tuple(yj.shape), []).append(j)
            for js in by_shape.values():
                pixels_js = self.decode(torch.stack([y[j] for j in js]))
                for j, pj in zip(js, pixels_js):
                    pixels[j] = pj
        return [Output(y[j], pixels[j], *mask_of.get(j, (None, None)), trajectories[j]) for j in range(len(requests))]

    def _row(self, inputs, r: Request, trajectory: Trajectory | None, mask, blend_late: bool):
        """One decoding row: (start y (1, C, h, w), latents to keep (k + 1, 1, C, h, w), mask (1, 1, h, w) or None,
        levels)."""
        s = r.settings
        if trajectory is not None:
            xs, levels = trajectory.latents, trajectory.timesteps
            keep = xs[1:] if blend_late else xs  # diffusers blends one step late: with x at t, not at t_prev
            y = xs[-1]
        else:
            x0 = self.x0(inputs[r.image])
            levels = self.denoiser.levels(s.ratio, s.steps)
            gen = torch.Generator().manual_seed(s.seed)
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
            y = self.denoiser.add_noise(x0, noise, levels[-1])
            keep = x0[None].expand(len(levels), *x0.shape)
            if mask is not None:  # Blended Latent Diffusion: x_0 noised to each level with fresh noise; x_0 at the end
                fresh = torch.randn((len(levels) - 1, *x0.shape), generator=gen, dtype=torch.float32)
                fresh = fresh.to(x0.device, x0.dtype)
                keep = torch.cat([x0[None], torch.stack([self.denoiser.add_noise(x0, fresh[i - 1], levels[i])
                                                         for i in range(1, len(levels))])])
        m = None if mask is None else mask[1][None, None].to(y.dtype)
        return y, keep, m, levels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) to pixels (B, 3, H, W), in chunks of the models' ``vae_batch``."""
        b = self.models.vae_batch
        return torch.cat([self.models.decode_latents(latents[i:i + b]) for i in range(0, len(latents), b)])

    def _checked(self, r: Request, count: int, masked: bool = False) -> Request:
        """The request with its settings as the recipe runs them (``resolve``); a ValueError if it cannot run."""
        if not 0 <= r.image < count:
            raise ValueError(f"request for image {r.image}, but {count} image(s) were given")
        method = METHOD_TABLE[r.settings.method]
        masked = masked or method.masked
        if r.mask is not None and not masked:
            masks = ", ".join(m for m, t in METHOD_TABLE.items() if t.masked)
            raise ValueError(f"mask= is used by the masked methods ({masks}); {method.name!r} edits without a mask")
        return Request(r.image, r.target, r.source, resolve(r.settings, masked and r.mask is None), r.mask)

    def generate(self, noise: torch.Tensor, target: Text, steps: int, guidance: float) -> torch.Tensor:
        """Plain text-to-image: guided sampling from pure noise (B, C, h, w) over the whole grid."""
        size = self.models.image_size(noise)
        levels = self.denoiser.levels(1.0, steps)
        return decode(self.denoiser, noise, levels, self.cond(target, size), self.cond("", size), guidance)
