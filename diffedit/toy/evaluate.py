"""Measure DiffEdit, SDEdit and Encode-Decode on held-out toy-world edits with ground truth.

The edits and their metrics are the sweep's (``sweep.edit_grid`` at one ratio, the paper's other knobs, and
``sweep.rows_for``): mask IoU with the ground-truth edit mask, background PSNR / SSIM outside it, PSNR to the
ground-truth target render, edit success (toy/judge.py). The reference text R is the source caption (the paper
uses captions where it has them); ``reference="empty"`` uses "". Measured here only: the VAE's background PSNR
(the ceiling of any latent editing method) and caption following of plain generation.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import metrics
from ..images import to_pil, to_tensor
from ..settings import REFERENCES, EditSettings
from ..sweep import METRICS, Setting, edit_grid, rows_for, toy_items
from . import judge, world

KEYS = {"diffedit": "diffedit", "sdedit": "sdedit", "encode-decode": "encode_decode"}  # method -> its JSON key
METHODS = tuple(KEYS.values())


def _u8(pil) -> np.ndarray:
    return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def evaluate(de, n: int = 40, seed: int = world.EVAL_SEED, ratio: float = 0.7, steps: int = 50,
             reference: str = "caption", guidance: float = 7.5, progress: bool = True) -> dict:
    """Run the three methods on ``n`` edits drawn at ``seed`` (never the training seed); the mean metrics."""
    rows = edit_rows(de, n, seed, range(n), ratio, steps, reference, guidance, progress)
    return summarize(rows, n=n, seed=seed, ratio=ratio, steps=steps, reference=reference)


def edit_rows(de, n: int, seed: int, indices, ratio: float = 0.7, steps: int = 50, reference: str = "caption",
              guidance: float = 7.5, progress: bool = True) -> list[dict]:
    """Per-edit metrics for the edits ``indices`` of the ``n`` drawn at ``seed`` (so workers can split them)."""
    if seed == world.TRAIN_SEED:
        raise ValueError(f"seed {seed} is the training seed; evaluate on held-out scenes (e.g. {world.EVAL_SEED})")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    s = EditSettings(ratio=ratio, steps=steps, guidance=guidance)
    points = [Setting("diffedit", s.ratio, reference, s.threshold, s.n, s.strength),
              Setting("sdedit", s.ratio, reference), Setting("encode-decode", s.ratio, reference)]
    items = toy_items(n, seed, world.SIZE)
    rows = []
    for i in tqdm(list(indices), desc="evaluate", disable=not progress):
        item, image = items[i], items[i].load()
        outputs = edit_grid(de, image, item.source, item.target, points, s.steps, s.guidance, seed * 1000 + i,
                            normalization=s.mask_normalization)
        row = {"index": i, "kind": item.edit.kind,
               "vae_bg_psnr": metrics.psnr(_reconstruct(de, image), _u8(image), mask=~item.edit.mask())}
        for out, r in zip(outputs, rows_for(item, image, outputs, seed * 1000 + i)):
            row[KEYS[out.setting.method]] = {k: r[k] for k in METRICS if k in r}
        rows.append(row)
    return rows


def summarize(rows: list[dict], **info) -> dict:
    """Means per method, overall and per kind of edit, plus the VAE's background PSNR (the ceiling)."""
    summary = {m: _mean([r[m] for r in rows]) for m in METHODS}
    summary.update(info, vae_bg_psnr=float(np.mean([r["vae_bg_psnr"] for r in rows])),
                   by_kind={m: {k: _mean([r[m] for r in rows if r["kind"] == k]) for k in world.EDIT_KINDS}
                            for m in METHODS})
    return summary


@torch.no_grad()
def _reconstruct(de, image) -> np.ndarray:
    """The image through the VAE alone (encode, decode): what any latent edit can keep at best."""
    x0 = de.encode_image(to_tensor(image, de.multiple, de.device, de.dtype))
    return _u8(to_pil(de.decode_latents(x0)[0], image.size))


def _mean(rows: list[dict]) -> dict:
    keys = list(rows[0]) if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {"count": len(rows)}


def caption_following(de, n: int = 50, seed: int = world.EVAL_SEED, steps: int = 50, guidance: float = 7.5,
                      progress: bool = True, indices=None) -> list[dict]:
    """Generate from held-out captions; per sample, whether the dominant background-palette colour is the
    captioned background and whether every captioned object colour covers >= 20 pixels."""
    scenes = world.scenes(n, seed)
    rows = []
    for i in tqdm(list(range(n) if indices is None else indices), desc="generate", disable=not progress):
        scene = scenes[i]
        img = _u8(de.generate(scene.caption, seed=seed * 1000 + i, steps=steps, guidance=guidance))
        counts = np.bincount(judge.classify(img).ravel(), minlength=len(judge.PALETTE_NAMES))
        bg_names = list(world.BACKGROUND_COLOURS)
        bg = bg_names[int(np.argmax([counts[judge.PALETTE_NAMES.index(b)] for b in bg_names]))] == scene.background
        obj = all(counts[judge.PALETTE_NAMES.index(o.colour)] >= 20 for o in scene.objects)
        rows.append({"index": i, "background": float(bg), "objects": float(obj), "follows": float(bg and obj)})
    return rows


def vae_reconstruction_psnr(de, n: int = 64, seed: int = world.EVAL_SEED) -> float:
    """Mean PSNR of plain VAE encode -> decode over n held-out scenes (whole image)."""
    return float(np.mean([metrics.psnr(_reconstruct(de, Image.fromarray(src)), src)
                          for src in (scene.render() for scene in world.scenes(n, seed))]))
