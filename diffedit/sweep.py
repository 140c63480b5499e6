"""``diffedit sweep``: DiffEdit and its baselines over a grid of settings and a set of images, sharing work.

    diffedit sweep --images toy:8 --ratio 0.5,0.7,0.9 --threshold 0.25,0.5,0.75 --n 1,2,5,10 \\
                   --method diffedit,sdedit,encode-decode --steps 25 --out sweep/
    torchrun --nproc_per_node 2 -m diffedit.sweep --images toy:8 --noises 1,2,5,10 ... --out sweep/

(Under torchrun write ``--noises`` for ``--n``: torchrun's own parser takes ``--n`` for an abbreviation of
its options and stops with "ambiguous option".)

The grid is the product of comma lists (defaults: the paper's values, ratio 0.7, threshold 0.5, n 10,
strength 0.5, reference "caption", method diffedit); the knobs a method does not use are left out of its
settings (SDEdit and Encode-Decode have no mask). Images are ``toy:N`` (N held-out toy-world edits drawn at
--seed, with ground truth) or a prompts file: CSV with the header ``image,source,target`` or JSON lines with
those keys; image paths are relative to the file.

Work is shared across the grid instead of running one ``DiffEdit.edit`` per grid point (``edit_grid``):
  * one VAE encode per image;
  * one DDIM inversion (Sec. 3.2) per image, to the largest ratio; every smaller ratio is a prefix of it
    (``Trajectory.truncate``); Encode-Decode decodes from the same trajectory;
  * per strength, one batched UNet pass over n_max noises x (the query + every reference text): the query
    rows serve every reference; every n uses the first n noises of the pass, and one rescaled map D serves
    every threshold (Sec. 3.1);
  * the decodings of one ratio (every mask, every reference, Encode-Decode as the all-ones mask) run as one
    batch; SDEdit runs once per (ratio, reference).
UNet sample evaluations are counted (a wrapper around ``de.eps`` that sums batch rows) and reported against
the cost of the same rows run as separate edits, by formula (``shared_cost`` / ``separate_cost``).

Seeds: image i uses the seed S * 1000 + i (as ``toy/evaluate.py``); mask noises come from a generator seeded
with it, drawn as ONE tensor of the grid's n_max noises (``torch.randn((n_max, *x0.shape))``), and a row with
n noises uses the first n of them. A row at n = n_max is therefore exactly ``de.edit(..., n=n_max,
seed=S * 1000 + i)``. For smaller n it equals ``de.edit(..., n=n)`` only because torch's CPU generator happens
to give the same first n draws whenever a latent holds a multiple of 16 numbers (every SD and toy latent;
checked in tests/test_sweep.py) -- not a documented guarantee. SDEdit draws its noise from the same seed,
as ``de.edit`` does. The same computation is not the same rounding, though: CPU kernels round differently
for different batch sizes (~1e-6), and guidance amplifies it, so in float32 a row's latents can differ from a
separate ``de.edit`` by ~1e-5 relative (measured 5e-5 on a random tiny model; in float64 they agree to
~1e-12, which tests/test_sweep.py checks), and a row recomputed on resume, in a smaller batch than first
planned, can differ from an uninterrupted run's by as much. Rows computed in the same grouping (e.g. the
torchrun shards: a rank takes whole images) are bit-identical.

Metrics per row (``metrics.edit_metrics``): PSNR / SSIM to the input and the mask area for any image; for the
toy world also mask IoU with the ground-truth mask, bg PSNR / bg SSIM outside it, PSNR to the ground-truth
target render and success (``toy/judge.py``). The paper's axes, LPIPS to the input and CLIP score with the
target text (``perceptual.py``), are added when the user points --lpips-weights / --clip-weights at weights
they have locally (nothing is downloaded); the report says which were computed.

Outputs in --out: ``results.jsonl`` (one row per image x setting; append-only with a flush per row, so an
interrupted sweep resumes without redoing finished rows; rows are keyed by image id + setting),
``summary.csv`` (the mean per setting), ``cost.json``, ``plots/*.png``, ``examples/*.png`` and ``index.html``.
``sweep.json`` records what every row depends on beyond its own key (images, seed, steps, guidance, model,
n_max): resuming with other values is refused.

Scale-out: under torchrun (or with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set) rank r takes images
r::world_size and appends to ``results.rank{r}.jsonl``; after a gloo barrier rank 0 merges every file into
``results.jsonl`` and writes the summary, plots and page. --out must be on a file system all ranks share.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .plots import METHOD_LABELS, PAPER, closest

METHODS = ("diffedit", "sdedit", "encode-decode")
REFERENCES = ("empty", "caption")
KNOBS = ("method", "ratio", "threshold", "n", "strength", "reference")
METRICS = ("iou", "mask_area", "bg_psnr", "bg_ssim", "target_psnr", "success", "psnr", "ssim", "lpips", "clip_score")
NORMALIZATIONS = ("quantile", "clamp", "minmax")  # masking.normalize's rules (quantile: the default, the paper's)


def perceptual_note(lpips_weights, clip_weights) -> str:
    """What the report says about the metrics that need network weights the user must have locally."""
    metrics = (("LPIPS to the input", lpips_weights, "--lpips-weights, the torchvision AlexNet file"),
               ("CLIP score with the target", clip_weights, "--clip-weights and --clip-model, an open_clip checkpoint"))
    return "Perceptual metrics: " + "; ".join(
        f"{name} computed" if given else f"{name} not computed (pass {how}; none can be downloaded here)"
        for name, given, how in metrics)


DEFAULTS = {"ratio": "0.7", "threshold": "0.5", "n": "10", "strength": "0.5", "reference": "caption",
            "method": "diffedit"}


# --- settings and images -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One grid point. Knobs a method does not use are None (SDEdit / Encode-Decode: no mask)."""
    method: str
    ratio: float
    reference: str
    threshold: float | None = None
    n: int | None = None
    strength: float | None = None

    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in KNOBS}


