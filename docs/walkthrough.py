"""DiffEdit step by step on one toy-world edit: writes an HTML page with a picture of every intermediate.

    python docs/walkthrough.py --out walkthrough/ [--model toy] [--steps 50] [--index I] [--grid 8]

The step-by-step edit is, unless ``--index`` forces one, the first of the first 20 held-out edits (in the
order the seed draws them) that DiffEdit at the page's settings edits successfully by the toy judge
(``toy.judge.edit_success``); the first edit if none does, and the page says so. A teaching example should
show the method working; the grid below it shows how often it does.

The edit the page shows is run by ``diffedit/reference.py:edit``, the one-screen DiffEdit written beside the paper's
Sec. 3, and every intermediate picture is a tensor that run computed: the denoiser's model call is wrapped so that it
keeps each row it is given and returns, in the order the three steps make them (``Recorder``). The page shows the input
scene and its caption, the target caption, the noise estimates under the two texts for one noise (channel means of
eps_Q and eps_R), the difference map D and the mask (Sec. 3.1), the DDIM encoding decoded at a few levels (Sec. 3.2),
the mask-guided decoding step by step (Sec. 3.2, "decoding with mask guidance"), and the result next to SDEdit,
Encode-Decode and masked SDEdit (DiffEdit's mask, SDEdit's noise), each also run by the reference. Below the steps, a
grid of the first ``--grid`` held-out edits as they come (failures included), each method run by ``DiffEdit.edit`` and
judged by the toy judge, and what the toy world shows per kind of edit, read from the shipped model's measurements
(``--results``, default docs/results/toy_kinds). The page cannot drift from the code: the reference is tested equal,
bit for bit, to the engine that ``DiffEdit.edit`` and every front end run (tests/test_reference.py), the page compares
the two on its own edit, and tests/test_walkthrough.py runs this script on a tiny random model.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffedit import images, masking, reference
from diffedit.denoiser import encoding_steps
from diffedit.pipeline import DiffEdit
from diffedit.settings import EditSettings
from diffedit.toy import judge, model_world, world
from diffedit.viz import heatmap, overlay

SHOW = 192  # px: every picture is shown this wide, pixelated (the toy scenes are 64 px)
THUMB = 112  # px: the grid's pictures
SEARCH = 20  # held-out edits the selection rule looks at, at most
STRENGTH, GUIDANCE, THRESHOLD = 0.5, 7.5, 0.5  # the paper's, and DiffEdit.edit's defaults
CFG_ROWS = 1 if GUIDANCE == 1.0 else 2  # rows per decoding step: Denoiser.guided runs both halves unless the scale is 1
METHODS = {"diffedit": "DiffEdit", "sdedit": "SDEdit", "encode-decode": "Encode-Decode", "masked-sdedit": "masked SDEdit"}
RESULTS = Path(__file__).parent / "results" / "toy_kinds"  # the shipped model's per-kind measurements
RULE = (f"the first of the first {SEARCH} held-out edits, in the order the seed draws them, that DiffEdit at the "
        "settings of the page edits successfully by the toy judge (toy.judge.edit_success); the first edit if "
        "none does")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (index.html + PNGs)")
    p.add_argument("--model", default="toy", help='"toy" or a checkpoint file / folder')
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the full grid")
    p.add_argument("--index", type=int, default=None,
                   help=f"show this held-out toy edit step by step (default %(default)s: {RULE})")
    p.add_argument("--grid", type=int, default=8,
                   help="a grid of every method on the first this many held-out edits (0: none)")
    p.add_argument("--seed", type=int, default=world.EVAL_SEED, help="toy edits are drawn at this seed")
    p.add_argument("--ratio", type=float, default=0.7, help="encoding ratio r")
    p.add_argument("--n", type=int, default=10, help="noises averaged into D")
    p.add_argument("--size", type=int, default=None, help="toy scene size in px (default: the world's; tests use less)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="folder of scripts/evaluate_toy.py (eval_*.json) and scripts/mask_anatomy.py (anatomy_*.json) "
                        "outputs, for the section on what the toy world shows (none there: no section)")
    return p


def _signed(x: torch.Tensor) -> np.ndarray:
    """A signed map -> [0, 1] with 0 at 0.5, scaled by its largest magnitude (for a heat map)."""
    x = x.detach().float().cpu()
    return (0.5 + 0.5 * x / x.abs().max().clamp(min=1e-12)).numpy()


def _scaled(x: torch.Tensor) -> np.ndarray:
    x = x.detach().float().cpu()
    return (x / x.max().clamp(min=1e-12)).numpy()


class Recorder:
    """Wraps the model call: returns what the model returns, and keeps every row it was given (``x``) and gave back
    (``out``), in call order. A reference edit asks for the rows of step 1 (n under Q, then n under R), then step 2
    (one row per encoding step), then step 3 (``CFG_ROWS`` per decoding step, the unconditional half first), so the
    rows are that edit's own intermediates."""

    def __init__(self, model):
        self.model, self.x, self.out = model, [], []

    def __call__(self, x, t, cond):
        out = self.model(x, t, cond)
        self.x.extend(x)
        self.out.extend(out)
        return out


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed == world.TRAIN_SEED:
        raise SystemExit(f"--seed {args.seed} is the toy world's training seed; use a held-out seed")
    if (args.index is not None and args.index < 0) or args.grid < 0:
        raise SystemExit("--index and --grid must be >= 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    de = DiffEdit.from_pretrained(args.model)
    # world.edits draws one edit after another, so a longer list keeps every index's edit
    pool = world.edits(max(SEARCH, args.grid, (args.index or 0) + 1), args.seed, size=args.size,
                       spec=model_world(args.model))
    runs = {}

    def run(i: int, method: str = "diffedit"):
        """``de.edit`` on held-out edit i at the page's settings, and the judge's verdict (each run once)."""
        if (i, method) not in runs:
            e = pool[i]
            r = de.edit(Image.fromarray(e.source.render()), e.target_caption, source=e.source_caption,
                        ratio=args.ratio, n=args.n, steps=args.steps, strength=STRENGTH, guidance=GUIDANCE,
                        threshold=THRESHOLD, seed=args.seed * 1000 + i, method=method)
            runs[i, method] = r, judge.edit_success(np.asarray(r.image.convert("RGB"), np.uint8), e)
        return runs[i, method]

    if args.index is not None:
        index, found = args.index, None
    else:
        found = next((i for i in range(SEARCH) if run(i)[1]), None)
        index = 0 if found is None else found
    edit = pool[index]
    steps, ratio, n, strength, guidance, threshold = args.steps, args.ratio, args.n, STRENGTH, GUIDANCE, THRESHOLD
    seed = args.seed * 1000 + index  # the seed diffedit/evaluation.py and diffedit sweep use for this edit
    pil = Image.fromarray(edit.source.render())
    size = pil.size
    pngs: list[str] = []

    def save(name: str, image: Image.Image) -> str:
        image.save(out / name)
        pngs.append(name)
        return name

    def latent_image(y: torch.Tensor) -> Image.Image:
        return images.to_pil(de.decode_latents(y.reshape(1, *y.shape[-3:]))[0], size)

    # The input latent x_0 (one VAE encode) and the texts, as the engine would encode them for this image.
    x0 = de.encode_image(images.to_tensor(pil, de.multiple, de.device, de.dtype))
    query, ref, empty = (de.encode_prompt([t], de.image_size(x0)) for t in (edit.target_caption, edit.source_caption, ""))
    save("input.png", pil)
    save("target_truth.png", Image.fromarray(edit.target.render()))

    # The edit, by the reference, its model call recorded; then the baselines, by the reference too.
    settings = EditSettings(ratio=ratio, n=n, steps=steps, strength=strength, guidance=guidance, threshold=threshold,
                            seed=seed)
    rec = Recorder(de.denoiser.model)
    den = de.denoiser.with_model(rec)
    y0, d, m = reference.edit(den, x0, query, ref, empty, settings)
    baselines = {method: reference.edit(de.denoiser, x0, query, ref, empty, settings.replace(method=method))[0]
                 for method in list(METHODS)[1:]}
    k = encoding_steps(ratio, steps)
    levels = den.levels(ratio, steps)  # x_0's level, then the k grid levels the encoding climbs
    if len(rec.x) != 2 * n + k + CFG_ROWS * k:
        raise RuntimeError(f"the reference ran {len(rec.x)} model rows, not 2n + k + {CFG_ROWS}k: the page would "
                           "show the wrong rows")
    x_t, eps_q, eps_r = torch.stack(rec.x[:n]), torch.stack(rec.out[:n]), torch.stack(rec.out[n:2 * n])
    encoding_rows = rec.x[2 * n:2 * n + k]                         # x_0, ..., x at level k - 1: each step's input
    decoding_rows = rec.x[2 * n + k::CFG_ROWS]                     # y_r, then y after each step but the last
    trajectory = torch.stack([*encoding_rows, decoding_rows[0]])  # x_0, ..., x_r (y_r = x_r)
    if not torch.equal(trajectory[0], x0[0]):
        raise RuntimeError("the recorded rows are out of order: the encoding's first input is not x_0")

    # Step 1 (Sec. 3.1): noise x_0 n times at strength 0.5; contrast the estimates under Q and R.
    save("noised.png", latent_image(x_t[0]))
    save("eps_query.png", heatmap(_signed(eps_q[0].mean(0)), size))
    save("eps_reference.png", heatmap(_signed(eps_r[0].mean(0)), size))
    save("eps_difference_one_noise.png", heatmap(_scaled((eps_q[0] - eps_r[0]).abs().mean(0)), size))
    d_raw = masking.difference_map(eps_q[:, None], eps_r[:, None])  # (1, h, w), before the rescaling
    save("d_raw.png", heatmap(_scaled(d_raw[0]), size))
    save("d.png", heatmap(d, size))
    mask_pil = images.mask_to_pil(m, size)
    save("mask.png", mask_pil)
    save("mask_overlay.png", overlay(pil, mask_pil))

    # Step 2 (Sec. 3.2): DDIM encoding with the unconditional model, every latent kept.
    shown = sorted({0, k // 3, (2 * k) // 3, k})
    encoded = [(i, float(levels[i]), save(f"encoded_{i:02d}.png", latent_image(trajectory[i]))) for i in shown]

    # Step 3 (Sec. 3.2): decoding with mask guidance; y after a few of the k steps (the last one is y_0).
    after = [*decoding_rows[1:], y0[0]]  # after[s]: y after s + 1 steps
    shown = sorted({0, k // 3, (2 * k) // 3, k - 1})
    decoding = [(s, float(levels[k - 1 - s]), save(f"decoding_{s:02d}.png", latent_image(after[s]))) for s in shown]

    # The result and the paper's baselines, from the same parts.
    result = latent_image(y0[0])
    save("result_diffedit.png", result)
    for method, y in baselines.items():
        save(f"result_{method.replace('-', '_')}.png", latent_image(y[0]))
    save("vae_reconstruction.png", latent_image(x0[0]))
    success = judge.edit_success(np.asarray(result.convert("RGB"), np.uint8), edit)  # the picture shown
    rows = (2 * n, k, CFG_ROWS * k)
    engine = run(index)[0].latents  # DiffEdit.edit (the engine) on the same edit, for the page to compare
    same = bool(torch.equal(engine.to(y0.device), y0[0]))
    gap = 0.0 if same else float((engine.to(y0.device) - y0[0]).abs().max())

    # The grid: the first edits as they come, so that it shows the failures the selection skips.
    grid = []
    for i in range(args.grid):
        item, source, names, verdicts = pool[i], Image.fromarray(pool[i].source.render()), {}, {}
        names["input"] = save(f"grid_{i:02d}_input.png", source)
        names["target"] = save(f"grid_{i:02d}_target.png", Image.fromarray(item.target.render()))
        for method in METHODS:
            r, verdicts[method] = run(i, method)
            names[method] = save(f"grid_{i:02d}_{method}.png", r.image)
        names["mask"] = save(f"grid_{i:02d}_mask.png", overlay(source, run(i)[0].mask))
        grid.append((i, item, names, verdicts))

    choice = _choice(args, index, found, success)
    (out / "index.html").write_text(_page(args, edit, encoded, decoding, k, strength, float(den.strength_level(strength, steps)),
                                          threshold, guidance, choice, success, grid, rows, gap), encoding="utf-8")
    missing = [p for p in pngs if p not in (out / "index.html").read_text()]
    assert not missing, f"walkthrough page does not show {missing}"
    print(f"wrote {out / 'index.html'} and {len(pngs)} PNGs")
    return 0


def _verdict(success: bool) -> str:
    """The judge's verdict as a coloured word."""
    return "<b style='color:#080'>success</b>" if success else "<b style='color:#c00'>failure</b>"


def _choice(args, index: int, found: int | None, success: bool) -> str:
    """The paragraph that says why the page shows edit ``index`` and how the judge rates DiffEdit on it."""
    rule = f"The rule: {html.escape(RULE)}."
    if args.index is not None:
        why = (f"This is held-out edit {index}, forced with <code>--index {index}</code>. Without it the page shows "
               f"{html.escape(RULE)}.")
    elif found is None:
        why = (f"None of the first {SEARCH} held-out edits succeeded with DiffEdit at these settings, so this page "
               f"shows the first one (edit 0), a failed edit. {rule}")
    else:
        skipped = f" Edits 0 to {index - 1} failed." if index > 1 else " Edit 0 failed." if index else ""
        why = f"This is held-out edit {index}, chosen by a fixed rule. {rule}{skipped}"
    return f"<p>{why} The toy judge calls DiffEdit's result on it a {_verdict(success)}.</p>"


def _grid(grid, seed: int) -> str:
    """The table of the first held-out edits, every method judged, and the count of successes per method."""
    if not grid:
        return ""
    img = lambda name: f"<img src='{html.escape(name)}' width='{THUMB}'>"
    head = "".join(f"<th>{h}</th>" for h in ("edit", "input", "ground truth", "DiffEdit's mask", *METHODS.values()))
    rows = "".join(
        f"<tr><td>{i}: {html.escape(e.kind)}<br>{html.escape(e.description)}</td><td>{img(names['input'])}</td>"
        f"<td>{img(names['target'])}</td><td>{img(names['mask'])}</td>"
        + "".join(f"<td>{img(names[m])}<br>{_verdict(verdicts[m])}</td>" for m in METHODS) + "</tr>"
        for i, e, names, verdicts in grid)
    counts = ", ".join(f"{label} {sum(v[m] for *_, v in grid)} / {len(grid)}" for m, label in METHODS.items())
    return f"""
<h2>The first {len(grid)} held-out edits, as they come</h2>
<p>The example above was chosen; these are not: edits 0 to {len(grid) - 1} of seed {seed}, failures
included, each edited by <code>DiffEdit.edit</code> with the settings above (method "diffedit", "sdedit",
"encode-decode" or "masked-sdedit") and judged by the toy judge (<code>toy/judge.py</code>: the target colour or
shape where the edit should be, the new background, or the background where a removed object was).</p>
<table style="border-collapse:collapse;font-size:12px;text-align:center"><tr>{head}</tr>{rows}</table>
<p>Successes: {counts}.</p>
"""


# What each kind of edit asks of the method, in a teacher's words (the measurements say how it fares)
KIND_WORDS = {
    "colour": "repaint one object in a new colour: the changed pixels are the whole object, which the model draws "
              "well; the fairest test of the method",
    "shape": "turn one object into another shape of the same colour: only a thin band between the two outlines "
             "changes, about one latent cell wide, and the model draws shapes less reliably than colours",
    "background": "change the background colour: almost every pixel changes, so the mask is most of the image and "
                  "there is little left for it to protect",
    "remove": "delete one of two objects: its pixels become background and the caption keeps the other object's "
              "phrase alone, a one-object caption the model was trained on",
}


def toy_results(folder: Path) -> str:
    """The section on what the toy world shows: per kind of edit, every method's success and background PSNR at
    each evaluated seed (``eval_*.json`` of scripts/evaluate_toy.py), and where D lands (``anatomy_*.json`` of
    scripts/mask_anatomy.py, its first setting); empty without measurements."""
    evals = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("eval_*.json"))]
    if not evals:
        return ""
    keys = {"diffedit": "DiffEdit", "sdedit": "SDEdit", "encode_decode": "Encode-Decode",
            "masked_sdedit": "masked SDEdit"}
    keys = {k: v for k, v in keys.items() if all(k in e for e in evals)}

    def by(e, method, kind):
        return e[method] if kind == "all" else e["by_kind"][method].get(kind, {})

    def both(method, kind, metric, fmt):
        values = [by(e, method, kind).get(metric) for e in evals]
        return ", ".join("-" if v is None else fmt.format(v) for v in values)

    head = "".join(f"<th>{h}</th>" for h in ("kind of edit (edits per seed)", "what it asks", *keys.values(),
                                               "DiffEdit's mask IoU (best a cell mask reaches)"))
    rows = ""
    for kind in (*KIND_WORDS, "all"):
        count = ", ".join(str(by(e, "diffedit", kind).get("count", 0)) for e in evals)
        cells = "".join(f"<td>{both(m, kind, 'success', '{:.2f}')}<br>{both(m, kind, 'bg_psnr', '{:.1f}')} dB</td>"
                        for m in keys)
        ceiling = ", ".join(f"{e['ceiling'][kind]['iou']:.2f}" for e in evals if kind in e["ceiling"])
        words = html.escape(KIND_WORDS.get(kind, "every kind together"))
        rows += (f"<tr><td>{kind} ({count})</td><td style='text-align:left'>{words}</td>{cells}"
                 f"<td>{both('diffedit', kind, 'iou', '{:.2f}')} ({ceiling})</td></tr>")
    seeds = ", ".join(str(e["seed"]) for e in evals)
    return f"""
<h2>What the toy world shows, kind by kind</h2>
<p>The shipped toy model on held-out edits (seeds {seeds}; {evals[0]['n']} edits each, a quarter of each kind;
r = {evals[0]['ratio']:g}, the paper's other settings; <code>scripts/evaluate_toy.py</code>, files in
<code>docs/results/toy_kinds</code>). Each cell: how often the judge accepts the edit, one number per seed, and
below it the background PSNR, how well the pixels the edit should not touch are kept (higher is better). The
kinds test different things, so read them row by row rather than the mean.</p>
<table style="border-collapse:collapse;font-size:13px;text-align:center" border="1"><tr>{head}</tr>{rows}</table>
{_anatomy(folder)}
"""


def _anatomy(folder: Path) -> str:
    """Where D lands per kind (the first setting of the first ``anatomy_*.json``): why a shape edit's mask falls
    short."""
    files = sorted(Path(folder).glob("anatomy_*.json"))
    if not files:
        return ""
    a = json.loads(files[0].read_text())
    res = a["results"][0]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    rows = "".join(f"<tr><td>{kind} ({g['count']})</td><td>{fmt(g['d_changed'])}</td><td>{fmt(g['d_rest_of_object'])}"
                   f"</td><td>{fmt(g['d_outside'])}</td><td>{g['mask_cells']:.0f} / {g['changed_cells']:.0f}</td></tr>"
                   for kind, g in res["by_kind"].items())
    return f"""
<p><b>Why shape edits fail.</b> D is the mean difference between the two noise estimates, rescaled to [0, 1];
the mask is where it passes {THRESHOLD:g}. Below, its mean over the latent cells the edit changes, over the rest of
the edited object, and outside the object, and the mask's size against the changed area in cells
(<code>scripts/mask_anatomy.py</code>, seed {a['seed']}, strength {res['strength']:g}, n = {res['n']}).
For a colour edit or a removal D is high on the whole object and low elsewhere, and the mask covers the object.
For a shape edit D is higher on the band that changes than anywhere else, but it sits near the threshold, so the
mask covers only part of a band that is about one latent cell wide; the model, asked to repaint part of an
outline, keeps the old shape.</p>
<table style="border-collapse:collapse;font-size:13px;text-align:center" border="1"><tr><th>kind (edits)</th>
<th>D on changed cells</th><th>D on the rest of the object</th><th>D outside</th><th>mask / changed cells</th></tr>
{rows}</table>
"""


def _page(args, edit, encoded, decoding, k, strength, t_mask, threshold, guidance, choice, success, grid,
          rows, gap) -> str:
    esc = html.escape

    def fig(name, caption):
        return (f"<figure><img src='{esc(name)}' width='{SHOW}'><figcaption>{caption}</figcaption></figure>")

    lvl = lambda t: f"t = {t:g}" if t >= 0 else "the level of x<sub>0</sub>"
    enc = "".join(fig(name, f"x after {i} of {k} encoding steps ({lvl(t)})") for i, t, name in encoded)
    dec = "".join(fig(name, f"y after {s + 1} of {k} decoding steps ({lvl(t)})") for s, t, name in decoding)
    agree = ("<code>DiffEdit.edit</code> gives the same latents, bit for bit" if gap == 0 else
             f"<code>DiffEdit.edit</code>'s latents differ from the reference's by at most {gap:.2g}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>DiffEdit, step by step</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}}
img{{image-rendering:pixelated;border:1px solid #ddd}} figure{{display:inline-block;margin:6px;text-align:center;
font-size:12px;vertical-align:top;max-width:{SHOW + 10}px}} code{{background:#f4f4f4}}</style></head><body>
<h1>DiffEdit, step by step</h1>
<p>DiffEdit (Couairon et al., ICLR 2023) edits an image from a text query in three steps: it finds
<em>where</em> to edit by contrasting the model's noise estimates under two texts, DDIM-encodes the image,
and decodes it with the query while keeping everything outside the mask. This page runs DiffEdit on one
held-out toy-world edit (model <code>{esc(args.model)}</code>, {args.steps} DDIM steps, encoding ratio
r = {args.ratio:g}, n = {args.n}, strength {strength:g}, threshold {threshold:g}, guidance {guidance:g}) with
<code>reference.edit</code> (<code>diffedit/reference.py</code>), the one-screen DiffEdit written beside the paper's
Sec. 3, and every picture of the three steps is a tensor that run computed, read off its model calls. The engine
that <code>DiffEdit.edit</code> runs is tested equal to it bit for bit (<code>tests/test_reference.py</code>); on
this edit {agree}. The function of each
step is named beside it; <code>docs/paper-map.md</code> maps the paper's equations to the code.
The edit ran {sum(rows)} model rows: 2n = {rows[0]} for the mask, k = {rows[1]} for the encoding and
{rows[2]} for the guided decoding.</p>
{choice}

<h2>The input</h2>
{fig("input.png", "input x (the source scene)")}{fig("target_truth.png", "what the edit should give (ground truth)")}
<p>Reference text R (the input's caption): <b>{esc(edit.source_caption)}</b><br>
Query text Q (the target caption): <b>{esc(edit.target_caption)}</b><br>
Edit: {esc(edit.kind)}, {esc(edit.description)}.</p>

<h2>Step 1: the mask (Sec. 3.1)</h2>
<p>The latent x<sub>0</sub> is noised to strength {strength:g} (timestep {t_mask}) with noise 1 of {args.n}
(<code>masking.noised_latents</code>). The UNet predicts that noise once conditioned on Q and once on R, without
guidance (two batched passes over the {args.n} noises, one per text). Where the texts agree about the image the two estimates agree; where
they disagree (the object or background the edit changes) they differ. Channel means, blue &lt; 0 &lt; yellow:</p>
{fig("noised.png", "x<sub>t</sub> for noise 1, decoded")}{fig("eps_query.png", "eps(x<sub>t</sub>, Q), channel mean")}
{fig("eps_reference.png", "eps(x<sub>t</sub>, R), channel mean")}
{fig("eps_difference_one_noise.png", "|eps<sub>Q</sub> - eps<sub>R</sub>|, one noise")}
<p>One noise is noisy. D averages |eps<sub>Q</sub> - eps<sub>R</sub>| over the channels and over
n = {args.n} noises (<code>masking.difference_map</code>), is clipped at its 98th percentile and rescaled to
[0, 1] (<code>masking.normalize</code>), and thresholded at {threshold:g} (<code>masking.binarize</code>):</p>
{fig("d_raw.png", "D, averaged over n noises (raw)")}{fig("d.png", "D clipped and rescaled")}
{fig("mask.png", "mask M = D &gt; threshold")}{fig("mask_overlay.png", "M over the input")}

<h2>Step 2: DDIM encoding (Sec. 3.2)</h2>
<p>x<sub>0</sub> is encoded with deterministic DDIM run backwards, with the unconditional model (text ""),
for k = round(r x steps) = {k} of the {args.steps} grid steps (<code>inversion.encode</code>). Every
latent is kept: decoding needs them. Decoded with the VAE:</p>
{enc}

<h2>Step 3: decoding with mask guidance (Sec. 3.2)</h2>
<p>From x<sub>r</sub>, DDIM sampling with classifier-free guidance towards Q (R as the negative prompt)
runs k steps (<code>edit.decode</code>). After each step to a level t the region
outside the mask is replaced by the encoded latent at the same level:
y<sub>t</sub> = M y<sub>t</sub> + (1 - M) x<sub>t</sub>. The last step puts x<sub>0</sub> itself back,
so outside the mask only the VAE's reconstruction error remains.</p>
{dec}

<h2>The result and the baselines</h2>
<p><b>SDEdit</b> noises x<sub>0</sub> to r with fresh noise and decodes with Q, no mask. <b>Encode-Decode</b>
decodes the same DDIM encoding with Q and no mask (DiffEdit with M = 1). Both change the whole image; DiffEdit only
the masked region. <b>Masked SDEdit</b> keeps DiffEdit's mask but starts from fresh noise instead of the DDIM
encoding: the paper's claim that the encoding and the mask work well together is DiffEdit against it. Each is
<code>reference.edit</code> with its method (<code>"sdedit"</code>, <code>"encode-decode"</code>,
<code>"masked-sdedit"</code>), as <code>DiffEdit.edit(..., method=...)</code> runs them.</p>
{fig("result_diffedit.png", f"DiffEdit ({_verdict(success)})")}{fig("result_sdedit.png", "SDEdit")}
{fig("result_encode_decode.png", "Encode-Decode")}{fig("result_masked_sdedit.png", "masked SDEdit")}
{fig("vae_reconstruction.png", "VAE reconstruction of the input (the ceiling)")}
{fig("target_truth.png", "ground truth")}
{_grid(grid, args.seed)}{toy_results(args.results)}</body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
