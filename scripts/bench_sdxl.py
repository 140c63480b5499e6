#!/usr/bin/env python
"""Our SDXL UNet against diffusers' on the same random full-size weights: time per row, FLOPs, rate.

    python scripts/bench_sdxl.py --threads 1 --json docs/results/bench_cpu_sdxl.json   # 32 and 64 latents, bf16, fp32
    python scripts/bench_sdxl.py --preset tiny-sdxl --sides 8 --repeats 1               # dry run, seconds

--dtype defaults to the CPU's native dtypes (precision.native_dtypes): bf16 and fp32 where the CPU has native bf16,
fp32 alone elsewhere (bf16 is emulated there, far slower; ask for it with --dtype, and a warning says so).

There is no diffusers SDXL DiffEdit to race (StableDiffusionDiffEditPipeline is SD1/2 only), so this races the
network that does the work: one UNet forward of a CFG pair (batch 2), ours (``DiffEdit.eps``, channels-last in bf16
on a CPU) against diffusers' UNet2DConditionModel built by ``oracles._networks`` on the SAME tensors (meta +
``load_state_dict(assign=True)``: one copy in memory), fed the same latents, context and pooled text with the
size micro-conditioning of a square image of the latents' size (time_ids = that size, crop 0, that size).

Per dtype and latent side: the FLOPs of the forward, counted on the meta device (on a CPU torch's FlopCounterMode
counts 0 for the fused attention kernel; the count during the warm-up call of each, without it, is kept as a check
that ours and diffusers' do the same work), then --repeats interleaved timed calls, the median; ms per row = median
/ 2; the rate against an n^3 matmul (--matmul-n: 2048, or 256 for a tiny preset) in the same dtype measured right
before and after (the better of the two: the practical peak; a shared host drifts). The relative difference of the
two outputs checks that they computed the same thing. FLOPs of one row (batch 1) at 16, 32, 64 and 128 latents are
counted on meta too. The UNet rows of an edit (paper settings r 0.8, n 10, strength 0.5, CFG 7.5, 50 steps; and the
library defaults, r 0.7) are counted with ModuleCounter on a tiny-sdxl edit: rows do not depend on the image size, so
they are those of a 1024 px edit.

Weights: random, made directly in the dtype (measure.random_model's distribution, no float32 copy); only the UNet
and the VAE (which the converter needs) are materialised, the text towers stay on meta. CPU only.
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
from diffedit.conditioning import Conditioning
from measure import ModuleCounter, count_flops, race_setup, race_table, random_model, timed_race
from measure import race_line, tune_malloc
from diffedit import images  # noqa: E402
from diffedit.models import StableDiffusion, preset, size_conditioning
from diffedit.pipeline import DiffEdit
from diffedit.plan import Input, Request  # noqa: E402
from diffedit.settings import EditSettings  # noqa: E402
from diffedit.precision import native_dtypes, resolve_dtype

EDIT = dict(ratio=0.8, n=10, strength=0.5, steps=50, guidance=7.5, seed=0)  # the benchmark's paper-faithful edit
T = 481  # the timestep of every timed forward


def meta_flops(name: str, side: int, batch: int = 1) -> int:
    """FLOPs of one UNet forward counted on the meta device, where attention decomposes into matmuls (on a CPU,
    torch's FlopCounterMode misses the fused scaled_dot_product_attention kernel: it counts 0 for it)."""
    cfg = preset(name)
    with torch.device("meta"):
        unet = StableDiffusion(cfg).unet
        x, t = torch.empty(batch, cfg.unet.in_channels, side, side), torch.full((batch,), T)
        ctx, y = torch.empty(batch, 77, cfg.unet.context_dim), torch.empty(batch, cfg.unet.adm_in_channels)
        return count_flops(lambda: unet(x, t, ctx, y))


def inputs(de: DiffEdit, side: int, batch: int = 2, seed: int = 0):
    """(x, t, ours' Conditioning, diffusers' keyword arguments) of one forward at a square latent side."""
    cfg, gen = de.cfg, torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.unet.in_channels, side, side, generator=gen).to(de.dtype)
    ctx = torch.randn(batch, 77, cfg.unet.context_dim, generator=gen).to(de.dtype)
    pooled = torch.randn(batch, cfg.text_2.projection_dim, generator=gen).to(de.dtype)
    px = side * cfg.vae.downsampling
    cond = Conditioning(ctx, size_conditioning(pooled, (px, px), (0, 0), (px, px), cfg.size_embed_dim))
    ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32).expand(batch, -1)
    theirs = dict(encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    return x, torch.full((batch,), T), cond, theirs


@torch.no_grad()
def race(de: DiffEdit, unet, side: int, args, deadline: float) -> dict:
    """One CFG-pair forward, ours against diffusers', at one latent side: FLOPs, median times, rate, agreement."""
    x, t, cond, kw = inputs(de, side)
    fns = {"ours": lambda: de.eps(x, t, cond), "diffusers": lambda: unet(x, t, **kw).sample}
    flops = meta_flops(args.preset, side, 2)
    return {"batch": 2, "latent": [side, side], "image_px": side * de.cfg.vae.downsampling, "flops": flops,
            **timed_race(fns, flops, de.dtype, args.matmul_n, args.repeats, deadline, rows=2)}


def run_dtype(dtype, args, deadline: float) -> dict:
    """Both UNets on one set of random weights in ``dtype``, every latent side raced; the model freed after."""
    t0 = time.perf_counter()
    weights = random_model(args.preset, dtype=dtype, parts=("model", "first_stage_model"))
    de = DiffEdit(weights, device="cpu", dtype=dtype)  # channels-last first: the twin shares its layout
    unet = oracles._networks(de.model, dtype)["unet"]
    ours_p = list(de.model.unet.parameters())
    ours = {p.data_ptr() for p in ours_p}
    shared = all(p.data_ptr() in ours for p in unet.parameters())
    conv = de.model.unet.out[2].weight
    res = {"setup_s": time.perf_counter() - t0, "shared_tensors": shared, "unet_params": sum(map(torch.numel, ours_p)),
           "channels_last": conv.is_contiguous(memory_format=torch.channels_last), "sides": {}}
    if not shared:
        raise RuntimeError("diffusers' UNet does not share our tensors: two copies would not fit")
    for side in args.sides:
        r = race(de, unet, side, args, deadline)
        res["sides"][str(side)] = r
        print(race_line(dtype, side, r), flush=True)
    return res


def edit_rows() -> dict:
    """UNet rows and calls of an SDXL edit, counted on a tiny-sdxl model (rows do not depend on the size)."""
    de = DiffEdit(random_model("tiny-sdxl"), device="cpu")
    px = 16  # the smallest image: the rows do not depend on the size
    out = {"counted_on": f"tiny-sdxl, {px} px (the rows of a 1024 px edit: they do not depend on the size)"}
    for name, settings in (("paper", EDIT), ("library_defaults", dict(seed=0))):
        with ModuleCounter(de.model.unet) as c:
            de.edit(oracles.astronaut(px), oracles.TARGET, oracles.SOURCE, **settings)
        request = Request(0, oracles.TARGET, oracles.SOURCE, EditSettings(**settings))
        pixels = images.to_tensor(oracles.astronaut(px), de.multiple, "cpu", de.dtype)
        out[name] = {"settings": settings, **c.get(), "expected_rows": de.engine().plan([Input(pixels)], [request]).cost.rows}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sdxl", help="sdxl (full size) or tiny-sdxl (a dry run)")
    p.add_argument("--sides", default="32,64", help="comma list of square latent sides (px / 8)")
    p.add_argument("--dtype", default=",".join(reversed(native_dtypes("cpu"))),
                   help="comma list: bfloat16, float32 (default: the CPU's native ones)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default: 2048; 256 for a tiny preset)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each after the warm-up")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop repeating past this many seconds")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.sides = [int(s) for s in args.sides.split(",")]
    args.matmul_n = args.matmul_n or (256 if args.preset.startswith("tiny") else 2048)  # a dry run takes seconds
    try:
        dtypes = [resolve_dtype(name.strip(), "cpu") for name in args.dtype.split(",")]
    except ValueError as e:
        p.error(f"--dtype: {e}")
    diffusers = race_setup(args.threads)
    start = time.perf_counter()
    out = {"preset": args.preset, "device": "cpu", "device_name": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "cpu_allocator": tune_malloc(), "loadavg_start": list(os.getloadavg()),
           "note": "diffusers has no SDXL DiffEdit pipeline (StableDiffusionDiffEditPipeline takes SD1/2 only), so "
                   "no edit is raced: the UNet forward is, on shared tensors. CPU timings on a shared machine: "
                   "compare ratios and the matmul peak of the same run, not absolute times.",
           "row_flops_batch1": {str(s): meta_flops(args.preset, s) for s in sorted({16, 32, 64, 128, *args.sides})},
           "dtypes": {}}
    print("FLOPs per row (batch 1):", {s: f"{f / 1e12:.3f} T" for s, f in out["row_flops_batch1"].items()}, flush=True)
    out["edit_rows"] = edit_rows()
    print("edit rows:", {k: v["rows"] for k, v in out["edit_rows"].items() if isinstance(v, dict)}, flush=True)
    for dtype in dtypes:
        out["dtypes"][str(dtype).removeprefix("torch.")] = run_dtype(dtype, args, start + args.budget_s)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed weights back before the next dtype's
    out["summary"] = race_table(out["dtypes"])
    bf16 = out["dtypes"].get("bfloat16", {}).get("sides", {})
    if bf16 and args.preset == "sdxl":  # a 1024 px edit's UNet time at the largest side's rate (an estimate)
        rate = bf16[str(max(args.sides))]["ours"]["tflop_per_s"]
        rows = out["edit_rows"]["paper"]["rows"]
        out["edit_1024_unet_estimate_s"] = {"rows": rows, "tflop_per_row": out["row_flops_batch1"]["128"] / 1e12,
                                            "tflop_per_s": rate,
                                            "seconds": rows * out["row_flops_batch1"]["128"] / 1e12 / rate}
    out["definitions"] = {
        "ms_per_row": "median wall time of one CFG-pair forward (batch 2) / 2",
        "speedup": "t(diffusers UNet) / t(ours), medians, same tensors, same inputs, interleaved",
        "speedup_of_minima": "the same with each one's fastest call (less sensitive to co-tenants' load)",
        "flops": "FLOPs of the CFG-pair forward counted on the meta device (all of attention included)",
        "flops_counted_on_cpu": "the same counted during the real call: FlopCounterMode counts 0 for the CPU's fused "
                                "attention kernel, so this lacks q k^T and the weighting of v (ours = diffusers')",
        "fraction_of_matmul": f"flops / median time over a {args.matmul_n}^3 matmul's rate in the same dtype (the "
                              "better of one right before and one right after the race)",
        "relative_difference": "||ours - diffusers|| / ||diffusers|| of the two outputs",
        "edit_1024_unet_estimate_s": "paper edit's rows x FLOPs of a 128 x 128 row / ours' bf16 rate at the largest "
                                     "side (not measured at 1024 px; see cpu_memory_sdxl.json for a real edit)"}
    out["total_s"], out["loadavg_end"] = time.perf_counter() - start, list(os.getloadavg())
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
