#!/usr/bin/env python
"""Our SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel on the same random full-size weights.

    python scripts/bench_sd3.py --json docs/results/bench_cpu_sd3.json   # sd3-medium, 32 and 64 latents
    python scripts/bench_sd3.py --dry-run                                 # tiny-sd3, seconds

One forward of a CFG pair (batch 2), ours against diffusers' built on the meta device and loaded (assign=True) with
our state dict through diffusers' own single-file converter: the tensors it passes through are shared, only the
q, k, v it splits and the final modulations it reorders are copies. Same latents, timestep, text tokens (77 CLIP +
256 T5, diffusers' default length) and pooled text for both.

Per dtype (float32, and bfloat16 where the CPU multiplies it natively) and latent side: the FLOPs of the forward
counted on the meta device (on a CPU torch's FlopCounterMode counts 0 for the fused attention kernel), then
--repeats interleaved timed calls after one warm-up each, the median; ms per row = median / 2; the rate against a
2048^3 matmul in the same dtype measured right before and after (the better: the practical peak). The relative
difference of the two outputs checks that they computed the same thing.

Weights: random, made directly in the dtype (matrices N(0, 1/fan_in), vectors N(0, 0.02^2), the RMS-norm weights
1, the position table N(0, 1)); one dtype's models are freed before the next. CPU only.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles and measure.py
import oracles  # noqa: E402
from measure import (count_flops, race_line, race_setup, race_table, random_weights_, shared_fraction,  # noqa: E402
                     timed_race, tune_malloc)
from diffedit.models.configs import MMDIT_PRESETS, MMDiTConfig
from diffedit.models.mmdit import MMDiT
from diffedit.precision import cpu_has_native_bf16

T = 750.0            # the timestep (s x 1000) of every timed forward
TEXT_TOKENS = 333    # CLIP-L/G's 77 tokens, then T5's 256


def random_mmdit(cfg: MMDiTConfig, dtype, seed: int = 0) -> MMDiT:
    """Our MMDiT with random weights made on the CPU in ``dtype`` (meta first: no float32 copy of the whole), its
    position table N(0, 1)."""
    with torch.device("meta"):
        model = MMDiT(cfg).to(dtype)
    return random_weights_(model, torch.Generator().manual_seed(seed), buffer_scale=1.0)


def meta_flops(cfg: MMDiTConfig, side: int, batch: int, tokens: int) -> int:
    """FLOPs of one forward counted on the meta device, where attention decomposes into matmuls."""
    with torch.device("meta"):
        model = MMDiT(cfg)
        args = (torch.empty(batch, cfg.in_channels, side, side), torch.full((batch,), T),
                torch.empty(batch, tokens, cfg.context_dim), torch.empty(batch, cfg.pooled_dim))
        return count_flops(lambda: model(*args))


@torch.no_grad()
def race(ours, theirs, side: int, dtype, args, deadline: float) -> dict:
    """One CFG-pair forward, ours against diffusers', at one latent side: FLOPs, median times, rate, agreement."""
    cfg, gen = ours.cfg, torch.Generator().manual_seed(side)
    x = torch.randn(2, cfg.in_channels, side, side, generator=gen).to(dtype)
    ctx = torch.randn(2, args.tokens, cfg.context_dim, generator=gen).to(dtype)
    y = torch.randn(2, cfg.pooled_dim, generator=gen).to(dtype)
    t = torch.full((2,), T)
    fns = {"ours": lambda: ours(x, t, ctx, y), "diffusers": lambda: theirs(x, ctx, y, t).sample}
    flops = meta_flops(cfg, side, 2, args.tokens)
    return {"batch": 2, "latent": [side, side], "image_px": 8 * side, "text_tokens": args.tokens, "flops": flops,
            **timed_race(fns, flops, dtype, args.matmul_n, args.repeats, deadline, rows=2)}


