"""The grid: its points (``Setting``), their row keys, and the UNet cost of a grid shared or run as separate edits."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..settings import METHOD_TABLE

GRID_KNOBS = ("method", "ratio", "threshold", "n", "strength", "reference", "dilate")  # a row's setting, in its key
METRICS = ("iou", "iou_footprint", "mask_area", "bg_psnr", "bg_ssim", "target_psnr", "success", "psnr", "ssim", "lpips", "clip_score")


def ordered(values) -> list:
    """The distinct values in their first order."""
    return list(dict.fromkeys(values))


@dataclass(frozen=True)
class Setting:
    """One grid point. Knobs a method does not use are None (SDEdit / Encode-Decode: no mask); a masked method's
    ``dilate`` None means 0 (the paper's mask)."""
    method: str
    ratio: float
    reference: str
    threshold: float | None = None
    n: int | None = None
    strength: float | None = None
    dilate: int | None = None

    def __post_init__(self):
        if METHOD_TABLE[self.method].masked and self.dilate is None:
            object.__setattr__(self, "dilate", 0)

    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in GRID_KNOBS}


def grid(ratios, thresholds, ns, strengths, references, methods, dilates=(0,)) -> list[Setting]:
    out = []
    for method in methods:
        for ratio in ratios:
            for ref in references:
                if METHOD_TABLE[method].masked:
                    out += [Setting(method, ratio, ref, t, n, s, c)
                            for s in strengths for n in ns for t in thresholds for c in dilates]
                else:
                    out.append(Setting(method, ratio, ref))
    return out


def row_key(row: dict) -> str:
    """Rows are keyed by image id + setting (JSON numbers round-trip, so a resumed key matches). A row written
    before ``dilate`` existed has none: it was made with the paper's mask, dilate 0 (``upgrade``)."""
    return json.dumps([row["image"], *(upgrade(row)[k] for k in GRID_KNOBS)])


def upgrade(row: dict) -> dict:
    """A row of an older sweep, with the grid knobs added since (dilate: 0 for DiffEdit, else None)."""
    if "dilate" in row:
        return row
    return {**row, "dilate": 0 if row.get("method") == "diffedit" else None}


def setting_key(image_id: str, s: Setting) -> str:
    return row_key({"image": image_id, **s.knobs()})


def _k(ratio: float, steps: int) -> int:
    from ..denoiser import encoding_steps
    return encoding_steps(ratio, steps)


def _cfg_rows(guidance: float) -> int:
    return 1 if guidance == 1.0 else 2  # Denoiser.guided evaluates only the conditional half at scale 1


def separate_cost(settings, steps: int, guidance: float) -> int:
    """UNet sample evaluations of one image's settings run as separate ``DiffEdit.edit`` calls: k for the
    encoding (methods that start from it), 2n for the mask (masked methods), g k for the decoding,
    with k = round(r * steps) and g = 2 (classifier-free guidance; 1 at guidance 1)."""
    g, total = _cfg_rows(guidance), 0
    for s in settings:
        m, k = METHOD_TABLE[s.method], _k(s.ratio, steps)
        total += (k if m.start == "encoding" else 0) + (2 * (s.n or 0) if m.masked else 0) + g * k
    return total


def shared_cost(settings, steps: int, guidance: float) -> int:
    """UNet sample evaluations ``edit_grid`` runs for one image's settings: one encoding to the largest
    ratio; per strength, n_max x (1 + number of references) mask rows; one decoding of g k rows per
    setting. (Assumes the query differs from every reference text; where it equals one, its D is 0 and those
    rows are skipped, as in ``masking.noise_difference_maps``.)"""
    g, total = _cfg_rows(guidance), 0
    traj = [s for s in settings if METHOD_TABLE[s.method].start == "encoding"]
    if traj:
        total += _k(max(s.ratio for s in traj), steps)
    masked = [s for s in settings if METHOD_TABLE[s.method].masked]
    for strength in {s.strength for s in masked}:
        group = [s for s in masked if s.strength == strength]
        total += max(s.n for s in group) * (1 + len({s.reference for s in group}))
    return total + sum(g * _k(s.ratio, steps) for s in settings)
