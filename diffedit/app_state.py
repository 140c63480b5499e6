"""The web app's work, cached per browser session, so that a knob change recomputes only what it changes.

    knob moved                          what runs again
    threshold, normalisation, strokes   no UNet evaluation: the cached D is rescaled and thresholded again
    ratio, guidance, method             the decoding only (the inversion, done once to ratio 1, is truncated)
    n, strength, seed, texts            the mask pass, then the decoding
    image                               everything, with one VAE encode

Torch only (no gradio). A ``Session`` is one browser session's cache, bounded in bytes; an ``AppModel`` the model
every session shares; a ``Work`` is one user action on a session: the edit engine (``diffedit.engine``) run with that
cache as its memo, so each step is looked up under everything it depends on, its progress totals read from the
engine's plan, and what the action ran (``Spent``: UNet rows per phase, VAE encodes, seconds).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import images
from .denoiser import encoding_steps
from .plan import PHASES, Input, Request
from .conditioning import Conditioning
from .model_call import Rows
from .inversion import Trajectory
from .settings import METHOD_TABLE, EditSettings

CACHE_BYTES = 256 * 2 ** 20   # per session: a 512 px SD trajectory at 50 steps is 3.3 MB, a toy one 52 kB
MAX_SIDE = 2048               # longer sides are shrunk to this (the status line says so), not refused
FULL_SIZE_BUDGET = 4          # full size is offered up to this many times the model's native pixel count
MAX_PIXELS = 100_000_000      # larger files are refused from their header, before any decoding
STROKE_COVER = 0.25           # a latent cell joins a stroke when a quarter of its pixels are painted


def nbytes(value) -> int:
    """The memory a cached value holds (what the cache's limit counts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Conditioning):
        return nbytes(value.context) + nbytes(value.y)
    if isinstance(value, Trajectory):
        return nbytes(value.latents) + nbytes(value.timesteps)
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, Picture):
        return nbytes(value.original) + sum(nbytes(im) for im in value.working.values())
    raise TypeError(f"no size rule for a cached {type(value).__name__}")


class LRUCache:
    """Values by key; the least recently used are dropped once the values exceed ``limit`` bytes."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.limit, self.bytes = limit, 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # a session's events may run at once (a slider during an edit)

    def __len__(self):
        return len(self._items)

    def has(self, key) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key):
        """The value under ``key``, or None if it is not (or no longer) kept."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def cached(self, key, make):
        """The value under ``key``; made (outside the lock: it may run the UNet) and kept if missing."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = make()
        size = nbytes(value)
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if size <= self.limit:
                self._items[key] = (value, size)
                self.bytes += size
            while self.bytes > self.limit:
                self.bytes -= self._items.popitem(last=False)[1][1]
        return value


class Cancelled(Exception):
    """The session's running work was asked to stop (Stop, a newer action, the browser leaving)."""


class Session:
    """One browser session: its cache, the strokes painted on its image, the toy scenes drawn, and ``stop``,
    set to end its running work at the next UNet call (``check_stop``).

    gr.State deep-copies its initial value for each new session; the copy starts empty, so two sessions
    never share a cached tensor."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.cache = LRUCache(limit)
        self.strokes: dict[str, tuple] = {}  # image digest -> (add, erase) latent masks, the painted layers
        self.scenes = 0  # toy scenes drawn: each press draws the next held-out one
        self.stop = threading.Event()

    def check_stop(self):
        """Called before every UNet call of this session's work: Cancelled once ``stop`` is set."""
        if self.stop.is_set():
            raise Cancelled("stopped")

    def __deepcopy__(self, memo):
        return Session(self.cache.limit)


