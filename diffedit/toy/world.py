"""Procedural toy world: flat-coloured shapes on a textured background, with exact ground truth.

A scene is one to three non-overlapping objects (circle / square / triangle in one of six
colours) on one of four background colours.  Everything is deterministic from a seed, edges
are hard (no anti-aliasing) so the ground-truth edit mask is exact, and every colour of both
palettes is >= 108 apart in RGB, so a judge can classify pixels by nearest palette colour
even after a lossy autoencoder.

An ``Edit`` changes one attribute (an object's colour or shape, or the background colour) and
keeps everything else, including the background texture, bit-identical.

Seeds: training data is drawn with ``TRAIN_SEED``; evaluation must use a different seed
(e.g. ``EVAL_SEED``) so that the edited scenes were never seen in training; the evaluation
script refuses ``TRAIN_SEED``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 64
TRAIN_SEED = 0
EVAL_SEED = 12345  # any seed != TRAIN_SEED will do; this is the conventional one

OBJECT_COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "white": (240, 240, 240), "purple": (170, 60, 210),
}
# Kept within [15, 240] so the +-8.5 texture never clips: a background edit changes every pixel.
BACKGROUND_COLOURS = {
    "black": (20, 20, 20), "gray": (128, 128, 128), "brown": (120, 75, 20), "navy": (15, 25, 135),
}
SHAPES = ("circle", "square", "triangle")
EDIT_KINDS = ("colour", "shape", "background")
# Every word a caption can contain (for a tiny text encoder's vocabulary).
VOCAB = ("a", "an", "and", "on", "background", *SHAPES, *OBJECT_COLOURS, *BACKGROUND_COLOURS)

_MARGIN = 2  # px between bounding circles of two objects
_COS30 = math.cos(math.pi / 6)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: int
    cy: int
    r: int  # radius of the bounding circle; every shape fits inside it

    @property
    def phrase(self) -> str:
        return f"{_article(self.colour)} {self.colour} {self.shape}"

    def mask(self, size: int = SIZE) -> np.ndarray:
        """Bool (size, size): the pixels this object covers."""
        out = np.zeros((size, size), bool)
        box, local = self._local_mask(size)
        out[box] = local
        return out

    def _local_mask(self, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """The mask inside the bounding box of the bounding circle only (fast to render)."""
        y0, x0 = max(0, self.cy - self.r), max(0, self.cx - self.r)
        dy = np.arange(y0, min(size, self.cy + self.r + 1), dtype=np.float32)[:, None] - self.cy
        dx = np.arange(x0, min(size, self.cx + self.r + 1), dtype=np.float32)[None, :] - self.cx
        box = (slice(y0, y0 + dy.shape[0]), slice(x0, x0 + dx.shape[1]))
        if self.shape == "circle":
            return box, dx * dx + dy * dy <= self.r * self.r
        if self.shape == "square":  # inscribed in the bounding circle
            h = self.r / math.sqrt(2)
            return box, (np.abs(dx) <= h) & (np.abs(dy) <= h)
        if self.shape == "triangle":  # equilateral, apex up, inscribed: inradius r/2
            # outward edge normals point away from the vertices at -90, 30 and 150 deg (y down)
            return box, ((dy <= self.r / 2)
                         & (dx * _COS30 - dy * 0.5 <= self.r / 2)
                         & (-dx * _COS30 - dy * 0.5 <= self.r / 2))
        raise ValueError(f"unknown shape {self.shape!r}")


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    texture_seed: int
    size: int = SIZE

    @property
    def caption(self) -> str:
        phrases = [o.phrase for o in sorted(self.objects, key=lambda o: (o.cx, o.cy))]
        # no punctuation, so a whitespace tokenizer covers it: "a X and a Y and a Z on a B background"
        return f"{' and '.join(phrases)} on {_article(self.background)} {self.background} background"

    def render(self) -> np.ndarray:
        """uint8 (size, size, 3)."""
        return render_batch([self])[0]


@dataclass(frozen=True)
class Edit:
    source: Scene
    target: Scene
    kind: str  # one of EDIT_KINDS
    description: str

    @property
    def source_caption(self) -> str:
        return self.source.caption

    @property
    def target_caption(self) -> str:
        return self.target.caption

    @property
    def edited_object_index(self) -> int | None:
        """Index into source.objects / target.objects (same order), None for background edits."""
        for i, (a, b) in enumerate(zip(self.source.objects, self.target.objects)):
            if a != b:
                return i
        return None

    def mask(self) -> np.ndarray:
        """Bool (H, W): exactly the pixels where the source and target renders differ."""
        return np.any(self.source.render() != self.target.render(), axis=-1)


@lru_cache(maxsize=16)
def _texture_basis(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached per size: centred coordinates ys, xs divided by the half-diagonal (so a projection
    on any direction lies in [-1, 1]), and a bank of uniform grain (+-2.5) to cut patches from."""
    ys, xs = (np.mgrid[0:size, 0:size].astype(np.float32) - size / 2) * np.float32(np.sqrt(2) / size)
    grain = (np.random.default_rng(0).random((4 * size, 4 * size), dtype=np.float32) - 0.5) * 5
    for a in (ys, xs, grain):
        a.flags.writeable = False  # shared
    return ys, xs, grain