def grid(ratios, thresholds, ns, strengths, references, methods) -> list[Setting]:
    out = []
    for method in methods:
        for ratio in ratios:
            for ref in references:
                if method == "diffedit":
                    out += [Setting(method, ratio, ref, t, n, s) for s in strengths for n in ns for t in thresholds]
                else:
                    out.append(Setting(method, ratio, ref))
    return out


def row_key(row: dict) -> str:
    """Rows are keyed by image id + setting (JSON numbers round-trip, so a resumed key matches)."""
    return json.dumps([row["image"], *(row[k] for k in KNOBS)])


def setting_key(image_id: str, s: Setting) -> str:
    return row_key({"image": image_id, **s.knobs()})


@dataclass
class Item:
    """One image to edit: id (stable across runs), global index, texts, and where the pixels come from."""
    id: str
    index: int
    source: str
    target: str
    path: Path | None = None
    edit: object | None = None  # toy.world.Edit: ground truth

    def load(self):
        from PIL import Image
        from .images import load_image
        if self.edit is not None:
            return Image.fromarray(self.edit.source.render())
        return load_image(self.path)


def load_items(spec: str, seed: int, toy_size: int) -> list[Item]:
    """``toy:N`` or a prompts file (CSV / JSON lines with image, source, target); errors name --images."""
    from .toy import world
    if spec.startswith("toy:"):
        if seed == world.TRAIN_SEED:
            raise ValueError(f"--seed {seed} is the toy world's training seed; sweep held-out edits "
                             f"(e.g. --seed {world.EVAL_SEED}, the default)")
        try:
            n = int(spec[4:])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--images {spec}: toy:N needs a positive integer N")
        return [Item(f"toy-{seed}-{i}", i, e.source_caption, e.target_caption, edit=e)
                for i, e in enumerate(world.edits(n, seed, size=toy_size))]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--images {spec}: prompts file not found (expected toy:N, or a .csv / .jsonl file "
                         "with image, source, target)")
    text = path.read_text(encoding="utf-8-sig")
    records = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"image", "source", "target"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"--images {spec}: the CSV header must hold image,source,target "
                             f"(missing {', '.join(sorted(missing))})")
        records = [(i + 2, r) for i, r in enumerate(reader)]
    else:
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--images {spec} line {i + 1}: not JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"--images {spec} line {i + 1}: expected an object with image, source, target")
                records.append((i + 1, rec))
    if not records:
        raise ValueError(f"--images {spec}: no rows")
    items = []
    for index, (line, rec) in enumerate(records):
        image, source, target = (rec.get(k) for k in ("image", "source", "target"))
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"--images {spec} line {line}: missing image path")
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"--images {spec} line {line}: missing target text")
        if source is not None and not isinstance(source, str):
            raise ValueError(f"--images {spec} line {line}: source must be a text")
        img = (path.parent / image).expanduser()
        if not img.is_file():
            raise ValueError(f"--images {spec} line {line}: image not found: {img}")
        items.append(Item(f"{index}:{image}", index, source or "", target, path=img))
    return items


# --- the cost model ------------------------------------------------------------------------------------

def _k(ratio: float, steps: int) -> int:
    from .inversion import num_encoding_steps
    return num_encoding_steps(ratio, steps)