@dataclass
class Picture:
    """An input image as the app works on it. ``original``: the upload in RGB, its side capped (results come back
    at its size); ``pil``: the copy the model works on (``at`` a working size); ``digest``: the cache's key for it,
    the upload's pixels and the working size."""
    pil: Image.Image
    original: Image.Image
    pixels: str                                 # a hash of the original's pixels
    shrunk_from: tuple[int, int] | None = None  # the uploaded size when MAX_SIDE shrank it
    working: dict = field(default_factory=dict, repr=False)  # size -> the original resized to it, made once

    @property
    def digest(self) -> str:
        return hashlib.sha1(f"{self.pixels} {self.pil.size}".encode()).hexdigest()

    @property
    def size(self) -> tuple[int, int]:
        """The size results come back at."""
        return self.original.size

    def at(self, side: int | None, multiple: int = 1) -> "Picture":
        """This picture worked with ``side`` px on its longer side (None: its own size), each side then rounded to
        a multiple of ``multiple`` (the model's)."""
        w, h = self.original.size
        if side is not None:
            w, h = (max(1, round(s * side / max(w, h))) for s in (w, h))
        size = images.model_size((w, h), multiple)
        if size == self.original.size:
            return replace(self, pil=self.original)
        if size not in self.working:
            self.working[size] = self.original.resize(size, Image.LANCZOS)
        return replace(self, pil=self.working[size])

    def restore(self, image: Image.Image) -> Image.Image:
        """A result at the working size, resized back to the original's."""
        return image if image.size == self.size else image.resize(self.size, Image.BICUBIC)


