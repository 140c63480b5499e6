"""``diffedit sweep`` / ``python -m diffedit.sweep`` / ``torchrun -m diffedit.sweep``: flags, checks and the run.

    diffedit sweep --images toy:8 --ratio 0.5,0.7,0.9 --threshold 0.25,0.5,0.75 --n 1,2,5,10 \\
                   --method diffedit,sdedit,encode-decode --steps 25 --out sweep/
    diffedit sweep --images piebench:PIE-Bench/ --categories 1,6 --subset 10 --mask-source estimated,annotated \\
                   --method diffedit,masked-sdedit,sdedit --model sd15.safetensors --device cuda --out pie/
    torchrun --nproc_per_node 2 -m diffedit.sweep --images toy:8 --noises 1,2,5,10 ... --out sweep/

Under torchrun write ``--noises`` for ``--n`` (torchrun takes ``--n`` for an abbreviation of its own options);
--out must be on a file system all ranks share. The parsed arguments stop here: ``parse_config`` checks them into
one ``runner.Config``, which is all the modules below see. Importing this package and building its parser load
neither torch nor numpy (``diffedit --help`` builds it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import settings
from ..frontend import MODEL_DEFAULTS, HelpFormatter, add_model_args
from ..settings import METHOD_TABLE, METHODS, REFERENCES, Knob, SettingsError, UsageError
from .items import load_items, piebench_items
from .plan import GRID_KNOBS, MASK_SOURCES, grid, ordered
from .report import perceptual_note
from .runner import Config, read_model, run

# clamp-mean is the diffusers recipe's rule; the sweep edits with the paper's recipe only.
NORMALIZATIONS = tuple(m for m in settings.NORMALIZATIONS if m != settings.RECIPES["diffusers"].normalization)
# The sweep's own knobs, checked as settings' are.
_KNOBS = {**settings.KNOBS,
          "reference": Knob("reference", str, "caption", "caption", "reference text R", choices=REFERENCES),
          "max_batch": Knob("max_batch", int, 64, None, "most rows per UNet call", 1),
          "toy_size": Knob("toy_size", int, 64, None, "toy scene size in px", 16),
          "examples": Knob("examples", int, 4, None, "images shown in index.html", 0),
          "mask_source": Knob("mask_source", str, "estimated", "estimated", "a masked method's mask",
                              choices=MASK_SOURCES),
          "subset": Knob("subset", int, None, None, "PIE-Bench images per category", 1)}
DEFAULTS = {k: str(_KNOBS[k].default) for k in (*GRID_KNOBS, "steps", "guidance", "max_batch", "toy_size", "examples")}


def _add_arguments(p):
    p.add_argument("--images", required=True, metavar="toy:N|piebench:DIR|FILE",
                   help="toy:N (N held-out toy edits, ground truth), piebench:DIR (a PIE-Bench folder: "
                        "mapping_file.json and annotation_images/) or a prompts file: CSV with header "
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
    g.add_argument("--mask-source", default=DEFAULTS["mask_source"],
                   help="masked methods' masks: estimated (step 1) and/or annotated (the image's annotation, at "
                        "latent size: the oracle-mask row; piebench:DIR and toy:N)")
    g = p.add_argument_group("fixed settings")
    g.add_argument("--steps", default=None,
                   help=f"DDIM steps of the full grid, at most {settings.MAX_STEPS} (paper 50); "
                        f"{MODEL_DEFAULTS['steps']} (default: {DEFAULTS['steps']})")
    g.add_argument("--guidance", default=None, help="classifier-free guidance scale (paper 7.5); "
                                                   f"{MODEL_DEFAULTS['guidance']} (default: {DEFAULTS['guidance']})")
    g.add_argument("--normalization", default="quantile", choices=NORMALIZATIONS,
                   help="how D's extremes are removed before the rescaling (quantile: clip at its 98th percentile)")
    g.add_argument("--max-batch", default=DEFAULTS["max_batch"], help="most rows per UNet call")
    g.add_argument("--toy-size", default=DEFAULTS["toy_size"],
                   help="toy scene size in px (64: the toy model's; smaller for tests)")
    g.add_argument("--examples", default=DEFAULTS["examples"],
                   help="images shown in index.html (input, D, mask, edits)")
    add_model_args(p, device_help="torch device (under torchrun, cuda means cuda:LOCAL_RANK)")
    g = p.add_argument_group("perceptual metrics (local weights only; the paper's axes; PIE-Bench's under piebench:DIR)")
    g.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="torchvision AlexNet checkpoint (alexnet-owt-7be5be79.pth): adds lpips (to the input); "
                        "under piebench:DIR the LPIPS SqueezeNet weights of lpips_unedit_part (else env "
                        "DIFFEDIT_LPIPS_WEIGHTS)")
    g.add_argument("--clip-weights", default=None, metavar="PATH",
                   help="open_clip checkpoint of --clip-model: adds clip_score (edit vs the target text); under "
                        "piebench:DIR CLIP ViT-L/14 in open_clip's layout, for the clip_similarity columns (else env "
                        "DIFFEDIT_CLIP_WEIGHTS)")
    g.add_argument("--dino-weights", default=None, metavar="PATH",
                   help="piebench:DIR only: DINO ViT-B/8 weights for structure_distance (else env "
                        "DIFFEDIT_DINO_WEIGHTS)")
    g.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name of --clip-weights")
    g = p.add_argument_group("PIE-Bench (--images piebench:DIR; metric networks from local files only)")
    g.add_argument("--categories", default=None, help="editing_type_id values to run, a comma list of 0..9 "
                   "(default: all)")
    g.add_argument("--subset", default=None, metavar="N", help="the first N images of each category (default: all)")
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
    """One value of a flag, converted and checked by its knob; a UsageError naming the flag."""
    k = _KNOBS[knob]
    text = str(text).strip()
    if k.choices is None:
        try:
            text = k.kind(text)
        except ValueError:
            raise UsageError(f"{flag}: {text!r} is not {'an integer' if k.kind is int else 'a number'}") from None
    try:
        return k.check(text)
    except SettingsError as e:
        raise UsageError(e.message_for(flag)) from None


def knob_values(flag: str, text: str, knob: str) -> list:
    """A comma list of values of a flag, each checked by its knob (``_value``), duplicates dropped; a UsageError
    naming the flag."""
    parts = [t.strip() for t in str(text).split(",")]
    if any(not t for t in parts):
        raise UsageError(f"{flag}: {text!r} is not a comma list (e.g. {DEFAULTS.get(knob, '0.5,0.7')})")
    return ordered(_value(flag, t, knob) for t in parts)


def parse_config(args) -> Config:
    """Every argument checked (a UsageError naming the flag) and the images list read, into the one object the
    sweep hands down; loads no model (its configs or keys give its own defaults). The only reader of ``args``."""
    from ..frontend import check_device
    from ..toy import resolve_world, world
    lists = {k: knob_values(f"--{k.replace('_', '-')}", getattr(args, k), k)
             for k in ("ratio", "threshold", "n", "strength", "reference", "method", "dilate", "mask_source")}
    steps = None if args.steps is None else _value("--steps", args.steps, "steps")
    guidance = None if args.guidance is None else _value("--guidance", args.guidance, "guidance")
    seed = world.EVAL_SEED if args.seed is None else _value("--seed", args.seed, "seed")
    max_batch = _value("--max-batch", args.max_batch, "max_batch")
    toy_size = _value("--toy-size", args.toy_size, "toy_size")
    examples = _value("--examples", args.examples, "examples")
    check_device(args.device)
    toy = args.images.startswith("toy:")
    try:
        spec = resolve_world(args.world, args.model) if toy else None
    except ValueError as e:  # an unknown --world, or a toy model whose recipe names one
        raise UsageError(str(e)) from None
    items, images, pie = _items(args, seed, toy_size, spec, lists)
    if steps is None or guidance is None:  # the model's own, once every flag is checked
        from ..checkpoint import edit_defaults
        own = read_model(args.model, edit_defaults)  # FLUX.1's steps and guidance; no weight is read
        steps = own.get("steps", _KNOBS["steps"].default) if steps is None else steps
        guidance = own.get("guidance", _KNOBS["guidance"].default) if guidance is None else guidance
    n_draw = max(lists["n"]) if any(METHOD_TABLE[m].masked for m in lists["method"]) else 0
    fingerprint = {"images": images, "toy_size": toy_size if toy else None, "world": spec.name if toy else None,
                   "seed": seed, "steps": steps, "guidance": guidance, "model": args.model, "n_max": n_draw,
                   "normalization": args.normalization, "dtype": _network_dtype(args.dtype, args.device),
                   # rows with and without a perceptual metric must not mix (None: not computed)
                   "lpips": "alexnet-v0.1" if args.lpips_weights and not pie else None,
                   "clip_model": args.clip_model if args.clip_weights and not pie else None,
                   "piebench_networks": None if pie is None else sorted(k for k, v in _pie_paths(pie).items() if v)}
    return Config(items, grid(*lists.values()), steps, guidance, seed, n_draw, max_batch, examples, fingerprint,
                  out=Path(args.out).expanduser(), model=args.model, device=args.device, dtype=args.dtype,
                  prediction_type=args.prediction_type, normalization=args.normalization,
                  lpips_weights=args.lpips_weights, clip_weights=args.clip_weights, clip_model=args.clip_model,
                  perceptual=_pie_note(pie) if pie else perceptual_note(args.lpips_weights, args.clip_weights),
                  quiet=args.quiet, pie_weights=pie)


def _items(args, seed: int, toy_size: int, spec, lists) -> tuple[list, str, dict | None]:
    """(the items, what the fingerprint names them by, the PIE-Bench metric networks' paths given by flag or None
    for another image source); the PIE-Bench options and --mask-source annotated checked against the source."""
    from ..piebench.data import NETWORKS
    pie = args.images.startswith("piebench:")
    given = [f for f, v in (("--categories", args.categories), ("--subset", args.subset),
                            ("--dino-weights", args.dino_weights)) if v is not None]
    if given and not pie:
        raise UsageError(f"{', '.join(given)}: only with --images piebench:DIR")
    if pie:
        folder = args.images[len("piebench:"):]
        if not folder.strip():
            raise UsageError("--images piebench:DIR needs the folder DIR (it holds mapping_file.json)")
        categories = None if args.categories is None else _categories(args.categories)
        subset = None if args.subset is None else _value("--subset", args.subset, "subset")
        items = piebench_items(folder, categories, subset)
        images = "piebench:" + str(Path(folder).expanduser().resolve())
    else:
        items = load_items(args.images, seed, toy_size, spec)
        images = args.images if spec else str(Path(args.images).expanduser().resolve())
    if "annotated" in lists["mask_source"]:
        if not items[0].annotated:
            raise UsageError("--mask-source annotated needs images with annotated masks (piebench:DIR or toy:N)")
        if not any(METHOD_TABLE[m].masked for m in lists["method"]):
            masked = ", ".join(m for m, t in METHOD_TABLE.items() if t.masked)
            raise UsageError(f"--mask-source annotated needs a masked method in --method ({masked})")
    return items, images, ({k: getattr(args, _PIE_FLAGS[k]) for k in NETWORKS} if pie else None)


_PIE_FLAGS = {"dino": "dino_weights", "clip": "clip_weights", "lpips": "lpips_weights"}  # under piebench:DIR


def _pie_paths(given: dict) -> dict:
    """The metric networks' weights: the flag, else the environment variable load_networks reads."""
    import os

    from ..piebench.data import NETWORKS
    return {k: given.get(k) or os.environ.get(f"DIFFEDIT_{k.upper()}_WEIGHTS") for k in NETWORKS}


