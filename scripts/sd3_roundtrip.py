#!/usr/bin/env python
"""How far the encoding drifts: invert x_0 to the ratio r, decode back with the same text and no guidance, and
measure ||y_0 - x_0|| / ||x_0||, against the number of grid steps. SD3's Euler inversion (``flow.FlowDenoiser``)
on a random tiny MMDiT beside DDIM's (``denoiser.Denoiser``) on a random tiny UNet of the same order of size.

    python scripts/sd3_roundtrip.py --json docs/results/sd3_roundtrip.json
    python scripts/sd3_roundtrip.py --dry-run          # two step counts, seconds

Random weights (every parameter N(0, 1/fan_in), norms about 1): a trained model's velocity field is smoother, so
these numbers show the trend with steps and the two schedules side by side, not the drift of a real model.
Latents: N(0, 1), 16 x 16 (MMDiT: 16 channels, UNet: 4), one text. fp64, so the numbers are the method's error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffedit import ddim
from diffedit.denoiser import Denoiser
from diffedit.edit import decode
from diffedit.flow import FlowDenoiser
from diffedit.conditioning import Conditioning
from diffedit.model_call import eps_model
from diffedit.inversion import encode
from diffedit.models import PRESETS, StableDiffusion, StableDiffusion3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test helpers
from conftest import randomize_  # noqa: E402


@torch.no_grad()
def roundtrip_error(denoiser, x0: torch.Tensor, cond, ratio: float, steps: int, guidance: float = 1.0) -> float:
    """||decode(encode(x_0)) - x_0|| / ||x_0||: encode to ``ratio`` (the denoiser's unguided estimate), decode with
    the same text at ``guidance`` (1: unguided; on FLUX.1-dev the embedded scale), no mask."""
    levels = denoiser.levels(ratio, steps)
    trajectory = encode(denoiser, x0, cond, levels, steps)
    y0 = decode(denoiser, trajectory.latents[-1], levels, cond, cond, guidance)
    return ((y0 - x0).norm() / x0.norm()).item()


def sd3_model(seed: int, gen: torch.Generator | None = None):
    """(denoiser, x_0, cond, parameters) of the random tiny MMDiT in float64; ``gen`` (None: one seeded with
    ``seed``) draws the text and x_0."""
    gen = gen or torch.Generator().manual_seed(seed)
    sd3 = randomize_(StableDiffusion3(PRESETS["tiny-sd3"]).mmdit, seed=seed).double().eval()
    m = sd3.cfg
    cond = Conditioning(torch.randn(1, 7, m.context_dim, generator=gen, dtype=torch.float64),
                        torch.randn(1, m.pooled_dim, generator=gen, dtype=torch.float64))
    flow = FlowDenoiser(lambda x, t, c: sd3(x, t, c.context, c.y), PRESETS["tiny-sd3"].flow_shift)
    x0 = torch.randn(1, m.in_channels, 16, 16, generator=gen, dtype=torch.float64)
    return flow, x0, cond, sum(p.numel() for p in sd3.parameters())


def models(seed: int = 0):
    """(name, denoiser, x_0, cond, parameters) of the random tiny MMDiT and UNet, in float64."""
    gen = torch.Generator().manual_seed(seed)
    flow, x_flow, cond, sd3_params = sd3_model(seed, gen)
    unet = randomize_(StableDiffusion(PRESETS["tiny"]).unet, seed=seed).double().eval()
    u = PRESETS["tiny"].unet
    alpha_bar = ddim.alphas_cumprod(dtype=torch.float64)
    dd = Denoiser(eps_model(unet, "epsilon", alpha_bar), alpha_bar)
    x_ddim = torch.randn(1, u.in_channels, 16, 16, generator=gen, dtype=torch.float64)
    text = torch.randn(1, 7, u.context_dim, generator=gen, dtype=torch.float64)
    return [("sd3 euler (tiny-sd3 MMDiT)", flow, x_flow, cond, sd3_params),
            ("ddim (tiny UNet)", dd, x_ddim, text, sum(p.numel() for p in unet.parameters()))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="10,25,50,100")
    ap.add_argument("--ratios", default="0.7,1.0")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="steps 4,8 and ratio 1: a check that it runs")
    args = ap.parse_args(argv)
    steps = [4, 8] if args.dry_run else [int(s) for s in args.steps.split(",")]
    ratios = [1.0] if args.dry_run else [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(1)
    out = {"what": "relative round-trip error ||y_0 - x_0|| / ||x_0|| of encoding to ratio r then decoding, same "
                   "text, guidance 1; random weights, fp64, 16 x 16 latents",
           "models": {}}
    for name, denoiser, x0, cond, params in models():
        rows = {f"r={r:g}": {str(n): roundtrip_error(denoiser, x0, cond, r, n) for n in steps} for r in ratios}
        out["models"][name] = {"parameters": params, "errors": rows}
        for r, errs in rows.items():
            print(f"{name:28s} {r}: " + "  ".join(f"{n} steps {e:.2e}" for n, e in errs.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
