"""Evaluate DiffEdit, SDEdit and Encode-Decode on held-out toy-world edits (see diffedit/toy/evaluate.py).

    python scripts/evaluate_toy.py --n 40 --seed 12345 --json eval.json [--ratio 0.7] [--generation 50]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from diffedit.pipeline import DiffEdit
from diffedit.toy import evaluate, world


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="number of held-out edits")
    p.add_argument("--seed", type=int, default=world.EVAL_SEED, help=f"scene seed (not {world.TRAIN_SEED}, the training seed)")
    p.add_argument("--ratio", type=float, default=0.7, help="encoding ratio r")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reference", choices=("caption", "empty"), default="caption", help="reference text R")
    p.add_argument("--generation", type=int, default=0, help="also measure caption following on this many samples")
    p.add_argument("--model", default="toy")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.seed == world.TRAIN_SEED:
        p.error(f"--seed {args.seed} is the training seed; choose a held-out seed")
    torch.set_grad_enabled(False)
    de = DiffEdit.from_pretrained(args.model)
    t0 = time.time()
    out = evaluate.evaluate(de, n=args.n, seed=args.seed, ratio=args.ratio, steps=args.steps, reference=args.reference)
    out["vae_psnr"] = evaluate.vae_reconstruction_psnr(de, seed=args.seed)
    if args.generation:
        out["generation"] = evaluate.caption_following(de, n=args.generation, seed=args.seed, steps=args.steps)
    out["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
