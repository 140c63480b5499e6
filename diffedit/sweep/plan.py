"""The grid: its points (``Setting``), their row keys, the engine's requests of one image's points and their cost
(the engine's plan of them, together or one by one)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..settings import METHOD_TABLE, EditSettings

GRID_KNOBS = ("method", "ratio", "threshold", "n", "strength", "reference", "dilate", "mask_source")  # in a row's key
MASK_SOURCES = ("estimated", "annotated")  # a masked method's mask: its own step 1, or the image's annotation
METRICS = ("iou", "iou_footprint", "mask_area", "bg_psnr", "bg_ssim", "target_psnr", "success", "psnr", "ssim", "lpips",
           "clip_score")


def ordered(values) -> list:
    """The distinct values in their first order."""
    return list(dict.fromkeys(values))


@dataclass(frozen=True)
class Setting:
    """One grid point. Knobs a method does not use are None (SDEdit / Encode-Decode: no mask; a masked method with
    the annotated mask: no threshold, n, strength or dilate); a masked method's ``dilate`` None means 0 (the paper's
    mask) and its ``mask_source`` None means "estimated"."""
    method: str
    ratio: float
    reference: str
    threshold: float | None = None
    n: int | None = None
    strength: float | None = None
    dilate: int | None = None
    mask_source: str | None = None

    def __post_init__(self):
        if METHOD_TABLE[self.method].masked and self.mask_source is None:
            object.__setattr__(self, "mask_source", "estimated")
        if self.mask_source == "estimated" and self.dilate is None:
            object.__setattr__(self, "dilate", 0)

    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in GRID_KNOBS}


def grid(ratios, thresholds, ns, strengths, references, methods, dilates=(0,),
         mask_sources=("estimated",)) -> list[Setting]:
    out = []
    for method in methods:
        for ratio in ratios:
            for ref in references:
                if METHOD_TABLE[method].masked:
                    if "estimated" in mask_sources:
                        out += [Setting(method, ratio, ref, t, n, s, c)
                                for s in strengths for n in ns for t in thresholds for c in dilates]
                    if "annotated" in mask_sources:
                        out.append(Setting(method, ratio, ref, mask_source="annotated"))
                else:
                    out.append(Setting(method, ratio, ref))
    return out


def row_key(row: dict) -> str:
    """Rows are keyed by image id + setting (JSON numbers round-trip, so a resumed key matches). A row written
    before ``dilate`` existed has none: it was made with the paper's mask, dilate 0 (``upgrade``)."""
    return json.dumps([row["image"], *(upgrade(row)[k] for k in GRID_KNOBS)])


def upgrade(row: dict) -> dict:
    """A row of an older sweep, with the grid knobs added since (a masked method's: dilate 0, its own mask; None
    for the others)."""
    if "dilate" in row and "mask_source" in row:
        return row
    masked = METHOD_TABLE[row["method"]].masked
    return {"dilate": 0 if masked else None, "mask_source": "estimated" if masked else None, **row}


def setting_key(image_id: str, s: Setting) -> str:
    return row_key({"image": image_id, **s.knobs()})


def edit_settings(s: Setting, steps: int, guidance: float, seed: int, normalization: str) -> EditSettings:
    """The API's settings of a grid point (the knobs a method does not use at their defaults)."""
    mask = {k: getattr(s, k) for k in ("threshold", "n", "strength", "dilate") if getattr(s, k) is not None}
    return EditSettings(method=s.method, ratio=s.ratio, steps=steps, guidance=guidance, seed=seed,
                        normalization=normalization, **mask)


def requests(settings, target: str, source: str, steps: int, guidance: float, seed: int = 0,
             normalization: str = "quantile", mask=None) -> list:
    """The engine's requests (``diffedit.plan.Request``, all on image 0) of one image's grid points: reference
    "caption" is ``source``, "empty" is ""; ``mask`` (bool (h, w) at latent size) is the annotated mask of the
    points whose mask_source is "annotated"."""
    from ..plan import Request
    if mask is None and any(s.mask_source == "annotated" for s in settings):
        raise ValueError("settings with the annotated mask need the image's mask")
    return [Request(0, target, "" if s.reference == "empty" else source,
                    edit_settings(s, steps, guidance, seed, normalization),
                    mask if s.mask_source == "annotated" else None) for s in settings]


def shared_cost(settings, steps: int, guidance: float, target: str, source: str, guided_rows=None):
    """The ``plan.Cost`` (model rows per phase, VAE encodes and decodes) of one image's settings run together, as
    ``grid.edit_grid`` runs them: one plan over all of its requests. ``guided_rows(scale)``: the model's rows per
    guided sample (None: classifier-free guidance's two)."""
    return _cost(requests(settings, target, source, steps, guidance, mask=_given_mask()), guided_rows)


def separate_cost(settings, steps: int, guidance: float, target: str, source: str, guided_rows=None):
    """The ``plan.Cost`` of the same settings run as separate ``DiffEdit.edit`` calls: one plan per setting."""
    from ..plan import Cost
    return sum((_cost(requests([s], target, source, steps, guidance, mask=_given_mask()), guided_rows)
                for s in settings), Cost())


def _given_mask():
    """A stand-in for an annotated mask: planning reads only whether a mask is given."""
    import torch
    return torch.zeros(0, dtype=torch.bool)


def _cost(reqs: list, guided_rows=None):
    """The cost of the engine's plan of ``reqs`` on one image; planning runs no model, and the plan groups by latent
    shape only, which one image's requests share."""
    from ..plan import Input, plan_edits, resolved
    rule = {} if guided_rows is None else {"guided_rows": guided_rows}
    return plan_edits([Input()], [resolved(r) for r in reqs], latent_shape=lambda inp: (), **rule).cost