def _pie_note(given: dict) -> str:
    """What the report says about PIE-Bench's metric networks (each from a local file or absent)."""
    flags = {k: "--" + v.replace("_", "-") for k, v in _PIE_FLAGS.items()}
    paths = _pie_paths(given)
    absent = [f"{k} (pass {flags[k]} or DIFFEDIT_{k.upper()}_WEIGHTS)" for k in flags if not paths[k]]
    have = [k for k in flags if paths[k]]
    return ("PIE-Bench metric networks: " + (f"{', '.join(have)} given" if have else "none given")
            + (f"; not computed without: {', '.join(absent)}; none can be downloaded here" if absent else ""))


def _categories(text: str) -> list[str]:
    from ..piebench.data import CATEGORIES
    parts = [t.strip() for t in str(text).split(",")]
    bad = [t for t in parts if t not in CATEGORIES]
    if bad:
        raise UsageError(f"--categories: {', '.join(map(repr, bad))} not among the editing_type_id values 0..9")
    return ordered(parts)


def _network_dtype(dtype: str, device: str) -> str:
    """The dtype "auto" stands for on ``device``: rows computed in different dtypes must not mix."""
    from ..precision import resolve_dtype
    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def run_sweep(args) -> int:
    """The ``diffedit sweep`` command (also ``python -m diffedit.sweep`` / torchrun). Returns 0."""
    return run(parse_config(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m diffedit.sweep ...`` (and torchrun): bad input ends with one line and exit status 2; any other
    exception is a bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run_sweep(args)
    except (UsageError, OSError) as e:  # bad input, or a file the system refused
        sys.stderr.write(f"diffedit sweep: error: {' '.join((str(e) or type(e).__name__).split())}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("diffedit sweep: interrupted (run the same command again to resume)\n")
        return 130
