"""The engine: runs a plan (plan.py) of DiffEdit's three steps for any number of images x queries x settings.

``plan`` turns (inputs, requests) into named jobs; ``edits`` runs them with one short loop per step:
    mask passes   step 1 (masking.noise_difference_maps): per job one draw of noises, each text's rows in their own
                  batched pass, so an image's map D never depends on what else is edited with it
    encodings     step 2 (inversion.encode): per job one batched encoding, to the largest ratio asked for
    decodings     step 3 (edit.decode): per job one batched decoding of its requests' rows
Each request's result is what ``reference.edit`` gives for it alone (tests/test_reference.py): rows of several
images share model calls in steps 2 and 3, where CPU kernels may round differently for another batch size, so a
batch equals each image edited alone to float rounding; masks, from each image's own seeded draw, are the same bits.

Methods dispatch through ``settings.METHOD_TABLE`` (masked or not; started from the encoding or from fresh noise);
the recipe (``settings.Recipe``) is applied by ``settings.resolve`` and read from the settings where it applies.

Optional: a ``memo`` (``cached(key, make)``, ``has(key)``, ``get(key)``; the app's per-session cache) keeps x_0,
texts, D and trajectories across calls, for inputs that have a ``key`` (the plan names each key); ``wrap`` wraps
the model call (counting, cancelling); ``on_phase(name)`` hears "encode" before each VAE encode and "mask",
"inversion", "decoding" before each phase that runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import masking
from .conditioning import Cond
from .edit import decode, noised_start
from .inversion import Trajectory, encode
from .plan import (PHASES, Decoding, Encoded, Encoding, Input, MaskPass, Plan, Request, Text, plan_edits, resolved,
                   text_key)
from .settings import METHOD_TABLE, UsageError

log = logging.getLogger(__name__)


@dataclass
class Output:
    latents: torch.Tensor | None               # y_0 (C, h, w)
    pixels: torch.Tensor | None                # y_0 decoded: (3, H, W) in [-1, 1]
    map: torch.Tensor | None = None            # D rescaled to [0, 1] (h, w), when step 1 ran
    mask: torch.Tensor | None = None           # M (h, w) bool, for a masked method
    trajectory: Trajectory | None = None       # the encoding the decoding started from (truncated to r)


class Engine:
    """Runs requests on ``models`` (a ``DiffEdit``: ``denoiser``, ``encode_image``, ``decode_latents``,
    ``encode_prompt``, ``image_size``, ``latent_shape``, ``vae_batch``, ``device``)."""

    def __init__(self, models, memo=None, wrap: Callable | None = None, on_phase: Callable[[str], None] | None = None):
        self.models, self.memo = models, memo
        d = models.denoiser
        self.denoiser = d if wrap is None else d.with_model(wrap(d.model))
        self.on_phase = on_phase or (lambda phase: None)
        self._conds: dict = {}  # this engine's texts and latents, memo or not
        self._x0s: dict = {}

    def _cached(self, key, make):
        if self.memo is None or not key:
            return make()
        return self.memo.cached(key, make)

    def _held(self, key) -> bool:
        return bool(key) and self.memo is not None and self.memo.has(key)

    # --- planning -------------------------------------------------------------------------------------------------

    def plan(self, inputs: list[Input], requests: list[Request], n_draw: int | None = None,
             invert_to: float | None = None, phases=PHASES, decode_pixels: bool = True) -> Plan:
        """The jobs ``edits`` (or, with ``phases``, ``masks`` / ``trajectories``) runs for these requests, knowing
        what the memo holds; ``.cost`` is what they will run. A UsageError if a request cannot run."""
        masked = phases == ("mask",)
        checked = [self._checked(r, len(inputs), masked) for r in requests]
        return plan_edits(inputs, checked, self.latent_shape, self._held, n_draw, invert_to, phases, decode_pixels,
                          self.denoiser.guided_rows)

    def latent_shape(self, inp: Input) -> tuple:
        """x_0's shape, without encoding the image."""
        if inp.x0 is not None:
            return tuple(inp.x0.shape)
        if inp.pixels is None:
            raise UsageError("an input needs its pixels or its latent x0")
        return self.models.latent_shape(inp.pixels)

    def _checked(self, r: Request, count: int, masked: bool = False) -> Request:
        """The request as the recipe runs it (``plan.resolved``); a UsageError if it cannot run."""
        if not 0 <= r.image < count:
            raise UsageError(f"request for image {r.image}, but {count} image(s) were given")
        method = METHOD_TABLE[r.settings.method]
        masked = masked or method.masked
        if r.mask is not None and not masked:
            masks = ", ".join(m for m, t in METHOD_TABLE.items() if t.masked)
            raise UsageError(f"mask= is used by the masked methods ({masks}); {method.name!r} edits without a mask")
        return resolved(r, masked)

    # --- inputs and texts -----------------------------------------------------------------------------------------

    def x0(self, inp: Input) -> torch.Tensor:
        if inp.x0 is not None:
            return inp.x0

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
            raise UsageError(f"an embedding given for one text must have one row, got {rows}")
        return text if text.ndim == 3 else text[None]

    def _size(self, shape: tuple) -> tuple[int, int]:
        return self.models.image_size(torch.empty(shape, device="meta"))

    # --- the run --------------------------------------------------------------------------------------------------

    def edits(self, inputs: list[Input], requests: list[Request], n_draw: int | None = None,
              invert_to: float | None = None, decode_pixels: bool = True) -> list[Output]:
        """Each request edited by its method; results in the order of ``requests``. ``n_draw``: the mask noises
        drawn per (image, strength, seed) (default: the largest n asked for); ``invert_to``: encode at least to this
        ratio (the app keeps one encoding for every ratio)."""
        plan = self.plan(inputs, requests, n_draw, invert_to, decode_pixels=decode_pixels)
        self._encode_texts(inputs, plan)
        masks = self._run_masks(inputs, plan)
        trajectories = self._run_encodings(inputs, plan)
        latents = self._run_decodings(inputs, plan, masks, trajectories)
        pixels = self._decode_pixels(latents) if decode_pixels else [None] * len(latents)
        return [Output(latents[j], pixels[j], *masks.get(j, (None, None)), trajectories.get(j))
                for j in range(len(requests))]

    def masks(self, inputs: list[Input], requests: list[Request], n_draw: int | None = None) -> list[tuple]:
        """(D rescaled to [0, 1], M) of each request, (h, w) each (Sec. 3.1); a given mask is used as it is.
        ``n_draw``: the number of noises drawn per (image, strength, seed) (default: the largest n asked for)."""
        plan = self.plan(inputs, requests, n_draw, phases=("mask",))
        self._encode_texts(inputs, plan)
        found = self._run_masks(inputs, plan)
        return [found[j] for j in range(len(requests))]

    def has_map(self, inp: Input, r: Request, n_draw: int | None = None) -> bool:
        """Whether the memo holds the map D of ``r`` on ``inp`` (then ``masks`` runs no model call for it)."""
        return self.plan([inp], [r], n_draw, phases=("mask",)).cost.mask == 0

    def trajectories(self, inputs: list[Input], requests: list[Request], invert_to: float | None = None) -> list:
        """The encoding (Sec. 3.2) each request's decoding starts from, truncated to its ratio (None for a request
        that starts from fresh noise)."""
        plan = self.plan(inputs, requests, invert_to=invert_to, phases=("inversion",))
        self._encode_texts(inputs, plan)
        found = self._run_encodings(inputs, plan)
        return [found.get(j) for j in range(len(requests))]

    def _encode_texts(self, inputs: list[Input], plan: Plan) -> None:
        """Every text the plan's model calls use, encoded before the first of them. Texts are encoded one at a time
        and kept, so this changes no result; a model whose text encoder and denoiser take turns in memory (the
        low-memory mode of FLUX.1 and SD3 with T5) then swaps once per run instead of once per phase."""
        for job in plan.masks:
            size = self._size(self.latent_shape(inputs[job.image]))
            for m in job.maps:
                for text in (m.target, m.source) if m.run and not m.empty else ():
                    self.cond(text, size)
        for job in plan.encodings:
            size = self._size(job.shape)
            for text in ["", *(t.source for t in job.rows if job.guided)]:
                self.cond(text, size)
        for job in plan.decodings:
            size = self._size(job.shape)
            for text in (t for j in job.requests for t in (plan.requests[j].target, plan.requests[j].source)):
                self.cond(text, size)

    def _run_masks(self, inputs: list[Input], plan: Plan) -> dict[int, tuple]:
        """Step 1: {request: (D rescaled, M)} for the masked requests; a given mask is used as it is (no D)."""
        out = {j: (None, r.mask.bool()) for j, r in enumerate(plan.requests) if r.mask is not None}
        if plan.masks:
            self.on_phase("mask")
        for job in plan.masks:
            raw = self._difference_maps(inputs[job.image], job, [m for m in job.maps if m.run])
            for m in job.maps:
                d = self._cached(m.key, lambda m=m: raw[id(m)] if id(m) in raw else
                                 self._difference_maps(inputs[job.image], job, [m])[id(m)])
                rescaled = {}
                for j in m.requests:
                    s = plan.requests[j].settings
                    if s.normalization not in rescaled:
                        rescaled[s.normalization] = masking.normalize(d[None], s.normalization)[0]
                    out[j] = (rescaled[s.normalization], masking.dilate(masking.binarize(rescaled[s.normalization],
                                                                                          s.threshold), s.dilate))
        return out

    def _difference_maps(self, inp: Input, job: MaskPass, maps: list) -> dict[int, torch.Tensor]:
        """The raw maps D (h, w) of ``maps`` (by id), from one draw of the job's noises (or the input's given)."""
        shape = self.latent_shape(inp)
        if any(m.empty for m in maps):
            log.warning("the target equals the source: D = 0, so the mask is empty and the input comes back")
        live = [m for m in maps if not m.empty]
        out = {id(m): torch.zeros(shape[-2:], device=self.models.device) for m in maps if m.empty}
        if not live:
            return out
        size = self._size(shape)
        texts, index = [], {}
        for t in (t for m in live for t in (m.target, m.source)):
            if text_key(t) not in index:
                index[text_key(t)] = len(texts)
                texts.append(self.cond(t, size))
        noises = self._noises(inp, job)
        pairs = [(index[text_key(m.target)], index[text_key(m.source)]) for m in live]
        if any(torch.equal(texts[a], texts[b]) for a, b in pairs):  # an embedding given equal to a text's
            log.warning("the target equals the source: D = 0, so the mask is empty and the input comes back")
        maps_n = masking.noise_difference_maps(self.denoiser, noises, texts, pairs, sorted({m.n for m in live}))
        return out | {id(m): d[m.n].float() for m, d in zip(live, maps_n)}

    def _noises(self, inp: Input, job: MaskPass) -> masking.Noises:
        level = self.denoiser.strength_level(job.strength, job.steps)
        given = inp.noises
        if given is None:
            return masking.noised_latents(self.denoiser, self.x0(inp), job.draw, job.strength, job.steps,
                                          torch.Generator().manual_seed(job.seed))
        if float(given.t) != float(level) or given.x_t.shape[0] < job.draw:
            raise UsageError(f"the noises given are {given.x_t.shape[0]} at level {float(given.t):g}; this mask "
                             f"needs {job.draw} at level {float(level):g}")
        return given

    def _run_encodings(self, inputs: list[Input], plan: Plan) -> dict[int, Trajectory]:
        """Step 2: {request: the trajectory it starts from, truncated to its ratio}."""
        made: dict[int, Trajectory] = {}
        if plan.encodings:
            self.on_phase("inversion")
        for job in plan.encodings:
            for t, trajectory in zip(job.rows, self._encode(inputs, job)):
                made[id(t)] = self._cached(t.key, lambda trajectory=trajectory: trajectory)
        out = {}
        for t in plan.trajectories:
            full = made.get(id(t)) or self._given_or_held(inputs, t)
            for j in t.requests:
                out[j] = full.truncate(plan.requests[j].settings.ratio)
        return out

    def _encode(self, inputs: list[Input], job: Encoding) -> list[Trajectory]:
        x0 = torch.cat([self.x0(inputs[t.image]) for t in job.rows])
        size, empty = self._size(job.shape), self.cond("", self._size(job.shape))
        empties = torch.cat([empty] * len(job.rows))
        if job.guided:  # diffusers' recipe: CFG under R
            cond, uncond = torch.cat([self.cond(t.source, size) for t in job.rows]), empties
        else:
            cond, uncond = empties, None
        levels = self.denoiser.levels(job.k / job.steps, job.steps)
        both = encode(self.denoiser, x0, cond, levels, job.steps, job.inversion_guidance, uncond)
        return [both.rows(slice(row, row + 1)) for row in range(len(job.rows))]

    def _given_or_held(self, inputs: list[Input], t: Encoded) -> Trajectory:
        if t.given:
            given = inputs[t.image].trajectory
            if given.steps != t.steps or given.ratio < t.k / t.steps - 1e-9:
                raise UsageError(f"the trajectory given reaches ratio {given.ratio:g} on a {given.steps}-step grid; "
                                 f"this edit needs ratio {t.k / t.steps:g} on a {t.steps}-step grid (invert with the "
                                 "same steps and at least that ratio)")
            return given
        # held at planning; made again, alone, if the memo let it go since
        alone = Encoding(self.latent_shape(inputs[t.image]), t.steps, t.k, t.inversion.guidance,
                         t.inversion.source is not None, [t])
        return self._cached(t.key, lambda: self._encode(inputs, alone)[0])

    def _run_decodings(self, inputs: list[Input], plan: Plan, masks: dict, trajectories: dict) -> list[torch.Tensor]:
        """Step 3: y_0 (C, h, w) of every request."""
        latents: dict = {}
        if plan.decodings:
            self.on_phase("decoding")
        for g in sorted({job.guidance for job in plan.decodings if self.denoiser.guidance_unused(job.guidance)}):
            log.warning("guidance %g has no effect: this model has no guidance input (FLUX.1-schnell)", g)
        for job in plan.decodings:
            rows = [self._row(inputs, plan.requests[j], trajectories.get(j), masks.get(j), job) for j in job.requests]
            levels, y = rows[0][3], torch.cat([row[0] for row in rows])
            any_mask = any(row[2] is not None for row in rows)
            keep = torch.cat([row[1] for row in rows], dim=1) if any_mask else None
            ones = torch.ones_like(y[:1, :1])  # an unmasked row among masked ones: M = 1 keeps y exactly
            mask = torch.cat([ones if row[2] is None else row[2] for row in rows]) if any_mask else None
            size = self._size(job.shape)
            cond = torch.cat([self.cond(plan.requests[j].target, size) for j in job.requests])
            uncond = torch.cat([self.cond(plan.requests[j].source, size) for j in job.requests])
            latents.update(zip(job.requests, decode(self.denoiser, y, levels, cond, uncond, job.guidance, keep, mask)))
        return [latents[j] for j in range(len(plan.requests))]

    def _row(self, inputs, r: Request, trajectory: Trajectory | None, mask, job: Decoding):
        """One decoding row: (start y (1, C, h, w), latents to keep (k + 1, 1, C, h, w), mask (1, 1, h, w) or None,
        levels)."""
        s = r.settings
        if trajectory is not None:
            xs, levels = trajectory.latents, trajectory.timesteps
            keep = xs[1:] if job.blend_late else xs  # diffusers blends one step late: with x at t, not at t_prev
            y = xs[-1]
        else:
            x0 = self.x0(inputs[r.image])
            levels = self.denoiser.levels(s.ratio, s.steps)
            y, keep = noised_start(self.denoiser, x0, levels, torch.Generator().manual_seed(s.seed), mask is not None)
            if keep is None:  # unmasked among masked rows of one decoding: M = 1 there, what is kept is never read
                keep = x0[None].expand(len(levels), *x0.shape)
        m = None if mask is None else mask[1][None, None].to(y.dtype)
        return y, keep, m, levels

    def _decode_pixels(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each y_0 decoded to pixels, images of one shape together."""
        pixels: list = [None] * len(latents)
        by_shape: dict = {}
        for j, y in enumerate(latents):
            by_shape.setdefault(tuple(y.shape), []).append(j)
        for js in by_shape.values():
            for j, p in zip(js, self.decode(torch.stack([latents[j] for j in js]))):
                pixels[j] = p
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) to pixels (B, 3, H, W), in chunks of the models' ``vae_batch``."""
        b = self.models.vae_batch
        return torch.cat([self.models.decode_latents(latents[i:i + b]) for i in range(0, len(latents), b)])

    def generate(self, noise: torch.Tensor, target: Text, steps: int, guidance: float) -> torch.Tensor:
        """Plain text-to-image: guided sampling from pure noise (B, C, h, w) over the whole grid."""
        size = self.models.image_size(noise)
        levels = self.denoiser.levels(1.0, steps)
        return decode(self.denoiser, noise, levels, self.cond(target, size), self.cond("", size), guidance)
