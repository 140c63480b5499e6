"""Evaluate DiffEdit, SDEdit, Encode-Decode and masked SDEdit on held-out toy-world edits (diffedit/evaluation.py).

    python scripts/evaluate_toy.py --n 40 --seed 777 --json eval.json [--ratio 0.7] [--generation 50] [--workers 2]
                                   [--dtype auto] [--world v2] [--md table.md]

Prints the JSON (means per method, overall and per kind; the ceilings; the caption following) and, on stderr, the
per-kind table (``evaluation.table``). The toy world defaults to the one the model's recipe names (v1 without one).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from diffedit.checkpoint.sources import resolve
from diffedit.pipeline import DiffEdit
from diffedit.precision import DTYPES
from diffedit.settings import REFERENCES
from diffedit import evaluation
from diffedit.toy import resolve_world, world


def _work(model, dtype, job, kwargs):
    """One worker's share, in its own process with one thread (the toy model is too small to split ops)."""
    torch.set_num_threads(1)
    de = DiffEdit.from_pretrained(model, dtype=dtype)
    with torch.no_grad():
        if job == "edit":
            return evaluation.edit_rows(de, progress=False, **kwargs)
        if job == "generate":
            return evaluation.caption_following(de, progress=False, **kwargs)
        return evaluation.vae_reconstruction_psnr(de, seed=kwargs["seed"], spec=kwargs["spec"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="number of held-out edits")
    p.add_argument("--seed", type=int, default=world.EVAL_SEED, help=f"scene seed (not {world.TRAIN_SEED}, the training seed)")
    p.add_argument("--ratio", type=float, default=0.7, help="encoding ratio r")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reference", choices=REFERENCES, default="caption", help="reference text R")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of the edits (paper 7.5)")
    p.add_argument("--generation", type=int, default=0, help="also measure caption following on this many samples")
    p.add_argument("--model", default="toy")
    p.add_argument("--world", choices=tuple(world.WORLDS), default=None,
                   help="the toy world of the edits and captions (default: the model's recipe's, else v1)")
    p.add_argument("--dtype", default="auto", choices=list(dict.fromkeys(("auto", *DTYPES))),
                   help="the networks' dtype (auto: bf16 on a CPU with native bf16, else fp32)")
    p.add_argument("--workers", type=int, default=1, help="processes (each one thread)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--md", default=None, help="write the per-kind table here (markdown)")
    args = p.parse_args(argv)
    if args.seed == world.TRAIN_SEED:
        p.error(f"--seed {args.seed} is the training seed; choose a held-out seed")
    if args.n < 1 or args.workers < 1:
        p.error("--n and --workers must be >= 1")
    if not args.guidance >= 1.0:
        p.error(f"--guidance must be >= 1 (1: no guidance), got {args.guidance}")
    try:
        resolve(args.model)  # a missing model: one line here, not a traceback from a worker
    except ValueError as e:
        p.error(f"--model {e}")
    try:
        spec = resolve_world(args.world, args.model)
    except ValueError as e:
        p.error(str(e))
    t0 = time.time()
    w = args.workers
    edit_kw = dict(n=args.n, seed=args.seed, ratio=args.ratio, steps=args.steps, reference=args.reference,
                   guidance=args.guidance)
    jobs = [("edit", {**edit_kw, "indices": range(r, args.n, w), "spec": spec}) for r in range(w)]
    jobs += [("generate", dict(n=args.generation, seed=args.seed, steps=args.steps,
                               indices=range(r, args.generation, w), spec=spec)) for r in range(w) if args.generation]
    jobs.append(("vae", {"seed": args.seed, "spec": spec}))
    with ProcessPoolExecutor(w, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_work, [args.model] * len(jobs), [args.dtype] * len(jobs), *zip(*jobs)))
    rows = sorted((r for (job, _), res in zip(jobs, results) if job == "edit" for r in res), key=lambda r: r["index"])
    out = evaluation.summarize(rows, **edit_kw, world=spec.name)
    out["vae_psnr"] = results[-1]
    if args.generation:
        gen = [r for (job, _), res in zip(jobs, results) if job == "generate" for r in res]
        out["generation"] = {k: float(np.mean([g[k] for g in gen]))
                             for k in ("background", "objects", "follows", "colour", "shape", "both")}
        out["generation"].update(n=args.generation, steps=args.steps)
    out["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    table = evaluation.table(out)
    print(table, file=sys.stderr)  # stdout stays one JSON document
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
