"""The web app's work, cached per browser session, so that a knob change recomputes only what it changes.

    knob moved                          what runs again
    threshold, normalisation, strokes   no UNet evaluation: the cached D is rescaled and thresholded again
    ratio, guidance, method             the decoding only (the inversion, done once to ratio 1, is truncated)
    n, strength, seed, texts            the mask pass, then the decoding
    image                               everything, with one VAE encode

Torch only (no gradio). A ``Session`` is one browser session's cache, bounded in bytes; a ``Work`` is one
user action on it: the algorithm's steps (masking.py, inversion.py, edit.py), each looked up in the cache
under everything it depends on, and what the action cost (UNet rows per phase, VAE encodes, seconds).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import images, masking
from .edit import masked_decode, sdedit
from .guidance import Conditioning
from .inversion import Trajectory, ddim_encode, num_encoding_steps
from .measure import EvalCounter
from .settings import EditSettings

CACHE_BYTES = 256 * 2 ** 20   # per session: a 512 px SD trajectory at 50 steps is 3.3 MB, a toy one 52 kB
MAX_SIDE = 2048               # longer sides are shrunk to this (with a warning), not refused
MAX_PIXELS = 100_000_000      # larger files are refused from their header, before any decoding
STROKE_COVER = 0.25           # a latent cell joins a stroke when a quarter of its pixels are painted
PHASES = ("mask", "inversion", "decoding")


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
        return nbytes(value.pil)
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


class Session:
    """One browser session: its cache, the strokes painted on its image, the cost of its last action.

    gr.State deep-copies its initial value for each new session; the copy starts empty, so two sessions
    never share a cached tensor."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.cache = LRUCache(limit)
        self.strokes: dict[str, tuple] = {}  # image digest -> (add, erase) latent masks, the painted layers
        self.last_cost: Cost | None = None
        self.scenes = 0  # toy scenes drawn: each press draws the next held-out one

    def __deepcopy__(self, memo):
        return Session(self.cache.limit)


@dataclass
class Picture:
    """An input image as the app works on it: RGB, its side capped, and a digest that keys the cache."""
    pil: Image.Image
    digest: str
    shrunk_from: tuple[int, int] | None = None  # the uploaded size when MAX_SIDE shrank it


@dataclass
class Cost:
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


class Engine:
    """The model every session shares, and ``evals``: every UNet evaluation run through it."""

    def __init__(self, de):
        self.de, self.evals = de, EvalCounter(de.eps)

    def work(self, session: Session, report=None) -> "Work":
        return Work(self, session, report)


