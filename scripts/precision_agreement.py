#!/usr/bin/env python
"""Do bf16 networks change DiffEdit's edits? bf16 against fp32 on the CPU, on the same inputs and seeds.

    python scripts/precision_agreement.py --json docs/results/precision_cpu.json [--n 40] [--seed 4243] [--steps 50]
    python scripts/precision_agreement.py --quick --json /tmp/precision.json      # tiny sizes, seconds

It runs bf16 whatever the CPU: where bf16 is not native it is emulated, far slower, and a warning says so.

(a) The toy model on --n held-out toy edits drawn at --seed. The default seed 4243 is held out: the toy model trains
    at world.TRAIN_SEED (0), and tests/test_precision.py uses 4242. Each edit runs at the toy evaluation's settings
    (r 0.7, the paper's other knobs, reference = source caption, seed S * 1000 + i) in both dtypes. The script reports
    the mask IoU between the two binary masks and the PSNR between the two outputs (measure.edit_agreement). The toy
    harness (evaluation.evaluate) then runs on the same edits in each dtype: DiffEdit's success, its IoU with the
    ground truth, its background PSNR, and the bf16 - fp32 differences.
(b) An SD1.5-size model with random weights (measure.random_model) at 128 px on crops of the astronaut, at the
    benchmark's settings (r 0.8, 10 steps, n 10): mask IoU and PSNR. With random weights, D has no meaning. This
    part only checks that the reduced precision does not move the numbers at full network depth.
Targets, printed as pass / fail: mean mask IoU >= 0.95, PSNR >= 30 dB (pooled: the mean squared error over every
edit, so one edit whose sampling went elsewhere inside the mask shows; the median, the worst and the PSNR outside both
masks are reported next to it), toy success / IoU / bg PSNR within 0.03 / 0.03 / 0.5 dB of fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles and measure.py
import oracles  # noqa: E402
from diffedit import evaluation
from measure import edit_agreement, random_model
from diffedit.pipeline import DiffEdit
from diffedit.toy import world

TARGETS = {"mask_iou": 0.95, "psnr_db": 30.0}
TOY_TOLERANCE = {"success": 0.03, "iou": 0.03, "bg_psnr": 0.5}
CROPS = [(0, 0, 512, 512), (64, 0, 448, 384), (128, 32, 384, 288)]  # the astronaut: whole, head and shoulders, face


def pairs_of(models: dict, jobs) -> list[tuple]:
    """(fp32 result, bf16 result) per job; ``jobs``: (image, target, source, edit kwargs)."""
    return [tuple(de.edit(image, target, source, **kw) for de in models.values()) for image, target, source, kw in jobs]


def toy_part(args) -> dict:
    models = {d: DiffEdit.from_pretrained("toy", dtype=d) for d in ("float32", "bfloat16")}
    edits = world.edits(args.n, args.seed, size=world.SIZE)
    jobs = [(Image.fromarray(e.source.render()), e.target_caption, e.source_caption, dict(ratio=0.7, steps=args.steps,
                                                                      seed=args.seed * 1000 + i))
            for i, e in enumerate(edits)]
    out = {"n": args.n, "seed": args.seed, "ratio": 0.7, "steps": args.steps,
           "agreement": edit_agreement(pairs_of(models, jobs))}
    metrics = {d: evaluation.evaluate(de, n=args.n, seed=args.seed, ratio=0.7, steps=args.steps,
                                      progress=False)["diffedit"] for d, de in models.items()}
    out["diffedit_metrics"] = metrics
    out["bf16_minus_fp32"] = {k: metrics["bfloat16"][k] - metrics["float32"][k] for k in TOY_TOLERANCE}
    return out


def sd_part(args) -> dict:
    """fp32 edits first, then the same model converted to bf16 in place (one copy of the weights in memory)."""
    torch.set_flush_denormal(True)  # random weights can produce denormals, which are slow on x86
    de = DiffEdit(random_model(args.preset, "cpu", torch.float32))
    kw = dict(ratio=0.8, n=args.maps, strength=0.5, steps=args.sd_steps, guidance=7.5)
    jobs = [(oracles.astronaut(args.size, crop), oracles.TARGET, oracles.SOURCE, dict(kw, seed=i))
            for i, crop in enumerate(CROPS[:args.sd_edits])]
    fp32 = [de.edit(image, target, source, **k) for image, target, source, k in jobs]
    de = DiffEdit(de.model, dtype=torch.bfloat16)
    bf16 = [de.edit(image, target, source, **k) for image, target, source, k in jobs]
    return {"preset": args.preset, "size": args.size, **kw, "agreement": edit_agreement(zip(fp32, bf16))}


def verdicts(out: dict) -> dict:
    checks = {}
    for part in ("toy", "sd"):
        for key, floor in TARGETS.items():
            checks[f"{part}_{key} >= {floor}"] = out[part]["agreement"][key] >= floor
    for key, tol in TOY_TOLERANCE.items():
        checks[f"toy |bf16 - fp32| {key} <= {tol}"] = abs(out["toy"]["bf16_minus_fp32"][key]) <= tol
    return checks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--n", type=int, default=40, help="toy edits")
    p.add_argument("--seed", type=int, default=4243, help=f"toy edit seed (held out; never {world.TRAIN_SEED})")
    p.add_argument("--steps", type=int, default=50, help="toy DDIM steps")
    p.add_argument("--quick", action="store_true", help="tiny sizes: 3 toy edits at 4 steps, the tiny preset")
    args = p.parse_args(argv)
    if args.seed == world.TRAIN_SEED:
        raise SystemExit(f"--seed {args.seed} is the toy training seed; choose a held-out one")
    args.preset, args.size, args.sd_steps, args.maps, args.sd_edits = "sd15", 128, 10, 10, 3
    if args.quick:
        args.n, args.steps = 3, 4
        args.preset, args.size, args.sd_steps, args.maps, args.sd_edits = "tiny", 64, 3, 2, 2
    t0 = time.perf_counter()
    out = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick,
           "toy": toy_part(args)}
    out["sd"] = sd_part(args)
    out["targets"] = {**TARGETS, "toy_tolerance": TOY_TOLERANCE}
    out["checks"] = verdicts(out)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    for name, ok in out["checks"].items():  # last, where a reader looks
        print(f"{'pass' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
