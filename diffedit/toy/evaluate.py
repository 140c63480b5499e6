"""Measure DiffEdit, SDEdit and Encode-Decode on held-out toy-world edits with ground truth.

Per edit: mask IoU with the ground-truth edit mask (DiffEdit; our latent-resolution mask upsampled to
pixels), background PSNR outside the ground-truth mask (distance to the input where nothing should
change), PSNR to the ground-truth target render, and edit success (toy/judge.py, independent of the
model). The reference text R is the source caption (the paper uses captions where it has them);
``reference="empty"`` uses "" instead. Also measured: the VAE's own background PSNR (the ceiling for
any latent editing method) and caption following of plain generation.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import metrics
from ..edit import masked_decode
from ..images import to_pil, to_tensor
from . import judge, world

METHODS = ("diffedit", "sdedit", "encode_decode")


def _u8(pil) -> np.ndarray:
    return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def evaluate(de, n: int = 40, seed: int = world.EVAL_SEED, ratio: float = 0.7, steps: int = 50,
             reference: str = "caption", progress: bool = True, **edit_kwargs) -> dict:
    """Run the three methods on ``n`` edits drawn at ``seed`` (never the training seed); the mean metrics."""
    rows = edit_rows(de, n, seed, range(n), ratio, steps, reference, progress, **edit_kwargs)
    return summarize(rows, n=n, seed=seed, ratio=ratio, steps=steps, reference=reference)


def edit_rows(de, n: int, seed: int, indices, ratio: float = 0.7, steps: int = 50, reference: str = "caption",
              progress: bool = True, **edit_kwargs) -> list[dict]:
    """Per-edit metrics for the edits ``indices`` of the ``n`` drawn at ``seed`` (so workers can split them)."""
    if seed == world.TRAIN_SEED:
        raise ValueError(f"seed {seed} is the training seed; evaluate on held-out scenes (e.g. {world.EVAL_SEED})")
    if reference not in ("caption", "empty"):
        raise ValueError(f"reference must be 'caption' or 'empty', got {reference!r}")
    edits = world.edits(n, seed)
    rows = []
    for i in tqdm(list(indices), desc="evaluate", disable=not progress):
        ed = edits[i]
        src, tgt, gt = ed.source.render(), ed.target.render(), ed.mask()
        image = Image.fromarray(src)
        ref = ed.source_caption if reference == "caption" else ""
        kw = dict(source=ref, ratio=ratio, steps=steps, seed=seed * 1000 + i, **edit_kwargs)
        res = de.edit(image, target=ed.target_caption, **kw)
        # Encode-Decode shares DiffEdit's trajectory: the same decoding with no mask.
        cond, uncond = de.encode_prompt([ed.target_caption]), de.encode_prompt([ref])
        y_ed = masked_decode(de.eps, res.trajectory, cond, uncond, kw.get("guidance", 7.5), de.alpha_bar,
                             max_batch=de.max_batch)
        outs = {"diffedit": _u8(res.image),
                "sdedit": _u8(de.edit(image, target=ed.target_caption, method="sdedit", **kw).image),
                "encode_decode": _u8(_to_pil(de, y_ed, image.size))}
        recon = _to_pil(de, res.trajectory.latents[0], image.size)
        row = {"index": i, "kind": ed.kind, "vae_bg_psnr": metrics.psnr(_u8(recon), src, mask=~gt)}
        for m, out in outs.items():
            pred = np.asarray(res.mask) > 127 if m == "diffedit" else None  # our mask, upsampled to pixels
            row[m] = metrics.edit_metrics(out, src, tgt, gt, pred) | {"success": float(judge.edit_success(out, ed))}
        rows.append(row)
    return rows


def summarize(rows: list[dict], **info) -> dict:
    """Means per method, overall and per kind of edit, plus the VAE's background PSNR (the ceiling)."""
    summary = {m: _mean([r[m] for r in rows]) for m in METHODS}
    summary.update(info, vae_bg_psnr=float(np.mean([r["vae_bg_psnr"] for r in rows])),
                   by_kind={m: {k: _mean([r[m] for r in rows if r["kind"] == k]) for k in world.EDIT_KINDS}
                            for m in METHODS})
    return summary


def _to_pil(de, latents, size):
    return to_pil(de.decode_latents(latents.reshape(1, *latents.shape[-3:]))[0], size)


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


@torch.no_grad()
def vae_reconstruction_psnr(de, n: int = 64, seed: int = world.EVAL_SEED) -> float:
    """Mean PSNR of plain VAE encode -> decode over n held-out scenes (whole image)."""
    vals = []
    for scene in world.scenes(n, seed):
        src = scene.render()
        x = to_tensor(Image.fromarray(src), de.multiple, de.device, de.dtype)
        vals.append(metrics.psnr(_u8(_to_pil(de, de.encode_image(x), (src.shape[1], src.shape[0]))), src))
    return float(np.mean(vals))
