"""Judge an edited image against a toy-world ``Edit``, independently of any diffusion model.

Each pixel is classified to the nearest colour of the full palette (objects + backgrounds;
all >= 108 apart in RGB, so noise from a lossy autoencoder rarely flips a class).

* colour / shape edit: inside the union of the source and target object regions, dilated by
  ``DILATE`` px, take the pixels classified as the target object's colour (``P``).  Here the
  palette is extended with the 25 % and 75 % blends of the target colour into the background
  colour, and the 75 % blend counts as the target colour: a blurred edge is such a blend, and
  plain nearest-colour would send it to a third colour (white + black -> gray), eroding small
  shapes.  The split is then at a 50 % blend (unbiased for a symmetric blur), except where a
  real palette colour lies near the blend (navy between black and blue): it stays itself.  Success if
  ``IoU(P, target region) >= IOU_MIN``; a shape edit must also match the target shape better
  than the source shape: ``IoU(P, target) >= IoU(P, source) + SHAPE_MARGIN``.
* background edit: of the background pixels (outside all objects, dilated by ``DILATE`` px to
  skip blurred edges), at least ``BG_MIN`` must be classified as the new background colour.
* removal: of the removed object's pixels (eroded by ``DILATE`` px, as the background is), at least
  ``REMOVE_MIN`` must be classified as the background colour, and every other object must be kept: judged as
  an object edit whose target is that object unchanged (``IoU >= IOU_MIN``).

Thresholds are calibrated in tests/test_world.py: >= 98 % of ground-truth target renders (clean,
noise + blur, 4x down/up-sampled; see ``degrade``) pass, <= 5 % of unedited source renders do, and plausible
failures are rejected (docs/results/toy_kinds/README.md has the measured rates).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .world import BACKGROUND_COLOURS, OBJECT_COLOURS, Edit

PALETTE_NAMES = (*OBJECT_COLOURS, *BACKGROUND_COLOURS)
PALETTE = np.array([*OBJECT_COLOURS.values(), *BACKGROUND_COLOURS.values()], np.float32)
IOU_MIN = 0.5
SHAPE_MARGIN = 0.05
BG_MIN = 0.7
REMOVE_MIN = 0.7
DILATE = 2


def classify(img: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """int (H, W): index into ``palette`` (default: PALETTE_NAMES) of each pixel's nearest colour."""
    palette = np.asarray(palette, np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; |x|^2 is the same for every p, so drop it (a matmul, fast)
    return np.argmin((palette**2).sum(-1) - 2 * np.asarray(img, np.float32) @ palette.T, axis=-1)


def target_colour_mask(img: np.ndarray, colour: str, background: str) -> np.ndarray:
    """Bool (H, W): pixels of ``colour``, or blended >= ~50 % from ``background`` towards it."""
    b, o = np.float32(BACKGROUND_COLOURS[background]), np.float32(OBJECT_COLOURS[colour])
    cls = classify(img, np.concatenate([PALETTE, [b + 0.25 * (o - b), b + 0.75 * (o - b)]]))
    return (cls == PALETTE_NAMES.index(colour)) | (cls == len(PALETTE) + 1)


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(k):  # k passes of a 3x3 max filter = a (2k+1)^2 square
        m = np.pad(out, 1)
        out = (m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:] | m[:-2, :-2] | m[:-2, 2:]
               | m[2:, :-2] | m[2:, 2:] | m[1:-1, 1:-1])
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _colour_iou(edited: np.ndarray, tgt: np.ndarray, src: np.ndarray, colour: str, background: str) -> tuple:
    """IoU with the target and with the source region of the pixels of ``colour`` (or blended towards it) within
    ``DILATE`` px of either region."""
    pred = _dilate(src | tgt, DILATE) & target_colour_mask(edited, colour, background)
    return _iou(pred, tgt), _iou(pred, src)


def _class_map(scene) -> np.ndarray:
    """int (H, W): the palette class of every pixel of ``scene.render()``, from geometry alone."""
    cls = np.full((scene.size, scene.size), PALETTE_NAMES.index(scene.background))
    for o in scene.objects:
        cls[o.mask(scene.size)] = PALETTE_NAMES.index(o.colour)
    return cls


