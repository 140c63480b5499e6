#!/usr/bin/env python
"""One UNet forward, eager against torch.compile, timed interleaved in one process, with its share of the matmul peak.

    python scripts/unet_forward.py [--preset sd15] [--latent 16] [--batch 2] [--compile inductor|freezing|none]

Random weights (diffedit.measure.random_model). Eager and compiled calls alternate (measure.interleaved), so a change
in the machine's load hits both; the report gives each one's median, the speedup and the FLOP rate
(measure.count_flops) over the rate of a large square matmul measured in the same run (measure.matmul_rate).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from measure import count_flops, interleaved, matmul_rate, random_model, tune_malloc, unet_inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--latent", type=int, default=16, help="latent side (16: a 128 px image)")
    p.add_argument("--batch", type=int, default=2, help="2: a classifier-free guidance pair")
    p.add_argument("--compile", default="inductor", choices=["inductor", "freezing", "none"])
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    cpu = torch.device("cpu")
    torch.set_flush_denormal(True)
    tune_malloc()
    sd = random_model(args.preset, cpu, torch.float32)
    unet = sd.unet
    x, t, c = unet_inputs(sd.cfg.unet, args.batch, args.latent)
    out = {"preset": args.preset, "latent": args.latent, "batch": args.batch, "threads": torch.get_num_threads()}
    flops = count_flops(lambda: unet(x, t, c))  # also the eager warm-up
    with torch.no_grad():
        variants = {"eager": lambda: unet(x, t, c)}
        if args.compile != "none":
            want = unet(x, t, c)
            compiled = torch.compile(unet, options={"freezing": True} if args.compile == "freezing" else None)
            t0 = time.perf_counter()
            got = compiled(x, t, c)
            out["compile_s"] = round(time.perf_counter() - t0, 1)
            out["compiled_rel_err"] = ((got - want).norm() / want.norm()).item()
            variants[args.compile] = lambda: compiled(x, t, c)
        times = interleaved(variants, cpu, args.repeats, warmup=0)
    peak = matmul_rate(cpu, torch.float32, 2048)
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"median_s": round(med, 4), "times_s": [round(v, 4) for v in ts],
                  "fraction_of_matmul": round(flops / med / peak, 3)}
    if args.compile != "none":
        out["speedup"] = round(out["eager"]["median_s"] / out[args.compile]["median_s"], 3)
    out["matmul_tflop_per_s"] = round(peak / 1e12, 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