def run_dtype(cfg: MMDiTConfig, dtype, args, deadline: float) -> dict:
    """Both models on one set of random weights in ``dtype``, every latent side raced; the models freed after."""
    t0 = time.perf_counter()
    ours = random_mmdit(cfg, dtype)
    theirs = oracles.sd3_transformer(ours)
    shared = shared_fraction([*ours.parameters(), *ours.buffers()], [*theirs.parameters(), *theirs.buffers()])
    res = {"setup_s": time.perf_counter() - t0, "params": sum(p.numel() for p in ours.parameters()),
           "pos_embed_numel": ours.pos_embed.numel(), "diffusers_bytes_shared": shared, "sides": {}}
    for side in args.sides:
        r = race(ours, theirs, side, dtype, args, deadline)
        res["sides"][str(side)] = r
        print(race_line(dtype, side, r), flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd3-medium", choices=list(MMDIT_PRESETS))
    p.add_argument("--sides", default="32,64", help="comma list of square latent sides (px / 8)")
    p.add_argument("--dtype", default=None, help="comma list: float32, bfloat16 (default: float32, and bfloat16 "
                                                 "where the CPU has native bf16)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each after the warm-up")
    p.add_argument("--tokens", type=int, default=TEXT_TOKENS, help="text tokens in the context")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop repeating past this many seconds")
    p.add_argument("--dry-run", action="store_true", help="tiny-sd3 at 8 x 8 latents, one repeat, 16 tokens")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset, args.sides, args.repeats, args.tokens = "tiny-sd3", "8", 1, 16
    args.sides = [int(s) for s in args.sides.split(",")]
    dtypes = args.dtype.split(",") if args.dtype else ["float32"] + ["bfloat16"] * cpu_has_native_bf16()
    args.matmul_n = 256 if args.dry_run else 2048
    diffusers = race_setup(args.threads)
    cfg = MMDIT_PRESETS[args.preset]
    start = time.perf_counter()
    out = {"preset": args.preset, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
           "device": "cpu", "device_name": platform.processor() or platform.machine(),
           "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "cpu_allocator": tune_malloc(), "loadavg_start": list(os.getloadavg()),
           "note": "The MMDiT forward of a CFG pair, ours against diffusers' SD3Transformer2DModel on shared tensors. "
                   "CPU timings on a shared machine: compare ratios and the matmul peak of the same run, not "
                   "absolute times.",
           "row_flops_batch1": {str(s): meta_flops(cfg, s, 1, args.tokens) for s in sorted({32, 64, 128, *args.sides})
                                if s <= cfg.patch_size * cfg.pos_embed_max_size},
           "dtypes": {}}
    print("FLOPs per row (batch 1):", {s: f"{f / 1e12:.3f} T" for s, f in out["row_flops_batch1"].items()}, flush=True)
    for name in dtypes:
        out["dtypes"][name] = run_dtype(cfg, getattr(torch, name.strip()), args, start + args.budget_s)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed weights back before the next dtype's
    out["summary"] = race_table(out["dtypes"])
    out["definitions"] = {
        "ms_per_row": "median wall time of one CFG-pair forward (batch 2) / 2",
        "speedup": "t(diffusers) / t(ours), medians, same tensors, same inputs, interleaved",
        "speedup_of_minima": "the same with each one's fastest call (less sensitive to co-tenants' load)",
        "flops": "FLOPs of the CFG-pair forward counted on the meta device (all of attention included)",
        "flops_counted_on_cpu": "the same counted during the real call: FlopCounterMode counts 0 for the CPU's fused "
                                "attention kernel, so this lacks q k^T and the weighting of v",
        "fraction_of_matmul": "flops / median time over a 2048^3 matmul's rate in the same dtype (the better of one "
                              "right before and one right after the race)",
        "relative_difference": "||ours - diffusers|| / ||diffusers|| of the two outputs",
        "diffusers_bytes_shared": "fraction of diffusers' parameter and buffer bytes stored in our tensors"}
    out["total_s"], out["loadavg_end"] = time.perf_counter() - start, list(os.getloadavg())
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text if not args.dry_run else json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