def judge(edited: np.ndarray, edit: Edit) -> dict:
    """Verdict and details for ``edited`` (uint8 (H, W, 3)): kind, success, score, threshold,
    iou_target / iou_source (object edits), kept_iou (removals: the worst kept object's IoU), and preserved:
    the fraction of pixels outside the dilated edit mask whose palette class matches the target render (reported,
    not judged)."""
    edited = np.asarray(edited)
    size = edit.target.size
    if edited.shape != (size, size, 3) or edited.dtype != np.uint8:
        raise ValueError(f"edited image must be uint8 {(size, size, 3)}, got {edited.dtype} {edited.shape}")
    cls = classify(edited)
    want = _class_map(edit.target)
    out = {"kind": edit.kind}
    if edit.kind == "background":
        bg_class = PALETTE_NAMES.index(edit.target.background)
        bg = ~_dilate(want != bg_class, DILATE)  # skip the blurred rims of the objects
        score = float(np.mean(cls[bg] == bg_class))
        out.update(score=score, threshold=BG_MIN, success=score >= BG_MIN)
    elif edit.kind == "remove":
        gone = edit.source.objects[edit.edited_object_index].mask(size)
        inner = ~_dilate(~gone, DILATE)  # skip the blurred rim, as for a background
        inner = inner if inner.any() else gone  # a tiny triangle erodes away: judge all of it
        score = float(np.mean(cls[inner] == PALETTE_NAMES.index(edit.target.background)))
        kept = min(_colour_iou(edited, o.mask(size), o.mask(size), o.colour, edit.target.background)[0]
                   for o in edit.target.objects)
        out.update(score=score, threshold=REMOVE_MIN, kept_iou=kept, success=score >= REMOVE_MIN and kept >= IOU_MIN)
    else:
        i = edit.edited_object_index
        src, tgt = edit.source.objects[i].mask(size), edit.target.objects[i].mask(size)
        iou_t, iou_s = _colour_iou(edited, tgt, src, edit.target.objects[i].colour, edit.target.background)
        ok = iou_t >= IOU_MIN and (edit.kind != "shape" or iou_t >= iou_s + SHAPE_MARGIN)
        out.update(score=iou_t, threshold=IOU_MIN, iou_target=iou_t, iou_source=iou_s, success=ok)
    # Informational (not part of the verdict): how much of the rest of the image kept its class.
    # Class maps differ exactly where the renders differ, i.e. on edit.mask() (tested).
    keep = ~_dilate(want != _class_map(edit.source), DILATE)
    out["preserved"] = float(np.mean(cls[keep] == want[keep])) if keep.any() else 1.0
    out["success"] = bool(out["success"])
    return out


def edit_success(edited: np.ndarray, edit: Edit) -> bool:
    """True if ``edited`` shows the edit's target in the edited region (see module docstring)."""
    return judge(edited, edit)["success"]


def latent_iou_ceiling(mask: np.ndarray, factor: int) -> float:
    """The best IoU with ``mask`` (bool (H, W)) that any cell mask upsampled by ``factor`` reaches (exact).

    A mask of k cells covering I pixels of ``mask`` scores I / (|mask| + k f^2 - I), which grows with I: so the best
    k-cell mask takes the k most covered cells, and the best mask is the best of these over k."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"factor {factor} must divide the mask's size {h} x {w}")
    if not mask.any():
        return 1.0  # the empty cell mask matches an empty mask exactly (the convention of _iou)
    cover = np.sort(mask.reshape(h // factor, factor, w // factor, factor).sum((1, 3)).ravel())[::-1]
    inter = np.cumsum(cover)
    cells = np.arange(1, len(cover) + 1) * factor * factor
    return float(np.max(inter / (np.count_nonzero(mask) + cells - inter)))


def degrade(img: np.ndarray, mode: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Imitate a lossy autoencoder, for calibrating the judge. Modes:
    "noise_blur": 3x3 box blur, then Gaussian noise sigma 8 (of 255);
    "down4": 4x box downsampling, then bilinear upsampling back."""
    img = np.asarray(img, np.uint8)
    h, w = img.shape[:2]
    if mode == "noise_blur":
        p = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
        blur = sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
        noisy = blur + (rng or np.random.default_rng(0)).normal(0, 8, blur.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if mode == "down4":
        small = Image.fromarray(img).resize((w // 4, h // 4), Image.BOX)
        return np.asarray(small.resize((w, h), Image.BILINEAR))
    raise ValueError(f"unknown degradation {mode!r}")
