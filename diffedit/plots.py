"""Figures of a ``diffedit sweep``: the edit / preservation trade-off, mask quality against the threshold and
against n, and an example of the difference map D and the mask over an image.

Every function takes the summary rows of a sweep (dicts: the knobs ``method``, ``ratio``, ``threshold``, ``n``,
``strength``, ``reference``, optionally ``dilate``, and the mean metrics, as ``sweep.summarize`` returns them) and
an output path, and returns the path written, or None when the rows hold nothing to plot. matplotlib (the
``plots`` extra) is imported inside the functions, with the Agg backend, so importing this module costs nothing.
"""
from __future__ import annotations

from pathlib import Path

from .settings import KNOBS, METHOD_TABLE

# The paper's defaults (Sec. 4): when a figure must fix a knob it takes the grid value closest to these.
PAPER = {**{k: KNOBS[k].default for k in ("ratio", "threshold", "n", "strength", "dilate")}, "reference": "caption"}
MASK_KNOBS = ("threshold", "n", "strength", "dilate")  # the masked methods' own knobs (dilate: not in the paper)
MISSING = "plots need matplotlib: pip install 'diffedit[plots]' (or pip install matplotlib)"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MISSING) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def closest(values, knob: str):
    """The value among ``values`` closest to the paper's default for ``knob`` (the reference: "caption" if
    present). Ties go to the larger value (more noises, a higher ratio)."""
    values = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
    if not values:
        return None
    want = PAPER[knob]
    if isinstance(want, str):
        return want if want in values else values[0]
    return min(values, key=lambda v: (abs(v - want), -v))


def representative(rows, method: str = "diffedit") -> dict:
    """For ``method``'s rows: the knob values closest to the paper's, one per knob (None if not varied)."""
    rows = [r for r in rows if r["method"] == method]
    return {k: closest([r.get(k) for r in rows], k) for k in PAPER}


def mask_method(rows) -> str:
    """The method whose rows show the mask: the first masked one the rows hold (DiffEdit when present; every masked
    method of a grid has the same mask knobs)."""
    held = {r["method"] for r in rows}
    return next((m for m, t in METHOD_TABLE.items() if t.masked and m in held), "diffedit")


