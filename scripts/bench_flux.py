#!/usr/bin/env python
"""Our FLUX.1 transformer against diffusers' FluxTransformer2DModel on the same random weights: time per row, FLOPs.

    python scripts/bench_flux.py --json docs/results/bench_cpu_flux.json   # flux-dev width, 1 + 2 blocks, 16 and 32
    python scripts/bench_flux.py --preset tiny-flux                        # dry run, seconds

FLUX.1 is a 12B transformer: in float32 it takes 48 GB, beyond a CPU machine of 24 GB, and a forward of it takes
minutes there. So the race runs the real width (hidden 3072, 24 heads of 128, MLP 12288, T5's 4096-wide text) at a
reduced depth (--double / --single blocks, default 1 and 2); every block of a kind is the same computation, so the
full model's time is the measured one scaled by the FLOPs of the full forward over those of the reduced one
(``est_full_ms_per_row``; an estimate, not a measurement). A tiny preset runs at its own depth.

One forward of one row (FLUX.1-dev's guided estimate is one row: the guidance is embedded), ours against diffusers'
built on the meta device and loaded (assign=True) with our state dict through diffusers' own single-file converter
(``tests/oracles/flux.py``): the tensors it passes through are shared, the q, k, v and MLP input it splits out of
the single blocks' linear1 and the final modulation it reorders are copies. Same latents, timestep, embedded guidance
3.5 (dev), text (--tokens T5 states, 512 as FluxPipeline's dev default) and pooled text for both; diffusers' call
includes its 2 x 2 packing and ids, as ours does.

Per dtype (float32, and bfloat16 where the CPU multiplies it natively: precision.native_dtypes) and latent side: the
FLOPs of the forward counted on the meta device (on a CPU torch's FlopCounterMode counts 0 for the fused attention
kernel), then --repeats interleaved timed calls after one warm-up each, the median; the rate against an n^3 matmul in
the same dtype measured right before and after (the better: the practical peak). The relative difference of the two
outputs checks that they computed the same thing. FLOPs of one full-depth row at 64 x 64 and 128 x 128 latents (512
and 1024 px) are counted on meta for dev (512 text tokens) and schnell (256). The model rows of a default edit come
from the engine's plan (``DiffEdit.engine().plan(...).cost``) on tiny models: rows do not depend on width or size.

Weights: random, made directly in the dtype (matrices N(0, 1/fan_in), other vectors N(0, 0.02^2), the RMS-norm
scales 1); one dtype's models are freed before the next. CPU only.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles and measure.py
from measure import (count_flops, race_line, race_setup, race_table, random_weights_, shared_fraction,  # noqa: E402
                     timed_race, tune_malloc)
from oracles.flux import diffusers_velocity, flux_transformer  # noqa: E402
from diffedit import images
from diffedit.models import FluxModel, preset
from diffedit.models.configs import FLUX_PRESETS, FluxConfig
from diffedit.models.flux import Flux
from diffedit.pipeline import DiffEdit
from diffedit.plan import PHASES, Input, Request
from diffedit.precision import native_dtypes, resolve_dtype
from diffedit.settings import EditSettings

T = 750.0        # the timestep (s x 1000) of every timed forward
GUIDANCE = 3.5   # the embedded guidance of every timed forward (dev)


def random_flux(cfg: FluxConfig, dtype, seed: int = 0) -> Flux:
    """Our Flux with random weights made on the CPU in ``dtype`` (meta first: no float32 copy of the whole)."""
    with torch.device("meta"):
        model = Flux(cfg).to(dtype)
    return random_weights_(model, torch.Generator().manual_seed(seed))


def meta_flops(cfg: FluxConfig, side: int, batch: int, tokens: int) -> int:
    """FLOPs of one forward counted on the meta device, where attention decomposes into matmuls."""
    with torch.device("meta"):
        model = Flux(cfg)
        args = (torch.empty(batch, 16, side, side), torch.full((batch,), T),
                torch.empty(batch, tokens, cfg.context_in_dim), torch.empty(batch, cfg.vec_in_dim),
                torch.full((batch,), GUIDANCE) if cfg.guidance_embed else None)
        return count_flops(lambda: model(*args))


@torch.no_grad()
def race(ours, theirs, side: int, dtype, args, deadline: float) -> dict:
    """One forward of --batch rows, ours against diffusers', at one latent side: FLOPs, times, rate, agreement."""
    cfg, gen, b = ours.cfg, torch.Generator().manual_seed(side), args.batch
    x = torch.randn(b, 16, side, side, generator=gen).to(dtype)
    ctx = torch.randn(b, args.tokens, cfg.context_in_dim, generator=gen).to(dtype)
    y = torch.randn(b, cfg.vec_in_dim, generator=gen).to(dtype)
    t, g = torch.full((b,), T), torch.full((b,), GUIDANCE) if cfg.guidance_embed else None
    fns = {"ours": lambda: ours(x, t, ctx, y, g), "diffusers": lambda: diffusers_velocity(theirs, x, t, ctx, y, g)}
    flops = meta_flops(cfg, side, b, args.tokens)
    res = {"batch": b, "latent": [side, side], "image_px": 8 * side, "text_tokens": args.tokens, "flops": flops,
           **timed_race(fns, flops, dtype, args.matmul_n, args.repeats, deadline, rows=b)}
    scale = meta_flops(args.full_cfg, side, b, args.tokens) / flops  # full depth over the depth raced
    for who in ("ours", "diffusers"):
        res[who]["est_full_ms_per_row"] = res[who]["ms_per_row"] * scale
    res["full_over_raced_flops"] = scale
    return res