def _cfg_rows(guidance: float) -> int:
    return 1 if guidance == 1.0 else 2  # guided_eps evaluates only the conditional half at scale 1


def separate_cost(settings, steps: int, guidance: float) -> int:
    """UNet sample evaluations of one image's settings run as separate ``DiffEdit.edit`` calls:
    DiffEdit k (inversion) + 2n (mask) + g k (decoding), SDEdit g k, Encode-Decode k + g k,
    with k = round(r * steps) and g = 2 (classifier-free guidance; 1 at guidance 1)."""
    g, total = _cfg_rows(guidance), 0
    for s in settings:
        k = _k(s.ratio, steps)
        total += {"diffedit": k + 2 * (s.n or 0) + g * k, "sdedit": g * k, "encode-decode": k + g * k}[s.method]
    return total


def shared_cost(settings, steps: int, guidance: float) -> int:
    """UNet sample evaluations ``edit_grid`` runs for one image's settings: one inversion to the largest
    ratio; per strength, n_max x (1 + number of references) mask rows; one decoding of g k rows per
    DiffEdit / Encode-Decode / SDEdit setting. (Assumes the query differs from every reference text;
    where it equals one, its D is 0 and those rows are skipped, as in ``noise_difference_maps``.)"""
    g, total = _cfg_rows(guidance), 0
    traj = [s for s in settings if s.method != "sdedit"]
    if traj:
        total += _k(max(s.ratio for s in traj), steps)
    masked = [s for s in settings if s.method == "diffedit"]
    for strength in {s.strength for s in masked}:
        group = [s for s in masked if s.strength == strength]
        total += max(s.n for s in group) * (1 + len({s.reference for s in group}))
    return total + sum(g * _k(s.ratio, steps) for s in settings)


class EvalCounter:
    """Wraps an eps function; ``count`` = UNet sample evaluations (batch rows) run through it."""

    def __init__(self, eps, on_rows=None):
        self.eps, self.count, self.on_rows = eps, 0, on_rows

    def __call__(self, x, t, context):
        self.count += x.shape[0]
        if self.on_rows is not None:
            self.on_rows(x.shape[0])
        return self.eps(x, t, context)


# --- the shared computation ----------------------------------------------------------------------------

@dataclass
class Output:
    setting: Setting
    latents: object        # torch (C, h, w): the edited y_0
    image: object          # PIL, at the input size
    map: object = None     # torch (h, w) float in [0, 1]: D (DiffEdit)
    mask: object = None    # torch (h, w) bool: M (DiffEdit)


def _ordered(values):
    return list(dict.fromkeys(values))