def _has(rows, key) -> bool:
    return any(r.get(key) is not None for r in rows)


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def tradeoff(rows, path, x: str | None = None, y: str | None = None):
    """Edit quality against distance to the input, one curve per method (and reference text), one point per
    encoding ratio r (labelled). The mask's knobs are fixed at the grid values closest to the paper's.

    x defaults to 1 - bg SSIM (outside the ground-truth mask, toy world), else LPIPS to the input (the paper's
    axis, when computed), else 1 - SSIM to the input; y to the edit success rate (toy judge), else the CLIP score
    with the target (the paper's), else PSNR to the ground-truth target. Without any edit-quality metric (a
    prompts file, no CLIP weights) there is nothing to plot: returns None."""
    x = x or next(k for k in ("bg_ssim", "lpips", "ssim") if _has(rows, k) or k == "ssim")
    y = y or next((k for k in ("success", "clip_score", "target_psnr") if _has(rows, k)), None)
    if y is None or not _has(rows, x):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    dist = (lambda v: 1 - v) if x.endswith("ssim") else (lambda v: v)
    refs = sorted({r["reference"] for r in rows})
    shown = mask_method(rows)
    rep = representative(rows, shown)
    for method, kind in METHOD_TABLE.items():
        for ref in refs:
            pts = [r for r in rows if r["method"] == method and r["reference"] == ref]
            if kind.masked:
                pts = [r for r in pts if all(r.get(k) == rep[k] for k in MASK_KNOBS)]
            pts = sorted((r for r in pts if r.get(x) is not None and r.get(y) is not None), key=lambda r: r["ratio"])
            if not pts:
                continue
            label = kind.label + (f" (R = {ref})" if len(refs) > 1 else "")
            xs, ys = [dist(r[x]) for r in pts], [r[y] for r in pts]
            line, = ax.plot(xs, ys, "o-", label=label)
            for r, px, py in zip(pts, xs, ys):
                ax.annotate(f"r={r['ratio']:g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
    names = {"bg_ssim": "1 - SSIM to the input outside the edit (ground-truth mask)",
             "ssim": "1 - SSIM to the input", "bg_psnr": "PSNR to the input outside the edit (dB)",
             "psnr": "PSNR to the input (dB)", "success": "edit success rate (toy judge)",
             "target_psnr": "PSNR to the ground-truth target (dB)", "lpips": "LPIPS to the input",
             "clip_score": "CLIP score with the target text"}
    ax.set_xlabel(names.get(x, x))
    ax.set_ylabel(names.get(y, y))
    if rep["n"] is not None:
        grown = f", mask grown by {rep['dilate']} cells" if rep["dilate"] else ""
        ax.set_title(f"{METHOD_TABLE[shown].label} at threshold {rep['threshold']:g}, n {rep['n']}, "
                     f"strength {rep['strength']:g}{grown}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def _mask_metric(rows):
    return "iou" if _has(rows, "iou") else "mask_area"


_AXIS = {"threshold": "threshold", "n": "n (noises averaged into D)", "strength": "noise strength of the mask pass"}


def _mask_curves(rows, path, x_knob: str, line_knob: str):
    method = mask_method(rows)
    rows = [r for r in rows if r["method"] == method and r.get("mask_source") != "annotated"]  # own masks only
    if len({r[x_knob] for r in rows}) < 2:  # no curve to draw along a knob the grid did not vary
        return None
    metric = _mask_metric(rows)
    rep = representative(rows, method)
    # Every other knob at the grid value closest to the paper's (the mask does not depend on r: one ratio's rows).
    fixed = [k for k in ("ratio", *MASK_KNOBS, "reference") if k not in (x_knob, line_knob)]
    rows = [r for r in rows if all(r.get(k) == rep[k] for k in fixed) and r.get(metric) is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v in sorted({r[line_knob] for r in rows}):
        pts = sorted((r for r in rows if r[line_knob] == v), key=lambda r: r[x_knob])
        ax.plot([r[x_knob] for r in pts], [r[metric] for r in pts], "o-", label=f"{line_knob} = {v}")
    ax.set_xlabel(_AXIS[x_knob])
    ax.set_ylabel("mask IoU with the ground truth" if metric == "iou" else "mask area (fraction of the image)")
    if x_knob == "n":
        ax.set_xscale("log")
        ns = sorted({r["n"] for r in rows})
        ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_title(", ".join(f"{k} {rep[k]}" for k in fixed if k != "ratio" and rep[k] is not None), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def mask_vs_threshold(rows, path):
    """The mask's IoU with the ground truth (toy world; else the mask area) against the threshold,
    one line per n."""
    return _mask_curves(rows, path, "threshold", "n")


def mask_vs_n(rows, path):
    """The mask's IoU with the ground truth (toy world; else the mask area) against n, one line per
    threshold."""
    return _mask_curves(rows, path, "n", "threshold")


def mask_vs_strength(rows, path):
    """The mask's IoU with the ground truth (toy world; else the mask area) against the noise strength of the
    mask pass, one line per reference text R."""
    return _mask_curves(rows, path, "strength", "reference")


def example_figure(image, d_map, mask, path, title: str | None = None):
    """Three panels: the image, D as a heat map (latent resolution, upscaled), the mask over the image.

    image: PIL image; d_map: (h, w) array or tensor in [0, 1]; mask: (h, w) bool at any resolution."""
    import numpy as np
    plt = _pyplot()
    d_map = np.asarray(d_map.detach().cpu() if hasattr(d_map, "detach") else d_map, dtype=np.float64)
    mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask, dtype=bool)
    w, h = image.size
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # imshow's own extent for the image: the maps cover it exactly
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    im = axes[1].imshow(d_map, cmap="viridis", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    axes[1].set_title("D (rescaled difference map)", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(image)
    overlay = np.zeros((*mask.shape, 4))
    overlay[mask] = (1.0, 0.0, 0.0, 0.45)
    axes[2].imshow(overlay, extent=extent, interpolation="nearest")
    axes[2].set_title("mask M over the input", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
