"""Measure DiffEdit, SDEdit, Encode-Decode and masked SDEdit on held-out toy-world edits with ground truth.

Masked SDEdit is DiffEdit's mask with SDEdit's fresh noise in place of the DDIM encoding: beside DiffEdit it tests
the paper's second claim, that the encoding works with the mask better than noise does.

The edits and their metrics are the sweep's (``sweep.edit_grid`` at one ratio, the paper's other knobs, and
``sweep.rows_for``): mask IoU with the two ground truths, the changed pixels (``iou``) and the edited object's
footprint (``iou_footprint``), background PSNR / SSIM outside the changed pixels, PSNR to the ground-truth target
render, edit success (toy/judge.py). The reference text R is the source caption (the paper uses captions where it
has them); ``reference="empty"`` uses "". Measured here only: the ceilings of any latent editing method (the VAE's
background PSNR, the best IoU a latent-cell mask reaches: ``judge.latent_iou_ceiling``) and caption following of
plain generation, colours and shapes. Every function draws from the toy world ``spec`` (default V1).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import metrics
from .images import to_pil, to_tensor
from .settings import METHOD_TABLE, REFERENCES, EditSettings, UsageError
from .sweep import METRICS, Setting, edit_grid, rows_for, toy_items
from .toy import judge, world

# method name -> its key in the results (the JSON files written since the first evaluation spell "-" as "_")
KEYS = {m: m.replace("-", "_") for m in METHOD_TABLE}
METHODS = tuple(KEYS.values())


def _u8(pil) -> np.ndarray:
    return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def evaluate(de, n: int = 40, seed: int = world.EVAL_SEED, ratio: float = 0.7, steps: int = 50,
             reference: str = "caption", guidance: float = 7.5, progress: bool = True,
             spec: world.WorldSpec = world.V1) -> dict:
    """Run the four methods on ``n`` edits drawn at ``seed`` (never the training seed); the mean metrics."""
    rows = edit_rows(de, n, seed, range(n), ratio, steps, reference, guidance, progress, spec)
    return summarize(rows, n=n, seed=seed, ratio=ratio, steps=steps, reference=reference, world=spec.name)


def edit_rows(de, n: int, seed: int, indices, ratio: float = 0.7, steps: int = 50, reference: str = "caption",
              guidance: float = 7.5, progress: bool = True, spec: world.WorldSpec = world.V1) -> list[dict]:
    """Per-edit metrics for the edits ``indices`` of the ``n`` drawn at ``seed`` (so workers can split them)."""
    if seed == world.TRAIN_SEED:
        raise UsageError(f"seed {seed} is the training seed; evaluate on held-out scenes (e.g. {world.EVAL_SEED})")
    if reference not in REFERENCES:
        raise UsageError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    s = EditSettings(ratio=ratio, steps=steps, guidance=guidance)
    mask = (s.threshold, s.n, s.strength)  # one mask for both masked methods
    points = [Setting("diffedit", s.ratio, reference, *mask), Setting("sdedit", s.ratio, reference),
              Setting("encode-decode", s.ratio, reference), Setting("masked-sdedit", s.ratio, reference, *mask)]
    items = toy_items(n, seed, spec.size, spec)
    factor = de.cfg.vae.downsampling
    rows = []
    for i in tqdm(list(indices), desc="evaluate", disable=not progress):
        item, image = items[i], items[i].load()
        outputs = edit_grid(de, image, item.source, item.target, points, s.steps, s.guidance, seed * 1000 + i,
                            normalization=s.mask_normalization)
        changed, footprint = item.edit.mask(), item.edit.footprint()
        row = {"index": i, "kind": item.edit.kind,
               "vae_bg_psnr": metrics.psnr(_reconstruct(de, image), _u8(image), mask=~changed),
               "ceiling": {"iou": judge.latent_iou_ceiling(changed, factor),
                           "iou_footprint": judge.latent_iou_ceiling(footprint, factor)}}
        for out, r in zip(outputs, rows_for(item, image, outputs, seed * 1000 + i)):
            row[KEYS[out.setting.method]] = {k: r[k] for k in METRICS if k in r}
        rows.append(row)
    return rows


def summarize(rows: list[dict], **info) -> dict:
    """Means per method, overall and per kind of edit; the ceilings (the VAE's background PSNR and the latent IoU
    ceilings), overall ("all") and per kind."""
    kinds = {"all": rows, **{k: [r for r in rows if r["kind"] == k] for k in world.EDIT_KINDS}}
    summary = {m: _mean([r[m] for r in rows]) for m in METHODS}
    summary.update(info, vae_bg_psnr=float(np.mean([r["vae_bg_psnr"] for r in rows])),
                   by_kind={m: {k: _mean([r[m] for r in kinds[k]]) for k in world.EDIT_KINDS} for m in METHODS},
                   ceiling={k: _mean([{**r["ceiling"], "vae_bg_psnr": r["vae_bg_psnr"]} for r in rs])
                            for k, rs in kinds.items()})
    return summary


def table(summary: dict) -> str:
    """The per-kind markdown table of a ``summarize`` result: success, background PSNR and DiffEdit's mask IoU
    against the changed pixels and the footprint, beside their ceilings."""
    def cell(d, *keys, fmt="{:.2f}"):
        return " / ".join("-" if d.get(k) is None else fmt.format(d[k]) for k in keys)

    lines = [f"| kind (count) | {METHOD_TABLE['diffedit'].label} IoU changed / footprint | "
             "ceiling IoU changed / footprint | "
             + " | ".join(f"{METHOD_TABLE[m].label} success / bg PSNR" for m in KEYS) + " | VAE bg PSNR |",
             "| --- | --- | --- |" + " --- |" * len(METHODS) + " --- |"]
    for kind in (*world.EDIT_KINDS, "all"):
        by = {m: summary[m] if kind == "all" else summary["by_kind"][m][kind] for m in METHODS}
        ceiling = summary["ceiling"][kind]
        lines.append(f"| {kind} ({ceiling['count']}) | {cell(by['diffedit'], 'iou', 'iou_footprint')} | "
                     f"{cell(ceiling, 'iou', 'iou_footprint')} | "
                     + " | ".join(f"{cell(by[m], 'success')} / {cell(by[m], 'bg_psnr', fmt='{:.1f}')}" for m in METHODS)
                     + f" | {cell(ceiling, 'vae_bg_psnr', fmt='{:.1f}')} |")
    return "\n".join(lines)


@torch.no_grad()
def _reconstruct(de, image) -> np.ndarray:
    """The image through the VAE alone (encode, decode): what any latent edit can keep at best."""
    x0 = de.encode_image(to_tensor(image, de.multiple, de.device, de.dtype))
    return _u8(to_pil(de.decode_latents(x0)[0], image.size))


def _mean(rows: list[dict]) -> dict:
    keys = list(rows[0]) if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {"count": len(rows)}


def caption_following(de, n: int = 50, seed: int = world.EVAL_SEED, steps: int = 50, guidance: float = 7.5,
                      progress: bool = True, indices=None, spec: world.WorldSpec = world.V1) -> list[dict]:
    """Generate from held-out captions; per sample whether the dominant background-palette colour is the captioned
    background, whether every captioned object colour covers >= 20 pixels ("objects", also "colour"), whether each
    object's pixels have its captioned shape (``shape_of``; "shape"), both ("both"), and "follows": background
    and colours."""
    scenes = world.scenes(n, seed, spec=spec)
    rows = []
    for i in tqdm(list(range(n) if indices is None else indices), desc="generate", disable=not progress):
        scene = scenes[i]
        img = _u8(de.generate(scene.caption, seed=seed * 1000 + i, steps=steps, guidance=guidance))
        counts = np.bincount(judge.classify(img).ravel(), minlength=len(judge.PALETTE_NAMES))
        bg_names = list(world.BACKGROUND_COLOURS)
        bg = bg_names[int(np.argmax([counts[judge.PALETTE_NAMES.index(b)] for b in bg_names]))] == scene.background
        colour = [counts[judge.PALETTE_NAMES.index(o.colour)] >= 20 for o in scene.objects]
        shape = [c and shape_of(img, o.colour, scene.background) == o.shape for c, o in zip(colour, scene.objects)]
        rows.append({"index": i, "background": float(bg), "objects": float(all(colour)),
                     "follows": float(bg and all(colour)), "colour": float(all(colour)), "shape": float(all(shape)),
                     "both": float(all(colour) and all(shape))})
    return rows


def shape_of(img: np.ndarray, colour: str, background: str) -> str | None:
    """The shape (world.SHAPES) whose outline best fits (IoU) the pixels of ``colour`` in ``img`` (uint8 (H, W, 3)),
    None without any: of each shape, templates of those pixels' area, radius +-2 px, centred +-1 px off their centroid.
    Every shape's centroid is its bounding circle's centre (the triangle is equilateral)."""
    got = judge.target_colour_mask(img, colour, background)
    if not got.any():
        return None
    ys, xs = np.nonzero(got)
    cy, cx, size = int(round(ys.mean())), int(round(xs.mean())), img.shape[0]
    best = (-1.0, None)
    for shape, area in (("circle", np.pi), ("square", 2.0), ("triangle", 3 * np.sqrt(3) / 4)):  # per r^2
        r0 = int(round(np.sqrt(len(ys) / area)))
        for r in range(max(1, r0 - 2), r0 + 3):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    template = world.Obj(shape, colour, cx + dx, cy + dy, r).mask(size)
                    best = max(best, (metrics.iou(template, got), shape))
    return best[1]


def vae_reconstruction_psnr(de, n: int = 64, seed: int = world.EVAL_SEED, spec: world.WorldSpec = world.V1) -> float:
    """Mean PSNR of plain VAE encode -> decode over n held-out scenes (whole image)."""
    return float(np.mean([metrics.psnr(_reconstruct(de, Image.fromarray(src)), src)
                          for src in (scene.render() for scene in world.scenes(n, seed, spec=spec))]))