def run_dtype(cfg: FluxConfig, dtype, args, deadline: float) -> dict:
    """Both transformers on one set of random weights in ``dtype``, every latent side raced; the models freed after."""
    t0 = time.perf_counter()
    ours = random_flux(cfg, dtype)
    theirs = flux_transformer(ours)
    res = {"setup_s": time.perf_counter() - t0, "params": sum(p.numel() for p in ours.parameters()),
           "diffusers_bytes_shared": shared_fraction(list(ours.parameters()), list(theirs.parameters())), "sides": {}}
    for side in args.sides:
        r = race(ours, theirs, side, dtype, args, deadline)
        res["sides"][str(side)] = r
        print(race_line(dtype, side, r), flush=True)
    return res


def edit_rows() -> dict:
    """The model rows of a default edit (no steps or guidance given: the model's own), from the engine's plan on a
    tiny dev-style and schnell-style model (the rows depend on neither the width nor the image size)."""
    out = {"counted_on": "the engine's plan on tiny-flux / tiny-flux-schnell at 16 px (rows do not depend on the "
                         "width or the size: those of a 1024 px FLUX.1 edit)"}
    pixels = images.to_tensor(Image.new("RGB", (16, 16)), 16, "cpu", torch.float32)
    for name, model, true_cfg in (("flux-dev", "tiny-flux", 1.0), ("flux-dev, true CFG 2", "tiny-flux", 2.0),
                                  ("flux-schnell", "tiny-flux-schnell", 1.0)):
        torch.manual_seed(0)
        de = DiffEdit(FluxModel(preset(model)), dtype=torch.float32)
        de.true_cfg_scale = true_cfg
        settings = EditSettings(**de.defaults(steps=None, guidance=None))
        cost = de.engine().plan([Input(pixels)], [Request(0, "a target", "", settings)]).cost
        out[name] = {"settings": {k: getattr(settings, k) for k in ("ratio", "steps", "guidance", "n", "strength")},
                     "true_cfg": true_cfg, "rows": cost.rows, **{k: getattr(cost, k) for k in PHASES}}
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-dev", choices=list(FLUX_PRESETS))
    p.add_argument("--double", type=int, default=1, help="double-stream blocks raced (full width; not for tiny)")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks raced")
    p.add_argument("--sides", default="16,32", help="comma list of square latent sides (px / 8)")
    p.add_argument("--dtype", default=",".join(native_dtypes("cpu")),
                   help="comma list: float32, bfloat16 (default: the CPU's native ones)")
    p.add_argument("--batch", type=int, default=1, help="rows per forward")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each after the warm-up")
    p.add_argument("--tokens", type=int, default=512, help="T5 tokens in the context (FluxPipeline's dev default)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop repeating past this many seconds")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    tiny = args.preset.startswith("tiny")
    if tiny:  # a dry run: the preset's own depth, one repeat, a short text
        args.sides, args.repeats, args.tokens = "8", 1, 16
    args.full_cfg = FLUX_PRESETS[args.preset]
    args.cfg = args.full_cfg if tiny else dataclasses.replace(args.full_cfg, depth=args.double,
                                                              depth_single_blocks=args.single)
    args.sides = [int(s) for s in args.sides.split(",")]
    args.matmul_n = 256 if tiny else 2048
    try:
        args.dtypes = [resolve_dtype(name.strip(), "cpu") for name in args.dtype.split(",")]
    except ValueError as e:
        p.error(f"--dtype: {e}")
    return args


