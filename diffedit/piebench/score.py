"""One PIE-Bench image edited at a grid's settings: the image the model edits, the edits saved in PIE's layout and
the rows of ``piebench.csv``.

The model edits at its own resolution (the toy model 64 px, SD1 512, SDXL 1024): a 512 px image is resized to it
(area when shrinking) and each edit back to 512 px (nearest for an integer upscale, so the toy world's flat scenes
stay flat), where the official metrics compare it with the 512 px source under the annotated mask. Each edit is
saved as ``<out>/<setting>/annotation_images/<image_path>`` (the official evaluation script reads that layout);
the metrics are computed on the edit before it is saved, so a lossy format of the source (PIE-Bench's .jpg) does
not enter them.
"""
from __future__ import annotations

from pathlib import Path

from .data import SIZE, category_name
from .metrics import METRICS, image_metrics

ROW_FIELDS = ("file_id", "editing_type_id")  # what a piebench.csv row has before the setting's knobs


def work_image(image, resolution: int):
    """``image`` (PIL, square) at the model's resolution."""
    from PIL import Image
    if image.size == (resolution, resolution):
        return image
    shrink = resolution < image.size[0]
    return image.resize((resolution, resolution), Image.BOX if shrink else Image.BICUBIC)


def to_pie_size(image):
    """An edit (PIL) at PIE's 512 x 512: nearest for an integer upscale, bicubic otherwise."""
    from PIL import Image
    w = image.size[0]
    if image.size == (SIZE, SIZE):
        return image
    nearest = w < SIZE and SIZE % w == 0 and image.size[1] == w
    return image.resize((SIZE, SIZE), Image.NEAREST if nearest else Image.BICUBIC)


def setting_dir(knobs: dict) -> str:
    """The folder name of a setting's edits: method, ratio, then its mask's knobs (or "annotated"), then R."""
    parts = [knobs["method"], f"r{knobs['ratio']:g}"]
    if knobs.get("mask_source") == "annotated":
        parts.append("annotated")
    elif knobs.get("threshold") is not None:
        parts += [f"t{knobs['threshold']:g}", f"n{knobs['n']}", f"s{knobs['strength']:g}", f"d{knobs['dilate'] or 0}"]
    parts.append(f"R-{knobs['reference']}")
    return "_".join(parts)


def save_edit(out: Path, knobs: dict, image_path: str, edited):
    """The edit (uint8 (512, 512, 3)) at ``<out>/<setting>/annotation_images/<image_path>``."""
    from PIL import Image
    path = out / setting_dir(knobs) / "annotation_images" / image_path
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(edited).save(path, quality=95)  # quality: JPEG's only (PIE's sources are .jpg)
    return path


def rows(item, outputs, nets, seed: int, steps: int, guidance: float, out: Path) -> list[dict]:
    """One row per output (``sweep.grid.Output``) of a PIE-Bench item: the official metrics of the edit at 512 px
    against the source under the annotated mask, and ``mask_iou`` (the mask used, nearest-upsampled to 512 px,
    against the annotated one; the annotated mask's own row gives the latent grid's ceiling); the edit saved in PIE's
    layout. ``iou`` repeats ``mask_iou`` and ``mask_area`` is the mask's share of the image, the names the sweep's
    summary and mask plots read."""
    import numpy as np

    from .. import metrics
    entry = item.entry
    source = np.asarray(item.load().convert("RGB"), dtype=np.uint8)
    annotated = entry.mask()
    found = []
    for o in outputs:
        knobs = o.setting.knobs()
        edited = np.asarray(to_pie_size(o.image.convert("RGB")), dtype=np.uint8)
        save_edit(out, knobs, entry.image_path, edited)
        m = image_metrics(nets, source, edited, annotated.astype(np.uint8), entry.source, entry.target)
        row = {"image": item.id, "index": item.index, "file_id": entry.key, "editing_type_id": entry.editing_type_id,
               "kind": category_name(entry.editing_type_id), "image_path": entry.image_path, **knobs,
               "seed": seed, "steps": steps, "guidance": guidance, **{k: m.get(k) for k in METRICS}}
        if o.mask is not None:
            pred = o.mask.cpu().numpy().astype(bool)
            row["mask_iou"] = row["iou"] = metrics.iou(metrics.resize_mask(pred, annotated.shape), annotated)
            row["mask_area"] = float(pred.mean())
        found.append(row)
    return found
