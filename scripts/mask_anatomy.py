"""Where the difference map D lands on held-out toy-world edits, per edit kind, at several strengths, n and rules.

    python scripts/mask_anatomy.py --model toy --n 40 --seed 12345 --strength 0.5,0.7,0.9 --noises 10,40 \
        [--normalization quantile,clamp] --json out.json

For each edit: the mean rescaled D (Sec. 3.1, the paper's other knobs at their defaults) over three sets of latent
cells, the cells holding a changed pixel, the other cells of the edited object's footprint (source or target object:
empty for colour and background edits) and the cells outside the footprint; the mask's area and the changed area in
cells; the mask's IoU with the changed pixels and with the footprint at pixel resolution (as evaluate_toy). A mask
that is too small while D is high on the changed cells is a threshold matter; D low on part of the changed cells is
the model's estimate, and more noise maps (--noises) tell its noise from its bias; --normalization compares the
rules that remove D's extremes before the threshold (settings.NORMALIZATIONS).
"""
from __future__ import annotations

import argparse
import json

import torch

from diffedit import metrics
from diffedit.pipeline import DiffEdit
from diffedit.settings import NORMALIZATIONS
from diffedit.sweep import group_means, toy_items
from diffedit.sweep.cli import knob_values
from diffedit.toy import resolve_world, world


def anatomy(de: DiffEdit, item, strength: float, n: int, normalization: str) -> dict:
    """D's means over the changed cells, the rest of the footprint and the cells outside it; areas and IoUs."""
    r = de.mask(item.load(), item.target, source=item.source, strength=strength, n=n, normalization=normalization)
    d, cells = r.map.float().numpy(), de.cfg.vae.downsampling
    changed, footprint = item.edit.mask(), item.edit.footprint()
    ch, fp = (metrics.downsample_mask(m, cells, "any") for m in (changed, footprint))
    rest_of_object, outside = fp & ~ch, ~fp
    binary = r.binary.numpy()
    return {"kind": item.edit.kind, "d_changed": float(d[ch].mean()),
            "d_rest_of_object": float(d[rest_of_object].mean()) if rest_of_object.any() else None,
            "d_outside": float(d[outside].mean()) if outside.any() else None,
            "mask_cells": int(r.binary.sum()), "changed_cells": int(ch.sum()),
            "iou": metrics.iou(metrics.resize_mask(binary, changed.shape), changed),
            "iou_footprint": metrics.iou(metrics.resize_mask(binary, footprint.shape), footprint)}


def summarize(rows: list[dict]) -> dict:
    """Means per kind and over all, each over the rows that have the value (None where none has it)."""
    keys = [k for k in rows[0] if k != "kind"]
    kinds = {g["kind"]: g for g in group_means(rows, ("kind",), keys)}
    groups = {**{k: kinds[k] for k in world.EDIT_KINDS if k in kinds}, "all": group_means(rows, (), keys)[0]}
    return {kind: {k: g.get(k) for k in keys} | {"count": g["count"]} for kind, g in groups.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--world", choices=tuple(world.WORLDS), default=None,
                   help="toy world of the edits (default: the one the model's recipe names, else v1)")
    p.add_argument("--n", type=int, default=40, help="number of held-out edits")
    p.add_argument("--seed", type=int, default=world.EVAL_SEED, help=f"scene seed (not {world.TRAIN_SEED})")
    p.add_argument("--strength", default="0.5", help="comma list of noise strengths (paper 0.5)")
    p.add_argument("--noises", default="10", help="comma list of the number of noise maps n (paper 10)")
    p.add_argument("--normalization", default="quantile",
                   help=f"comma list of mask rules ({', '.join(NORMALIZATIONS)}; paper-faithful default quantile)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.seed == world.TRAIN_SEED:
        p.error(f"--seed {args.seed} is the training seed; choose a held-out seed")
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    try:  # each value checked by its knob (settings.py) before the model loads
        strengths = knob_values("--strength", args.strength, "strength")
        noises = knob_values("--noises", args.noises, "n")
        rules = knob_values("--normalization", args.normalization, "normalization")
    except ValueError as e:
        p.error(str(e))
    try:
        spec = resolve_world(args.world, args.model)
        de = DiffEdit.from_pretrained(args.model, dtype="float32")
        items = toy_items(args.n, args.seed, spec.size, spec)
        results = []
        with torch.no_grad():
            for rule in rules:
                for s in strengths:
                    for n in noises:
                        rows = [anatomy(de, item, s, n, rule) for item in items]
                        results.append({"normalization": rule, "strength": s, "n": n, "by_kind": summarize(rows)})
    except ValueError as e:  # a missing model, a world whose objects do not fit: one line
        p.error(str(e))
    out = {"model": args.model, "world": spec.name, "seed": args.seed, "edits": args.n, "results": results}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