def main(argv=None):
    args = parse(argv)
    diffusers = race_setup(args.threads)
    start = time.perf_counter()
    full = {name: FLUX_PRESETS[name] for name in ("flux-dev", "flux-schnell")}
    out = {"preset": args.preset, "raced_config": dataclasses.asdict(args.cfg), "device": "cpu",
           "device_name": platform.processor() or platform.machine(), "dtypes_native": native_dtypes("cpu"),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "cpu_allocator": tune_malloc(), "loadavg_start": list(os.getloadavg()),
           "note": "The FLUX.1 transformer forward of one row, ours against diffusers' FluxTransformer2DModel on "
                   "shared tensors, at the real width and a reduced depth (est_full_ms_per_row scales by FLOPs). CPU "
                   "timings on a shared machine: compare ratios and the matmul peak of the same run, not absolute "
                   "times.",
           "row_flops_full_depth": {f"{name} ({tok} text tokens)": {
               f"{s}x{s}": meta_flops(cfg, s, 1, tok) for s in (64, 128)}
               for (name, cfg), tok in zip(full.items(), (512, 256))},
           "params_full_depth": {name: _meta_params(cfg) for name, cfg in full.items()},
           "dtypes": {}}
    print("FLOPs per row:", json.dumps(out["row_flops_full_depth"]), flush=True)
    out["edit_rows"] = edit_rows()
    print("edit rows:", {k: v["rows"] for k, v in out["edit_rows"].items() if isinstance(v, dict)}, flush=True)
    for dtype in args.dtypes:
        out["dtypes"][str(dtype).removeprefix("torch.")] = run_dtype(args.cfg, dtype, args, start + args.budget_s)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed weights back before the next dtype's
    out["summary"] = race_table(out["dtypes"], ("ms_per_row", "est_full_ms_per_row", "fraction_of_matmul"))
    out["definitions"] = {
        "ms_per_row": "median wall time of one forward of the raced depth / rows",
        "est_full_ms_per_row": "ms_per_row x FLOPs of the full-depth forward / FLOPs of the raced one (an estimate)",
        "speedup": "t(diffusers) / t(ours), medians, same tensors, same inputs, interleaved",
        "speedup_of_minima": "the same with each one's fastest call (less sensitive to co-tenants' load)",
        "flops": "FLOPs of the raced forward counted on the meta device (all of attention included)",
        "flops_counted_on_cpu": "the same counted during the real call: FlopCounterMode counts 0 for the CPU's fused "
                                "attention kernel, so this lacks q k^T and the weighting of v",
        "fraction_of_matmul": f"flops / median time over a {args.matmul_n}^3 matmul's rate in the same dtype (the "
                              "better of one right before and one right after the race)",
        "relative_difference": "||ours - diffusers|| / ||diffusers|| of the two outputs",
        "diffusers_bytes_shared": "fraction of diffusers' parameter bytes stored in our tensors",
        "edit_rows": "transformer rows of a default edit (n 10, strength 0.5, ratio 0.7, the model's steps and "
                     "guidance) from the engine's plan: mask 2n, inversion round(r x steps), decoding "
                     "round(r x steps) x rows per guided sample (1; 2 with true CFG)"}
    out["total_s"], out["loadavg_end"] = time.perf_counter() - start, list(os.getloadavg())
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps(out["summary"], indent=1))


def _meta_params(cfg: FluxConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Flux(cfg).parameters())


if __name__ == "__main__":
    main()