@dataclass
class Spent:
    """What one action ran: UNet sample evaluations (batch rows) per phase, VAE encodes, seconds."""
    rows: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    encodes: int = 0
    seconds: float = 0.0

    @property
    def evaluations(self) -> int:
        return sum(self.rows.values())

    def text(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        return (f"{self.evaluations} UNet evaluations ({parts}), {self.encodes} VAE encode(s), "
                f"{self.seconds:.2f} s")


class AppModel:
    """The model every session shares, and ``evals``: every UNet evaluation run through it."""

    def __init__(self, de):
        self.de, self.evals = de, Rows()

    def work(self, session: Session, report=None) -> "Work":
        return Work(self, session, report)


class Work:
    """One user action on one session, run by the edit engine (``diffedit.engine``) with the session's cache as
    its memo. ``report(phase, rows_done, rows_total)`` follows the UNet work; every UNet call first asks the
    session whether to stop (``Session.check_stop``)."""

    def __init__(self, model: AppModel, session: Session, report=None):
        self.de, self.evals, self.session = model.de, model.evals, session
        self.cache = session.cache
        self.spent = Spent()
        self.report = report or (lambda *_: None)
        self._start = time.perf_counter()
        self._phase, self._done, self._totals = None, 0, {}
        self.engine = self.de.engine(memo=self.cache, wrap=self._wrap, on_phase=self._on_phase)

    def finish(self) -> Spent:
        self.spent.seconds = time.perf_counter() - self._start
        return self.spent

    def _expect(self, inputs: list[Input], requests: list[Request], **options):
        """The progress bar's total per phase: the UNet rows the engine's plan will run (work held costs none)."""
        cost = self.engine.plan(inputs, requests, **options).cost
        self._totals = {phase: getattr(cost, phase) for phase in PHASES}

    def _on_phase(self, phase: str):
        if phase == "encode":
            self.spent.encodes += 1
        else:
            self._phase, self._done = phase, 0

    def _wrap(self, model):
        """The model call, counted into the app's total and this action's phase, stopped when the session asks."""
        def call(x, t, context):
            self.session.check_stop()
            self.evals.add(x)
            self.spent.rows[self._phase] += x.shape[0]
            self._done += x.shape[0]
            self.report(self._phase, self._done, self._totals.get(self._phase, self._done))
            return model(x, t, context)
        return call

    # --- the steps, through the engine ----------------------------------------------------------------------

    def picture(self, image) -> Picture:
        """A path (read, never written) or a PIL image -> Picture; images.ImageError if unreadable."""
        if isinstance(image, (str, Path)) and Path(image).is_file():
            st = Path(image).stat()  # gradio keeps each upload at its own path: read it once
            return self.cache.cached(("file", str(image), st.st_size, st.st_mtime_ns), lambda: _picture(image))
        return _picture(image)

    def _input(self, pic: Picture) -> Input:
        return Input(images.to_tensor(pic.pil, self.de.multiple, self.de.device, self.de.dtype), key=pic.digest)

    def has_difference(self, pic: Picture, source: str, target: str, s: EditSettings) -> bool:
        return self.engine.has_map(self._input(pic), Request(0, target, source, s))

    def mask(self, pic: Picture, source: str, target: str, s: EditSettings):
        """(D rescaled to [0, 1], the mask M): D thresholded, with the session's strokes painted in."""
        inputs, requests = [self._input(pic)], [Request(0, target, source, s)]
        self._expect(inputs, requests, phases=("mask",))
        ((d, m),) = self.engine.masks(inputs, requests)
        if pic.digest in self.session.strokes:
            add, erase, _ = self.session.strokes[pic.digest]
            m = (m | add.to(m.device)) & ~erase.to(m.device)
        return d, m

    def paint(self, pic: Picture, layers: list[Image.Image]) -> bool:
        """Keep the strokes of the editor's layers (the first adds to the mask, the second erases);
        False if they paint the same cells as before."""
        w, h = images.model_size(pic.pil.size, self.de.multiple)
        f = self.de.cfg.vae.downsampling
        cells = [stroke_cells(layer, (w // f, h // f)) for layer in layers[:2]]
        cells += [torch.zeros(h // f, w // f, dtype=torch.bool)] * (2 - len(cells))
        before = self.session.strokes.get(pic.digest, (torch.zeros_like(cells[0]),) * 2)
        self.session.strokes = {pic.digest: (cells[0], cells[1], list(layers))}  # one image at a time
        return not all(torch.equal(a, b) for a, b in zip(cells, before))

    def edit(self, pic: Picture, source: str, target: str, s: EditSettings, mask: torch.Tensor | None = None):
        """The edited image (input size) by ``s.method``; a masked method blends with ``mask`` (h, w) bool."""
        return self.edits(pic, source, target, [s], mask)[0]

    def edits(self, pic: Picture, source: str, target: str, settings: list[EditSettings],
              mask: torch.Tensor | None = None) -> list[Image.Image]:
        """The edited images (input size) of each settings' method, those the cache does not hold in one engine call;
        the masked methods blend with ``mask`` (h, w) bool. The encoding is made once to ratio 1: every ratio is a
        truncation of it."""
        mask_key = None if mask is None else hashlib.sha1(mask.cpu().numpy().tobytes()).hexdigest()
        keys, requests = [], []
        for s in settings:
            method = METHOD_TABLE[s.method]
            keys.append(("edit", pic.digest, s.method, encoding_steps(s.ratio, s.steps), s.steps, s.guidance, source,
                         target, s.seed if method.start == "noise" else None, mask_key if method.masked else None))
            requests.append(Request(0, target, source, s, mask if method.masked else None))
        out = [self.cache.get(key) for key in keys]  # one look-up each: an entry may be dropped between two
        todo = [j for j, image in enumerate(out) if image is None]
        if todo:
            inputs, requests = [self._input(pic)], [requests[j] for j in todo]
            self._expect(inputs, requests, invert_to=1.0)
            edited = self.engine.edits(inputs, requests, invert_to=1.0)
            for j, e in zip(todo, edited):
                image = images.to_pil(e.pixels, pic.pil.size)
                out[j] = self.cache.cached(keys[j], lambda image=image: image)
        return out


def _picture(image) -> Picture:
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:  # the header only: a huge file is refused before it is decoded
                w, h = im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            raise images.ImageError("cannot read the file as an image") from None
        if w * h > MAX_PIXELS:
            raise images.ImageError(f"the image is {w} x {h} px; the app opens at most {MAX_PIXELS // 10 ** 6} "
                                    "megapixels (scale it down first)")
    pil = images.load_image(image)
    shrunk_from = None
    if max(pil.size) > MAX_SIDE:
        shrunk_from, pil = pil.size, pil.copy()
        pil.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
    pixels = hashlib.sha1(repr(pil.size).encode() + pil.tobytes()).hexdigest()
    return Picture(pil, pil, pixels, shrunk_from)  # at its own size; ``at`` gives a working size


def stroke_cells(layer: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """A painted layer (RGBA, painted where opaque) -> bool (h, w) latent cells, ``latent_size`` (w, h)."""
    painted = Image.fromarray((np.asarray(layer.convert("RGBA").getchannel("A")) >= 128).astype(np.uint8) * 255)
    cover = np.asarray(painted.resize(latent_size, Image.BOX), dtype=np.float32) / 255
    return torch.from_numpy(cover >= STROKE_COVER)