class Work:
    """One user action on one session. ``report(phase, rows_done, rows_total)`` follows the UNet work."""

    def __init__(self, engine: Engine, session: Session, report=None):
        self.de, self.evals, self.session = engine.de, engine.evals, session
        self.cache = session.cache
        self.cost = Cost()
        self.report = report or (lambda *_: None)
        self._start = time.perf_counter()

    def finish(self) -> Cost:
        self.cost.seconds = time.perf_counter() - self._start
        self.session.last_cost = self.cost
        return self.cost

    def _eps(self, phase: str, total: int) -> EvalCounter:
        """The model's eps, counted into the app's total and into this action's ``phase``."""
        done = 0

        def on_rows(rows):
            nonlocal done
            done += rows
            self.cost.rows[phase] += rows
            self.report(phase, done, total)
        return EvalCounter(self.evals, on_rows)

    # --- the cached steps --------------------------------------------------------------------------------

    def picture(self, image) -> Picture:
        """A path (read, never written) or a PIL image -> Picture; images.ImageError if unreadable."""
        if isinstance(image, (str, Path)) and Path(image).is_file():
            st = Path(image).stat()  # gradio keeps each upload at its own path: read it once
            return self.cache.cached(("file", str(image), st.st_size, st.st_mtime_ns), lambda: _picture(image))
        return _picture(image)

    def x0(self, pic: Picture) -> torch.Tensor:
        def encode():
            self.cost.encodes += 1
            return self.de.encode_image(images.to_tensor(pic.pil, self.de.multiple, self.de.device, self.de.dtype))
        return self.cache.cached(("x0", pic.digest), encode)

    def text(self, text: str, pic: Picture) -> torch.Tensor:
        """The conditioning of ``text`` for ``pic`` (SDXL's carries the image size)."""
        size = self.de.image_size(self.x0(pic))  # as the pipeline derives it
        return self.cache.cached(("text", text, *size), lambda: self.de.encode_prompt([text], size))

    @staticmethod
    def _d_key(pic, source, target, s: EditSettings):
        return ("D", pic.digest, source, target, s.n, s.strength, s.seed, s.steps)

    def has_difference(self, pic: Picture, source: str, target: str, s: EditSettings) -> bool:
        return self.cache.has(self._d_key(pic, source, target, s))

    def difference(self, pic: Picture, source: str, target: str, s: EditSettings) -> torch.Tensor:
        """The raw map D (h, w) of ``target`` against ``source`` (Sec. 3.1): the mask pass, no guidance."""
        def estimate():
            noises = masking.noised_latents(self.x0(pic), s.n, s.strength, s.steps, self.de.alpha_bar,
                                            torch.Generator().manual_seed(s.seed))
            return masking.noise_difference_maps(self._eps("mask", 2 * s.n), noises, self.text(target, pic),
                                                 self.text(source, pic), self.de.max_batch)[0].float()
        return self.cache.cached(self._d_key(pic, source, target, s), estimate)

    def mask(self, pic: Picture, source: str, target: str, s: EditSettings):
        """(D rescaled to [0, 1], the mask M): D thresholded, with the session's strokes painted in."""
        d = masking.normalize(self.difference(pic, source, target, s)[None], s.mask_normalization)[0]
        m = masking.binarize(d, s.threshold)
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

    def trajectory(self, pic: Picture, steps: int) -> Trajectory:
        """The DDIM encoding (Sec. 3.2: text "", no guidance) to ratio 1: every ratio is a truncation of it."""
        def invert():
            return ddim_encode(self._eps("inversion", steps), self.x0(pic), self.text("", pic), 1.0, steps,
                               self.de.alpha_bar, max_batch=self.de.max_batch)
        return self.cache.cached(("trajectory", pic.digest, steps), invert)

    def edit(self, pic: Picture, source: str, target: str, s: EditSettings, mask: torch.Tensor | None = None):
        """The edited image (input size) by ``s.method``; DiffEdit blends with ``mask`` (h, w) bool."""
        k = num_encoding_steps(s.ratio, s.steps)
        mask_key = None if s.method != "diffedit" else hashlib.sha1(mask.cpu().numpy().tobytes()).hexdigest()
        key = ("edit", pic.digest, s.method, k, s.steps, s.guidance, source, target,
               s.seed if s.method == "sdedit" else None, mask_key)

        def decode():
            cond, ref = self.text(target, pic), self.text(source, pic)  # the paper's negative prompt is R
            eps = self._eps("decoding", k * (1 if s.guidance == 1 else 2))
            if s.method == "sdedit":
                y0 = sdedit(eps, self.x0(pic), cond, ref, s.ratio, s.steps, s.guidance, self.de.alpha_bar,
                            torch.Generator().manual_seed(s.seed), self.de.max_batch)
            else:
                trajectory = self.trajectory(pic, s.steps).truncate(s.ratio)
                blend = mask[None, None].to(trajectory.latents.dtype) if s.method == "diffedit" else None
                y0 = masked_decode(eps, trajectory, cond, ref, s.guidance, self.de.alpha_bar, blend,
                                   max_batch=self.de.max_batch)
            return images.to_pil(self.de.decode_latents(y0)[0], pic.pil.size)
        return self.cache.cached(key, decode)


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
    digest = hashlib.sha1(repr(pil.size).encode() + pil.tobytes()).hexdigest()
    return Picture(pil, digest, shrunk_from)


def stroke_cells(layer: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """A painted layer (RGBA, painted where opaque) -> bool (h, w) latent cells, ``latent_size`` (w, h)."""
    painted = Image.fromarray((np.asarray(layer.convert("RGBA").getchannel("A")) >= 128).astype(np.uint8) * 255)
    cover = np.asarray(painted.resize(latent_size, Image.BOX), dtype=np.float32) / 255
    return torch.from_numpy(cover >= STROKE_COVER)
