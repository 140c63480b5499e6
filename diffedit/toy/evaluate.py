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
    """Run the three methods on ``n`` edits drawn at ``seed`` (never the training seed)."""
    if seed == world.TRAIN_SEED:
        raise ValueError(f"seed {seed} is the training seed; evaluate on held-out scenes (e.g. {world.EVAL_SEED})")
    if reference not in ("caption", "empty"):
        raise ValueError(f"reference must be 'caption' or 'empty', got {reference!r}")
    rows = {m: [] for m in METHODS}
    vae_bg = []
    for i, ed in enumerate(tqdm(world.edits(n, seed), desc="evaluate", disable=not progress)):
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
        for m, out in outs.items():
            row = {"bg_psnr": metrics.psnr(out, src, mask=~gt), "target_psnr": metrics.psnr(out, tgt),
                   "success": float(judge.edit_success(out, ed)), "kind": ed.kind}
            if m == "diffedit":
                pred = metrics.resize_mask(res.mask_map.numpy() > kw.get("threshold", 0.5), gt.shape)
                row["iou"] = metrics.iou(pred, gt)
            rows[m].append(row)
        recon = _to_pil(de, res.trajectory.latents[0], image.size)
        vae_bg.append(metrics.psnr(_u8(recon), src, mask=~gt))
    summary = {m: _mean(r) for m, r in rows.items()}
    summary.update(n=n, seed=seed, ratio=ratio, steps=steps, reference=reference,
                   vae_bg_psnr=float(np.mean(vae_bg)),
                   by_kind={m: {k: _mean([r for r in rs if r["kind"] == k]) for k in world.EDIT_KINDS}
                            for m, rs in rows.items()})
    return summary


def _to_pil(de, latents, size):
    return to_pil(de.decode_latents(latents.reshape(1, *latents.shape[-3:]))[0], size)


def _mean(rows: list[dict]) -> dict:
    keys = [k for k in (rows[0] if rows else {}) if k != "kind"]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {"count": len(rows)}


def caption_following(de, n: int = 50, seed: int = world.EVAL_SEED, steps: int = 50, guidance: float = 7.5,
                      progress: bool = True) -> dict:
    """Generate from n held-out captions; a sample follows its caption when the dominant background-palette
    colour is the captioned background and every captioned object colour covers >= 20 pixels."""
    ok_bg = ok_obj = ok_all = 0
    for i, scene in enumerate(tqdm(world.scenes(n, seed), desc="generate", disable=not progress)):
        img = _u8(de.generate(scene.caption, seed=seed * 1000 + i, steps=steps, guidance=guidance))
        cls = judge.classify(img)
        counts = np.bincount(cls.ravel(), minlength=len(judge.PALETTE_NAMES))
        bg_names = list(world.BACKGROUND_COLOURS)
        bg_counts = [counts[judge.PALETTE_NAMES.index(b)] for b in bg_names]
        bg = bg_names[int(np.argmax(bg_counts))] == scene.background
        obj = all(counts[judge.PALETTE_NAMES.index(o.colour)] >= 20 for o in scene.objects)
        ok_bg, ok_obj, ok_all = ok_bg + bg, ok_obj + obj, ok_all + (bg and obj)
    return {"n": n, "seed": seed, "background": ok_bg / n, "objects": ok_obj / n, "follows": ok_all / n}


@torch.no_grad()
def vae_reconstruction_psnr(de, n: int = 64, seed: int = world.EVAL_SEED) -> float:
    """Mean PSNR of plain VAE encode -> decode over n held-out scenes (whole image)."""
    vals = []
    for scene in world.scenes(n, seed):
        src = scene.render()
        x = to_tensor(Image.fromarray(src), de.multiple, de.device, de.dtype)
        vals.append(metrics.psnr(_u8(_to_pil(de, de.encode_image(x), (src.shape[1], src.shape[0]))), src))
    return float(np.mean(vals))
