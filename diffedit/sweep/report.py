"""What a sweep writes besides its rows: summary.csv, cost.json, the table, example images, plots and index.html."""
from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

from ..plots import MASK_KNOBS, PAPER, closest
from ..settings import METHOD_TABLE
from .plan import GRID_KNOBS, METRICS, ordered, separate_cost, shared_cost
from .results import merge, summarize


def perceptual_note(lpips_weights, clip_weights) -> str:
    """What the report says about the metrics that need network weights the user must have locally."""
    metrics = (("LPIPS to the input", lpips_weights, "--lpips-weights, the torchvision AlexNet file"),
               ("CLIP score with the target", clip_weights, "--clip-weights and --clip-model, an open_clip checkpoint"))
    return "Perceptual metrics: " + "; ".join(
        f"{name} computed" if given else f"{name} not computed (pass {how}; none can be downloaded here)"
        for name, given, how in metrics)


def _columns(rows: list[dict]) -> list[str]:
    # mask_source shows once a row used the annotated mask: a grid without one reads as before it existed
    knobs = [k for k in GRID_KNOBS if k != "mask_source" or any(r.get(k) == "annotated" for r in rows)]
    return [*knobs, "count", *(m for m in METRICS if any(m in r for r in rows))]


def _fmt(v, escape=str) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else escape(str(v)))


def write_summary_csv(rows: list[dict], path: Path):
    cols = _columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})