def edit_grid(de, image, source: str, target: str, settings, steps: int = 50, guidance: float = 7.5,
              seed: int = 0, n_draw: int | None = None, eps=None, normalization: str = "quantile") -> list[Output]:
    """Edit one image (PIL) towards ``target`` at every setting, sharing the work (see the module docstring).

    ``source`` is the text of reference "caption" ("empty" is ""); ``n_draw`` the number of mask noises
    drawn (default: the largest n of ``settings``; rows use the first n); ``eps`` the eps function to call
    (default ``de.eps``; pass an ``EvalCounter`` to count); ``normalization`` the rule that removes D's
    extremes (``masking.normalize``). Returns one Output per setting, in order."""
    import torch

    from . import images, masking
    from .edit import masked_decode, sdedit
    from .guidance import batched_eps
    from .inversion import ddim_encode

    eps = eps or de.eps
    settings = list(settings)
    with torch.no_grad():
        x0 = de.encode_image(images.to_tensor(image, de.multiple, de.device, de.dtype))
        query = de.encode_prompt([target])
        refs = {r: de.encode_prompt(["" if r == "empty" else source]) for r in _ordered(s.reference for s in settings)}
        latents: dict[Setting, torch.Tensor] = {}
        maps, masks = {}, {}

        # Step 1, the masks: per strength one pass over the noises x (references + query).
        masked = [s for s in settings if s.method == "diffedit"]
        n_draw = n_draw or max((s.n for s in masked), default=1)
        for strength in _ordered(s.strength for s in masked):
            group = [s for s in masked if s.strength == strength]
            n_need = max(s.n for s in group)
            if n_need > n_draw:
                raise ValueError(f"n {n_need} is more than the {n_draw} noises drawn")
            noises = masking.noised_latents(x0, n_draw, strength, steps, de.alpha_bar,
                                            torch.Generator().manual_seed(seed))
            x = noises.x_t[:n_need, 0]
            live = [r for r in _ordered(s.reference for s in group) if not torch.equal(query[0], refs[r][0])]
            if live:  # text-major rows, as noise_difference_maps: [ref_1 x n, ..., ref_m x n, query x n]
                texts = torch.cat([refs[r] for r in live] + [query])
                e = batched_eps(eps, x.repeat(len(texts), 1, 1, 1), noises.t, texts.repeat_interleave(n_need, 0),
                                de.max_batch).reshape(len(texts), n_need, *x.shape[1:])
            for s in group:
                mk = (strength, s.reference, s.n)
                if mk not in maps:
                    if s.reference in live:
                        j = live.index(s.reference)
                        d = masking.difference_map(e[-1][:s.n, None], e[j][:s.n, None])
                    else:  # the query is the reference: D = 0 by definition
                        d = x0.new_zeros(1, *x0.shape[-2:])
                    maps[mk] = masking.normalize(d.float(), normalization)[0]
                masks[s] = masking.binarize(maps[mk], s.threshold)

        # Steps 2 and 3: one inversion to the largest ratio; per ratio one batched masked decoding.
        traj_settings = [s for s in settings if s.method != "sdedit"]
        if traj_settings:
            trajectory = ddim_encode(eps, x0, de.encode_prompt([""]), max(s.ratio for s in traj_settings), steps,
                                     de.alpha_bar, max_batch=de.max_batch)
            for ratio in _ordered(s.ratio for s in traj_settings):
                group = [s for s in traj_settings if s.ratio == ratio]
                blend = torch.stack([masks[s] if s.method == "diffedit" else torch.ones_like(x0[0, 0], dtype=torch.bool)
                                     for s in group])[:, None].to(x0.dtype)  # Encode-Decode: M = 1 keeps y exactly
                y0 = masked_decode(eps, trajectory.truncate(ratio), query.expand(len(group), -1, -1),
                                   torch.cat([refs[s.reference] for s in group]), guidance, de.alpha_bar, blend,
                                   None, de.max_batch)
                latents.update(zip(group, y0))
        for s in settings:
            if s.method == "sdedit":
                latents[s] = sdedit(eps, x0, query, refs[s.reference], s.ratio, steps, guidance, de.alpha_bar,
                                    torch.Generator().manual_seed(seed), de.max_batch)[0]

        y = torch.stack([latents[s] for s in settings])
        decoded = torch.cat([de.decode_latents(y[i:i + 8]) for i in range(0, len(settings), 8)])
    return [Output(s, y[i], images.to_pil(decoded[i], image.size),
                   maps.get((s.strength, s.reference, s.n)) if s.method == "diffedit" else None, masks.get(s))
            for i, s in enumerate(settings)]


def rows_for(item: Item, image, outputs: list[Output], seed: int, steps: int | None = None,
             guidance: float | None = None, scorers: dict | None = None) -> list[dict]:
    """One results row per output: the knobs, the fixed settings, and the metrics (toy ground truth when the
    item has it; ``scorers``: optional "lpips" (edit, input) and "clip_score" (edit, target text) callables)."""
    from . import metrics
    from .toy import judge
    src = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tgt = gt = None
    if item.edit is not None:
        tgt, gt = item.edit.target.render(), item.edit.mask()
    rows = []
    for out in outputs:
        edited = np.asarray(out.image.convert("RGB"), dtype=np.uint8)
        pred = None if out.mask is None else out.mask.cpu().numpy()
        m = metrics.edit_metrics(edited, src, tgt, gt, pred)
        if item.edit is not None:
            m["success"] = float(judge.edit_success(edited, item.edit))
        if scorers and "lpips" in scorers:
            m["lpips"] = scorers["lpips"](edited, src)
        if scorers and "clip_score" in scorers:
            m["clip_score"] = scorers["clip_score"](edited, item.target)
        rows.append({"image": item.id, "index": item.index, "kind": getattr(item.edit, "kind", None),
                     **out.setting.knobs(), "seed": seed, "steps": steps, "guidance": guidance,
                     **{k: m[k] for k in METRICS if k in m}})
    return rows


# --- results files -------------------------------------------------------------------------------------

def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a JSON-lines file. An unfinished last line (an interrupted write) is skipped and, with
    ``repair``, cut off, so that appending continues on a fresh line; a bad line elsewhere is skipped."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else the last, unterminated line
    rows = []
    for line in lines:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"diffedit sweep: skipping a malformed line of {path}", file=sys.stderr)
    if tail.strip():
        try:
            rows.append(json.loads(tail))
            complete = True
        except json.JSONDecodeError:
            complete = False
        if repair:
            with open(path, "r+b") as f:
                if complete:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(len(data) - len(tail))
    return rows


