#!/usr/bin/env python
"""How far FLUX.1's Euler encoding drifts: invert x_0 to the ratio r, decode back with the same text and no mask, and
measure ||y_0 - x_0|| / ||x_0||, against the number of grid steps; SD3's beside it. Then the choice of the embedded
guidance used while encoding on FLUX.1-dev: decode at the default embedded guidance and encode at g = 1 (the distilled
model's no-guidance point) or at the decoding's g, on selection seeds.

    python scripts/flux_roundtrip.py --json docs/results/flux_roundtrip.json
    python scripts/flux_roundtrip.py --dry-run          # two step counts, one seed, seconds

Models: random tiny-flux (dev-style: guidance embedded, the resolution-dependent shift), tiny-flux-schnell (no
guidance, no shift) and tiny-sd3 (static shift 3), each ``flux_flow.FluxDenoiser`` / ``flow.FlowDenoiser`` as the
pipeline builds it. Random weights (every parameter N(0, 1/fan_in), norms about 1): a trained model's velocity field is
smoother, so the numbers show the trend with steps and the schedules side by side, not the drift of a real model; the
choice of the encoding's guidance by the edit's quality needs real weights. Latents N(0, 1), 16 x 16 x 16, one text;
fp64 (RoPE's angles in fp32, as the model computes them), so the numbers are the method's error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from diffedit.conditioning import Conditioning
from diffedit.flux_flow import FluxDenoiser
from diffedit.models import PRESETS
from diffedit.models.flux import Flux

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test helpers
from conftest import randomize_  # noqa: E402
from sd3_roundtrip import roundtrip_error, sd3_model  # noqa: E402  (this script's folder)

SELECTION_SEEDS = (555, 777)  # the project's selection seeds (never the evaluation's)


def flux_model(name: str, seed: int):
    """(denoiser, x_0, cond, parameters) of a random tiny FLUX.1 model in float64, as the pipeline calls it."""
    cfg, gen = PRESETS[name], torch.Generator().manual_seed(seed)
    net = randomize_(Flux(cfg.flux), seed=seed).double().eval()
    f = cfg.flux
    cond = Conditioning(torch.randn(1, 7, f.context_in_dim, generator=gen, dtype=torch.float64),
                        torch.randn(1, f.vec_in_dim, generator=gen, dtype=torch.float64))
    den = FluxDenoiser(lambda x, tm, c: net(x, tm.t, c.context, c.y, tm.guidance), cfg.flux_schedule, f.guidance_embed)
    x0 = torch.randn(1, f.in_channels // 4, 16, 16, generator=gen, dtype=torch.float64)
    return den, x0, cond, sum(p.numel() for p in net.parameters())


def by_steps(args) -> dict:
    """Round-trip error (unguided both ways) against steps per model and ratio, the seeds' mean."""
    out = {}
    for name, make in (("flux-dev euler (tiny-flux)", lambda s: flux_model("tiny-flux", s)),
                       ("flux-schnell euler (tiny-flux-schnell)", lambda s: flux_model("tiny-flux-schnell", s)),
                       ("sd3 euler (tiny-sd3 MMDiT)", sd3_model)):
        made = [make(s) for s in args.seeds]
        rows = {f"r={r:g}": {str(n): statistics.mean(roundtrip_error(d, x, c, r, n) for d, x, c, _ in made)
                             for n in args.steps} for r in args.ratios}
        out[name] = {"parameters": made[0][3], "errors": rows}
        for r, errs in rows.items():
            print(f"{name:40s} {r}: " + "  ".join(f"{n} steps {e:.2e}" for n, e in errs.items()), flush=True)
    return out


def encoding_guidance(args) -> dict:
    """On tiny-flux (dev-style): decode at the default embedded guidance, encode at g = 1 or at the decoding's g; the
    round-trip error per seed, ratio and steps."""
    g_dec = PRESETS["tiny-flux"].flux_schedule.guidance
    out = {"decoding_guidance": g_dec, "errors": {}}
    for g_enc in (1.0, g_dec):
        rows = {}
        for seed in args.seeds:
            den, x0, cond, _ = flux_model("tiny-flux", seed)
            den = dataclasses.replace(den, unguided=g_enc)
            for r in args.ratios:
                rows.setdefault(f"r={r:g}", {})[str(seed)] = {
                    str(n): roundtrip_error(den, x0, cond, r, n, g_dec) for n in args.steps}
        out["errors"][f"encode g={g_enc:g}"] = rows
        for r, per_seed in rows.items():
            mean = {n: statistics.mean(e[n] for e in per_seed.values()) for n in map(str, args.steps)}
            print(f"encode at g={g_enc:g}, decode at g={g_dec:g} {r}: "
                  + "  ".join(f"{n} steps {e:.2e}" for n, e in mean.items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="1,2,4,10,28,50,100")
    ap.add_argument("--ratios", default="0.7,1.0")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="steps 2,4, ratio 1, one seed: a check that it runs")
    args = ap.parse_args(argv)
    args.steps = [2, 4] if args.dry_run else [int(s) for s in args.steps.split(",")]
    args.ratios = [1.0] if args.dry_run else [float(r) for r in args.ratios.split(",")]
    args.seeds = SELECTION_SEEDS[:1] if args.dry_run else SELECTION_SEEDS
    torch.set_num_threads(1)
    out = {"what": "relative round-trip error ||y_0 - x_0|| / ||x_0|| of encoding to ratio r then decoding with the "
                   "same text, no mask; random weights, fp64, 16 x 16 x 16 latents; the mean over the seeds",
           "seeds": list(args.seeds), "unguided": by_steps(args), "encoding_guidance": encoding_guidance(args)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