def format_table(rows: list[dict]) -> str:
    cols = _columns(rows)
    cells = [cols] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _stem(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", image_id)


def example_knobs(settings) -> dict:
    """The knobs of the example images: the grid values closest to the paper's (DiffEdit's own for its mask)."""
    rep = {k: closest([getattr(s, k) for s in settings], k) for k in PAPER}
    masked = [s for s in settings if METHOD_TABLE[s.method].masked]
    return {**rep, **{k: closest([getattr(s, k) for s in masked], k) for k in MASK_KNOBS}}


def save_examples(out: Path, item, image, outputs, rep: dict):
    """Small PNGs of one image: input, ground truth (toy), D, mask, and the edit of every method per ratio
    at the knobs ``rep`` (``example_knobs``); D and M as .npy for the example figure."""
    import numpy as np

    from .. import images as imgs
    from ..viz import heatmap, overlay
    ex = out / "examples"
    ex.mkdir(exist_ok=True)
    stem = _stem(item.id)
    image.save(ex / f"{stem}_input.png")
    if item.edit is not None:
        from PIL import Image
        Image.fromarray(item.edit.target.render()).save(ex / f"{stem}_target.png")
    mask_saved = False
    for o in outputs:
        s = o.setting
        if s.reference != rep["reference"]:
            continue
        masked = METHOD_TABLE[s.method].masked
        if masked and any(getattr(s, k) != rep[k] for k in MASK_KNOBS):
            continue
        if masked and not mask_saved and o.map is not None:  # D and M depend on neither r nor the start: once
            heatmap(o.map.cpu(), image.size).save(ex / f"{stem}_map.png")
            np.save(ex / f"{stem}_map.npy", o.map.cpu().numpy())
            overlay(image, imgs.mask_to_pil(o.mask, image.size)).save(ex / f"{stem}_mask.png")
            np.save(ex / f"{stem}_mask.npy", o.mask.cpu().numpy())
            mask_saved = True
        o.image.save(ex / f"{stem}_{s.method}_r{s.ratio:g}.png")


def finalize(out: Path, cfg, stats, guided_rows=None, quiet: bool = False):
    """Merge the rows; write summary.csv, cost.json, the plots and index.html. ``stats``: model rows run, planned
    (the engine's plan), as separate edits, and rows computed, this run; ``guided_rows``: the model's rows per guided
    sample (``plan.shared_cost``)."""
    rows = merge(out)
    summary = summarize(rows)
    write_summary_csv(summary, out / "summary.csv")
    run, planned, separate, computed = stats
    shared_grid = [shared_cost(cfg.settings, cfg.steps, cfg.guidance, i.target, i.source, guided_rows)
                   for i in cfg.items]
    separate_grid = [separate_cost(cfg.settings, cfg.steps, cfg.guidance, i.target, i.source, guided_rows)
                     for i in cfg.items]
    cost = {"unet_evaluations_run": run, "shared_formula_this_run": planned, "separate_edits_this_run": separate,
            "rows_computed_this_run": computed, "rows_total": len(rows),
            "full_grid_shared": sum(c.rows for c in shared_grid),
            "full_grid_separate": sum(c.rows for c in separate_grid),
            "vae_encodes_per_image": {"shared": shared_grid[0].vae_encodes, "separate": separate_grid[0].vae_encodes}}
    (out / "cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    plots, plot_note = _plots(out, rows, summary, cfg.examples)
    pie = _piebench(out, cfg, rows)
    plots.update({k: v for k, v in pie.items() if k.startswith("piebench_") and Path(v).suffix == ".png"})
    write_html(out, cfg, rows, summary, cost, plots, plot_note)
    if not quiet:
        print(format_table(summary))
        saving = f" ({separate / run:.2f}x fewer)" if run else ""
        print(f"UNet sample evaluations this run: {run} (planned {planned}); as separate edits: {separate}{saving}")
        print(cfg.perceptual)
        if plot_note:
            print(f"plots: {plot_note}")
        print(f"wrote {out / 'results.jsonl'}, {out / 'summary.csv'}, {out / 'index.html'}")
        if pie:
            print(f"PIE-Bench: wrote {', '.join(k for k in pie if '.' in k)} and the edits under "
                  f"{out}/<setting>/annotation_images/")


def _piebench(out: Path, cfg, rows) -> dict:
    """A PIE-Bench run's own tables and figures (``piebench.report``); {} for another image source."""
    if getattr(cfg, "pie_weights", None) is None:
        return {}
    from ..piebench.data import NETWORKS
    from ..piebench.report import finalize as piebench_finalize
    present = cfg.fingerprint.get("piebench_networks") or []
    return piebench_finalize(out, rows, [k for k in NETWORKS if k not in present])


def _plots(out: Path, rows, summary, examples: int) -> tuple[dict, str | None]:
    """The figures of ``plots`` that the grid supports, by name, and a note when there are none."""
    import numpy as np

    plots = {}
    try:
        from .. import plots as P
        pdir = out / "plots"
        for name, fn in (("tradeoff", P.tradeoff), ("mask_vs_threshold", P.mask_vs_threshold),
                         ("mask_vs_n", P.mask_vs_n), ("mask_vs_strength", P.mask_vs_strength)):
            if (path := fn(summary, pdir / f"{name}.png")) is not None:
                plots[name] = path
            else:  # an earlier run's figure of a knob this grid no longer varies would mislead
                (pdir / f"{name}.png").unlink(missing_ok=True)
        first = next((r for r in rows if r["index"] < examples), None)
        if first is not None:
            stem = out / "examples" / _stem(first["image"])
            if Path(f"{stem}_map.npy").is_file() and Path(f"{stem}_input.png").is_file():
                from PIL import Image
                with Image.open(f"{stem}_input.png") as im:
                    plots["example"] = P.example_figure(im.convert("RGB"), np.load(f"{stem}_map.npy"),
                                                        np.load(f"{stem}_mask.npy"), pdir / "example.png",
                                                        title=first["image"])
    except ImportError as e:
        return plots, str(e)
    return plots, None if plots else "nothing to plot"


def write_html(out: Path, cfg, rows, summary, cost, plots: dict, plot_note: str | None):
    esc = html.escape
    fp = cfg.fingerprint
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>diffedit sweep</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} img.ex{width:128px;"
             "image-rendering:pixelated} figure{display:inline-block;margin:4px;text-align:center;font-size:11px}"
             "</style></head><body><h1>diffedit sweep</h1>",
             f"<p>images <code>{esc(str(fp['images']))}</code> ({len(cfg.items)}), model <code>{esc(fp['model'])}"
             f"</code>, {fp['steps']} DDIM steps, guidance {fp['guidance']:g}, seed {fp['seed']} "
             "(image i: seed*1000+i), "
             f"{len(cfg.settings)} settings, {len(rows)} rows.</p>",
             "<h2>Cost (UNet sample evaluations)</h2><table>"
             f"<tr><th>this run, counted</th><td>{cost['unet_evaluations_run']}</td></tr>"
             f"<tr><th>this run, shared-work formula</th><td>{cost['shared_formula_this_run']}</td></tr>"
             f"<tr><th>this run's rows as separate edits</th><td>{cost['separate_edits_this_run']}</td></tr>"
             f"<tr><th>full grid, shared</th><td>{cost['full_grid_shared']}</td></tr>"
             f"<tr><th>full grid, separate edits</th><td>{cost['full_grid_separate']}</td></tr></table>"
             f"<p>{esc(cfg.perceptual)}.</p>", "<h2>Plots</h2>"]
    if plot_note:
        parts.append(f"<p>{esc(plot_note)}</p>")
    for name, path in plots.items():
        parts.append(f"<figure><img src='{esc(Path(path).relative_to(out).as_posix())}' style='max-width:600px'>"
                     f"<figcaption>{esc(name)}</figcaption></figure>")
    cols = _columns(summary)
    parts.append("<h2>Summary (mean per setting)</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{_fmt(r.get(c), esc)}</td>" for c in cols) + "</tr>" for r in summary]
    parts.append("</table><h2>Examples</h2><p>DiffEdit at the grid values closest to the paper's; every method "
                 "at each ratio.</p>")
    ex = out / "examples"
    ratios = ordered(s.ratio for s in cfg.settings)
    methods = ordered(s.method for s in cfg.settings)
    for item in cfg.items[:cfg.examples]:
        stem = _stem(item.id)
        tiles = [("input", f"{stem}_input.png"), ("target (ground truth)", f"{stem}_target.png"),
                 ("D", f"{stem}_map.png"), ("mask", f"{stem}_mask.png")]
        tiles += [(f"{METHOD_TABLE[m].label} r={r:g}", f"{stem}_{m}_r{r:g}.png") for m in methods for r in ratios]
        tiles = [(label, name) for label, name in tiles if (ex / name).is_file()]
        if not tiles:
            continue
        parts.append(f"<h3>{esc(item.id)}</h3><p>source: <i>{esc(item.source)}</i><br>target: "
                     f"<i>{esc(item.target)}</i></p><div>")
        parts += [f"<figure><img class='ex' src='examples/{esc(name)}'><figcaption>{esc(label)}</figcaption></figure>"
                  for label, name in tiles]
        parts.append("</div>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts), encoding="utf-8")