def _append(f, row: dict):
    f.write(json.dumps(row) + "\n")
    f.flush()


def _sort_key(row):
    return (row["index"], METHODS.index(row["method"]), row["ratio"], REFERENCES.index(row["reference"]),
            row["strength"] or 0, row["n"] or 0, row["threshold"] or 0)


def merge(out: Path) -> list[dict]:
    """results.jsonl + every results.rank*.jsonl -> results.jsonl (deduplicated, sorted), atomically."""
    rows, seen = [], set()
    rank_files = sorted(out.glob("results.rank*.jsonl"))
    for path in [out / "results.jsonl", *rank_files]:
        for row in read_rows(path):
            if (key := row_key(row)) not in seen:
                seen.add(key)
                rows.append(row)
    rows.sort(key=_sort_key)
    tmp = out / f"results.jsonl.tmp{os.getpid()}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "results.jsonl")
    for path in rank_files:
        path.unlink()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """The mean of every metric per setting (success: the success rate), with the row count."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KNOBS), []).append(r)
    out = []
    for knobs, rs in groups.items():
        s = dict(zip(KNOBS, knobs))
        s["count"] = len(rs)
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                s[m] = float(np.mean(vals))
        out.append(s)
    out.sort(key=lambda r: _sort_key({**r, "index": 0}))
    return out


def write_summary_csv(rows: list[dict], path: Path):
    cols = [*KNOBS, "count", *(m for m in METRICS if any(m in r for r in rows))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})


def format_table(rows: list[dict]) -> str:
    cols = [*KNOBS, "count", *(m for m in METRICS if any(m in r for r in rows))]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# --- arguments -----------------------------------------------------------------------------------------

def _add_arguments(p):
    p.add_argument("--images", required=True, metavar="toy:N|FILE",
                   help="toy:N (N held-out toy edits, ground truth) or a prompts file: CSV with header "
                        "image,source,target or JSON lines with those keys (paths relative to the file)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (an existing sweep there resumes)")
    p.add_argument("--seed", default=None, metavar="S",
                   help="toy edits are drawn at S; image i uses seed S*1000+i (default: toy world EVAL_SEED)")
    g = p.add_argument_group("the grid (comma lists)")
    g.add_argument("--ratio", default=DEFAULTS["ratio"], help="encoding ratios r in (0, 1] (paper: swept)")
    g.add_argument("--threshold", default=DEFAULTS["threshold"], help="mask thresholds in [0, 1] (paper 0.5)")
    g.add_argument("--n", "--noises", dest="n", default=DEFAULTS["n"],
                   help="numbers of noises averaged into D, >= 1 (paper 10); --noises under torchrun")
    g.add_argument("--strength", default=DEFAULTS["strength"], help="mask noise strengths in (0, 1] (paper 0.5)")
    g.add_argument("--reference", default=DEFAULTS["reference"],
                   help='reference texts R: "empty" ("") and/or "caption" (the source text)')
    g.add_argument("--method", default=DEFAULTS["method"], help="methods: diffedit, sdedit, encode-decode")
    g = p.add_argument_group("fixed settings")
    g.add_argument("--steps", default="50", help="DDIM steps of the full grid (paper 50)")
    g.add_argument("--guidance", default="7.5", help="classifier-free guidance scale (paper 7.5)")
    g.add_argument("--normalization", default="quantile", choices=NORMALIZATIONS,
                   help="how D's extremes are removed before the rescaling (quantile: clip at its 98th percentile)")
    g.add_argument("--model", default="toy", help='"toy", a .safetensors/.ckpt file, a diffusers folder or a hub id')
    g.add_argument("--device", default="cpu", help="torch device (under torchrun, cuda means cuda:LOCAL_RANK)")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    g.add_argument("--max-batch", default="64", help="most rows per UNet call")
    g.add_argument("--toy-size", default="64", help="toy scene size in px (64: the toy model's; smaller for tests)")
    g.add_argument("--examples", default="4", help="images shown in index.html (input, D, mask, edits)")
    g = p.add_argument_group("perceptual metrics (local weights only; the paper's axes)")
    g.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="torchvision AlexNet checkpoint (alexnet-owt-7be5be79.pth): adds lpips (to the input)")
    g.add_argument("--clip-weights", default=None, metavar="PATH",
                   help="open_clip checkpoint of --clip-model: adds clip_score (edit vs the target text)")
    g.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name of --clip-weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")


DESCRIPTION = ("Run DiffEdit and its baselines (SDEdit, Encode-Decode) over a grid of settings and a set of images, "
               "sharing the work between grid points; write results.jsonl, summary.csv, plots and index.html.")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where there is none or the help text already gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def add_sweep_parser(subparsers):
    p = subparsers.add_parser("sweep", help="DiffEdit and its baselines over a grid of settings and images",
                              description=DESCRIPTION, formatter_class=_Help)
    _add_arguments(p)
    p.set_defaults(run=run_sweep)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffedit.sweep", description=DESCRIPTION, formatter_class=_Help)
    _add_arguments(p)
    return p


def _number(flag, text, cast, lo=None, hi=None, lo_open=False):
    text = str(text).strip()
    try:
        v = cast(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not {'an integer' if cast is int else 'a number'}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{flag}: {text!r} is not a finite number")
    if lo is not None and ((v <= lo) if lo_open else (v < lo)) or hi is not None and v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else f"{'>' if lo_open else '>='} {lo}"
        raise ValueError(f"{flag}: {text} is out of range (must be {rng})")
    return v


def _list(flag, text, cast=float, lo=None, hi=None, lo_open=False, choices=None):
    parts = [t.strip() for t in str(text).split(",")]
    if not parts or any(not t for t in parts):
        raise ValueError(f"{flag}: {text!r} is not a comma list (e.g. {DEFAULTS.get(flag[2:], '0.5,0.7')})")
    if choices is not None:
        bad = [t for t in parts if t not in choices]
        if bad:
            raise ValueError(f"{flag}: unknown value {bad[0]!r} (choose from {', '.join(choices)})")
        return _ordered(parts)
    return _ordered(_number(flag, t, cast, lo, hi, lo_open) for t in parts)


@dataclass
class Config:
    items: list
    settings: list
    steps: int
    guidance: float
    seed: int
    n_draw: int
    max_batch: int
    examples: int
    fingerprint: dict
    perceptual: str = ""
    normalization: str = "quantile"


def parse_config(args) -> Config:
    """Check every argument (ValueError naming the flag) and read the images list; loads no model."""
    from .toy import world
    ratios = _list("--ratio", args.ratio, float, 0, 1, lo_open=True)
    thresholds = _list("--threshold", args.threshold, float, 0, 1)
    ns = _list("--n", args.n, int, 1)
    strengths = _list("--strength", args.strength, float, 0, 1, lo_open=True)
    references = _list("--reference", args.reference, choices=REFERENCES)
    methods = _list("--method", args.method, choices=METHODS)
    steps = _number("--steps", args.steps, int, 1, 1000)
    guidance = _number("--guidance", args.guidance, float, 0)
    seed = world.EVAL_SEED if args.seed is None else _number("--seed", args.seed, int, 0)
    max_batch = _number("--max-batch", args.max_batch, int, 1)
    toy_size = _number("--toy-size", args.toy_size, int, 16)
    examples = _number("--examples", args.examples, int, 0)
    items = load_items(args.images, seed, toy_size)
    settings = grid(ratios, thresholds, ns, strengths, references, methods)
    n_draw = max(ns) if "diffedit" in methods else 0
    images = args.images if args.images.startswith("toy:") else str(Path(args.images).expanduser().resolve())
    fingerprint = {"images": images, "toy_size": toy_size if images.startswith("toy:") else None, "seed": seed,
                   "steps": steps, "guidance": guidance, "model": args.model, "n_max": n_draw,
                   "normalization": args.normalization,
                   # rows with and without a perceptual metric must not mix (None: not computed)
                   "lpips": "alexnet-v0.1" if args.lpips_weights else None,
                   "clip_model": args.clip_model if args.clip_weights else None}
    return Config(items, settings, steps, guidance, seed, n_draw, max_batch, examples, fingerprint,
                  perceptual_note(args.lpips_weights, args.clip_weights), args.normalization)


def _check_fingerprint(out: Path, fp: dict):
    path = out / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k} {old.get(k)!r} -> {fp[k]!r}" for k in fp if k != "n_max" and old.get(k) != fp[k]]
        if old.get("n_max") and fp["n_max"] and old["n_max"] != fp["n_max"]:
            diff.append(f"largest --n {old['n_max']} -> {fp['n_max']} (rows use the first n of n_max noises)")
        if diff:
            raise ValueError(f"--out {out} holds a sweep made with other settings ({'; '.join(diff)}); resume it "
                             "with the same --images/--seed/--steps/--guidance/--normalization/--model/largest --n, "
                             "or use another --out")
        fp = {**fp, "n_max": old.get("n_max") or fp["n_max"]}
    tmp = out / f"sweep.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(fp, indent=1) + "\n")
    os.replace(tmp, path)


# --- running -------------------------------------------------------------------------------------------

def _dist_env() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ValueError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT too (launch with torchrun)")
    return rank, world


def _stem(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", image_id)


def _example_name(setting: Setting) -> str:
    return f"{setting.method}_r{setting.ratio:g}"


def _save_examples(out: Path, item: Item, image, outputs: list[Output], rep: dict):
    """Small PNGs of one image: input, ground truth (toy), D, mask, and the edit of every method per ratio
    at the knobs closest to the paper's; D as .npy for the example figure."""
    from . import images as imgs
    from .viz import heatmap, overlay
    ex = out / "examples"
    ex.mkdir(exist_ok=True)
    stem = _stem(item.id)
    image.save(ex / f"{stem}_input.png")
    if item.edit is not None:
        from PIL import Image
        Image.fromarray(item.edit.target.render()).save(ex / f"{stem}_target.png")
    for o in outputs:
        s = o.setting
        if s.reference != rep["reference"]:
            continue
        if s.method == "diffedit":
            if (s.threshold, s.n, s.strength) != (rep["threshold"], rep["n"], rep["strength"]):
                continue
            heatmap(o.map.cpu(), image.size).save(ex / f"{stem}_map.png")  # D and M do not depend on r
            np.save(ex / f"{stem}_map.npy", o.map.cpu().numpy())
            overlay(image, imgs.mask_to_pil(o.mask, image.size)).save(ex / f"{stem}_mask.png")
            np.save(ex / f"{stem}_mask.npy", o.mask.cpu().numpy())
        o.image.save(ex / f"{stem}_{_example_name(s)}.png")


