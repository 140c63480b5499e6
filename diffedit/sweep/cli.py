"""``diffedit sweep`` / ``python -m diffedit.sweep`` / ``torchrun -m diffedit.sweep``: flags, checks and the run.

    diffedit sweep --images toy:8 --ratio 0.5,0.7,0.9 --threshold 0.25,0.5,0.75 --n 1,2,5,10 \\
                   --method diffedit,sdedit,encode-decode --steps 25 --out sweep/
    torchrun --nproc_per_node 2 -m diffedit.sweep --images toy:8 --noises 1,2,5,10 ... --out sweep/

Under torchrun write ``--noises`` for ``--n`` (torchrun takes ``--n`` for an abbreviation of its own options).
Rank r takes images r::world_size and appends to ``results.rank{r}.jsonl``; after a gloo barrier rank 0 merges
them into ``results.jsonl`` and writes the report. --out must be on a file system all ranks share.
Importing this package and building its parser load neither torch nor numpy (``diffedit --help`` builds it).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from ..frontend import HelpFormatter, add_model_args
from ..settings import METHODS, REFERENCES, Knob, SettingsError
from .items import load_items
from .plan import GRID_KNOBS, grid, ordered, row_key, separate_cost, setting_key, shared_cost
from .report import example_knobs, finalize, perceptual_note, save_examples
from .results import append, check_fingerprint, read_rows

# clamp-mean is the diffusers recipe's rule; the sweep edits with the paper's recipe only.
NORMALIZATIONS = tuple(m for m in settings.NORMALIZATIONS if m != settings.RECIPES["diffusers"].normalization)
# The sweep's own knobs, checked as settings' are.
_KNOBS = {**settings.KNOBS,
          "reference": Knob("reference", str, "caption", "caption", "reference text R", choices=REFERENCES),
          "max_batch": Knob("max_batch", int, 64, None, "most rows per UNet call", 1),
          "toy_size": Knob("toy_size", int, 64, None, "toy scene size in px", 16),
          "examples": Knob("examples", int, 4, None, "images shown in index.html", 0)}
DEFAULTS = {k: str(_KNOBS[k].default) for k in (*GRID_KNOBS, "steps", "guidance", "max_batch", "toy_size", "examples")}


def _add_arguments(p):
    p.add_argument("--images", required=True, metavar="toy:N|FILE",
                   help="toy:N (N held-out toy edits, ground truth) or a prompts file: CSV with header "
                        "image,source,target or JSON lines with those keys (paths relative to the file)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (an existing sweep there resumes)")
    p.add_argument("--seed", default=None, metavar="S",
                   help="toy edits are drawn at S; image i uses seed S*1000+i (default: toy world EVAL_SEED)")
    p.add_argument("--world", default=None, metavar="v1|v2",
                   help="the toy world toy:N draws (diffedit/toy/world.py WORLDS; default: the one the toy model's "
                        "recipe names, else v1)")
    g = p.add_argument_group("the grid (comma lists)")
    g.add_argument("--ratio", default=DEFAULTS["ratio"], help="encoding ratios r in (0, 1] (paper: swept)")
    g.add_argument("--threshold", default=DEFAULTS["threshold"], help="mask thresholds in [0, 1] (paper 0.5)")
    g.add_argument("--n", "--noises", dest="n", default=DEFAULTS["n"],
                   help=f"numbers of noises averaged into D, 1 to {settings.MAX_N} (paper 10); --noises under torchrun")
    g.add_argument("--strength", default=DEFAULTS["strength"], help="mask noise strengths in (0, 1] (paper 0.5)")
    g.add_argument("--reference", default=DEFAULTS["reference"],
                   help='reference texts R: "empty" ("") and/or "caption" (the source text)')
    g.add_argument("--method", default=DEFAULTS["method"], help=f"methods: {', '.join(METHODS)}")
    g.add_argument("--dilate", default=DEFAULTS["dilate"],
                   help=f"DiffEdit's mask grown by this many latent cells, 0 to {settings.KNOBS['dilate'].hi} "
                        "(not in the paper: 0)")
    g = p.add_argument_group("fixed settings")
    g.add_argument("--steps", default=DEFAULTS["steps"],
                   help=f"DDIM steps of the full grid, at most {settings.MAX_STEPS} (paper 50)")
    g.add_argument("--guidance", default=DEFAULTS["guidance"], help="classifier-free guidance scale (paper 7.5)")
    g.add_argument("--normalization", default="quantile", choices=NORMALIZATIONS,
                   help="how D's extremes are removed before the rescaling (quantile: clip at its 98th percentile)")
    g.add_argument("--max-batch", default=DEFAULTS["max_batch"], help="most rows per UNet call")
    g.add_argument("--toy-size", default=DEFAULTS["toy_size"],
                   help="toy scene size in px (64: the toy model's; smaller for tests)")
    g.add_argument("--examples", default=DEFAULTS["examples"],
                   help="images shown in index.html (input, D, mask, edits)")
    add_model_args(p, device_help="torch device (under torchrun, cuda means cuda:LOCAL_RANK)")
    g = p.add_argument_group("perceptual metrics (local weights only; the paper's axes)")
    g.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="torchvision AlexNet checkpoint (alexnet-owt-7be5be79.pth): adds lpips (to the input)")
    g.add_argument("--clip-weights", default=None, metavar="PATH",
                   help="open_clip checkpoint of --clip-model: adds clip_score (edit vs the target text)")
    g.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name of --clip-weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")


DESCRIPTION = ("Run DiffEdit and its baselines (SDEdit, Encode-Decode) over a grid of settings and a set of images, "
               "sharing the work between grid points; write results.jsonl, summary.csv, plots and index.html.")


def add_sweep_parser(subparsers):
    p = subparsers.add_parser("sweep", help="DiffEdit and its baselines over a grid of settings and images",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    _add_arguments(p)
    p.set_defaults(run=run_sweep)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffedit.sweep", description=DESCRIPTION, formatter_class=HelpFormatter)
    _add_arguments(p)
    return p


def _value(flag: str, text: str, knob: str):
    """One value of a flag, converted and checked by its knob; a ValueError naming the flag."""
    k = _KNOBS[knob]
    text = str(text).strip()
    if k.choices is None:
        try:
            text = k.kind(text)
        except ValueError:
            raise ValueError(f"{flag}: {text!r} is not {'an integer' if k.kind is int else 'a number'}") from None
    try:
        return k.check(text)
    except SettingsError as e:
        raise ValueError(e.message_for(flag)) from None


def knob_values(flag: str, text: str, knob: str) -> list:
    """A comma list of values of a flag, each checked by its knob (``_value``), duplicates dropped; a ValueError
    naming the flag."""
    parts = [t.strip() for t in str(text).split(",")]
    if any(not t for t in parts):
        raise ValueError(f"{flag}: {text!r} is not a comma list (e.g. {DEFAULTS.get(knob, '0.5,0.7')})")
    return ordered(_value(flag, t, knob) for t in parts)


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
    from ..toy import world
    lists = {k: knob_values(f"--{k}", getattr(args, k), k) for k in ("ratio", "threshold", "n", "strength", "reference",
                                                                 "method", "dilate")}  # grid's argument order
    steps = _value("--steps", args.steps, "steps")
    guidance = _value("--guidance", args.guidance, "guidance")
    seed = world.EVAL_SEED if args.seed is None else _value("--seed", args.seed, "seed")
    max_batch = _value("--max-batch", args.max_batch, "max_batch")
    toy_size = _value("--toy-size", args.toy_size, "toy_size")
    examples = _value("--examples", args.examples, "examples")
    toy = args.images.startswith("toy:")
    spec = _world(args) if toy else None
    items = load_items(args.images, seed, toy_size, spec)
    points = grid(*lists.values())
    n_draw = max(lists["n"]) if "diffedit" in lists["method"] else 0
    images = args.images if toy else str(Path(args.images).expanduser().resolve())
    fingerprint = {"images": images, "toy_size": toy_size if toy else None, "world": spec.name if toy else None,
                   "seed": seed, "steps": steps, "guidance": guidance, "model": args.model, "n_max": n_draw,
                   "normalization": args.normalization, "dtype": _network_dtype(args),
                   # rows with and without a perceptual metric must not mix (None: not computed)
                   "lpips": "alexnet-v0.1" if args.lpips_weights else None,
                   "clip_model": args.clip_model if args.clip_weights else None}
    return Config(items, points, steps, guidance, seed, n_draw, max_batch, examples, fingerprint,
                  perceptual_note(args.lpips_weights, args.clip_weights), args.normalization)


def _world(args):
    """The toy world of --world, or the one the model was trained in."""
    from ..toy import resolve_world
    return resolve_world(args.world, args.model)


def _network_dtype(args) -> str:
    """The dtype "auto" stands for on --device: rows computed in different dtypes must not mix."""
    from ..precision import resolve_dtype
    return str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")


def _dist_env() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ValueError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT too (launch with torchrun)")
    return rank, world


def _scorers(args, device) -> dict:
    """The perceptual metrics asked for; a bad weights file stops the sweep before any work or file."""
    scorers = {}
    if args.lpips_weights:
        from ..perceptual import LPIPS
        scorers["lpips"] = LPIPS(args.lpips_weights, device)
    if args.clip_weights:
        from ..perceptual import CLIPScore
        scorers["clip_score"] = CLIPScore(args.clip_weights, args.clip_model, device)
    return scorers


def run_sweep(args) -> int:
    """The ``diffedit sweep`` command (also ``python -m diffedit.sweep`` / torchrun). Returns 0."""
    cfg = parse_config(args)
    rank, world = _dist_env()
    device = args.device
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    scorers = _scorers(args, device)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out, cfg.fingerprint)

    import torch

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
        stats = _run(args, cfg, todo, own, out, device, scorers, rank, world)
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


def _run(args, cfg: Config, todo, own: Path, out: Path, device, scorers, rank: int, world: int) -> list[int]:
    """Edit this rank's missing rows, appending each image's rows; returns [UNet evaluations run, planned by
    the formula, as separate edits, rows computed]."""
    from tqdm import tqdm

    from ..checkpoint import CheckpointError
    from ..model_call import EvalCounter
    from ..pipeline import DiffEdit
    from .grid import edit_grid, rows_for

    planned = sum(shared_cost(m, cfg.steps, cfg.guidance) for _, m in todo)
    separate = sum(separate_cost(m, cfg.steps, cfg.guidance) for _, m in todo)
    counter = EvalCounter(None)
    if todo:
        try:
            de = DiffEdit.from_pretrained(args.model, device=device, dtype=args.dtype, max_batch=cfg.max_batch,
                                          prediction_type=args.prediction_type)
        except CheckpointError as e:
            raise ValueError(f"--model {args.model}: {e}") from None
        rep = example_knobs(cfg.settings)
        bar = tqdm(total=planned, unit="eval", desc="sweep" if world == 1 else f"sweep rank {rank}",
                   position=rank, disable=args.quiet, dynamic_ncols=True)
        counter.on_rows = bar.update
        with open(own, "a", encoding="utf-8") as f:
            for i, (item, missing) in enumerate(todo):
                image = item.load()
                seed = cfg.seed * 1000 + item.index
                outputs = edit_grid(de, image, item.source, item.target, missing, cfg.steps, cfg.guidance,
                                    seed, cfg.n_draw or None, counter.around, cfg.normalization)
                for row in rows_for(item, image, outputs, seed, cfg.steps, cfg.guidance, scorers):
                    append(f, row)
                if item.index < cfg.examples:
                    save_examples(out, item, image, outputs, rep)
                bar.set_postfix(images=f"{i + 1}/{len(todo)}")
        bar.close()
    return [counter.count, planned, separate, sum(len(m) for _, m in todo)]


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