def _texture(seed: int, size: int) -> np.ndarray:
    """float32 (size, size, 1) within +-8.5: gradient (amplitude 2-6, any direction) + grain.

    The parameters come from a splitmix64 hash of the seed, not a Generator: creating one per
    scene would dominate render time."""
    h = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 31
    angle = (h & 0xFFFF) / 65536 * 2 * math.pi
    amp = 2.0 + 4.0 * ((h >> 16) & 0xFFFF) / 65536
    oy, ox = (h >> 32) % (3 * size + 1), (h >> 48) % (3 * size + 1)
    ys, xs, grain = _texture_basis(size)
    t = (amp * math.cos(angle)) * xs + (amp * math.sin(angle)) * ys  # python floats keep float32
    t += grain[oy:oy + size, ox:ox + size]
    return t[..., None]


def sample_scene(rng: np.random.Generator, size: int = SIZE, max_objects: int = 2) -> Scene:
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be in 1..3, got {max_objects}")
    r_lo, r_hi = round(8 * size / SIZE), round(18 * size / SIZE)
    n = int(rng.integers(1, max_objects + 1))
    colours = [list(OBJECT_COLOURS)[k] for k in rng.permutation(len(OBJECT_COLOURS))[:n]]  # distinct
    shapes = [SHAPES[k] for k in rng.integers(len(SHAPES), size=n)]
    while True:  # rejection-sample a non-overlapping layout, 64 candidates per object at once
        objs: list[Obj] = []
        for colour, shape in zip(colours, shapes):
            u = rng.random((64, 3))
            r = r_lo + (u[:, 0] * (r_hi - r_lo + 1)).astype(int)
            cx, cy = (r + (u[:, k] * (size - 2 * r)).astype(int) for k in (1, 2))  # in [r, size-1-r]
            ok = np.ones(64, bool)
            for o in objs:
                ok &= (cx - o.cx) ** 2 + (cy - o.cy) ** 2 >= (r + o.r + _MARGIN) ** 2
            if not ok.any():
                break  # crowded: start the layout again
            k = int(np.argmax(ok))
            objs.append(Obj(shape, colour, int(cx[k]), int(cy[k]), int(r[k])))
        if len(objs) == n:
            break
    background = list(BACKGROUND_COLOURS)[int(rng.integers(len(BACKGROUND_COLOURS)))]
    return Scene(background, tuple(objs), int(rng.integers(2**31)), size)


def sample_edit(rng: np.random.Generator, scene: Scene | None = None,
                kinds: tuple[str, ...] = EDIT_KINDS, size: int = SIZE, max_objects: int = 2) -> Edit:
    if scene is None:
        scene = sample_scene(rng, size, max_objects)
    if not kinds or set(kinds) - set(EDIT_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {EDIT_KINDS}, got {kinds}")
    kind = str(rng.choice(list(kinds)))
    if kind == "background":
        new = str(rng.choice([c for c in BACKGROUND_COLOURS if c != scene.background]))
        target = dataclasses.replace(scene, background=new)
        return Edit(scene, target, kind, f"{scene.background} background -> {new} background")
    i = int(rng.integers(len(scene.objects)))
    old = scene.objects[i]
    if kind == "colour":  # a colour no object of the scene uses, so captions stay unambiguous
        used = {o.colour for o in scene.objects}
        new_obj = dataclasses.replace(old, colour=str(rng.choice([c for c in OBJECT_COLOURS if c not in used])))
    else:  # same centre and radius: the shapes differ in pixels, so the edit is never empty
        new_obj = dataclasses.replace(old, shape=str(rng.choice([s for s in SHAPES if s != old.shape])))
    objects = scene.objects[:i] + (new_obj,) + scene.objects[i + 1:]
    target = dataclasses.replace(scene, objects=objects)
    return Edit(scene, target, kind, f"{old.colour} {old.shape} -> {new_obj.colour} {new_obj.shape}")


def scenes(n: int, seed: int, size: int = SIZE, max_objects: int = 2) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, size, max_objects) for _ in range(n)]


def edits(n: int, seed: int, size: int = SIZE, max_objects: int = 2,
          kinds: tuple[str, ...] = EDIT_KINDS) -> list[Edit]:
    rng = np.random.default_rng(seed)
    return [sample_edit(rng, None, kinds, size, max_objects) for _ in range(n)]


def render_batch(scene_list, chunk: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3); all scenes must share one size.  Scene.render() goes through here."""
    scene_list = list(scene_list)
    size = scene_list[0].size if scene_list else SIZE
    if any(s.size != size for s in scene_list):
        raise ValueError("render_batch needs scenes of one size")
    out = np.empty((len(scene_list), size, size, 3), np.uint8)
    for start in range(0, len(scene_list), chunk):  # small chunks keep the float32 temporaries in cache
        part = scene_list[start:start + chunk]
        tex = np.stack([_texture(s.texture_seed, size) for s in part])
        # +0.5: round, not truncate; colours lie in [15, 240], the texture in +-8.5: no clipping
        base = np.array([BACKGROUND_COLOURS[s.background] for s in part], np.float32) + 0.5
        out[start:start + len(part)] = tex + base[:, None, None, :]
    for img, s in zip(out, scene_list):
        for o in s.objects:
            box, local = o._local_mask(size)
            img[box][local] = OBJECT_COLOURS[o.colour]
    return out