def run_sweep(args) -> int:
    """The ``diffedit sweep`` command (also ``python -m diffedit.sweep`` / torchrun). Returns 0."""
    cfg = parse_config(args)
    rank, world = _dist_env()
    device = args.device
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    scorers = {}  # a bad weights file stops the sweep before any work or file
    if args.lpips_weights:
        from .perceptual import LPIPS
        scorers["lpips"] = LPIPS(args.lpips_weights, device)
    if args.clip_weights:
        from .perceptual import CLIPScore
        scorers["clip_score"] = CLIPScore(args.clip_weights, args.clip_model, device)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(out, cfg.fingerprint)

    import torch
    from tqdm import tqdm

    from .checkpoint import CheckpointError
    from .pipeline import DiffEdit


    if world > 1:
        import datetime

        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=24))
    try:
        own = out / ("results.jsonl" if world == 1 else f"results.rank{rank}.jsonl")
        read_rows(own, repair=True)
        done = {row_key(r) for p in [out / "results.jsonl", *out.glob("results.rank*.jsonl")] for r in read_rows(p)}
        todo = []
        for item in cfg.items[rank::world]:
            missing = [s for s in cfg.settings if setting_key(item.id, s) not in done]
            if missing:
                todo.append((item, missing))
        planned = sum(shared_cost(m, cfg.steps, cfg.guidance) for _, m in todo)
        separate = sum(separate_cost(m, cfg.steps, cfg.guidance) for _, m in todo)
        counter = EvalCounter(None)
        if todo:
            try:
                de = DiffEdit.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype),
                                              max_batch=cfg.max_batch)
            except CheckpointError as e:
                raise ValueError(f"--model {args.model}: {e}") from None
            counter.eps = de.eps
            rep = {k: closest([getattr(s, k) for s in cfg.settings], k) for k in PAPER}
            rep_d = {k: closest([getattr(s, k) for s in cfg.settings if s.method == "diffedit"], k) for k in PAPER}
            rep = {**rep, **{k: rep_d[k] for k in ("threshold", "n", "strength")}}
            bar = tqdm(total=planned, unit="eval", desc="sweep" if world == 1 else f"sweep rank {rank}",
                       position=rank, disable=args.quiet, dynamic_ncols=True)
            counter.on_rows = bar.update
            with open(own, "a", encoding="utf-8") as f:
                for i, (item, missing) in enumerate(todo):
                    image = item.load()
                    seed = cfg.seed * 1000 + item.index
                    outputs = edit_grid(de, image, item.source, item.target, missing, cfg.steps, cfg.guidance,
                                        seed, cfg.n_draw or None, counter, cfg.normalization)
                    for row in rows_for(item, image, outputs, seed, cfg.steps, cfg.guidance, scorers):
                        _append(f, row)
                    if item.index < cfg.examples:
                        _save_examples(out, item, image, outputs, rep)
                    bar.set_postfix(images=f"{i + 1}/{len(todo)}")
            bar.close()
        stats = [counter.count, planned, separate, sum(len(m) for _, m in todo)]
        if world > 1:
            import torch.distributed as dist
            t = torch.tensor(stats, dtype=torch.float64)
            dist.all_reduce(t)
            stats = [int(v) for v in t.tolist()]
            dist.barrier()
        if rank == 0:
            finalize(out, cfg, stats, quiet=args.quiet)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


