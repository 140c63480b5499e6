"""What a PIE-Bench sweep writes besides the sweep's own report: ``piebench.csv`` (one row per image and setting),
the means per setting overall and per category (``piebench_summary.csv`` and ``piebench.md``), the paired
comparisons (``piebench_paired.csv``) and the trade-off figures (``plots/piebench_*.png``).

Paired per image, each with the mean difference, a bootstrap 95 % interval of it and the sign count: DiffEdit
against masked SDEdit under the same mask (the encoding against fresh noise: the paper's claim), and DiffEdit with
its own mask against DiffEdit decoded with the annotated one (the oracle mask, which separates the mask's error
from the decoding's). The markdown scales the metrics as PIE-Bench's tables do (``SCALE``).
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..plots import MASK_KNOBS, closest
from ..settings import METHOD_TABLE
from ..sweep.plan import GRID_KNOBS
from ..sweep.results import group_means
from .data import CATEGORIES, category_name
from .metrics import METRICS
from .score import ROW_FIELDS, setting_dir

COLUMNS = (*METRICS, "mask_iou")
# PIE-Bench's tables: structure distance x 10^3, LPIPS x 10^3, MSE x 10^4, SSIM x 10^2
SCALE = {"structure_distance": 1e3, "lpips_unedit_part": 1e3, "mse_unedit_part": 1e4, "ssim_unedit_part": 1e2}
HIGHER = {"psnr_unedit_part", "ssim_unedit_part", "clip_similarity_source_image", "clip_similarity_target_image",
          "clip_similarity_target_image_edit_part", "mask_iou"}  # the rest: lower is better
RESAMPLES = 2000


def _cell(v) -> str:
    return "" if v is None else (f"{v:.8g}" if isinstance(v, float) else str(v))


def _write_csv(path: Path, cols, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([[_cell(r.get(c)) for c in cols] for r in rows])


def summaries(rows: list[dict]) -> list[dict]:
    """Per setting, overall (category "all") then per category: the row count and the mean of every metric."""
    out = group_means(rows, GRID_KNOBS, COLUMNS)
    for r in out:
        r["category"] = "all"
    for kind in sorted({r["editing_type_id"] for r in rows}):
        part = group_means([r for r in rows if r["editing_type_id"] == kind], GRID_KNOBS, COLUMNS)
        out += [{**r, "category": kind} for r in part]
    return out


def _rep(rows, method: str) -> dict:
    """A masked method's estimated-mask knobs closest to the paper's (the settings figures and pairs fix)."""
    own = [r for r in rows if r["method"] == method and r.get("mask_source") != "annotated"]
    return {k: closest([r.get(k) for r in own], k) for k in MASK_KNOBS}


def pairs(rows: list[dict]) -> list[tuple[str, dict, dict]]:
    """(what is compared, knobs of a, knobs of b) of the settings the rows hold: DiffEdit against masked SDEdit with
    the same mask and ratio, and DiffEdit's estimated mask (the knobs closest to the paper's) against the annotated
    one at each ratio."""
    settings = {setting_dir(r): {k: r.get(k) for k in GRID_KNOBS} for r in rows}
    found, rep = [], _rep(rows, "diffedit")
    for knobs in settings.values():
        if knobs["method"] != "diffedit":
            continue
        other = setting_dir({**knobs, "method": "masked-sdedit"})
        if other in settings:
            found.append(("diffedit - masked-sdedit (same mask)", knobs, settings[other]))
        if knobs["mask_source"] == "annotated":
            est = {**knobs, **rep, "mask_source": "estimated"}
            if setting_dir(est) in settings:
                found.append(("diffedit estimated - annotated mask (oracle)", settings[setting_dir(est)], knobs))
    return found


def paired(rows: list[dict], seed: int = 0) -> list[dict]:
    """Every pair of ``pairs``, overall and per category, per metric both settings have: images, mean of a - b,
    a bootstrap 95 % interval of that mean, how many images a is above / below b."""
    import numpy as np
    by = {(setting_dir(r), r["image"]): r for r in rows}
    out = []
    for what, a, b in pairs(rows):
        da, db = setting_dir(a), setting_dir(b)
        images = [i for (d, i) in by if d == da and (db, i) in by]
        for kind in ["all", *sorted({by[(da, i)]["editing_type_id"] for i in images})]:
            part = [i for i in images if kind == "all" or by[(da, i)]["editing_type_id"] == kind]
            for m in COLUMNS:
                if m == "mask_iou" and "same mask" in what:  # equal by construction
                    continue
                ab = [(by[(da, i)].get(m), by[(db, i)].get(m)) for i in part]
                d = np.array([x - y for x, y in ab if x is not None and y is not None], dtype=float)
                d = d[np.isfinite(d)]
                if not len(d):
                    continue
                boot = np.random.default_rng(seed).choice(d, (RESAMPLES, len(d))).mean(axis=1)
                out.append({"comparison": what, "a": da, "b": db, "category": kind, "metric": m, "images": len(d),
                            "mean_a_minus_b": float(d.mean()), "ci95_low": float(np.quantile(boot, 0.025)),
                            "ci95_high": float(np.quantile(boot, 0.975)), "a_above": int((d > 0).sum()),
                            "a_below": int((d < 0).sum()), "higher_is_better": m in HIGHER})
    return out


def _md_table(summary: list[dict], cols) -> list[str]:
    head = ["setting", "images", *(f"{c} x{SCALE[c]:g}" if c in SCALE else c for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        vals = [("" if r.get(c) is None else f"{r[c] * SCALE.get(c, 1):.4g}") for c in cols]
        lines.append("| " + " | ".join([setting_dir(r), str(r["count"]), *vals]) + " |")
    return lines


def write_markdown(path: Path, summary, comparisons, note: str):
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in summary)]
    lines = ["# PIE-Bench", "", note, "", "Means per setting; mask_iou: the mask used against the annotated one "
             "(the annotated mask's own row: the latent grid's ceiling).", ""]
    for kind in ["all", *sorted({r["category"] for r in summary} - {"all"})]:
        title = "All images" if kind == "all" else f"Category {kind}: {category_name(kind)}"
        lines += [f"## {title}", "", *_md_table([r for r in summary if r["category"] == kind], cols), ""]
    lines += ["## Paired per image (a - b; bootstrap 95 % interval; images where a is above / below b)", ""]
    if not comparisons:
        lines.append("No pair in this grid (add --method masked-sdedit or --mask-source annotated beside diffedit).")
    else:
        lines += ["| comparison | a | b | category | metric | images | mean a - b | 95 % CI | a above / below |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['comparison']} | {c['a']} | {c['b']} | {c['category']} | {c['metric']} | {c['images']} | "
                  f"{c['mean_a_minus_b']:.4g} | [{c['ci95_low']:.4g}, {c['ci95_high']:.4g}] | "
                  f"{c['a_above']} / {c['a_below']} |" for c in comparisons]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _curves(summary: list[dict], rep: dict, method: str, mask_source) -> list[dict]:
    """The summary rows of one curve: a method (and mask source) over the ratios, the mask knobs fixed at ``rep``."""
    pts = [r for r in summary if r["method"] == method and r.get("mask_source") == mask_source]
    if mask_source == "estimated":
        pts = [r for r in pts if all(r.get(k) == rep[method][k] for k in MASK_KNOBS)]
    refs = sorted({r["reference"] for r in pts})
    pts = [r for r in pts if r["reference"] == ("caption" if "caption" in refs else refs[0])] if refs else []
    return sorted(pts, key=lambda r: r["ratio"])


def tradeoff(summary: list[dict], path: Path, x: str, y: str):
    """One panel per category (all images first), one curve per method (the masked ones per mask source) over the
    ratios, ``y`` against ``x``; None when no row has both."""
    if not any(r.get(x) is not None and r.get(y) is not None for r in summary):
        return None
    from ..plots import _pyplot, _save
    plt = _pyplot()
    kinds = ["all", *sorted({r["category"] for r in summary} - {"all"})]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds) + 1.5, 3.6), squeeze=False)
    rep = {m: _rep(summary, m) for m in METHOD_TABLE}
    names = {"ratio": "encoding ratio r", "psnr_unedit_part": "background PSNR (dB)",
             "lpips_unedit_part": "background LPIPS", "clip_similarity_target_image": "CLIP similarity, target"}
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in summary if r["category"] == kind]
        for method, t in METHOD_TABLE.items():
            for source in (("estimated", "annotated") if t.masked else (None,)):
                pts = [r for r in _curves(rows, rep, method, source) if r.get(x) is not None and r.get(y) is not None]
                if pts:
                    label = t.label + (" (annotated mask)" if source == "annotated" else "")
                    ax.plot([r[x] for r in pts], [r[y] for r in pts], "o-" if source != "annotated" else "s--",
                            label=label)
        ax.set_title("all images" if kind == "all" else f"{kind}: {category_name(kind)}", fontsize=9)
        ax.set_xlabel(names.get(x, x), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(names.get(y, y), fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def finalize(out: Path, rows: list[dict], missing: list[str] | None = None) -> dict:
    """Write piebench.csv, the summaries, the paired comparisons and the figures from a sweep's rows (those of
    PIE-Bench images); returns {name: path}. ``missing``: the metric networks absent, for the note."""
    rows = [r for r in rows if "file_id" in r]
    if not rows:
        return {}
    _write_csv(out / "piebench.csv", (*ROW_FIELDS, *GRID_KNOBS, *COLUMNS), rows)
    summary = summaries(rows)
    _write_csv(out / "piebench_summary.csv", ("category", "category_name", *GRID_KNOBS, "count", *COLUMNS),
               [{**r, "category_name": category_name(r["category"]) if r["category"] in CATEGORIES else "all"}
                for r in summary])
    comparisons = paired(rows)
    _write_csv(out / "piebench_paired.csv", ("comparison", "a", "b", "category", "metric", "images", "mean_a_minus_b",
                                             "ci95_low", "ci95_high", "a_above", "a_below", "higher_is_better"),
               comparisons)
    absent = [m for m in COLUMNS if not any(r.get(m) is not None for r in rows)]
    note = ("Metrics not computed (no local weights for " + ", ".join(missing or ["their networks"]) + "): "
            + ", ".join(absent) + "." if absent else "Every metric computed.")
    write_markdown(out / "piebench.md", summary, comparisons, note)
    written = {"piebench.csv": out / "piebench.csv", "piebench_summary.csv": out / "piebench_summary.csv",
               "piebench_paired.csv": out / "piebench_paired.csv", "piebench.md": out / "piebench.md"}
    x = "lpips_unedit_part" if any(r.get("lpips_unedit_part") is not None for r in rows) else "psnr_unedit_part"
    figures = (("piebench_tradeoff", x, "clip_similarity_target_image"),
               ("piebench_background_vs_ratio", "ratio", "psnr_unedit_part"))
    try:
        for name, fx, fy in figures:
            if (p := tradeoff(summary, out / "plots" / f"{name}.png", fx, fy)) is not None:
                written[name] = p
    except ImportError as e:  # matplotlib absent: the tables stand alone
        written["plots"] = str(e)
    return written