def finalize(out: Path, cfg: Config, stats, quiet: bool = False):
    """Merge the rows; write summary.csv, cost.json, the plots and index.html."""
    rows = merge(out)
    summary = summarize(rows)
    write_summary_csv(summary, out / "summary.csv")
    run, planned, separate, computed = stats
    n_img = len(cfg.items)
    cost = {"unet_evaluations_run": run, "shared_formula_this_run": planned, "separate_edits_this_run": separate,
            "rows_computed_this_run": computed, "rows_total": len(rows),
            "full_grid_shared": n_img * shared_cost(cfg.settings, cfg.steps, cfg.guidance),
            "full_grid_separate": n_img * separate_cost(cfg.settings, cfg.steps, cfg.guidance),
            "vae_encodes_per_image": {"shared": 1, "separate": len(cfg.settings)}}
    (out / "cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    plots, plot_note = {}, None
    try:
        from . import plots as P
        pdir = out / "plots"
        for name, fn in (("tradeoff", P.tradeoff), ("mask_vs_threshold", P.mask_vs_threshold),
                         ("mask_vs_n", P.mask_vs_n), ("mask_vs_strength", P.mask_vs_strength)):
            if (path := fn(summary, pdir / f"{name}.png")) is not None:
                plots[name] = path
            else:  # an earlier run's figure of a knob this grid no longer varies would mislead
                (pdir / f"{name}.png").unlink(missing_ok=True)
        first = next((r for r in rows if r["index"] < cfg.examples), None)
        if first is not None:
            stem = out / "examples" / _stem(first["image"])
            if Path(f"{stem}_map.npy").is_file() and Path(f"{stem}_input.png").is_file():
                from PIL import Image
                with Image.open(f"{stem}_input.png") as im:
                    plots["example"] = P.example_figure(im.convert("RGB"), np.load(f"{stem}_map.npy"),
                                                        np.load(f"{stem}_mask.npy"), pdir / "example.png",
                                                        title=first["image"])
        if not plots:
            plot_note = "nothing to plot"
    except ImportError as e:
        plot_note = str(e)
    write_html(out, cfg, rows, summary, cost, plots, plot_note)
    if not quiet:
        print(format_table(summary))
        saving = f" ({separate / run:.2f}x fewer)" if run else ""
        print(f"UNet sample evaluations this run: {run} (formula {planned}); as separate edits: {separate}{saving}")
        print(cfg.perceptual)
        if plot_note:
            print(f"plots: {plot_note}")
        print(f"wrote {out / 'results.jsonl'}, {out / 'summary.csv'}, {out / 'index.html'}")


def write_html(out: Path, cfg: Config, rows, summary, cost, plots: dict, plot_note: str | None):
    esc = html.escape
    fp = cfg.fingerprint
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>diffedit sweep</title><style>"
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
    cols = [*KNOBS, "count", *(m for m in METRICS if any(m in r for r in summary))]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else esc(str(v)))
    parts.append("<h2>Summary (mean per setting)</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in summary]
    parts.append("</table><h2>Examples</h2><p>DiffEdit at the grid values closest to the paper's; every method "
                 "at each ratio.</p>")
    ex = out / "examples"
    ratios = _ordered(s.ratio for s in cfg.settings)
    methods = _ordered(s.method for s in cfg.settings)
    for item in cfg.items[:cfg.examples]:
        stem = _stem(item.id)
        tiles = [("input", f"{stem}_input.png"), ("target (ground truth)", f"{stem}_target.png"),
                 ("D", f"{stem}_map.png"), ("mask", f"{stem}_mask.png")]
        tiles += [(f"{METHOD_LABELS[m]} r={r:g}", f"{stem}_{m}_r{r:g}.png") for m in methods for r in ratios]
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


def main(argv: list[str] | None = None) -> int:
    """``python -m diffedit.sweep ...`` (and torchrun): bad input ends with one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run_sweep(args)
    except ValueError as e:
        sys.stderr.write(f"diffedit sweep: error: {' '.join(str(e).split())}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("diffedit sweep: interrupted (run the same command again to resume)\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
